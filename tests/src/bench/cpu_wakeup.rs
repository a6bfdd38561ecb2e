//! Keeps the CPUs out of idle states deeper than polling while a benchmark runs.
//!
//! On a virtual machine with the haltpoll idle driver, a vCPU that halts takes tens of
//! microseconds to wake. Whether a request/response round trip finds the other side's vCPU halted
//! or still polling then decides its latency, so the p50 of a case flips between two modes from
//! one run to the next, independently of the code under test. Holding a PM QoS request of 0 µs
//! on `/dev/cpu_dma_latency` (the interface `tuned`'s latency-performance profile and cyclictest
//! use) keeps every case on the polling side, baseline and Weir alike.

use std::{fs::File, io::Write as _};

const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";
/// Set to leave the idle states alone (to measure as a default machine runs).
const KEEP_IDLE_STATES_ENV: &str = "WEIR_BENCH_KEEP_IDLE_STATES";

/// The PM QoS request; the kernel drops it when the file is closed.
pub struct WakeupLatencyHold {
    _request: File,
}

/// Holds the request for as long as the returned value lives, and says so on stdout. Returns
/// `None` (and says why) where the device is missing or `WEIR_BENCH_KEEP_IDLE_STATES` is set.
pub fn hold_polling_idle() -> Option<WakeupLatencyHold> {
    if std::env::var_os(KEEP_IDLE_STATES_ENV).is_some() {
        println!("CPU idle states: left as configured ({KEEP_IDLE_STATES_ENV} is set)");
        return None;
    }
    let request = File::options()
        .write(true)
        .open(PM_QOS_DEVICE)
        .and_then(|mut file| {
            file.write_all(&0i32.to_ne_bytes())?;
            Ok(file)
        });
    match request {
        Ok(file) => {
            println!(
                "CPU idle states: held at polling through {PM_QOS_DEVICE} for every case \
                 (set {KEEP_IDLE_STATES_ENV}=1 to measure with them)"
            );
            Some(WakeupLatencyHold { _request: file })
        }
        Err(e) => {
            println!("CPU idle states: left as configured ({PM_QOS_DEVICE}: {e})");
            None
        }
    }
}
