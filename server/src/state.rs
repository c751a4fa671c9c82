//! What the handlers share: the engine once loaded, the settings, the counters and the
//! bookkeeping of admission ([`crate::admit`]).

use crate::config::Config;
use crate::engine::{Adapter, RequestOptions, Stages, Usage};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Semaphore;

/// What the handlers share.
pub(crate) struct ServerState<E> {
    /// Set once `load` has made the engine; until then requests get 503.
    pub(crate) engine: OnceLock<E>,
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    /// `--parallel` permits: a request runs on a worker thread while it holds one.
    pub(crate) workers: Arc<Semaphore>,
    /// Requests admitted whose work has not ended yet (waiting or running).
    pub(crate) admitted: AtomicUsize,
    /// Numbers requests (and chat responses' ids).
    pub(crate) next_id: AtomicU64,
    /// Cancel flags of the requests in flight, to cancel them at shutdown.
    pub(crate) in_flight: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    /// The engine's LoRA adapters with their global scales (`POST /lora-adapters`).
    pub(crate) lora: Mutex<Vec<Adapter>>,
}

/// The state as the handlers hold it.
pub(crate) type Shared<E> = Arc<ServerState<E>>;

impl<E> ServerState<E> {
    /// A server with no engine yet.
    pub(crate) fn new(config: Config) -> Self {
        ServerState {
            engine: OnceLock::new(),
            workers: Arc::new(Semaphore::new(config.parallel.max(1))),
            metrics: Default::default(),
            admitted: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
            lora: Mutex::new(Vec::new()),
            config,
        }
    }

    /// A request without `"lora"` gets the global scales (as llama-server).
    pub(crate) fn fill_lora(&self, options: &mut RequestOptions) {
        if options.lora.is_none() {
            let global = lock(&self.lora);
            if !global.is_empty() {
                options.lora = Some(
                    global
                        .iter()
                        .map(|a| (i64::from(a.id), f64::from(a.scale)))
                        .collect(),
                );
            }
        }
    }

    /// Adds a finished request's tokens and stage times to the metrics.
    pub(crate) fn record(&self, usage: Usage, stages: &Stages) {
        self.metrics.tokens(usage);
        for &(name, ms) in stages {
            self.metrics.stage(name, ms / 1e3);
        }
    }
}

/// Locks `m`, also after a thread panicked holding it (the data stay usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
