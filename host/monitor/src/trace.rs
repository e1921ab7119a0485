//! `--trace-boot`: timestamps of each boot stage, printed as a breakdown.

use std::time::Instant;

/// Boot-stage timestamps relative to the monitor's start.
#[derive(Debug)]
pub struct BootTrace {
    start: Instant,
    marks: Vec<(&'static str, Instant)>,
}

impl BootTrace {
    /// Starts the trace at `start` (the earliest instant the process knows).
    pub fn new(start: Instant) -> BootTrace {
        BootTrace {
            start,
            marks: Vec::with_capacity(12),
        }
    }

    pub fn mark(&mut self, stage: &'static str) {
        self.marks.push((stage, Instant::now()));
    }

    /// Records a stage that ended at `at` (e.g. on another thread); marks
    /// stay in time order.
    pub fn mark_at(&mut self, stage: &'static str, at: Instant) {
        let pos = self
            .marks
            .iter()
            .position(|(_, t)| *t > at)
            .unwrap_or(self.marks.len());
        self.marks.insert(pos, (stage, at));
    }

    /// The breakdown: each stage with its time since start and since the
    /// previous stage, in milliseconds.
    pub fn report(&self) -> String {
        let mut out = String::from("boot trace (ms since monitor start | since previous stage)\n");
        let mut prev = self.start;
        out.push_str(&format!(
            "  {:>8.3} | {:>8.3}  monitor process started\n",
            0.0, 0.0
        ));
        for (stage, t) in &self.marks {
            let since = t.duration_since(self.start).as_secs_f64() * 1e3;
            let step = t.duration_since(prev).as_secs_f64() * 1e3;
            out.push_str(&format!("  {since:>8.3} | {step:>8.3}  {stage}\n"));
            prev = *t;
        }
        out
    }
}
