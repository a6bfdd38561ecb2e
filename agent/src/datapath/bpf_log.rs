//! Kernel-side debug logging (`--bpf-log`): the programs' aya-log records, read from their ring
//! buffer and written to the agent's own log (target `weir::bpf`), so they go wherever the
//! agent's logs go. The programs only log when the object was loaded with logging on
//! (`loader::load_object`); without `--bpf-log` nothing reads the ring buffer because nothing
//! writes it.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum BpfLogError {
    #[error("the kernel object has no aya-log ring buffer (AYA_LOGS): {0}")]
    Init(#[source] aya_log::Error),
    #[error("watching the aya-log ring buffer: {0}")]
    Watch(#[source] std::io::Error),
}

/// Forwards aya-log records to `tracing` at the record's level (debug and trace records at info:
/// `--bpf-log` is the switch, not `RUST_LOG`).
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let module = record.module_path().unwrap_or("kernel");
        match record.level() {
            log::Level::Error => tracing::error!(target: "weir::bpf", module, "{}", record.args()),
            log::Level::Warn => tracing::warn!(target: "weir::bpf", module, "{}", record.args()),
            _ => tracing::info!(target: "weir::bpf", module, "{}", record.args()),
        }
    }

    fn flush(&self) {}
}

/// Takes the log ring buffer out of `ebpf` (loaded with logging on) and forwards its records
/// until the task is dropped.
pub fn start(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>, BpfLogError> {
    let logger = EbpfLogger::init_with_logger(ebpf, ToTracing).map_err(BpfLogError::Init)?;
    // SAFETY: the logger owns the ring buffer's fd for as long as the AsyncFd owns the logger,
    // and nothing else closes it.
    let mut fd = unsafe { AsyncFd::register(logger) }
        .map_err(|e| BpfLogError::Watch(std::io::Error::from(e)))?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!(error = %e, "reading the kernel's debug log stopped");
                    return;
                }
            };
            // aya-log panics on a record it cannot decode: that ends the debug log, never the
            // agent.
            let logger = guard.get_inner_mut();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
                tracing::error!(
                    "the kernel's debug log had a record aya-log could not decode; it is no longer read"
                );
                return;
            }
            guard.clear_ready();
        }
    }))
}
