//! Model and decoding flags shared by the generation commands (llama.cpp spellings), and
//! their translation into the library's load and generate options.

use clap::{Args, ValueEnum};
use pali::image::FrameSelection;
use pali::options::RequestValues;
use pali::{GenerateOptions, LoadOptions, Model, ModelPaths, SlidingWindow};
use std::path::PathBuf;

/// Model and decoding flags shared by the generation commands (llama.cpp spellings).
#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// Decoder GGUF (default: the bundled demo model in models/demo).
    #[arg(short = 'm', long = "model")]
    pub(crate) model: Option<PathBuf>,
    /// Vision GGUF (default: the one mmproj-*.gguf next to the decoder).
    #[arg(long)]
    pub(crate) mmproj: Option<PathBuf>,
    /// Maximum tokens to generate.
    #[arg(
        short = 'n',
        long = "n-predict",
        default_value_t = 64,
        allow_negative_numbers = true
    )]
    pub(crate) n_predict: i64,
    /// Threads (default: available cores).
    #[arg(short = 't', long)]
    pub(crate) threads: Option<i32>,
    /// Largest context in tokens (prefix + generated); 0 = what the request needs.
    #[arg(
        short = 'c',
        long = "ctx-size",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub(crate) ctx_size: i64,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub(crate) temp: f32,
    /// Top-k sampling (0 = off).
    #[arg(long = "top-k", default_value_t = 0, allow_negative_numbers = true)]
    pub(crate) top_k: i64,
    /// Top-p (nucleus) sampling (1 = off).
    #[arg(long = "top-p", default_value_t = 1.0, allow_negative_numbers = true)]
    pub(crate) top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Decoder layers on the GPU (GPU builds) or the RPC servers; the vision tower follows
    /// onto a local GPU when > 0. Default: all when a GPU is found (as llama.cpp) or with
    /// --rpc, else 0. -ngl 0 keeps everything on the CPU.
    #[arg(long = "n-gpu-layers", visible_alias = "ngl")]
    pub(crate) n_gpu_layers: Option<i32>,
    /// ggml RPC servers (`pali rpc-server`) that take a share of the decoder's layers, as in
    /// llama.cpp: HOST:PORT[,HOST:PORT…]. No authentication or encryption: trusted networks
    /// only.
    #[cfg(feature = "rpc")]
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,…")]
    pub(crate) rpc: Vec<String>,
    /// The vision tower's compute precision: auto (f32 for now), f32 (HF's F32 to float
    /// reassociation), f16 (F16 weights and attention, F32 accumulation and norms: a GPU's
    /// speed; not on Vulkan).
    #[arg(long = "vision-precision", value_enum, default_value_t = PrecisionArg::Auto)]
    pub(crate) vision_precision: PrecisionArg,
    /// Shares of the offloaded layers per device, in order: the --rpc servers, then local
    /// GPUs (llama.cpp's -ts): e.g. 3,1. Default: by each device's free memory.
    #[arg(
        long = "tensor-split",
        visible_alias = "ts",
        value_delimiter = ',',
        value_name = "N,…"
    )]
    pub(crate) tensor_split: Vec<f32>,
    /// Gemma 2 sliding window: off (full attention, as PaliGemma was trained) or llama.cpp's.
    #[arg(long = "sliding-window", value_enum, default_value_t = WindowArg::Off)]
    pub(crate) sliding_window: WindowArg,
    /// Never hold the vision tower and the decoder in memory at once (each is loaded when
    /// needed): peak memory ≈ the larger file instead of both, for a reload per image.
    /// auto = on when RAM < 2 × the two files + 1 GiB.
    #[arg(long = "low-mem", value_enum, default_value_t = LowMemArg::Auto)]
    pub(crate) low_mem: LowMemArg,
    /// KV cache type: q8_0 halves its memory (1.4 -> 0.7 GiB for a 10B at 896 px), q4_0
    /// quarters it (less exact); both turn on flash attention.
    #[arg(long = "cache-type", visible_alias = "ctk", value_enum, default_value_t = CacheTypeArg::F16)]
    pub(crate) cache_type: CacheTypeArg,
    /// Print one JSON object per image instead of streaming text.
    #[arg(long)]
    pub(crate) json: bool,
    /// LoRA adapter (`pali convert-lora`'s output: either file of its pair) applied at
    /// scale 1, as llama.cpp's --lora; repeatable. Adapters get ids 0, 1, … in command-line
    /// order (with --lora-scaled).
    #[arg(long = "lora", value_name = "FILE")]
    pub(crate) lora: Vec<PathBuf>,
    /// LoRA adapter applied at SCALE (llama.cpp's --lora-scaled; 0 = loaded, not applied);
    /// repeatable.
    #[arg(long = "lora-scaled", num_args = 2, value_names = ["FILE", "SCALE"], allow_negative_numbers = true)]
    pub(crate) lora_scaled: Vec<String>,
    /// The adapters of --lora and --lora-scaled in command-line order, with their scales
    /// ([`order_adapters`]).
    #[arg(skip)]
    pub(crate) adapters: Vec<(PathBuf, f64)>,
}

