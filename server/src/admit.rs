//! Admission, workers and cancellation: a request is admitted into the bounded queue
//! (`--parallel` + `--queue` places, then 503 with `Retry-After`), waits for one of the
//! `--parallel` workers, runs on a blocking thread, ends with 504 at `--timeout`, and is
//! cancelled when its client disconnects or the server shuts down.

use crate::engine::{Engine, EngineError};
use crate::error::ApiError;
use crate::state::{lock, ServerState, Shared};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request's place: counted from admission until its work has really ended (the worker
/// thread holds it, so a timed-out generation still counts until it stops).
struct Ticket<E: Engine> {
    state: Shared<E>,
    id: u64,
    running: bool,
}

impl<E: Engine> Ticket<E> {
    /// Admits a request, or 503 when `--parallel` + `--queue` are taken.
    fn admit(state: &Shared<E>, cancel: &Arc<AtomicBool>) -> Result<Self, ApiError> {
        let c = &state.config;
        let cap = c.parallel.max(1) + c.queue;
        if state.engine.get().is_none() {
            return Err(ApiError::loading());
        }
        if state.admitted.fetch_add(1, Ordering::SeqCst) >= cap {
            state.admitted.fetch_sub(1, Ordering::SeqCst);
            // Roughly when a place frees up: the mean request time per worker.
            let mean = state.metrics.mean("request").unwrap_or(1.0);
            let wait = (mean * c.queue as f64 / c.parallel.max(1) as f64).ceil();
            return Err(ApiError::busy(c.queue, wait.clamp(1.0, 600.0) as u64));
        }
        state.metrics.waiting.fetch_add(1, Ordering::SeqCst);
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&state.in_flight).insert(id, cancel.clone());
        Ok(Ticket {
            state: state.clone(),
            id,
            running: false,
        })
    }

    fn start(&mut self) {
        self.state.metrics.waiting.fetch_sub(1, Ordering::SeqCst);
        self.state.metrics.running.fetch_add(1, Ordering::SeqCst);
        self.running = true;
    }
}

impl<E: Engine> Drop for Ticket<E> {
    fn drop(&mut self) {
        let m = &self.state.metrics;
        if self.running { &m.running } else { &m.waiting }.fetch_sub(1, Ordering::SeqCst);
        self.state.admitted.fetch_sub(1, Ordering::SeqCst);
        lock(&self.state.in_flight).remove(&self.id);
    }
}

/// Sets the cancel flag if the request's future is dropped before its work ended: hyper
/// drops a handler's future when its client disconnects.
struct CancelOnDrop<'a, E: Engine> {
    flag: Arc<AtomicBool>,
    state: &'a ServerState<E>,
    armed: bool,
}

impl<E: Engine> Drop for CancelOnDrop<'_, E> {
    fn drop(&mut self) {
        if self.armed {
            client_gone(self.state, &self.flag);
        }
    }
}

/// Cancels a request whose client has gone (counted once).
pub(crate) fn client_gone<E: Engine>(state: &ServerState<E>, flag: &AtomicBool) {
    if !flag.swap(true, Ordering::Relaxed) {
        log::info!("client gone: cancelling its request");
        state.metrics.cancelled();
    }
}

/// Cancels every request in flight (at shutdown, once the grace period is over); returns
/// how many there were.
pub(crate) fn cancel_all<E>(state: &ServerState<E>) -> usize {
    let flags: Vec<Arc<AtomicBool>> = lock(&state.in_flight).values().cloned().collect();
    flags.iter().for_each(|f| f.store(true, Ordering::Relaxed));
    flags.len()
}

