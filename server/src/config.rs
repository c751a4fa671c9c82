//! The server's settings: the `pali serve` flags that are not the model's.

use std::path::PathBuf;
use std::time::Duration;

/// Server settings (the `pali serve` flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// `--api-key`: required as `Authorization: Bearer KEY` on every endpoint but `/health`
    /// and `/v1/models` (as llama-server).
    pub api_key: Option<String>,
    /// `--queue`: requests that may wait for a worker; more get 503.
    pub queue: usize,
    /// `--parallel`: requests that run at once.
    pub parallel: usize,
    /// `--timeout`: seconds a request may take, waiting included (504 after).
    pub timeout: Option<f64>,
    /// `--max-body`: bytes (413 over it).
    pub max_body: usize,
    /// `--allow-files`: the folder (canonical path) whose files `image_url` may name.
    pub allow_files: Option<PathBuf>,
    /// `--max-frames`: most frames a `video_url` clip may give one prompt (its `frames`
    /// field; the engine checks a count from `fps`).
    pub max_frames: usize,
    /// After SIGTERM / Ctrl-C, how long running requests may take before they are
    /// cancelled.
    pub shutdown_grace: Duration,
    /// `--max-connections`: connections served at once; more are closed as they arrive,
    /// so slow or idle clients cannot take every file descriptor.
    pub max_connections: usize,
    /// `--header-timeout`: a client must send a request's headers within this
    /// (slowloris-style clients are dropped; nginx's `client_header_timeout`).
    pub header_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            api_key: None,
            queue: 32,
            parallel: 1,
            timeout: None,
            max_body: 32 << 20,
            allow_files: None,
            max_frames: 16,
            shutdown_grace: Duration::from_secs(10),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}
