//! Keeps the CPUs out of idle states deeper than polling while a latency is measured.
//!
//! On a virtual machine with the haltpoll idle driver, a vCPU that halts takes tens of
//! microseconds to wake. Whether a request/response round trip finds the other side's vCPU halted
//! or still polling then decides its latency, so the p50 of a case flips between two modes from
//! one run to the next, independently of the code under test. Holding a PM QoS request of 0 µs
//! on `/dev/cpu_dma_latency` (the interface `tuned`'s latency-performance profile and cyclictest
//! use) keeps every case on the polling side, baseline and Weir alike.
//!
//! A throughput run measures worse with it: a single TCP stream's rounds swung by ±20 % with the
//! idle vCPU polling, and by a few percent without, more than the path's cost either way
//! (probably because a polling vCPU keeps busy a host core that the working vCPU shares). So the
//! hold can be released for such runs and taken again (`traffic`).

use std::{fs::File, io::Write as _};

const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";
/// Set to leave the idle states alone (to measure as a default machine runs).
const KEEP_IDLE_STATES_ENV: &str = "WEIR_BENCH_KEEP_IDLE_STATES";

/// The PM QoS request while it is held; the kernel drops it when the file is closed.
pub struct IdleStates {
    /// False where `WEIR_BENCH_KEEP_IDLE_STATES` is set or the device cannot be opened.
    enabled: bool,
    request: Option<File>,
}

impl IdleStates {
    /// Holds polling from now on, and says so on stdout; or says why it leaves the idle states
    /// alone (`WEIR_BENCH_KEEP_IDLE_STATES` set, or the device missing).
    pub fn hold_polling_from_now() -> Self {
        let mut this = Self {
            enabled: std::env::var_os(KEEP_IDLE_STATES_ENV).is_none(),
            request: None,
        };
        if !this.enabled {
            println!("CPU idle states: left as configured ({KEEP_IDLE_STATES_ENV} is set)");
            return this;
        }
        match open_request() {
            Ok(file) => {
                println!(
                    "CPU idle states: held at polling through {PM_QOS_DEVICE} while latencies \
                     are measured (set {KEEP_IDLE_STATES_ENV}=1 to measure with them)"
                );
                this.request = Some(file);
            }
            Err(e) => {
                println!("CPU idle states: left as configured ({PM_QOS_DEVICE}: {e})");
                this.enabled = false;
            }
        }
        this
    }

    /// Holds polling again (nothing where it is held already or left alone).
    pub fn hold_polling(&mut self) {
        if self.enabled && self.request.is_none() {
            // Opened once already, so a failure now is unexpected; the run goes on unheld.
            self.request = open_request().ok();
        }
    }

    /// Lets the CPUs halt while they wait, as they do by default.
    pub fn release(&mut self) {
        self.request = None;
    }
}

fn open_request() -> std::io::Result<File> {
    let mut file = File::options().write(true).open(PM_QOS_DEVICE)?;
    file.write_all(&0i32.to_ne_bytes())?;
    Ok(file)
}
