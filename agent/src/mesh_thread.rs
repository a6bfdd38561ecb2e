//! The mesh gateway's own thread: a single-threaded async runtime that runs the whole gateway
//! (the TUN reader, every lane's TLS and HTTP/2 connection, the receivers that write into the
//! TUN, the sessions), so a packet crosses the gateway on one thread.
//!
//! On the agent's multi-threaded runtime a packet passes through several tasks (the TUN reader,
//! the lane's request body, the HTTP/2 connection; on the way in, the connection and the lane's
//! receiver). The runtime runs a task woken by another on the same worker at once (its LIFO
//! slot) only for a few hand-offs in a row; the next one goes to the run queue and wakes another
//! worker thread to steal it, and a worker that woke up to find work wakes another in turn. Each
//! such wake-up is a futex call and a context switch on the packet's path, and the woken thread
//! often preempts the one carrying the packet (`cargo xtask bench mesh`, the README's profile).
//! A single-threaded runtime has no other worker to wake: the tasks of one packet run back to
//! back, and the only wake-ups left are the ones a packet must cause (the TUN or the socket
//! waking this thread).
//!
//! The price is one core for all of the gateway's lanes, where the shared runtime spreads them
//! over the node's cores. On the bench's 2-core machines, where the shared runtime has no core to
//! spread them over, the own thread was ahead in every quiet run (README, the `mesh` bench), so
//! `--mesh-own-thread auto`, the default, takes it on nodes with that few CPUs
//! (`mesh_forward::OWN_THREAD_MAX_CPUS`).

use std::{io, thread, time::Duration};

use tokio::{runtime::Handle, sync::oneshot};

use crate::sched_slice;

/// The thread's name (as `ps -L` and `perf` show it).
pub const THREAD_NAME: &str = "weir-mesh";

/// A running mesh thread; its runtime and every task on it end when this is dropped.
pub struct MeshThread {
    handle: Handle,
    _stop: oneshot::Sender<()>,
}

impl MeshThread {
    /// Starts the thread with its runtime (I/O and timers enabled), asking the scheduler for
    /// `slice` ([`sched_slice`]; zero keeps the kernel's default).
    pub fn start(slice: Duration) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                if let Err(e) = sched_slice::request_for_current_thread(slice) {
                    tracing::debug!(error = %e, "the scheduler slice was not set on the mesh thread");
                }
                // Runs the spawned tasks until the owner is dropped; the runtime is then dropped
                // here, outside any async context, which ends its tasks.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }

    /// Where to spawn the gateway's tasks.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_mesh_thread_and_end_with_it() {
        let mesh = MeshThread::start(Duration::ZERO).expect("the mesh thread starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let on = tx.clone();
        mesh.handle().spawn(async move {
            on.send(thread::current().name().map(str::to_owned))
                .unwrap();
            // Spawned from a task of the mesh runtime: lands on the same thread.
            tokio::spawn(async move {
                on.send(thread::current().name().map(str::to_owned))
                    .unwrap();
            });
        });
        for _ in 0..2 {
            assert_eq!(rx.recv().unwrap().as_deref(), Some(THREAD_NAME));
        }
        // A task that never ends by itself: dropping the mesh thread ends it (its sender drops).
        let (held, ended) = std::sync::mpsc::channel::<()>();
        mesh.handle().spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        drop(tx);
        drop(mesh);
        assert!(
            ended.recv().is_err(),
            "the pending task was dropped with the runtime"
        );
    }
}
