//! pali's HTTP server: OpenAI's `POST /v1/chat/completions` (whole or streamed), `POST
//! /v1/detect` and `/v1/segment` (the CLI's `--json`), `GET /v1/models`, `/health` and
//! `/metrics`, over any [`Engine`]. `pali serve` runs it with a `pali::Model`.
//!
//! Requests are admitted into a bounded queue (`--queue`, then 503 with `Retry-After`), run
//! on at most `--parallel` blocking workers, end at `--timeout`, and are cancelled when
//! their client disconnects. Errors are OpenAI's JSON with the matching status.

#![warn(missing_docs)]

pub mod chat;
pub mod engine;
pub mod error;
pub mod input;
pub mod metrics;

pub use engine::{
    CancelFlag, Completion, CompletionRequest, Engine, EngineError, ErrorKind, LocateRequest,
    Located, Sampling, Stages, Usage,
};
pub use error::ApiError;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

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
            shutdown_grace: Duration::from_secs(10),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// What the handlers share.
struct ServerState<E> {
    engine: OnceLock<E>,
    config: Config,
    metrics: metrics::Metrics,
    workers: Arc<Semaphore>,
    admitted: AtomicUsize,
    next_id: AtomicU64,
    /// Cancel flags of the requests in flight, to cancel them at shutdown.
    in_flight: Mutex<HashMap<u64, CancelFlag>>,
}

type Shared<E> = Arc<ServerState<E>>;

/// Serves on `listener` until `shutdown` resolves, then stops accepting, lets running
/// requests finish for [`Config::shutdown_grace`], cancels the rest and returns. `load`
/// makes the engine on a blocking thread while the server already answers (`/health` is
/// 503 until it is done); if it fails, so does `serve`.
pub async fn serve<E: Engine>(
    listener: tokio::net::TcpListener,
    config: Config,
    load: impl FnOnce() -> Result<E, String> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let state: Shared<E> = Arc::new(ServerState {
        engine: OnceLock::new(),
        workers: Arc::new(Semaphore::new(config.parallel.max(1))),
        metrics: Default::default(),
        admitted: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        in_flight: Mutex::new(HashMap::new()),
        config,
    });
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let engine = load()?;
            log::info!("model {} loaded", engine.model_id());
            let _ = state.engine.set(engine);
            Ok::<(), String>(())
        })
    };
    let stopping = Arc::new(tokio::sync::Notify::new());
    let app = router(state.clone());
    let server = {
        let stopping = stopping.clone();
        accept_loop(listener, app, &state.config, async move {
            shutdown.await;
            log::warn!("shutting down: no new connections; finishing the requests in flight");
            stopping.notify_one();
        })
    };
    let grace = state.config.shutdown_grace;
    let cancel_late = {
        let state = state.clone();
        async move {
            stopping.notified().await;
            tokio::time::sleep(grace).await;
            let flags: Vec<CancelFlag> = lock(&state.in_flight).values().cloned().collect();
            log::warn!("cancelling {} requests still running", flags.len());
            flags.iter().for_each(|f| f.store(true, Ordering::Relaxed));
            // Their connections close once the cancelled generations return.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    let load_failed = async move {
        match loader.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => e,
            Err(e) => format!("loading the model failed: {e}"),
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| e.to_string()),
        e = load_failed => Err(e),
        () = cancel_late => Ok(()),
    }
}

/// Accepts connections until `shutdown` resolves, each served by hyper's HTTP/1.1 with a
/// header timeout, at most `max_connections` at a time; then lets open connections finish
/// their requests (closing idle ones) and returns when all are closed.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused = 0u64;
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // Out of file descriptors and the like: wait instead of spinning.
                Err(e) => {
                    log::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                log::warn!(
                    "{refused} connections refused so far: {} open (--max-connections)",
                    config.max_connections
                );
            }
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let header_timeout = config.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    let _ = slots
        .acquire_many(config.max_connections.max(1) as u32)
        .await;
    Ok(())
}

