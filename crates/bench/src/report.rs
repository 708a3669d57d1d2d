//! Percentiles, and printing results as a table row or a JSON line.

use serde_json::{json, Value};

/// p50, p99, p99.9 and max of `samples` (any unit).
#[derive(Debug, Clone, Copy)]
pub struct Pct {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn percentiles(samples: &mut [f64]) -> Pct {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i.min(samples.len() - 1)]
    };
    Pct {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: samples.last().copied().unwrap_or(0.0),
    }
}

/// One result: printed as a line of text, or as JSON with `--json`.
pub struct Report {
    pub json: bool,
}

impl Report {
    pub fn emit(&self, scenario: &str, params: Value, figures: Value, human: String) {
        if self.json {
            println!(
                "{}",
                json!({"scenario": scenario, "params": params, "figures": figures})
            );
        } else {
            println!("{human}");
        }
    }
}
