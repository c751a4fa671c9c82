//! What the server asks of the model behind it: one trait, plain request and result structs.
//! `pali serve` implements it with `pali::Model`; the server knows HTTP, not PaliGemma.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The decoding settings a request carries, as sent (the engine checks them:
/// [`Engine::check_options`]); `None` = the server's defaults (its command line).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOptions {
    /// `max_tokens` / `max_completion_tokens`.
    pub max_tokens: Option<i64>,
    /// 0 = greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling (1 = off).
    pub top_p: Option<f32>,
    /// Top-k sampling (0 = off; llama-server's extension).
    pub top_k: Option<i64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop sequences, `None` when the request has none.
    pub stop: Option<Vec<String>>,
    /// Generate exactly `max_tokens`, past the end of text (llama-server's `ignore_eos`).
    pub ignore_eos: bool,
    /// LoRA adapters and scales, `(id, scale)` as sent (the engine checks them): the
    /// request's `"lora"` (adapters it does not list are not applied), or else the server's
    /// global scales (`--lora`, `POST /lora-adapters`); `None` only when the engine has none.
    pub lora: Option<Vec<(i64, f64)>>,
}

/// A LoRA adapter the engine loaded at start (llama-server's `--lora`), with its global scale,
/// as `GET /lora-adapters` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Adapter {
    /// Its id in requests' `"lora": [{"id", "scale"}]`.
    pub id: u32,
    /// The file it was loaded from.
    pub path: String,
    /// The scale requests without `"lora"` get (0: loaded, not applied).
    pub scale: f32,
}

/// What a prompt is about, not yet decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Media {
    /// Image files' bytes (JPEG, PNG, WebP, …): one, or several for one prompt about all of
    /// them in order.
    Images(Vec<Vec<u8>>),
    /// One clip.
    Video(Video),
}

/// A clip: a video file or an animated image, and which of its frames to take.
#[derive(Debug, Clone, PartialEq)]
pub struct Video {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// Frames spread over the clip (already within the server's `--max-frames`).
    pub frames: Option<usize>,
    /// Frames per second of the clip's time (the engine checks the count against
    /// `--max-frames`).
    pub fps: Option<f64>,
}

/// A prompt about one or more images or a clip.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The images or the clip.
    pub media: Media,
    /// The PaliGemma prompt (`caption en`, `detect cat ; dog`, `answer en …`).
    pub prompt: String,
    #[allow(missing_docs)]
    pub sampling: RequestOptions,
    /// Set by the server when the client has gone or the request timed out (or shutdown's
    /// grace period ran out); the engine stops at its next token.
    pub cancel: Arc<AtomicBool>,
}

/// Object names to find (or segment) in one image.
#[derive(Debug, Clone)]
pub struct LocateRequest {
    /// The image file's bytes.
    pub image: Vec<u8>,
    /// Object names (an entry may itself hold `a ; b`).
    pub objects: Vec<String>,
    /// `segment` instead of `detect`.
    pub segment: bool,
    #[allow(missing_docs)]
    pub sampling: RequestOptions,
    /// Set by the server when the client has gone or the request timed out (or shutdown's
    /// grace period ran out); the engine stops at its next token.
    pub cancel: Arc<AtomicBool>,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Prefix tokens: image tokens, `<bos>`, the prompt and the separator.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// Where a request's time went, by stage (`preprocess`, `vision`, `prefill`, `decode`), in
/// milliseconds: exported in `/metrics`.
pub type Stages = Vec<(&'static str, f64)>;

/// A finished text generation.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The answer.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    #[allow(missing_docs)]
    pub usage: Usage,
    #[allow(missing_docs)]
    pub stages: Stages,
    /// The engine's own timing object, passed through as `timings` (as llama-server does).
    pub timings: serde_json::Value,
}

/// A finished detect / segment request.
#[derive(Debug, Clone)]
pub struct LocateResponse {
    /// The response body: exactly what `pali detect --json` / `pali segment --json` prints.
    pub json: serde_json::Value,
    #[allow(missing_docs)]
    pub usage: Usage,
    #[allow(missing_docs)]
    pub stages: Stages,
}

/// What went wrong, as the client should hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong: an unreadable or oversized image, no object names, … (400).
    InvalidRequest,
    /// The prompt and `max_tokens` do not fit the context (400, `context_length_exceeded`).
    ContextLength,
    /// The cancel flag was seen.
    Cancelled,
    /// The engine failed (500).
    Internal,
}

/// An engine error: its kind and a message naming the problem.
#[derive(Debug, Clone)]
pub struct EngineError {
    #[allow(missing_docs)]
    pub kind: ErrorKind,
    #[allow(missing_docs)]
    pub message: String,
}

impl EngineError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError {
            kind,
            message: message.into(),
        }
    }
}

/// The model behind the server. Calls come from blocking worker threads, at most
/// `--parallel` at a time.
pub trait Engine: Send + Sync + 'static {
    /// The model name shown in `/v1/models` and in responses.
    fn model_id(&self) -> String;
    /// The LoRA adapters loaded with the model and their initial global scales (ids as the
    /// engine numbers them); none by default.
    fn adapters(&self) -> Vec<Adapter> {
        Vec::new()
    }
    /// Refuses a request's options before it is queued (an `InvalidRequest` becomes a
    /// 400): the engine's own rules, the same every front end of the model applies (also
    /// for `POST /lora-adapters`, sent as `lora` alone).
    fn check_options(&self, _options: &RequestOptions) -> Result<(), EngineError> {
        Ok(())
    }
    /// Runs a prompt on an image; `on_text` receives the answer as it grows.
    fn complete(
        &self,
        req: CompletionRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, EngineError>;
    /// Finds or segments objects.
    fn locate(&self, req: LocateRequest) -> Result<LocateResponse, EngineError>;
}