/// Binds `host:port` (port 0: any free port), tells `on_bound` the address, and serves
/// until SIGINT or SIGTERM, on a runtime of its own ([`serve`]).
pub fn run_until_signal<E: Engine>(
    host: &str,
    port: u16,
    config: Config,
    load: impl FnOnce() -> Result<E, String> + Send + 'static,
    on_bound: impl FnOnce(std::net::SocketAddr),
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the server's runtime: {e}"))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        on_bound(addr);
        serve(listener, config, load, shutdown_signal()).await
    })
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn router<E: Engine>(state: Shared<E>) -> Router {
    let max_body = state.config.max_body;
    Router::new()
        .route("/health", get(health::<E>))
        .route("/v1/health", get(health::<E>))
        .route("/v1/models", get(models::<E>))
        .route("/models", get(models::<E>))
        .route("/metrics", get(metrics_text::<E>))
        .route("/v1/chat/completions", post(chat_completions::<E>))
        .route("/chat/completions", post(chat_completions::<E>))
        .route("/v1/detect", post(locate_handler::<E>))
        .route("/v1/segment", post(locate_handler::<E>))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            authorize::<E>,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count::<E>))
        .with_state(state)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts every response by endpoint and status.
async fn count<E: Engine>(State(s): State<Shared<E>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let r = next.run(req).await;
    s.metrics.request(&path, r.status().as_u16());
    r
}

