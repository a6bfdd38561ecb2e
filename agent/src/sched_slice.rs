//! The CPU slice the agent's threads ask the kernel's scheduler for.
//!
//! A mesh gateway's thread sleeps until a packet wakes it. The kernel places the woken thread on
//! the waker's CPU (a socket's or TUN's wake-up is a "sync" one) and, under EEVDF, does not
//! preempt the task running there while that task is inside its slice: the packet waits until
//! the running task's slice ends, which the scheduler notices only on a timer tick (4 ms at
//! HZ=250). A pod that keeps its CPU busy after sending (a spinning load generator, a busy
//! service), or any other CPU-bound work on the node, therefore delays every packet it sends
//! through the gateway by up to a tick. Since Linux 6.12 a `SCHED_OTHER` thread may ask for a
//! shorter slice (`sched_attr.sched_runtime`); a woken thread with a shorter slice than the
//! running one preempts it (the scheduler's `PREEMPT_SHORT`). The thread's share of the CPU
//! does not change, only how soon it gets the CPU after waking.

use std::{io, time::Duration};

/// `struct sched_attr` of sched_setattr(2) (its first version, 56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// The smallest and largest slice the kernel accepts (it clamps to this range).
pub const MIN_SLICE: Duration = Duration::from_micros(100);
pub const MAX_SLICE: Duration = Duration::from_millis(100);

fn get_attr() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes into the attr we own; tid 0 is the
    // calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &raw mut attr,
            size_of::<SchedAttr>() as libc::c_uint,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Asks for a slice of `slice` (clamped by the kernel to [`MIN_SLICE`]..[`MAX_SLICE`]) for the
/// calling thread, keeping its policy and nice value; `Duration::ZERO` returns it to the
/// kernel's default. Only `SCHED_OTHER` threads are changed (a real-time policy set by the
/// operator is left alone).
pub fn request_for_current_thread(slice: Duration) -> io::Result<()> {
    let mut attr = get_attr()?;
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        return Ok(());
    }
    attr.size = size_of::<SchedAttr>() as u32;
    attr.sched_flags = 0;
    attr.sched_runtime = slice.as_nanos() as u64;
    // SAFETY: sched_setattr reads the attr we own; tid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The slice the calling thread runs with, as the kernel reports it (its default when none was
/// asked for, on kernels that report slices; zero on older ones).
pub fn of_current_thread() -> io::Result<Duration> {
    get_attr().map(|a| Duration::from_nanos(a.sched_runtime))
}

/// Whether the running kernel honours slice requests (6.12 or later).
pub fn kernel_supports_slices() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() {
        if !kernel_supports_slices() {
            eprintln!("this kernel predates slice requests (6.12); nothing to check");
            return;
        }
        // Its own thread: the test harness's threads must keep their scheduling.
        std::thread::spawn(|| {
            // SAFETY: setpriority on the calling thread (who 0).
            assert_eq!(
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) },
                0,
                "renicing the test thread"
            );
            let default = of_current_thread().expect("sched_getattr");
            request_for_current_thread(Duration::from_micros(250)).expect("sched_setattr");
            assert_eq!(of_current_thread().unwrap(), Duration::from_micros(250));
            assert_eq!(get_attr().unwrap().sched_nice, 3, "the nice value is kept");
            // Below the kernel's minimum: clamped, not refused.
            request_for_current_thread(Duration::from_micros(10)).expect("sched_setattr");
            assert_eq!(of_current_thread().unwrap(), MIN_SLICE);
            // Zero: back to the default.
            request_for_current_thread(Duration::ZERO).expect("sched_setattr");
            assert_eq!(of_current_thread().unwrap(), default);
        })
        .join()
        .expect("the test thread");
    }
}
