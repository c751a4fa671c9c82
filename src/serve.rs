//! `pali serve`: the pali-server HTTP front end over a loaded [`pali::Model`]. This file only
//! maps requests onto the library's task calls and their errors onto HTTP's.

use pali::preprocess::decode_image;
use pali::{FinishReason, GenerateOptions, Model, Task, Timings};
use pali_server::{
    Completion, CompletionRequest, Config, EngineError, ErrorKind, LocateRequest, Located,
    Sampling, Stages, Usage,
};

/// The model and the command line's defaults.
pub struct PaliEngine {
    /// The loaded model.
    pub model: Model,
    /// Shown in `/v1/models`: the decoder file's stem.
    pub id: String,
    /// `-n`, `--temp`, … for requests that do not say.
    pub defaults: GenerateOptions,
    /// Context size requests must fit in (`-c`, else the model's trained context).
    pub ctx: usize,
}

fn engine_error(e: pali::Error) -> EngineError {
    let kind = match &e {
        pali::Error::Image(_) | pali::Error::Prompt(_) => ErrorKind::InvalidRequest,
        pali::Error::Cancelled => ErrorKind::Cancelled,
        pali::Error::ContextLength(_) => ErrorKind::ContextLength,
        _ => ErrorKind::Internal,
    };
    EngineError::new(kind, e.to_string())
}

fn stages(t: &Timings) -> Stages {
    vec![
        ("preprocess", t.preprocess_ms),
        ("vision", t.vision_ms),
        ("prefill", t.prefill_ms),
        ("decode", t.decode_ms),
    ]
}

fn finish(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

impl PaliEngine {
    /// The request's options over the defaults; the context (`-c`) is enforced by the
    /// library ([`pali::Error::ContextLength`]).
    fn options(&self, s: &Sampling, cancel: &pali::CancelFlag) -> GenerateOptions {
        let d = &self.defaults;
        let n_predict = s.max_tokens.unwrap_or(d.n_predict);
        GenerateOptions {
            n_predict,
            sampling: pali::Sampling {
                temperature: s.temperature.unwrap_or(d.sampling.temperature),
                top_k: s.top_k.unwrap_or(d.sampling.top_k),
                top_p: s.top_p.unwrap_or(d.sampling.top_p),
                seed: s.seed.unwrap_or(d.sampling.seed),
            },
            max_ctx: self.ctx,
            ignore_eos: s.ignore_eos,
            stop: s.stop.clone(),
            cancel: Some(cancel.clone()),
            ..d.clone()
        }
    }
}

fn image(bytes: &[u8]) -> Result<pali::preprocess::RgbImage, EngineError> {
    decode_image(bytes, pali::MAX_IMAGE_PIXELS)
        .map_err(|e| EngineError::new(ErrorKind::InvalidRequest, format!("image: {e}")))
}

impl pali_server::Engine for PaliEngine {
    fn model_id(&self) -> String {
        self.id.clone()
    }

    fn complete(
        &self,
        req: CompletionRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, EngineError> {
        let img = image(&req.image)?;
        let opts = self.options(&req.sampling, &req.cancel);
        let a = self
            .model
            .answer(&img, &Task::Raw(req.prompt), &opts, on_text)
            .map_err(engine_error)?;
        Ok(Completion {
            finish_reason: finish(a.finish_reason),
            usage: Usage {
                prompt_tokens: a.timings.n_prefix,
                completion_tokens: a.tokens.len(),
            },
            stages: stages(&a.timings),
            timings: serde_json::to_value(&a.timings).unwrap_or_default(),
            text: a.text,
        })
    }

    fn locate(&self, req: LocateRequest) -> Result<Located, EngineError> {
        let img = image(&req.image)?;
        let opts = self.options(&req.sampling, &req.cancel);
        let found = if req.segment {
            self.model.segment(&img, &req.objects, &opts)
        } else {
            self.model.detect(&img, &req.objects, &opts)
        }
        .map_err(engine_error)?;
        Ok(Located {
            usage: Usage {
                prompt_tokens: found.timings.n_prefix,
                completion_tokens: found.tokens.len(),
            },
            stages: stages(&found.timings),
            json: crate::answer_json(&found),
        })
    }
}

/// `pali serve`'s own flags (the model flags come with them).
pub struct ServeFlags {
    pub host: String,
    pub port: u16,
    pub config: Config,
}

/// Serves until SIGINT / SIGTERM; the model loads while `/health` already answers 503.
pub fn run(
    flags: ServeFlags,
    load: impl FnOnce() -> Result<PaliEngine, String> + Send + 'static,
) -> Result<(), String> {
    let open = !flags.host.starts_with("127.") && flags.host != "localhost" && flags.host != "::1";
    if open && flags.config.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach this address can use the model",
            flags.host
        );
    }
    pali_server::run_until_signal(&flags.host, flags.port, flags.config, load, |addr| {
        // Tests and scripts read this line to find the port (`--port 0`).
        eprintln!("pali: listening on http://{addr}");
    })
}
