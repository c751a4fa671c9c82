//! `pali serve`: the pali-server HTTP front end over a loaded [`pali::Model`]. This file only
//! maps requests onto the library's task calls and their errors onto HTTP's.

use crate::args::{gen_options, load_model, ModelArgs};
use crate::files::model_paths;
use pali::image::decode_image;
use pali::image::{ClipPlan, FrameSelection};
use pali::{Answer, FinishReason, GenerateOptions, Model, Task, Timings};
use pali_server::{
    Adapter, Completion, CompletionRequest, Config, EngineError, ErrorKind, LocateRequest,
    LocateResponse, Media, RequestOptions, Stages, Usage,
};
use std::path::PathBuf;
use std::time::Duration;

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
    /// `--max-frames`: most frames of a clip per request.
    pub max_frames: usize,
    /// `--max-pixels`: most decoded pixels per request (all its images or frames).
    pub max_pixels: u64,
    /// The initial global scale of each adapter (`--lora` 1, `--lora-scaled`, 0 with
    /// `--lora-init-without-apply`), in id order.
    pub adapter_scales: Vec<f32>,
}

fn engine_error(e: pali::Error) -> EngineError {
    let kind = match &e {
        pali::Error::Image(_) | pali::Error::Prompt(_) | pali::Error::InvalidOption(_) => {
            ErrorKind::InvalidRequest
        }
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
    /// The request's options over the defaults, checked by the library's one validation
    /// ([`GenerateOptions::apply`]); the context (`-c`) is enforced by the library
    /// ([`pali::Error::ContextLength`]).
    fn options(&self, s: &RequestOptions) -> Result<GenerateOptions, EngineError> {
        let values = pali::options::RequestValues {
            n_predict: s.max_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            stop: s.stop.clone(),
            ignore_eos: Some(s.ignore_eos),
            lora: s.lora.clone(),
            ..Default::default()
        };
        let mut o = self.defaults.apply(&values).map_err(engine_error)?;
        o.max_ctx = self.ctx;
        self.model.check_options(&o).map_err(engine_error)?;
        Ok(o)
    }
}

fn image(bytes: &[u8]) -> Result<pali::RgbImage, EngineError> {
    decode_image(bytes, pali::MAX_IMAGE_PIXELS)
        .map_err(|e| EngineError::new(ErrorKind::InvalidRequest, format!("image: {e}")))
}

fn invalid(message: String) -> EngineError {
    EngineError::new(ErrorKind::InvalidRequest, message)
}

impl PaliEngine {
    /// A request's images decoded, or its clip with its frames chosen, within the limits: at
    /// most `--max-frames` frames and `--max-pixels` decoded pixels in all (a clip's checked
    /// before its frames are decoded, as is its fit in the context: `Model::run_clip_plan`).
    fn media(&self, media: &Media) -> Result<Loaded, EngineError> {
        let budget = |pixels: u64| {
            if pixels > self.max_pixels {
                return Err(invalid(format!(
                    "the request's images are {pixels} pixels once decoded, more than the server's --max-pixels {}",
                    self.max_pixels
                )));
            }
            Ok(())
        };
        match media {
            Media::Images(files) => {
                let images = files
                    .iter()
                    .enumerate()
                    .map(|(i, bytes)| {
                        image(bytes).map_err(|e| match files.len() {
                            1 => e,
                            _ => invalid(format!("image {}: {}", i + 1, e.message)),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                budget(
                    images
                        .iter()
                        .map(|i| u64::from(i.width) * u64::from(i.height))
                        .sum(),
                )?;
                Ok(Loaded::Images(images))
            }
            Media::Video(v) => {
                let selection = match (v.frames, v.fps) {
                    (_, Some(f)) => FrameSelection::PerSecond(f),
                    (k, None) => FrameSelection::Count(k.unwrap_or(self.max_frames)),
                };
                let plan = ClipPlan::from_bytes(
                    v.bytes.clone(),
                    "video_url",
                    selection,
                    pali::MAX_IMAGE_PIXELS,
                )
                .map_err(|e| invalid(format!("video: {e}")))?;
                if plan.indices.len() > self.max_frames {
                    return Err(invalid(format!(
                        "video: fps = {} gives {} frames, more than the server's --max-frames {}",
                        v.fps.unwrap_or_default(),
                        plan.indices.len(),
                        self.max_frames
                    )));
                }
                budget(plan.pixels())?;
                Ok(Loaded::Clip(plan))
            }
        }
    }
}

/// A request's pixels, or its clip to decode.
enum Loaded {
    Images(Vec<pali::RgbImage>),
    Clip(ClipPlan),
}

impl pali_server::Engine for PaliEngine {
    fn model_id(&self) -> String {
        self.id.clone()
    }

    fn adapters(&self) -> Vec<Adapter> {
        self.model
            .adapters()
            .iter()
            .zip(&self.adapter_scales)
            .map(|(a, &scale)| Adapter {
                id: a.id.0,
                path: a.path.display().to_string(),
                scale,
            })
            .collect()
    }

    fn check_options(&self, options: &RequestOptions) -> Result<(), EngineError> {
        self.options(options).map(|_| ())
    }

    fn complete(
        &self,
        req: CompletionRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, EngineError> {
        let opts = GenerateOptions {
            cancel: Some(req.cancel.clone()),
            ..self.options(&req.sampling)?
        };
        let task = Task::Raw(req.prompt);
        let answer = match self.media(&req.media)? {
            Loaded::Images(images) => self.model.run(&images, &task, &opts, on_text),
            Loaded::Clip(plan) => self.model.run_clip_plan(plan, &task, &opts, on_text),
        }
        .map_err(engine_error)?;
        let Answer::Text(a) = answer else {
            unreachable!("a raw prompt answers with text")
        };
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

    fn locate(&self, req: LocateRequest) -> Result<LocateResponse, EngineError> {
        let img = image(&req.image)?;
        let opts = GenerateOptions {
            cancel: Some(req.cancel.clone()),
            ..self.options(&req.sampling)?
        };
        let task = match req.segment {
            true => Task::Segment(req.objects),
            false => Task::Detect(req.objects),
        };
        let found = self
            .model
            .locate(&img, &task, &opts)
            .map_err(engine_error)?;
        Ok(LocateResponse {
            usage: Usage {
                prompt_tokens: found.timings.n_prefix,
                completion_tokens: found.tokens.len(),
            },
            stages: stages(&found.timings),
            json: pali::tasks::to_json(&found),
        })
    }
}

/// `pali serve`'s own flags (the model flags come with them).
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to bind (0.0.0.0 to be reachable from other machines: set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (all endpoints but /health and /v1/models).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Requests that may wait for a worker; beyond it 503 with Retry-After.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// Requests that run at once, each in its own llama.cpp context; without -t they share
    /// the cores (threads / N each). See BENCHMARKS.md, "Server".
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Seconds a request may take, waiting included (504 after); 0 = no limit.
    #[arg(long, default_value_t = 0.0)]
    timeout: f64,
    /// Largest request body in bytes (413 over it).
    #[arg(long, default_value_t = 32 << 20)]
    max_body: usize,
    /// Let image_url / video_url name files inside this folder (never outside it).
    #[arg(long, value_name = "DIR")]
    allow_files: Option<PathBuf>,
    /// Most frames a video_url clip may give one prompt (its `frames` field, or what its
    /// `fps` field yields); 400 over it.
    #[arg(long, default_value_t = 16)]
    pub max_frames: usize,
    /// Most pixels a request's images (or a clip's chosen frames) may hold once decoded, in
    /// all; 400 over it. Default: one image at the pixel limit.
    #[arg(long, default_value_t = pali::MAX_IMAGE_PIXELS)]
    pub max_pixels: u64,
    /// Connections served at once; more are closed as they arrive.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (slow clients are dropped).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Mask decoder GGUF for /v1/segment masks (the bundled demo model has its own).
    #[arg(long, value_name = "VAE.gguf")]
    pub vae: Option<PathBuf>,
    /// Load the --lora adapters with global scale 0 (llama-server's flag): requests choose
    /// them with "lora", or POST /lora-adapters sets the scales.
    #[arg(long)]
    lora_init_without_apply: bool,
}

impl ServeArgs {
    /// The server settings, checked.
    fn config(&self) -> Result<Config, String> {
        let allow_files = self
            .allow_files
            .as_ref()
            .map(|d| {
                std::fs::canonicalize(d)
                    .ok()
                    .filter(|c| c.is_dir())
                    .ok_or_else(|| format!("--allow-files {}: not a folder", d.display()))
            })
            .transpose()?;
        if self.parallel == 0 {
            return Err("--parallel must be at least 1".into());
        }
        let t = self.timeout;
        if !(t >= 0.0 && t.is_finite()) {
            return Err(format!("--timeout {t}: give seconds, 0 for no limit"));
        }
        let h = self.header_timeout;
        if !(h > 0.0 && h.is_finite()) {
            return Err(format!("--header-timeout {h}: give seconds (more than 0)"));
        }
        if self.max_frames == 0 || self.max_pixels == 0 {
            return Err("--max-frames and --max-pixels must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        Ok(Config {
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            queue: self.queue,
            parallel: self.parallel,
            timeout: (t > 0.0).then_some(t),
            max_body: self.max_body,
            allow_files,
            max_frames: self.max_frames,
            max_connections: self.max_connections,
            header_timeout: Duration::from_secs_f64(h),
            ..Default::default()
        })
    }
}

/// Serves until SIGINT / SIGTERM; the model loads while `/health` already answers 503.
pub fn run(
    flags: ServeArgs,
    load: impl FnOnce() -> Result<PaliEngine, String> + Send + 'static,
) -> Result<(), String> {
    let config = flags.config()?;
    // The CLI's quiet exit on a closed pipe must not apply to client sockets.
    pali_ggml::ignore_sigpipe();
    let host = flags.host.as_str();
    let open = !host.starts_with("127.") && host != "localhost" && host != "::1";
    if open && config.api_key.is_none() {
        eprintln!(
            "warning: listening on {host} without --api-key: anyone who can reach this address can use the model"
        );
    }
    pali_server::run_until_signal(host, flags.port, config, load, |addr| {
        // Tests and scripts read this line to find the port (`--port 0`).
        eprintln!("pali: listening on http://{addr}");
    })
}

/// `pali serve`: finds the model files, then loads them while the server already answers.
pub(crate) fn run_serve(flags: ServeArgs, mut args: ModelArgs) -> Result<(), String> {
    let paths = model_paths(&args, flags.vae.as_deref(), true)?;
    // Requests running at once share the cores: ggml's threads spin, and two contexts of
    // all-core threads on 2 cores ran 30x slower than one (BENCHMARKS.md, "Server").
    if args.threads.is_none() && flags.parallel > 1 {
        let t = (pali::default_threads() / flags.parallel as i32).max(1);
        log::info!("--parallel {}: {t} threads per request", flags.parallel);
        args.threads = Some(t);
    }
    let (max_frames, max_pixels) = (flags.max_frames, flags.max_pixels);
    let scales: Vec<f32> = args
        .adapters
        .iter()
        .map(|(_, s)| {
            if flags.lora_init_without_apply {
                0.0
            } else {
                *s as f32
            }
        })
        .collect();
    let load = move || {
        let model = load_model(&args, &paths)?;
        let id = paths
            .decoder
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pali".into());
        let ctx = if args.ctx_size > 0 {
            args.ctx_size as usize
        } else {
            model.n_ctx_train()
        };
        Ok(PaliEngine {
            defaults: gen_options(&args)?,
            model,
            id,
            ctx,
            max_frames,
            max_pixels,
            adapter_scales: scales,
        })
    };
    run(flags, load)
}
