//! CPU time of processes, for measurements: on 2 cores it bounds what concurrent calls achieve.

use std::time::Duration;

/// User and system CPU time.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    /// The CPU time of this process's waited-for children (e.g. the plugin processes a test ran).
    pub fn children() -> Self {
        // SAFETY: getrusage only writes the struct it is given.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
            u
        };
        let time = |t: libc::timeval| {
            Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64)
        };
        Self {
            user: time(u.ru_utime),
            system: time(u.ru_stime),
        }
    }

    /// The CPU time of a running process so far, from /proc (in clock ticks); zero if it is gone.
    pub fn of_process(pid: u32) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let time = |ticks: u64| Duration::from_micros(ticks * 1_000_000 / hz);
        // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the command.
        Self {
            user: time(ticks(11)),
            system: time(ticks(12)),
        }
    }

    /// What was used since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    pub fn total(self) -> Duration {
        self.user + self.system
    }
}