/// Admits `job`, waits for a worker, runs it on a blocking thread and returns its result;
/// 504 and cancelled at `--timeout`.
pub(crate) async fn run<E: Engine, T: Send + 'static>(
    state: &Shared<E>,
    cancel: &Arc<AtomicBool>,
    job: impl FnOnce(&E) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    let t0 = Instant::now();
    let mut ticket = Ticket::admit(state, cancel)?;
    let mut guard = CancelOnDrop {
        flag: cancel.clone(),
        state,
        armed: true,
    };
    let work = async {
        let permit = state
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::shutting_down())?;
        ticket.start();
        state.metrics.stage("queue", t0.elapsed().as_secs_f64());
        let st = state.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let _hold = (permit, ticket);
            job(st.engine.get().expect("admitted only once loaded"))
        });
        let r = handle
            .await
            .map_err(|e| ApiError::internal(format!("the engine failed: {e}")))?;
        r.map_err(ApiError::from)
    };
    let r = match state.config.timeout {
        None => work.await,
        Some(s) => match tokio::time::timeout(Duration::from_secs_f64(s), work).await {
            Ok(r) => r,
            Err(_) => {
                cancel.store(true, Ordering::Relaxed);
                state.metrics.cancelled();
                Err(ApiError::timeout(s))
            }
        },
    };
    guard.armed = false;
    state.metrics.stage("request", t0.elapsed().as_secs_f64());
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Completion, CompletionRequest, LocateRequest, LocateResponse};
    use crate::Config;

    struct Idle;

    impl Engine for Idle {
        fn model_id(&self) -> String {
            "idle".into()
        }
        fn complete(
            &self,
            _: CompletionRequest,
            _: &mut dyn FnMut(&str),
        ) -> Result<Completion, EngineError> {
            unreachable!("tickets only")
        }
        fn locate(&self, _: LocateRequest) -> Result<LocateResponse, EngineError> {
            unreachable!("tickets only")
        }
    }

    fn state(parallel: usize, queue: usize) -> Shared<Idle> {
        let s = ServerState::new(Config {
            parallel,
            queue,
            ..Config::default()
        });
        Arc::new(s)
    }

    fn flag() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    #[test]
    fn nothing_is_admitted_while_loading() {
        let s = state(1, 1);
        let e = Ticket::admit(&s, &flag()).err().expect("refused");
        assert_eq!((e.status.as_u16(), e.code), (503, "model_loading"));
        assert_eq!(s.admitted.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn places_are_parallel_plus_queue_and_freed_by_the_ticket() {
        let s = state(2, 1);
        let _ = s.engine.set(Idle);
        let flags = [flag(), flag(), flag()];
        let mut tickets: Vec<_> = flags
            .iter()
            .map(|f| Ticket::admit(&s, f).expect("a place"))
            .collect();
        tickets[0].start();
        assert_eq!(s.metrics.running.load(Ordering::SeqCst), 1);
        assert_eq!(s.metrics.waiting.load(Ordering::SeqCst), 2);
        assert_eq!(lock(&s.in_flight).len(), 3);

        let e = Ticket::admit(&s, &flag()).err().expect("full");
        assert_eq!((e.status.as_u16(), e.code), (503, "queue_full"));
        assert_eq!(e.retry_after, Some(1));
        assert_eq!(
            s.admitted.load(Ordering::SeqCst),
            3,
            "a refusal takes no place"
        );

        assert_eq!(cancel_all(&s), 3);
        assert!(flags.iter().all(|f| f.load(Ordering::Relaxed)));

        drop(tickets.remove(0));
        assert_eq!(s.metrics.running.load(Ordering::SeqCst), 0);
        assert_eq!(s.metrics.waiting.load(Ordering::SeqCst), 2);
        let again = Ticket::admit(&s, &flag()).expect("a freed place");
        drop((again, tickets));
        assert_eq!(s.admitted.load(Ordering::SeqCst), 0);
        assert_eq!(s.metrics.waiting.load(Ordering::SeqCst), 0);
        assert!(lock(&s.in_flight).is_empty());
    }

    #[test]
    fn a_client_gone_is_counted_once() {
        let s = state(1, 0);
        let f = flag();
        client_gone(&s, &f);
        client_gone(&s, &f);
        assert!(f.load(Ordering::Relaxed));
        assert!(s.metrics.render().contains("pali_cancelled_total 1\n"));
    }
}
