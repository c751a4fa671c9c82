//! One generation on its own thread: the calling thread waits with the GIL released, wakes
//! to let Python run its signal handlers (Ctrl-C cancels the generation through
//! `GenerateOptions::cancel` and raises `KeyboardInterrupt`), and `stream` receives the
//! text as it is generated. Dropping or closing a [`Stream`] cancels its generation.

use crate::errors;
use crate::input::Input;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pali::{Answer, CancelFlag, GenerateOptions, Task};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a waiting thread lets Python handle signals.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The cancel flags of the generation threads running now, one per thread.
static RUNNING: Mutex<Vec<CancelFlag>> = Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<CancelFlag>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// The number of generation threads still running (tests check that a cancelled stream
/// really stopped).
#[pyfunction]
pub(crate) fn running_generations() -> usize {
    running().len()
}

/// Cancels every running generation and waits (at most `limit`) for their threads to end:
/// at exit, so that no thread is still inside llama.cpp while the process tears it down
/// (a stream dropped by a `KeyboardInterrupt` stops at its next token, on its own).
pub(crate) fn cancel_all(py: Python<'_>, limit: Duration) {
    for flag in running().iter() {
        flag.store(true, Ordering::SeqCst);
    }
    let end = std::time::Instant::now() + limit;
    py.detach(|| {
        while running_generations() > 0 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

/// Registers a generation thread's cancel flag from its start to its end.
struct Running(CancelFlag);

impl Running {
    fn start(flag: &CancelFlag) -> Running {
        running().push(flag.clone());
        Running(flag.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        running().retain(|f| !Arc::ptr_eq(f, &self.0));
    }
}

/// The answer (or the error, or a panic's payload) and the milliseconds the thread spent
/// on it (decoding the input, then `Model::run`), for measuring what Python adds.
type Outcome = (std::thread::Result<pali::Result<Answer>>, f64);

enum Event {
    Piece(String),
    /// Boxed: an answer is large, the pieces before it are many.
    Done(Box<Outcome>),
}

/// A running generation.
pub(crate) struct Job {
    cancel: CancelFlag,
    events: Mutex<Receiver<Event>>,
}

/// What a finished job returns to Python: the answer's JSON (exactly `pali … --json`'s),
/// for `segment` with a mask decoder each object's mask as a numpy bool (H, W) array, and
/// the generation thread's milliseconds (image decoding + `Model::run`; benchmarks).
pub(crate) type PyAnswer = (String, Vec<Option<Py<PyArray2<bool>>>>, f64);

impl Job {
    /// Starts `task` on a new thread: the input is decoded there and run ([`Input::run`]).
    /// With `stream`, every piece of text is sent as it is generated.
    pub(crate) fn start(
        py: Python<'_>,
        model: Arc<pali::Model>,
        input: Input,
        task: Task,
        opts: GenerateOptions,
        stream: bool,
    ) -> PyResult<Job> {
        let cancel = CancelFlag::default();
        let opts = GenerateOptions {
            cancel: Some(cancel.clone()),
            ..opts
        };
        let (tx, rx) = mpsc::channel();
        let running = Running::start(&cancel);
        let work = move || {
            let _running = running;
            let pieces = tx.clone();
            let t0 = std::time::Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                input.run(&model, &task, &opts, &mut |piece| {
                    if stream {
                        let _ = pieces.send(Event::Piece(piece.to_owned()));
                    }
                })
            }));
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let _ = tx.send(Event::Done(Box::new((outcome, ms))));
        };
        std::thread::Builder::new()
            .name("pali-generate".into())
            .spawn(work)
            .map_err(|e| {
                errors::error(
                    py,
                    errors::Kind::Base,
                    format!("cannot start a generation thread: {e}"),
                )
            })?;
        Ok(Job {
            cancel,
            events: Mutex::new(rx),
        })
    }

    /// The next event, waiting with the GIL released; `None` once the thread is gone. A
    /// signal handler's exception (Ctrl-C's `KeyboardInterrupt`) cancels the generation,
    /// waits for the thread to stop and is returned.
    fn next_event(&self, py: Python<'_>) -> PyResult<Option<Event>> {
        loop {
            match py.detach(|| self.receive(Some(SIGNAL_POLL))) {
                Ok(event) => return Ok(Some(event)),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.cancel_and_wait(py);
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }

    fn receive(&self, timeout: Option<Duration>) -> Result<Event, RecvTimeoutError> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            Some(t) => events.recv_timeout(t),
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
        }
    }

    /// Sets the cancel flag and waits (GIL released) until the thread has finished.
    fn cancel_and_wait(&self, py: Python<'_>) {
        self.cancel.store(true, Ordering::SeqCst);
        py.detach(|| while self.receive(None).is_ok() {});
    }
}

/// Waits for a job's answer (no streaming).
pub(crate) fn wait(py: Python<'_>, job: Job) -> PyResult<PyAnswer> {
    loop {
        match job.next_event(py)? {
            Some(Event::Piece(_)) => {}
            Some(Event::Done(outcome)) => return finish(py, *outcome),
            None => return Err(vanished(py)),
        }
    }
}

fn vanished(py: Python<'_>) -> PyErr {
    errors::error(
        py,
        errors::Kind::Base,
        "internal error (a bug in pali): the generation thread ended without an answer",
    )
}

/// A generation's text as it is generated: iterate over it for the pieces; `result` is the
/// answer once the iteration ended. `close()` (from any thread, also while another thread
/// waits for a piece), dropping it or breaking out of a `for` loop over it cancels the
/// generation.
#[pyclass(module = "pali._native", name = "Stream", frozen)]
pub(crate) struct Stream {
    job: Job,
    /// Set by `close()`: the end of the generation is then no error.
    closed: AtomicBool,
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    result: Option<PyAnswer>,
    done: bool,
    cancelled: bool,
}

impl Stream {
    pub(crate) fn new(job: Job) -> Self {
        Stream {
            job,
            closed: AtomicBool::new(false),
            state: Mutex::new(StreamState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the end: cancelled (by `close()` or a signal) or not.
    fn end(&self, cancelled: bool) {
        let mut state = self.state();
        state.done = true;
        state.cancelled |= cancelled;
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        if self.state().done {
            return Ok(None);
        }
        let event = self.job.next_event(py);
        // Closed from another thread: what is left is no longer wanted.
        if event.is_ok() && self.closed.load(Ordering::SeqCst) {
            self.end(true);
            return Ok(None);
        }
        match event {
            Ok(Some(Event::Piece(p))) => Ok(Some(p)),
            Ok(Some(Event::Done(outcome))) => {
                self.end(false);
                let answer = finish(py, *outcome)?;
                self.state().result = Some(answer);
                Ok(None)
            }
            Ok(None) => {
                self.end(false);
                Err(vanished(py))
            }
            Err(e) => {
                self.end(true);
                Err(e)
            }
        }
    }

    /// Cancels the generation if it is still running and waits for it to stop.
    fn close(&self, py: Python<'_>) {
        if !self.state().done {
            self.closed.store(true, Ordering::SeqCst);
            self.job.cancel_and_wait(py);
            self.end(true);
        }
    }

    /// The answer's JSON and masks once the iteration has ended, else None.
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<PyAnswer> {
        self.state().result.as_ref().map(|(json, masks, ms)| {
            let masks = masks.iter().map(|m| m.as_ref().map(|m| m.clone_ref(py)));
            (json.clone(), masks.collect(), *ms)
        })
    }

    /// Whether the generation was cancelled (closed early or interrupted).
    #[getter]
    fn cancelled(&self) -> bool {
        self.state().cancelled
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // No waiting here: the thread stops at its next token and ends on its own.
        self.job.cancel.store(true, Ordering::SeqCst);
    }
}

/// The outcome of a generation as Python values or the Python exception.
fn finish(py: Python<'_>, (outcome, ms): Outcome) -> PyResult<PyAnswer> {
    let answer = match outcome {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(errors::from_pali(py, e)),
        Err(panic) => return Err(errors::from_panic(py, &*panic)),
    };
    let json = pali::tasks::to_json(&answer).to_string();
    if let Answer::Located(found) = &answer {
        if found.masks().iter().any(Option::is_some) {
            crate::image::need_numpy(py, "segment's masks")?;
        }
    }
    let masks = match answer {
        Answer::Text(_) => Vec::new(),
        Answer::Located(found) => found
            .objects
            .into_iter()
            .map(|o| {
                o.segment.and_then(|s| s.mask).map(|m| {
                    let shape = (m.height as usize, m.width as usize);
                    Array2::from_shape_vec(shape, m.data)
                        .expect("a mask has height x width values")
                        .into_pyarray(py)
                        .unbind()
                })
            })
            .collect(),
    };
    Ok((json, masks, ms))
}
