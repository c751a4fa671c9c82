//! `/metrics` in Prometheus' text format: requests by endpoint and status, queue depth,
//! tokens, and the time spent per stage.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Admitted requests waiting for a worker.
    pub waiting: AtomicUsize,
    /// Requests running on a worker.
    pub running: AtomicUsize,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cancelled: AtomicU64,
    /// (sum of seconds, count) per stage.
    stages: Mutex<BTreeMap<&'static str, (f64, u64)>>,
}

/// Request paths reported by name; anything else is `other`.
const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/detect",
    "/v1/segment",
    "/v1/models",
    "/models",
    "/health",
    "/v1/health",
    "/metrics",
];

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, path: &str, status: u16) {
        let path = ENDPOINTS
            .iter()
            .find(|&&e| e == path)
            .copied()
            .unwrap_or("other");
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((path.to_string(), status))
            .or_default() += 1;
    }

    /// Adds a request's token counts.
    pub fn tokens(&self, usage: crate::Usage) {
        self.prompt_tokens
            .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
    }

    /// Counts a generation ended because its client left or it timed out.
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a stage's time.
    pub fn stage(&self, stage: &'static str, seconds: f64) {
        let mut s = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        let e = s.entry(stage).or_default();
        e.0 += seconds;
        e.1 += 1;
    }

    /// Mean seconds of a stage so far.
    pub fn mean(&self, stage: &'static str) -> Option<f64> {
        let s = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        s.get(stage).filter(|e| e.1 > 0).map(|e| e.0 / e.1 as f64)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP pali_requests_total HTTP requests by endpoint and status."
        );
        let _ = writeln!(o, "# TYPE pali_requests_total counter");
        for ((path, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "pali_requests_total{{endpoint=\"{path}\",status=\"{status}\"}} {n}"
            );
        }
        let gauges = [
            (
                "pali_queue_depth",
                "Admitted requests waiting for a worker.",
                &self.waiting,
            ),
            (
                "pali_requests_running",
                "Requests running on a worker.",
                &self.running,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        let counters = [
            (
                "pali_prompt_tokens_total",
                "Prefix tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "pali_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
            (
                "pali_cancelled_total",
                "Generations ended early: client gone or --timeout.",
                &self.cancelled,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            o,
            "# HELP pali_stage_seconds Time per stage (queue, preprocess, vision, prefill, decode, request).\n# TYPE pali_stage_seconds summary"
        );
        for (stage, (sum, n)) in self.stages.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "pali_stage_seconds_sum{{stage=\"{stage}\"}} {sum}");
            let _ = writeln!(o, "pali_stage_seconds_count{{stage=\"{stage}\"}} {n}");
        }
        o
    }
}
