//! `POST /v1/chat/completions` in OpenAI's shapes: the request (one user message holding the
//! PaliGemma prompt and one image) and the response, whole or as SSE chunks; then the
//! handler that runs it (through the admission queue) and streams its answer.

use crate::admit::{self, client_gone};
use crate::engine::{Completion, CompletionRequest, Engine, RequestOptions, Usage};
use crate::error::ApiError;
use crate::input::body_or_error;
use crate::state::{unix_now, Shared};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------
// The wire: OpenAI's request and response shapes

#[derive(Deserialize)]
struct ChatRequest {
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Url(String),
    Object { url: String },
}

/// A chat request reduced to what PaliGemma takes.
#[derive(Debug)]
pub struct ChatJob {
    /// The PaliGemma prompt.
    pub prompt: String,
    /// The image file's bytes.
    pub image: Vec<u8>,
    #[allow(missing_docs)]
    pub sampling: RequestOptions,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Parses and checks a chat request body.
pub fn parse(body: &[u8], allow_files: Option<&Path>) -> Result<ChatJob, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("malformed chat request: {e}")))?;
    if let Some(n) = req.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(format!(
            "n = {n}: only one choice per request is supported (send n = 1)"
        )));
    }
    let (prompt, image) = prompt_and_image(&req.messages, allow_files)?;
    // Only what the wire itself cannot carry is refused here; the ranges of the values are
    // the engine's rules (Engine::check_options), shared with its other front ends.
    if let Some(s) = req.seed.filter(|&s| s < 0) {
        return Err(ApiError::invalid(format!(
            "seed = {s}: must not be negative"
        )));
    }
    let stop = req.stop.map(|s| match s {
        Stop::One(s) => vec![s],
        Stop::Many(v) => v,
    });
    Ok(ChatJob {
        prompt,
        image,
        sampling: RequestOptions {
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed.map(|s| s as u64),
            stop,
            ignore_eos: req.ignore_eos,
        },
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The one user message's text (the prompt) and its one image.
fn prompt_and_image(
    messages: &[Message],
    allow_files: Option<&Path>,
) -> Result<(String, Vec<u8>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages is empty: send one user message with the prompt and the image",
        ));
    }
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| m.role != "user") {
        return Err(ApiError::invalid(format!(
            "messages[{i}] has role {:?}: PaliGemma answers one prompt about one image, so send exactly one user message",
            m.role
        )));
    }
    if messages.len() > 1 {
        return Err(ApiError::invalid(format!(
            "{} user messages: PaliGemma answers one prompt about one image, so send exactly one",
            messages.len()
        )));
    }
    let mut text = Vec::new();
    let mut images = Vec::new();
    match &messages[0].content {
        None => {}
        Some(Content::Text(t)) => text.push(t.as_str()),
        Some(Content::Parts(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                match p {
                    Part::Text { text: t } => text.push(t.as_str()),
                    Part::ImageUrl { image_url } => {
                        let url = match image_url {
                            ImageUrl::Url(u) | ImageUrl::Object { url: u } => u,
                        };
                        images.push((j, url));
                    }
                }
            }
        }
    }
    let image = match images.as_slice() {
        [] => {
            return Err(ApiError::invalid(
                "no image: add one image_url content part (data:image/...;base64,...)",
            ))
        }
        [(j, url)] => crate::input::image_from_url(
            url,
            allow_files,
            &format!("messages[0].content[{j}].image_url"),
        )?,
        more => {
            return Err(ApiError::invalid(format!(
                "{} images in messages[0].content: PaliGemma takes one image per request",
                more.len()
            )))
        }
    };
    let prompt = text
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "no text: add a text content part with the PaliGemma prompt, e.g. \"caption en\"",
        ));
    }
    Ok((prompt, image))
}

/// Identifies one response (its id, creation time and model), shared by all its chunks.
#[derive(Debug, Clone)]
pub struct ResponseId {
    /// `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    #[allow(missing_docs)]
    pub model: String,
}

/// OpenAI's `usage`.
pub fn usage_json(u: Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// A whole `chat.completion`.
pub fn completion_json(r: &ResponseId, c: &Completion) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "object": "chat.completion", "created": r.created, "model": r.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": c.text },
            "logprobs": null,
            "finish_reason": c.finish_reason,
        }],
        "usage": usage_json(c.usage),
        "timings": c.timings,
    })
}

/// One `chat.completion.chunk`: a delta, or the last one with its finish reason.
pub fn chunk_json(
    r: &ResponseId,
    delta: serde_json::Value,
    finish_reason: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.model,
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
    })
}

/// The extra chunk `stream_options.include_usage` asks for: no choices, the usage.
pub fn usage_chunk_json(r: &ResponseId, u: Usage) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.model,
        "choices": [], "usage": usage_json(u),
    })
}

// ---------------------------------------------------------------------------
// The handler

