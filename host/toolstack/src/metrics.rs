//! Start-latency histogram and the Prometheus text format.

use std::fmt::Write;

/// Bucket bounds in seconds: from a quarter millisecond (the warm-start
/// goal is half of one) to a cold start on a busy host.
pub const BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

/// Start latencies (request -> guest `main`), by whether a pooled shell
/// served the start.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Per bucket of [`BUCKETS`], not cumulative; then the overflow.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// Writes the histogram as `name` with `labels` (e.g. `kind="warm"`).
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Writes a metric's `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.0003);
        h.observe(0.0003);
        h.observe(7.0);
        let mut s = String::new();
        h.write(&mut s, "x", "kind=\"warm\"");
        assert!(s.contains("x_bucket{kind=\"warm\",le=\"0.00025\"} 0\n"));
        assert!(s.contains("x_bucket{kind=\"warm\",le=\"0.0005\"} 2\n"));
        assert!(s.contains("x_bucket{kind=\"warm\",le=\"0.5\"} 2\n"));
        assert!(s.contains("x_bucket{kind=\"warm\",le=\"+Inf\"} 3\n"));
        assert!(s.contains("x_count{kind=\"warm\"} 3\n"));
        assert_eq!(label("a\"b"), "a\\\"b");
    }
}
