//! Where the machine's CPU time goes during a benchmark: this process and its
//! reaped children (the servers, `audit verify`) versus everything else, so
//! a figure taken on a busy machine says so.

use std::time::{Duration, Instant};

use crate::server::{clock_ticks, cpu_fields_of};

/// CPU seconds at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snap {
    /// Busy seconds of all CPUs together (user, nice, system, irq, softirq).
    pub busy: f64,
    /// Stolen by the hypervisor.
    pub steal: f64,
    /// Every second of every CPU (busy, idle, iowait, steal).
    pub total: f64,
    /// This process and its reaped children.
    pub own: f64,
}

pub fn snap() -> Snap {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse::<f64>().ok())
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0) / clock_ticks();
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    let steal = at(7);
    let total = busy + at(3) + at(4) + steal;
    let f = cpu_fields_of("/proc/self/stat");
    // utime, stime, cutime, cstime
    let own = f.iter().take(4).sum::<f64>();
    Snap {
        busy,
        steal,
        total,
        own,
    }
}

/// Shares of the machine between two snaps, given the CPU seconds of live
/// (unreaped) children measured separately.
#[derive(Debug, Clone, Copy, Default)]
pub struct Use {
    /// Fraction of all CPUs used by other processes.
    pub others: f64,
    pub steal: f64,
}

pub fn between(a: Snap, b: Snap, live_children: f64) -> Use {
    let total = (b.total - a.total).max(1e-9);
    let others = (b.busy - a.busy) - (b.own - a.own) - live_children;
    Use {
        others: (others / total).clamp(0.0, 1.0),
        steal: ((b.steal - a.steal) / total).clamp(0.0, 1.0),
    }
}

/// Waits (at most `max`) until other processes use less than `share` of the
/// machine over one second. Returns their share at the end.
pub fn wait_quiet(share: f64, max: Duration) -> f64 {
    let deadline = Instant::now() + max;
    let mut told = false;
    loop {
        let a = snap();
        std::thread::sleep(Duration::from_secs(1));
        let u = between(a, snap(), 0.0);
        if u.others < share || Instant::now() >= deadline {
            if told {
                eprintln!("   other processes now use {:.0}%", 100.0 * u.others);
            }
            return u.others;
        }
        if !told {
            eprintln!(
                "   other processes use {:.0}% of the CPUs; waiting (at most {} s) for a quieter machine",
                100.0 * u.others,
                max.as_secs()
            );
            told = true;
        }
    }
}
