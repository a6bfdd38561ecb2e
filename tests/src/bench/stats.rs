//! Percentiles and formatting shared by the benchmarks.

use std::time::Duration;

/// Sorted samples with percentile lookups.
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((self.0.len() - 1) as f64 * p / 100.0).round() as usize;
        self.0[idx.min(self.0.len() - 1)]
    }

    pub fn mean(&self) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.iter().sum::<Duration>() / self.0.len() as u32
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Resident memory of this process, from /proc/self/status.
pub fn rss_mib() -> f64 {
    weir_lab::process::rss_mib(std::process::id())
}