/// `--api-key`: `Authorization: Bearer KEY`, compared in constant time.
async fn authorize<E: Engine>(State(s): State<Shared<E>>, req: Request, next: Next) -> Response {
    const PUBLIC: &[&str] = &["/health", "/v1/health", "/v1/models", "/models"];
    if let Some(key) = &s.config.api_key {
        if !PUBLIC.contains(&req.uri().path()) {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

async fn health<E: Engine>(State(s): State<Shared<E>>) -> Response {
    match s.engine.get() {
        Some(_) => Json(serde_json::json!({ "status": "ok" })).into_response(),
        None => ApiError::loading().into_response(),
    }
}

async fn models<E: Engine>(State(s): State<Shared<E>>) -> Response {
    let Some(e) = s.engine.get() else {
        return ApiError::loading().into_response();
    };
    Json(serde_json::json!({ "object": "list", "data": [{
        "id": e.model_id(), "object": "model", "created": unix_now(), "owned_by": "pali",
    }]}))
    .into_response()
}

async fn metrics_text<E: Engine>(State(s): State<Shared<E>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body, or 413 / 400 naming what is wrong with it.
fn body_or_error(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(format!("unreadable request body: {e}"))
        }
    })
}

// ---------------------------------------------------------------------------
// Admission, workers, cancellation

/// A request's place: counted from admission until its work has really ended (the worker
/// thread holds it, so a timed-out generation still counts until it stops).
struct Ticket<E: Engine> {
    state: Shared<E>,
    id: u64,
    running: bool,
}

impl<E: Engine> Ticket<E> {
    /// Admits a request, or 503 when `--parallel` + `--queue` are taken.
    fn admit(state: &Shared<E>, cancel: &CancelFlag) -> Result<Self, ApiError> {
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
    flag: CancelFlag,
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
fn client_gone<E: Engine>(state: &ServerState<E>, flag: &CancelFlag) {
    if !flag.swap(true, Ordering::Relaxed) {
        log::info!("client gone: cancelling its request");
        state.metrics.cancelled();
    }
}

/// Admits `job`, waits for a worker, runs it on a blocking thread and returns its result;
/// 504 and cancelled at `--timeout`.
async fn run<E: Engine, T: Send + 'static>(
    state: &Shared<E>,
    cancel: &CancelFlag,
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

fn record<E: Engine>(state: &ServerState<E>, usage: Usage, stages: &Stages) {
    state.metrics.tokens(usage);
    for &(name, ms) in stages {
        state.metrics.stage(name, ms / 1e3);
    }
}

// ---------------------------------------------------------------------------
// Chat completions

async fn chat_completions<E: Engine>(
    State(state): State<Shared<E>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_response(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_response<E: Engine>(
    state: Shared<E>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_or_error(body, state.config.max_body)?;
    let job = chat::parse(&body, state.config.allow_files.as_deref())?;
    let engine = state.engine.get().ok_or_else(ApiError::loading)?;
    let rid = chat::ResponseId {
        id: format!(
            "chatcmpl-{:x}{:08x}",
            unix_now(),
            state.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_now(),
        model: engine.model_id(),
    };
    let cancel: CancelFlag = Arc::new(AtomicBool::new(false));
    let req = CompletionRequest {
        image: job.image,
        prompt: job.prompt,
        sampling: job.sampling,
        cancel: cancel.clone(),
    };
    if job.stream {
        return stream_chat(state, rid, req, job.include_usage).await;
    }
    let c = run(&state, &cancel, move |e| e.complete(req, &mut |_| {})).await?;
    record(&state, c.usage, &c.stages);
    Ok(Json(chat::completion_json(&rid, &c)).into_response())
}

/// What the generating worker tells the stream.
enum Progress {
    Piece(String),
    Done(Result<Completion, ApiError>),
}

/// `stream: true`. The response starts once the first piece of text exists, so an error
/// before it (a bad image, a prompt too long) still gets its HTTP status; later errors
/// arrive as an `{"error": …}` event.
async fn stream_chat<E: Engine>(
    state: Shared<E>,
    rid: chat::ResponseId,
    req: CompletionRequest,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let cancel = req.cancel.clone();
    let (ptx, mut prx) = mpsc::unbounded_channel::<Progress>();
    {
        let (state, cancel) = (state.clone(), cancel.clone());
        tokio::spawn(async move {
            let pieces = ptx.clone();
            let (st, flag) = (state.clone(), cancel.clone());
            let r = run(&state, &cancel, move |e| {
                e.complete(req, &mut |p| {
                    // Nobody listens: the handler was dropped before the stream began.
                    if pieces.send(Progress::Piece(p.to_string())).is_err() {
                        client_gone(&st, &flag);
                    }
                })
            })
            .await;
            if let Ok(c) = &r {
                record(&state, c.usage, &c.stages);
            }
            let _ = ptx.send(Progress::Done(r));
        });
    }
    let first = match prx.recv().await {
        Some(Progress::Done(Err(e))) => return Err(e),
        Some(p) => p,
        None => return Err(ApiError::internal("the generation ended without a result")),
    };
    let (etx, erx) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let send = |v: serde_json::Value| etx.send(Ok(Event::default().data(v.to_string())));
        let role = serde_json::json!({ "role": "assistant", "content": "" });
        let mut next = Some(first);
        let mut gone = send(chat::chunk_json(&rid, role, None)).is_err();
        while let Some(p) = next.take() {
            gone |= match p {
                Progress::Piece(t) => {
                    let delta = serde_json::json!({ "content": t });
                    send(chat::chunk_json(&rid, delta, None)).is_err()
                }
                Progress::Done(Ok(c)) => {
                    let last = chat::chunk_json(&rid, serde_json::json!({}), Some(c.finish_reason));
                    let mut fail = send(last).is_err();
                    if include_usage {
                        fail |= send(chat::usage_chunk_json(&rid, c.usage)).is_err();
                    }
                    fail |= etx.send(Ok(Event::default().data("[DONE]"))).is_err();
                    fail
                }
                Progress::Done(Err(e)) => send(e.body()).is_err(),
            };
            if gone {
                client_gone(&state, &cancel);
            }
            // The body is dropped once a write fails: then cancel at once, not at the next
            // piece (a long prefill, or tokens that add no text, write nothing).
            next = tokio::select! {
                p = prx.recv() => p,
                () = etx.closed(), if !gone => {
                    gone = true;
                    client_gone(&state, &cancel);
                    prx.recv().await
                }
            };
        }
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(erx);
    // Keep-alive comments make a silent stream write, so a closed connection is noticed.
    let keep_alive = axum::response::sse::KeepAlive::new().interval(Duration::from_millis(500));
    Ok(Sse::new(stream).keep_alive(keep_alive).into_response())
}

// ---------------------------------------------------------------------------
// Detect and segment

/// `/v1/detect` and `/v1/segment`.
async fn locate_handler<E: Engine>(
    State(state): State<Shared<E>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    locate(state, headers, body, uri.path() == "/v1/segment").await
}

async fn locate<E: Engine>(
    state: Shared<E>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    segment: bool,
) -> Response {
    let r = async {
        let body = body_or_error(body, state.config.max_body)?;
        let ctype = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (image, objects, sampling) = if ctype.starts_with("multipart/form-data") {
            locate_form(ctype, body).await?
        } else {
            locate_json(&body, state.config.allow_files.as_deref())?
        };
        let cancel: CancelFlag = Arc::new(AtomicBool::new(false));
        let req = LocateRequest {
            image,
            objects,
            segment,
            sampling,
            cancel: cancel.clone(),
        };
        let found = run(&state, &cancel, move |e| e.locate(req)).await?;
        record(&state, found.usage, &found.stages);
        Ok::<_, ApiError>(Json(found.json).into_response())
    };
    r.await.unwrap_or_else(|e| e.into_response())
}

/// `{"image": "<base64 or data URL>" | "image_url": "...", "objects": [..] | "a ; b",
/// "max_tokens": N}`.
fn locate_json(
    body: &[u8],
    allow_files: Option<&std::path::Path>,
) -> Result<(Vec<u8>, Vec<String>, Sampling), ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        image: Option<String>,
        image_url: Option<String>,
        objects: Option<Objects>,
        max_tokens: Option<i64>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Objects {
        One(String),
        Many(Vec<String>),
    }
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("malformed request: {e}")))?;
    let image =
        match (&b.image, &b.image_url) {
            (Some(i), None) => input::image_from_inline(i, "image")?,
            (None, Some(u)) => input::image_from_url(u, allow_files, "image_url")?,
            (None, None) => return Err(ApiError::invalid(
                "no image: send \"image\" (base64 or a data URL) or a multipart upload named image",
            )),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "both image and image_url: send one image",
                ))
            }
        };
    let objects = match b.objects {
        None => Vec::new(),
        Some(Objects::One(s)) => vec![s],
        Some(Objects::Many(v)) => v,
    };
    Ok((image, objects, max_tokens_only(b.max_tokens)?))
}

/// A multipart upload: one file part `image`, text parts `objects` (repeatable, or `a ; b`)
/// and optionally `max_tokens`.
async fn locate_form(
    ctype: &str,
    body: Bytes,
) -> Result<(Vec<u8>, Vec<String>, Sampling), ApiError> {
    let mut form = input::parse_multipart(ctype, body).await?;
    let image = match form.files.len() {
        0 => return Err(ApiError::invalid("no image: add a file part named image")),
        1 => form.files.remove(0).1,
        n => {
            return Err(ApiError::invalid(format!(
                "{n} files uploaded: send one image per request"
            )))
        }
    };
    let objects = form
        .values("objects")
        .into_iter()
        .map(String::from)
        .collect();
    let max_tokens = match form.values("max_tokens").first() {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::invalid(format!("max_tokens = {v:?}: not a number")))?,
        ),
    };
    Ok((image, objects, max_tokens_only(max_tokens)?))
}

fn max_tokens_only(m: Option<i64>) -> Result<Sampling, ApiError> {
    match m {
        Some(m) if m < 1 => Err(ApiError::invalid(format!(
            "max_tokens = {m}: must be at least 1"
        ))),
        m => Ok(Sampling {
            max_tokens: m.map(|m| m as usize),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_by_content() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
