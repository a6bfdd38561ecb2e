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
        // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the command.
        Self {
            user: ticks_to_duration(ticks(11)),
            system: ticks_to_duration(ticks(12)),
        }
    }

    /// The whole machine's busy time so far, all CPUs and all processes, kernel threads and
    /// interrupts included (the first line of /proc/stat, in clock ticks).
    pub fn machine() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal ...
        Self {
            user: ticks_to_duration(field(0) + field(1)),
            system: ticks_to_duration(field(2) + field(5) + field(6)),
        }
    }

    /// What was used since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    pub fn total(self) -> Duration {
        self.user + self.system
    }
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}
