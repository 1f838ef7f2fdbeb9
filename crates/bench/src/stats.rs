//! Percentiles over latency samples, and the figures of one benchmark row.

use std::time::Duration;

/// Latency samples in seconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    sorted: Vec<f64>,
}

impl Samples {
    pub fn from_secs(mut v: Vec<f64>) -> Samples {
        v.sort_by(f64::total_cmp);
        Samples { sorted: v }
    }

    pub fn from_durations(v: &[Duration]) -> Samples {
        Samples::from_secs(v.iter().map(Duration::as_secs_f64).collect())
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Nearest-rank percentile, `p` in 0..=100; 0 when empty.
    pub fn pct(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn p50(&self) -> f64 {
        self.pct(50.0)
    }

    pub fn p99(&self) -> f64 {
        self.pct(99.0)
    }

    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(0.0)
    }

    pub fn mean(&self) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        self.sorted.iter().sum::<f64>() / self.sorted.len() as f64
    }
}

/// Seconds as a short human figure: `850 µs`, `1.93 ms`, `2.41 s`.
pub fn fmt_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Bytes as decimal megabytes, the unit of the targets.
pub fn fmt_mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Whether a figure must stay below or reach its target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// figure <= target
    AtMost(f64),
    /// figure >= target
    AtLeast(f64),
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub figure: String,
    pub value: f64,
    pub target: String,
    pub goal: Option<Goal>,
    /// The figure in terms of the physical baselines of the same run.
    pub note: String,
    /// Share of all CPUs other processes used while it was measured.
    pub others: Option<f64>,
}

impl Row {
    pub fn info(
        what: impl Into<String>,
        figure: impl Into<String>,
        note: impl Into<String>,
    ) -> Row {
        Row {
            what: what.into(),
            figure: figure.into(),
            value: 0.0,
            target: String::new(),
            goal: None,
            note: note.into(),
            others: None,
        }
    }

    pub fn target(
        what: impl Into<String>,
        figure: impl Into<String>,
        value: f64,
        target: impl Into<String>,
        goal: Goal,
        note: impl Into<String>,
    ) -> Row {
        Row {
            what: what.into(),
            figure: figure.into(),
            value,
            target: target.into(),
            goal: Some(goal),
            note: note.into(),
            others: None,
        }
    }

    /// figure / target.
    pub fn ratio(&self) -> Option<f64> {
        match self.goal? {
            Goal::AtMost(t) | Goal::AtLeast(t) if t > 0.0 => Some(self.value / t),
            _ => None,
        }
    }

    pub fn met(&self) -> Option<bool> {
        Some(match self.goal? {
            Goal::AtMost(t) => self.value <= t,
            Goal::AtLeast(t) => self.value >= t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples::from_secs((1..=100).map(f64::from).collect());
        assert_eq!(s.p50(), 50.0);
        assert_eq!(s.p99(), 99.0);
        assert_eq!(s.max(), 100.0);
        assert_eq!(s.pct(0.0), 1.0);
        assert_eq!(Samples::default().p99(), 0.0);
    }

    #[test]
    fn ratios_and_goals() {
        let r = Row::target("x", "2 ms", 0.002, "<= 10 ms", Goal::AtMost(0.010), "");
        assert_eq!(r.met(), Some(true));
        assert!((r.ratio().unwrap_or(0.0) - 0.2).abs() < 1e-9);
        let r = Row::target("y", "900/s", 900.0, ">= 1000/s", Goal::AtLeast(1000.0), "");
        assert_eq!(r.met(), Some(false));
    }
}
