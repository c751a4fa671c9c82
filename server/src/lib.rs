//! pali's HTTP server: OpenAI's `POST /v1/chat/completions` (whole or streamed), `POST
//! /v1/detect` and `/v1/segment` (the CLI's `--json`), `GET /v1/models`, `/health` and
//! `/metrics`, over any [`Engine`]. `pali serve` runs it with a `pali::Model`.
//!
//! Requests are admitted into a bounded queue (`--queue`, then 503 with `Retry-After`), run
//! on at most `--parallel` blocking workers, end at `--timeout`, and are cancelled when
//! their client disconnects. Errors are OpenAI's JSON with the matching status.
//!
//! The modules, by concern: [`engine`] (what the server asks of the model), [`chat`] and
//! `locate` (the endpoints' wire shapes and handlers), `admit` (queue, workers, timeout,
//! cancellation), `auth` (`--api-key`), `listen` (the accept loop), [`error`], [`input`]
//! and [`metrics`].

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod admit;
mod auth;
pub mod chat;
mod config;
pub mod engine;
pub mod error;
pub mod input;
mod listen;
mod locate;
pub mod lora;
pub mod metrics;
mod state;

pub use config::Config;
pub use engine::{
    Adapter, Completion, CompletionRequest, Engine, EngineError, ErrorKind, LocateRequest,
    LocateResponse, Media, RequestOptions, Stages, Usage, Video,
};
pub use error::ApiError;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use state::{ServerState, Shared};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
    let state: Shared<E> = Arc::new(ServerState::new(config));
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let engine = load()?;
            log::info!("model {} loaded", engine.model_id());
            *state::lock(&state.lora) = engine.adapters();
            let _ = state.engine.set(engine);
            Ok::<(), String>(())
        })
    };
    let stopping = Arc::new(tokio::sync::Notify::new());
    let app = router(state.clone());
    let server = {
        let stopping = stopping.clone();
        listen::accept_loop(listener, app, &state.config, async move {
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
            let n = admit::cancel_all(&state);
            log::warn!("cancelling {n} requests still running");
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
        serve(listener, config, load, listen::shutdown_signal()).await
    })
}

fn router<E: Engine>(state: Shared<E>) -> Router {
    let max_body = state.config.max_body;
    Router::new()
        .route("/health", get(health::<E>))
        .route("/v1/health", get(health::<E>))
        .route("/v1/models", get(models::<E>))
        .route("/models", get(models::<E>))
        .route("/metrics", get(metrics_text::<E>))
        .route("/v1/chat/completions", post(chat::chat_completions::<E>))
        .route("/chat/completions", post(chat::chat_completions::<E>))
        .route("/v1/detect", post(locate::locate_handler::<E>))
        .route("/lora-adapters", get(lora::list::<E>).post(lora::set::<E>))
        .route("/v1/segment", post(locate::locate_handler::<E>))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize::<E>,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count::<E>))
        .with_state(state)
}

/// Counts every response by endpoint and status.
async fn count<E: Engine>(State(s): State<Shared<E>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let r = next.run(req).await;
    s.metrics.request(&path, r.status().as_u16());
    r
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
    let adapters = state::lock(&s.lora).clone();
    Json(serde_json::json!({ "object": "list", "data": [{
        "id": e.model_id(), "object": "model", "created": state::unix_now(), "owned_by": "pali",
        "lora_adapters": adapters,
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
