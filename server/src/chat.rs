//! `POST /v1/chat/completions` in OpenAI's shapes: the request (one user message holding the
//! PaliGemma prompt and its images — several `image_url` parts are one prompt about all of
//! them, in order — or one `video_url` clip, as vLLM accepts) and the response, whole or as
//! SSE chunks; then the handler that runs it (through the admission queue) and streams its
//! answer.

use crate::admit::{self, client_gone};
use crate::engine::{Completion, CompletionRequest, Engine, Media, RequestOptions, Usage, Video};
use crate::error::ApiError;
use crate::input::body_or_error;
use crate::input::{media_from_url, Media as InputMedia};
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
    /// A clip's frames: how many (spread over it).
    frames: Option<i64>,
    /// A clip's frames: how many per second of its time.
    fps: Option<f64>,
    /// llama-server's per-request adapters: `[{"id", "scale"}]`.
    lora: Option<serde_json::Value>,
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
    VideoUrl { video_url: ImageUrl },
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
    /// Its images, or its clip.
    pub media: Media,
    #[allow(missing_docs)]
    pub sampling: RequestOptions,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Frames taken from a clip when the request says neither `frames` nor `fps` (PaliGemma 2's
/// video transfers use 8–16 at 224 px), at most `--max-frames`.
pub const DEFAULT_FRAMES: i64 = 16;

/// Parses and checks a chat request body; a clip's `frames` may be at most `max_frames`.
pub fn parse(
    body: &[u8],
    allow_files: Option<&Path>,
    max_frames: usize,
) -> Result<ChatJob, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("malformed chat request: {e}")))?;
    if let Some(n) = req.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(format!(
            "n = {n}: only one choice per request is supported (send n = 1)"
        )));
    }
    let (prompt, media) = prompt_and_media(&req.messages, allow_files)?;
    let media = match media {
        Found::Images(images) => {
            if req.frames.is_some() || req.fps.is_some() {
                return Err(ApiError::invalid(
                    "frames and fps choose a clip's frames: send the clip as a video_url part",
                ));
            }
            Media::Images(images)
        }
        Found::Video(bytes) => {
            let frames = match (req.frames, req.fps) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::invalid("frames and fps: send one of them"))
                }
                (None, None) => Some(DEFAULT_FRAMES.min(max_frames as i64)),
                (f, _) => f,
            };
            if let Some(k) = frames.filter(|&k| k < 1 || k as u64 > max_frames as u64) {
                return Err(ApiError::invalid(format!(
                    "frames = {k}: must be 1 to {max_frames} (the server's --max-frames {max_frames})"
                )));
            }
            Media::Video(Video {
                bytes,
                frames: frames.map(|k| k as usize),
                fps: req.fps,
            })
        }
    };
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
        media,
        sampling: RequestOptions {
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed.map(|s| s as u64),
            stop,
            ignore_eos: req.ignore_eos,
            lora: req
                .lora
                .map(|v| crate::lora::parse_lora(&v, "lora"))
                .transpose()?,
        },
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// What the one user message holds besides its text.
enum Found {
    Images(Vec<Vec<u8>>),
    Video(Vec<u8>),
}