/// Fills [`ModelArgs::adapters`] from --lora and --lora-scaled in the order they were given
/// (ids follow it, as in llama.cpp); a SCALE that is not a number is a usage error.
pub(crate) fn order_adapters(args: &mut ModelArgs, m: &clap::ArgMatches) -> Result<(), String> {
    let mut found: Vec<(usize, PathBuf, f64)> = Vec::new();
    if let Some(idx) = m.indices_of("lora") {
        for (i, p) in idx.zip(&args.lora) {
            found.push((i, p.clone(), 1.0));
        }
    }
    if let Some(idx) = m.indices_of("lora_scaled") {
        let idx: Vec<usize> = idx.collect();
        for (pair, i) in args.lora_scaled.chunks(2).zip(idx.chunks(2)) {
            let scale = pair[1].trim().parse::<f64>().map_err(|_| {
                format!(
                    "--lora-scaled {} {}: SCALE is not a number",
                    pair[0], pair[1]
                )
            })?;
            found.push((i[0], PathBuf::from(&pair[0]), scale));
        }
    }
    found.sort_by_key(|(i, _, _)| *i);
    args.adapters = found.into_iter().map(|(_, p, s)| (p, s)).collect();
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum CacheTypeArg {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PrecisionArg {
    Auto,
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LowMemArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum WindowArg {
    Off,
    #[value(name = "llama.cpp")]
    LlamaCpp,
}

/// llama.cpp's multi-letter single-dash flags (`-ngl 99`, `-ctk q8_0`), which users type from
/// habit but clap cannot declare (a short flag is one letter): rewritten to their long names.
pub(crate) fn llama_cpp_flag(arg: std::ffi::OsString) -> std::ffi::OsString {
    match arg.to_str() {
        Some("-ngl") => "--n-gpu-layers".into(),
        Some("-ctk") => "--cache-type".into(),
        Some("-ts") => "--tensor-split".into(),
        _ => arg,
    }
}

pub(crate) fn load_model(args: &ModelArgs, paths: &ModelPaths) -> Result<Model, String> {
    #[cfg(feature = "rpc")]
    let rpc_servers = args.rpc.clone();
    #[cfg(not(feature = "rpc"))]
    let rpc_servers: Vec<String> = Vec::new();
    // Without -ngl every layer goes to a local GPU when ggml found one, as in llama.cpp (a
    // GPU build on a machine without one says so once and runs on the CPU), and to the
    // servers with --rpc, as asked for.
    let all_layers = if !rpc_servers.is_empty() || pali_ggml::graph::has_local_gpu() {
        999
    } else {
        if args.n_gpu_layers.is_none() {
            if let Some(notice) = pali::no_gpu_notice() {
                log::warn!("{notice}");
            }
        }
        0
    };
    if args.tensor_split.iter().any(|v| !v.is_finite() || *v < 0.0)
        || (!args.tensor_split.is_empty() && args.tensor_split.iter().all(|v| *v == 0.0))
    {
        return Err(format!(
            "--tensor-split {:?}: shares must be non-negative numbers, not all zero",
            args.tensor_split
        ));
    }
    let opts = LoadOptions {
        threads: args.threads.unwrap_or_else(pali::default_threads),
        n_gpu_layers: args.n_gpu_layers.unwrap_or(all_layers),
        rpc_servers,
        tensor_split: args.tensor_split.clone(),
        vision_precision: match args.vision_precision {
            PrecisionArg::Auto => pali::vision::VisionPrecision::Auto,
            PrecisionArg::F32 => pali::vision::VisionPrecision::F32,
            PrecisionArg::F16 => pali::vision::VisionPrecision::F16,
        },
        sliding_window: match args.sliding_window {
            WindowArg::Off => SlidingWindow::Off,
            WindowArg::LlamaCpp => SlidingWindow::LlamaCpp,
        },
        low_mem: match args.low_mem {
            LowMemArg::Auto => None,
            LowMemArg::On => Some(true),
            LowMemArg::Off => Some(false),
        },
    };
    let model = Model::load(paths, &opts).map_err(|e| e.to_string())?;
    log::info!(
        "loaded {} + {}",
        paths.decoder.display(),
        paths.mmproj.display()
    );
    for (path, _) in &args.adapters {
        model.load_adapter(path).map_err(|e| e.to_string())?;
    }
    Ok(model)
}

/// The generation options of the flags, checked by the library's one validation (the same
/// rules and messages as `pali serve` and the C library).
pub(crate) fn gen_options(args: &ModelArgs) -> Result<GenerateOptions, String> {
    let base = GenerateOptions {
        kv_type: match args.cache_type {
            CacheTypeArg::F16 => pali::KvCacheType::F16,
            CacheTypeArg::Q8_0 => pali::KvCacheType::Q8_0,
            CacheTypeArg::Q4_0 => pali::KvCacheType::Q4_0,
        },
        ..Default::default()
    };
    let values = RequestValues {
        n_predict: Some(args.n_predict),
        max_ctx: Some(args.ctx_size),
        temperature: Some(args.temp),
        top_k: Some(args.top_k),
        top_p: Some(args.top_p),
        seed: Some(args.seed),
        // Ids 0, 1, … in order: load_model loads them in this order on a fresh model.
        lora: Some(
            args.adapters
                .iter()
                .enumerate()
                .map(|(id, (_, scale))| (id as i64, *scale))
                .collect(),
        ),
        ..Default::default()
    };
    base.apply(&values).map_err(|e| e.to_string())
}

/// A clip's frames instead of one image (video files need ffmpeg on the PATH; animated
/// GIF / APNG / WebP do not).
#[derive(Args, Clone, Default)]
pub(crate) struct ClipArgs {
    /// Treat the file as a clip and take K of its n frames as one prompt: frame i (i = 0 …
    /// K−1) is floor(i × n / K); a clip with fewer than K frames repeats them in order (with
    /// a warning). PaliGemma 2's video transfers use 8–16 frames at 224 px.
    #[arg(long, value_name = "K", conflicts_with = "fps")]
    pub(crate) frames: Option<usize>,
    /// Treat the file as a clip and take F frames per second of its time (the frame shown at
    /// 0, 1/F, 2/F, … s).
    #[arg(long, value_name = "F")]
    pub(crate) fps: Option<f64>,
}

impl ClipArgs {
    /// The frame selection asked for, if any.
    pub(crate) fn selection(&self) -> Option<FrameSelection> {
        match (self.frames, self.fps) {
            (Some(k), _) => Some(FrameSelection::Count(k)),
            (None, Some(f)) => Some(FrameSelection::PerSecond(f)),
            (None, None) => None,
        }
    }
}