/// `POST /v1/chat/completions` (and `/chat/completions`).
pub(crate) async fn chat_completions<E: Engine>(
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
    let job = parse(&body, state.config.allow_files.as_deref())?;
    let engine = state.engine.get().ok_or_else(ApiError::loading)?;
    engine.check_options(&job.sampling)?;
    let rid = ResponseId {
        id: format!(
            "chatcmpl-{:x}{:08x}",
            unix_now(),
            state.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_now(),
        model: engine.model_id(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let req = CompletionRequest {
        image: job.image,
        prompt: job.prompt,
        sampling: job.sampling,
        cancel: cancel.clone(),
    };
    if job.stream {
        return stream_chat(state, rid, req, job.include_usage).await;
    }
    let c = admit::run(&state, &cancel, move |e| e.complete(req, &mut |_| {})).await?;
    state.record(c.usage, &c.stages);
    Ok(Json(completion_json(&rid, &c)).into_response())
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
    rid: ResponseId,
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
            let r = admit::run(&state, &cancel, move |e| {
                e.complete(req, &mut |p| {
                    // Nobody listens: the handler was dropped before the stream began.
                    if pieces.send(Progress::Piece(p.to_string())).is_err() {
                        client_gone(&st, &flag);
                    }
                })
            })
            .await;
            if let Ok(c) = &r {
                state.record(c.usage, &c.stages);
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
        let mut gone = send(chunk_json(&rid, role, None)).is_err();
        while let Some(p) = next.take() {
            gone |= match p {
                Progress::Piece(t) => {
                    let delta = serde_json::json!({ "content": t });
                    send(chunk_json(&rid, delta, None)).is_err()
                }
                Progress::Done(Ok(c)) => {
                    let last = chunk_json(&rid, serde_json::json!({}), Some(c.finish_reason));
                    let mut fail = send(last).is_err();
                    if include_usage {
                        fail |= send(usage_chunk_json(&rid, c.usage)).is_err();
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
    let keep_alive = KeepAlive::new().interval(Duration::from_millis(500));
    Ok(Sse::new(stream).keep_alive(keep_alive).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: &str = "data:image/png;base64,aGVsbG8=";

    fn req(v: serde_json::Value) -> Result<ChatJob, ApiError> {
        parse(v.to_string().as_bytes(), None)
    }

    fn user(parts: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "model": "m", "messages": [{ "role": "user", "content": parts }] })
    }

    #[test]
    fn a_prompt_and_an_image() {
        let j = req(user(serde_json::json!([
            { "type": "text", "text": " caption en " },
            { "type": "image_url", "image_url": { "url": IMG } },
        ])))
        .unwrap();
        assert_eq!(j.prompt, "caption en");
        assert_eq!(j.image, b"hello");
        assert!(!j.stream);
        assert_eq!(j.sampling, RequestOptions::default());
    }

    #[test]
    fn what_is_refused() {
        let img = serde_json::json!({ "type": "image_url", "image_url": { "url": IMG } });
        let text = serde_json::json!({ "type": "text", "text": "caption en" });
        let cases = [
            (serde_json::json!({"messages": "x"}), "malformed"),
            (serde_json::json!({"messages": []}), "messages is empty"),
            (user(serde_json::json!([text])), "no image"),
            (user(serde_json::json!([img, img, text])), "2 images"),
            (user(serde_json::json!([img])), "no text"),
            (user(serde_json::json!("caption en")), "no image"),
            (
                serde_json::json!({"messages": [{"role": "system", "content": "hi"}]}),
                "role \"system\"",
            ),
        ];
        for (body, needle) in cases {
            let e = req(body.clone()).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let ok = user(serde_json::json!([img, text]));
        for (field, value, needle) in [
            ("n", serde_json::json!(2), "n = 2"),
            ("seed", serde_json::json!(-1), "seed = -1"),
            ("top_k", serde_json::json!(1.5), "malformed"),
        ] {
            let mut body = ok.clone();
            body[field] = value;
            let e = req(body).unwrap_err();
            assert!(e.message.contains(needle), "{field}: {}", e.message);
        }
        let mut body = ok.clone();
        body["stop"] = serde_json::json!("square");
        body["max_completion_tokens"] = serde_json::json!(5);
        body["stream"] = serde_json::json!(true);
        body["stream_options"] = serde_json::json!({"include_usage": true});
        let j = req(body).unwrap();
        assert_eq!(j.sampling.stop, Some(vec!["square".to_string()]));
        assert_eq!(j.sampling.max_tokens, Some(5));
        assert!(j.stream && j.include_usage);
        // Ranges are the engine's to check (Engine::check_options): passed on as sent.
        let mut body = ok.clone();
        body["temperature"] = serde_json::json!(-1.0);
        body["max_tokens"] = serde_json::json!(0);
        body["top_k"] = serde_json::json!(-2);
        let j = req(body).unwrap();
        assert_eq!(j.sampling.temperature, Some(-1.0));
        assert_eq!(
            (j.sampling.max_tokens, j.sampling.top_k),
            (Some(0), Some(-2))
        );
    }
}