/// The one user message's text (the prompt) and its images (in order) or its one clip.
fn prompt_and_media(
    messages: &[Message],
    allow_files: Option<&Path>,
) -> Result<(String, Found), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages is empty: send one user message with the prompt and the image",
        ));
    }
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| m.role != "user") {
        return Err(ApiError::invalid(format!(
            "messages[{i}] has role {:?}: PaliGemma answers one prompt (about its images), so send exactly one user message",
            m.role
        )));
    }
    if messages.len() > 1 {
        return Err(ApiError::invalid(format!(
            "{} user messages: PaliGemma answers one prompt (about its images), so send exactly one",
            messages.len()
        )));
    }
    let mut text = Vec::new();
    let (mut images, mut videos) = (Vec::new(), Vec::new());
    match &messages[0].content {
        None => {}
        Some(Content::Text(t)) => text.push(t.as_str()),
        Some(Content::Parts(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                match p {
                    Part::Text { text: t } => text.push(t.as_str()),
                    Part::ImageUrl {
                        image_url: ImageUrl::Url(u) | ImageUrl::Object { url: u },
                    } => images.push((j, u)),
                    Part::VideoUrl {
                        video_url: ImageUrl::Url(u) | ImageUrl::Object { url: u },
                    } => videos.push((j, u)),
                }
            }
        }
    }
    let found = match (images.as_slice(), videos.as_slice()) {
        ([], []) => return Err(ApiError::invalid(
            "no image: add an image_url content part (data:image/...;base64,...) or a video_url",
        )),
        (_, [_, _, ..]) => {
            return Err(ApiError::invalid(format!(
                "{} video_url parts: send one clip per request",
                videos.len()
            )))
        }
        ([_, ..], [_]) => {
            return Err(ApiError::invalid(
                "image_url and video_url parts in one message: send images or one clip",
            ))
        }
        ([], [(j, url)]) => Found::Video(media_from_url(
            url,
            allow_files,
            &format!("messages[0].content[{j}].video_url"),
            InputMedia::Video,
        )?),
        (images, []) => Found::Images(
            images
                .iter()
                .map(|(j, url)| {
                    media_from_url(
                        url,
                        allow_files,
                        &format!("messages[0].content[{j}].image_url"),
                        InputMedia::Image,
                    )
                })
                .collect::<Result<_, _>>()?,
        ),
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
    Ok((prompt, found))
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
    let mut job = parse(
        &body,
        state.config.allow_files.as_deref(),
        state.config.max_frames,
    )?;
    state.fill_lora(&mut job.sampling);
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
        media: job.media,
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
        parse(v.to_string().as_bytes(), None, 16)
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
        assert_eq!(j.media, Media::Images(vec![b"hello".to_vec()]));
        assert!(!j.stream);
        assert_eq!(j.sampling, RequestOptions::default());
    }

    #[test]
    fn several_images_and_a_clip() {
        let img = |u: &str| serde_json::json!({ "type": "image_url", "image_url": { "url": u } });
        let text = serde_json::json!({ "type": "text", "text": "caption en" });
        let other = "data:image/png;base64,d29ybGQ="; // "world"
        let j = req(user(serde_json::json!([img(IMG), text, img(other)]))).unwrap();
        assert_eq!(
            j.media,
            Media::Images(vec![b"hello".to_vec(), b"world".to_vec()])
        );
        let clip = serde_json::json!({ "type": "video_url", "video_url": { "url": "data:video/mp4;base64,aGVsbG8=" } });
        let j = req(user(serde_json::json!([clip, text]))).unwrap();
        let Media::Video(v) = j.media else { panic!() };
        assert_eq!(
            (v.bytes.as_slice(), v.frames, v.fps),
            (&b"hello"[..], Some(16), None)
        );
        let mut body = user(serde_json::json!([clip, text]));
        body["fps"] = serde_json::json!(2.0);
        let Media::Video(v) = req(body).unwrap().media else {
            panic!()
        };
        assert_eq!((v.frames, v.fps), (None, Some(2.0)));
        let non_video = serde_json::json!({ "type": "video_url", "video_url": { "url": "data:text/plain;base64,aGVsbG8=" } });
        for (body, needle) in [
            (
                user(serde_json::json!([clip, clip, text])),
                "2 video_url parts",
            ),
            (
                user(serde_json::json!([img(IMG), clip, text])),
                "images or one clip",
            ),
            (
                user(serde_json::json!([non_video, text])),
                "not a video type",
            ),
            (
                user(serde_json::json!([
                    img(IMG),
                    img("data:image/png;base64,%%%"),
                    text
                ])),
                "content[1].image_url: bad base64",
            ),
        ] {
            let e = req(body.clone()).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        for (field, value, needle) in [
            (
                "frames",
                serde_json::json!(17),
                "frames = 17: must be 1 to 16",
            ),
            ("frames", serde_json::json!(0), "frames = 0"),
        ] {
            let mut body = user(serde_json::json!([clip, text]));
            body[field] = value;
            let e = req(body).unwrap_err();
            assert!(e.message.contains(needle), "{field}: {}", e.message);
        }
        let mut body = user(serde_json::json!([img(IMG), text]));
        body["frames"] = serde_json::json!(4);
        assert!(req(body).unwrap_err().message.contains("video_url"));
    }

    #[test]
    fn what_is_refused() {
        let img = serde_json::json!({ "type": "image_url", "image_url": { "url": IMG } });
        let text = serde_json::json!({ "type": "text", "text": "caption en" });
        let cases = [
            (serde_json::json!({"messages": "x"}), "malformed"),
            (serde_json::json!({"messages": []}), "messages is empty"),
            (user(serde_json::json!([text])), "no image"),
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
