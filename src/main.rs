//! The `pali` command line: convert checkpoints, inspect GGUF files, caption, ask, detect,
//! segment, run.

use clap::{Args, Parser, Subcommand, ValueEnum};
use pali::preprocess::load_image;
use pali::{GenerateOptions, LoadOptions, Model, ModelPaths, Sampling, SlidingWindow, Task};
use pali_convert::{ConvertOptions, ConvertOutput};
use pali_ggml::gguf::GgufFile;
use pali_ggml::quant::FileType;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[cfg(feature = "serve")]
mod serve;

#[derive(Parser)]
#[command(
    name = "pali",
    version,
    about = "PaliGemma 2 on the edge: caption, detect and ask on-device"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

/// Model and decoding flags shared by the generation commands (llama.cpp spellings).
#[derive(Args, Clone)]
struct ModelArgs {
    /// Decoder GGUF (default: the bundled demo model in models/demo).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Vision GGUF (default: the one mmproj-*.gguf next to the decoder).
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Maximum tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n_predict: usize,
    /// Threads (default: available cores).
    #[arg(short = 't', long)]
    threads: Option<i32>,
    /// Largest context in tokens (prefix + generated); 0 = what the request needs.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    ctx_size: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    /// Top-k sampling (0 = off).
    #[arg(long = "top-k", default_value_t = 0)]
    top_k: usize,
    /// Top-p (nucleus) sampling (1 = off).
    #[arg(long = "top-p", default_value_t = 1.0)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decoder layers on the GPU (GPU builds) or the RPC servers; the vision tower follows
    /// onto a local GPU when > 0. Default: all when a GPU is found (as llama.cpp) or with
    /// --rpc, else 0. -ngl 0 keeps everything on the CPU.
    #[arg(long = "n-gpu-layers", visible_alias = "ngl")]
    n_gpu_layers: Option<i32>,
    /// ggml RPC servers (`pali rpc-server`) that take a share of the decoder's layers, as in
    /// llama.cpp: HOST:PORT[,HOST:PORT…]. No authentication or encryption: trusted networks
    /// only.
    #[cfg(feature = "rpc")]
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,…")]
    rpc: Vec<String>,
    /// The vision tower's compute precision: auto (f32 for now), f32 (HF's F32 to float
    /// reassociation), f16 (F16 weights and attention, F32 accumulation and norms: a GPU's
    /// speed; not on Vulkan).
    #[arg(long = "vision-precision", value_enum, default_value_t = PrecisionArg::Auto)]
    vision_precision: PrecisionArg,
    /// Shares of the offloaded layers per device, in order: the --rpc servers, then local
    /// GPUs (llama.cpp's -ts): e.g. 3,1. Default: by each device's free memory.
    #[arg(
        long = "tensor-split",
        visible_alias = "ts",
        value_delimiter = ',',
        value_name = "N,…"
    )]
    tensor_split: Vec<f32>,
    /// Gemma 2 sliding window: off (full attention, as PaliGemma was trained) or llama.cpp's.
    #[arg(long = "sliding-window", value_enum, default_value_t = WindowArg::Off)]
    sliding_window: WindowArg,
    /// Never hold the vision tower and the decoder in memory at once (each is loaded when
    /// needed): peak memory ≈ the larger file instead of both, for a reload per image.
    /// auto = on when RAM < 2 × the two files + 1 GiB.
    #[arg(long = "low-mem", value_enum, default_value_t = LowMemArg::Auto)]
    low_mem: LowMemArg,
    /// KV cache type: q8_0 halves its memory (1.4 -> 0.7 GiB for a 10B at 896 px), q4_0
    /// quarters it (less exact); both turn on flash attention.
    #[arg(long = "cache-type", visible_alias = "ctk", value_enum, default_value_t = CacheTypeArg::F16)]
    cache_type: CacheTypeArg,
    /// Print one JSON object per image instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CacheTypeArg {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Auto,
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum LowMemArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum WindowArg {
    Off,
    #[value(name = "llama.cpp")]
    LlamaCpp,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an HF PaliGemma 2 checkpoint into a decoder GGUF and an mmproj GGUF.
    Convert {
        /// HF checkpoint folder (config.json, *.safetensors, tokenizer files).
        hf_dir: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        out: PathBuf,
        /// Decoder type: f32, f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q4_0, iq4_nl,
        /// iq4_xs, q3_k_l, q3_k_m, q3_k_s, iq3_m, iq3_s, q2_k (llama-quantize's mixes).
        #[arg(long = "type", default_value = "f16")]
        text_type: String,
        /// Vision tower type: f16, f32, q8_0.
        #[arg(long, default_value = "f16")]
        vision_type: String,
        /// Overwrite existing output files.
        #[arg(long)]
        force: bool,
        /// Model name used in file names (default: from the checkpoint).
        #[arg(long)]
        name: Option<String>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Threads for quantization (default: all cores).
        #[arg(short, long, default_value_t = 0)]
        threads: i32,
    },
    /// Convert big_vision's segmentation VQ-VAE (vae-oid.npz) into a mask decoder GGUF for
    /// `segment --vae`.
    ConvertVae {
        /// The .npz file (big_vision's vae-oid.npz: PyTorch names, float32).
        npz: PathBuf,
        /// Output GGUF (default: the .npz path with a .gguf extension).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Overwrite an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Print a GGUF file's metadata and tensor table, or (--backends) the ggml backends and
    /// devices found on this machine and which one pali uses.
    Info {
        /// The GGUF file.
        #[arg(required_unless_present = "backends")]
        file: Option<PathBuf>,
        /// List ggml's backends and devices (as llama.cpp's --list-devices) instead.
        #[arg(long, conflicts_with = "file")]
        backends: bool,
        /// With --backends: one JSON object.
        #[arg(long, requires = "backends")]
        json: bool,
    },
    /// Caption images (files or folders): `caption <lang>`, or `describe <lang>` with --long.
    Caption {
        /// Images or folders of images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Caption language.
        #[arg(long, default_value = "en")]
        lang: String,
        /// A longer description (`describe`; pt checkpoints).
        #[arg(long)]
        long: bool,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Answer a question about an image (`answer <lang> <question>`).
    Ask {
        /// The image.
        image: PathBuf,
        /// The question.
        question: String,
        /// Question language.
        #[arg(long, default_value = "en")]
        lang: String,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Read the text in an image (`ocr`).
    Ocr {
        /// The image.
        image: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Find objects (`detect a ; b`): boxes in the image's pixels, optionally drawn.
    Detect {
        /// The image.
        image: PathBuf,
        /// Objects to find: "cat ; dog" (or one per argument; quote multi-word names).
        #[arg(required = true)]
        objects: Vec<String>,
        /// Also write the image with labelled boxes to this PNG file.
        #[arg(long, value_name = "OUT.png")]
        draw: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Segment objects (`segment a ; b`): boxes, the 16 mask codes per object and, with
    /// --vae, each object's binary mask in the image's pixels.
    Segment {
        /// The image.
        image: PathBuf,
        /// Objects to segment: "cat ; dog" (or one per argument; quote multi-word names).
        #[arg(required = true)]
        objects: Vec<String>,
        /// Mask decoder GGUF (`pali convert-vae vae-oid.npz -o vae.gguf`; the bundled demo
        /// model uses models/demo/vae-pali-demo.gguf); without one masks are not decoded
        /// ("mask": null).
        #[arg(long, value_name = "VAE.gguf")]
        vae: Option<PathBuf>,
        /// Also write the image with labelled boxes (and masks, with --vae) to this PNG file.
        #[arg(long, value_name = "OUT.png")]
        draw: Option<PathBuf>,
        /// Write the union of all masks as a single-channel PNG (255 inside); needs --vae.
        #[arg(long, value_name = "MASK.png")]
        mask_out: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Run any prompt on an image.
    Run {
        /// The image.
        #[arg(long)]
        image: PathBuf,
        /// Prompt text (the task prefix, e.g. "caption en").
        #[arg(short = 'p', long)]
        prompt: String,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Time preprocessing, vision, prefill and decode over several runs (exactly -n tokens each, past <eos>, like llama-bench).
    Bench {
        /// The image.
        image: PathBuf,
        /// Prompt.
        #[arg(short = 'p', long, default_value = "caption en")]
        prompt: String,
        /// Measured runs (after one warm-up).
        #[arg(short = 'r', long, default_value_t = 5)]
        runs: usize,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Serve the model over HTTP: OpenAI's /v1/chat/completions, /v1/detect, /v1/segment,
    /// /v1/models, /health, /metrics.
    #[cfg(feature = "serve")]
    Serve {
        #[command(flatten)]
        serve: serve::ServeArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Serve this machine's ggml device (its GPUs in a GPU build, else the CPU) to other
    /// machines' `--rpc`, as llama.cpp's rpc-server (same protocol). No authentication or
    /// encryption: anyone who reaches the port can use the device; trusted networks only.
    #[cfg(feature = "rpc")]
    RpcServer {
        /// Address to listen on (anything but loopback is reachable by the network).
        #[arg(short = 'H', long, default_value = "127.0.0.1")]
        host: String,
        /// Port.
        #[arg(short, long, default_value_t = pali_ggml::rpc::DEFAULT_PORT)]
        port: u16,
        /// CPU threads (default: physical cores).
        #[arg(short, long)]
        threads: Option<i32>,
        /// Keep large tensors on disk between runs, so a client loading the same model again
        /// sends only their hashes ($LLAMA_CACHE/rpc, else ~/.cache/llama.cpp/rpc, shared with
        /// llama.cpp's rpc-server).
        #[arg(short = 'c', long)]
        cache: bool,
    },
    /// Score the model on a labelled JSON Lines set: exact match per task, detection IoU.
    Eval {
        /// The set: one `{"image", "prompt", "answer"}` object per line.
        set: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
}

fn parse_type(s: &str, what: &str, allowed: &[FileType]) -> Result<FileType, String> {
    if FileType::needs_imatrix(s) {
        return Err(format!(
            "{what} {s}: llama.cpp quantizes this type only with an importance matrix \
             (llama-imatrix + llama-quantize --imatrix), which pali convert does not make; \
             convert to f16 and use llama-quantize, or pick a type without one \
             (iq4_xs, q3_k_s, q2_k, …)"
        ));
    }
    FileType::parse(s)
        .filter(|t| allowed.contains(t))
        .ok_or_else(|| {
            let names: Vec<String> = allowed
                .iter()
                .map(|t| t.label().to_ascii_lowercase())
                .collect();
            format!(
                "unsupported {what} {s:?}: choose one of {}",
                names.join(", ")
            )
        })
}

#[allow(clippy::too_many_arguments)]
fn run_convert(
    hf_dir: PathBuf,
    out: PathBuf,
    text_type: &str,
    vision_type: &str,
    force: bool,
    name: Option<String>,
    quiet: bool,
    threads: i32,
) -> Result<ConvertOutput, String> {
    use FileType::*;
    let decoder_types: Vec<FileType> = FileType::all().filter(|t| *t != BF16).collect();
    let text_type = parse_type(text_type, "--type", &decoder_types)?;
    let vision_type = parse_type(vision_type, "--vision-type", &[F16, F32, Q8_0])?;
    ctrlc::set_handler(|| {
        pali_convert::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        pali_convert::remove_partial_files();
        eprintln!("\ninterrupted: no output written");
        std::process::exit(130);
    })
    .map_err(|e| e.to_string())?;
    let show = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = indicatif::ProgressBar::new(0);
    if show {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let opts = ConvertOptions {
        input: hf_dir,
        out_dir: out,
        text_type,
        vision_type,
        force,
        name,
        threads,
    };
    let mut progress = |done: u64, total: u64, phase: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(phase.to_string());
    };
    let res = pali_convert::convert(&opts, &mut progress).map_err(|e| e.to_string());
    bar.finish_and_clear();
    res
}

fn run_info(file: PathBuf) -> Result<(), String> {
    let g = GgufFile::open(&file).map_err(|e| e.to_string())?;
    println!(
        "{}: GGUF, data at offset {}",
        file.display(),
        g.data_offset()
    );
    println!("metadata:");
    for k in g.keys() {
        if let Some(v) = g.get(&k) {
            println!("  {k:<45} {v}");
        }
    }
    let tensors = g.tensors();
    let total: u64 = tensors.iter().map(|t| t.size).sum();
    println!(
        "tensors ({}, {:.2} MiB):",
        tensors.len(),
        total as f64 / (1 << 20) as f64
    );
    println!(
        "  {:<40} {:>6} {:>22} {:>12}",
        "name", "type", "shape", "bytes"
    );
    for t in tensors {
        let shape = format!("{:?}", t.ne);
        println!(
            "  {:<40} {:>6} {:>22} {:>12}",
            t.name,
            t.ty.name(),
            shape,
            t.size
        );
    }
    Ok(())
}

/// `pali info --backends`: ggml's registered backends and devices, and the device pali runs
/// on with its default flags.
fn run_backends(json: bool) {
    use pali_ggml::backends;
    let regs = backends::registered();
    let devices = backends::devices();
    let gpu = backends::local_gpu();
    let used = gpu.as_ref().map_or("CPU".to_string(), |d| d.name.clone());
    let compiled: Vec<&str> = backends::compiled_gpu_backends()
        .iter()
        .map(|(b, _)| *b)
        .collect();
    let notice = pali::no_gpu_notice();
    if json {
        let devs: Vec<serde_json::Value> = devices
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name, "backend": d.backend, "type": d.kind.label(),
                    "description": d.description, "memory_free": d.memory_free,
                    "memory_total": d.memory_total,
                })
            })
            .collect();
        let regs: Vec<serde_json::Value> = regs
            .iter()
            .map(|(n, c)| serde_json::json!({"name": n, "devices": c}))
            .collect();
        let v = serde_json::json!({
            "compiled_gpu_backends": compiled,
            "dynamic_backends": cfg!(feature = "dynamic-backends"),
            "backends": regs,
            "devices": devs,
            "used": used,
            "cpu_features": pali_ggml::cpu_features(),
            "blas": pali_ggml::blas::library(),
            "notice": notice,
        });
        println!("{v}");
        return;
    }
    let build = if compiled.is_empty() {
        "CPU only".to_string()
    } else {
        compiled.join(", ")
    };
    println!(
        "build: {build}{}",
        if cfg!(feature = "dynamic-backends") {
            " (backends loaded as modules at run time)"
        } else {
            ""
        }
    );
    println!("backends:");
    for (name, n) in &regs {
        println!("  {name:<10} {n} device{}", if *n == 1 { "" } else { "s" });
    }
    println!("devices:");
    for d in &devices {
        println!(
            "  {:<10} {:<5} {} ({} MiB free of {} MiB)",
            d.name,
            d.kind.label(),
            d.description,
            d.memory_free >> 20,
            d.memory_total >> 20
        );
    }
    println!("CPU features: {}", pali_ggml::cpu_features().join(" "));
    match pali_ggml::blas::library() {
        Some(b) => println!("BLAS: {b} (float matmuls of the vision tower on the CPU)"),
        None => println!("BLAS: none (ggml's own kernels for every matmul)"),
    }
    match gpu {
        Some(d) => println!(
            "used: {} ({}) for the decoder's layers and the vision tower (-ngl 0: the CPU)",
            d.name, d.description
        ),
        None => println!("used: CPU"),
    }
    if let Some(n) = notice {
        println!("notice: {n}");
    }
}

/// Where the bundled demo model is looked for: the working directory, then the source tree.
fn bundled_roots() -> [PathBuf; 2] {
    [
        std::env::current_dir().unwrap_or_default(),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ]
}

/// Finds the model files: the flags, else the bundled demo model; `vae` is the mask
/// decoder asked for (`--vae`), else with `demo_vae` the bundled model's own.
fn model_paths(args: &ModelArgs, vae: Option<&Path>, demo_vae: bool) -> Result<ModelPaths, String> {
    let paths = model_files(args)?;
    let vae = vae.map(Path::to_path_buf).or_else(|| {
        // The bundled demo model comes with its own mask decoder: the one beside the model
        // that `model_files` picks (the first root that has one).
        (demo_vae && args.model.is_none() && args.mmproj.is_none())
            .then(|| {
                bundled_roots()
                    .iter()
                    .find(|r| pali::default_model_paths(r).is_some())
                    .and_then(|r| pali::default_vae_path(r))
            })
            .flatten()
    });
    Ok(match vae {
        Some(v) => paths.with_mask_decoder(v),
        None => paths,
    })
}

/// The decoder and mmproj files: the flags, else the bundled demo model.
fn model_files(args: &ModelArgs) -> Result<ModelPaths, String> {
    let find_mmproj = |dir: &Path| -> Result<PathBuf, String> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|f| {
                    let f = f.to_string_lossy();
                    f.starts_with("mmproj-") && f.ends_with(".gguf")
                })
            })
            .collect();
        v.sort();
        match v.len() {
            1 => Ok(v.remove(0)),
            0 => Err(format!(
                "no mmproj-*.gguf next to the model in {}: pass --mmproj",
                dir.display()
            )),
            _ => Err(format!(
                "several mmproj-*.gguf in {}: pass --mmproj",
                dir.display()
            )),
        }
    };
    match (&args.model, &args.mmproj) {
        (Some(m), Some(p)) => Ok(ModelPaths::new(m, p)),
        (Some(m), None) => {
            let dir = m
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Ok(ModelPaths::new(m, find_mmproj(dir)?))
        }
        (None, Some(_)) => Err("--mmproj needs -m (the decoder) as well".into()),
        (None, None) => bundled_roots()
            .iter()
            .find_map(|r| pali::default_model_paths(r))
            .ok_or_else(|| {
                "no model given (-m, --mmproj) and no bundled model in models/demo".into()
            }),
    }
}

fn load_model(args: &ModelArgs, paths: &ModelPaths) -> Result<Model, String> {
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
            PrecisionArg::Auto => pali::siglip::VisionPrecision::Auto,
            PrecisionArg::F32 => pali::siglip::VisionPrecision::F32,
            PrecisionArg::F16 => pali::siglip::VisionPrecision::F16,
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
    Ok(model)
}

fn gen_options(args: &ModelArgs) -> GenerateOptions {
    GenerateOptions {
        n_predict: args.n_predict,
        sampling: Sampling {
            temperature: args.temp,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        max_ctx: args.ctx_size,
        kv_type: match args.cache_type {
            CacheTypeArg::F16 => pali::KvCacheType::F16,
            CacheTypeArg::Q8_0 => pali::KvCacheType::Q8_0,
            CacheTypeArg::Q4_0 => pali::KvCacheType::Q4_0,
        },
        ..Default::default()
    }
}

/// Image files given directly or found (non-recursively) in given folders.
fn expand_images(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension().is_some_and(|e| {
                        matches!(
                            e.to_ascii_lowercase().to_str(),
                            Some("jpg" | "jpeg" | "png" | "webp" | "bmp" | "gif")
                        )
                    })
                })
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Output files and the mask decoder of `pali detect` / `pali segment`.
#[derive(Default)]
struct LocateOutputs<'a> {
    /// `--draw`.
    draw: Option<&'a Path>,
    /// `--mask-out` (segment).
    mask_out: Option<&'a Path>,
    /// `--vae` (segment).
    vae: Option<&'a Path>,
}

/// `pali detect` / `pali segment`: the library's task, printed as `label: x1,y1,x2,y2`
/// lines or one JSON object; `--draw` writes the labelled picture, `--mask-out` the masks.
fn run_locate(
    image: &Path,
    objects: Vec<String>,
    segment: bool,
    outs: LocateOutputs<'_>,
    args: &ModelArgs,
) -> Result<bool, String> {
    let paths = model_paths(args, outs.vae, segment)?;
    if outs.mask_out.is_some() && paths.mask_decoder.is_none() {
        return Err("--mask-out needs the mask decoder: pass --vae VAE.gguf (made by `pali convert-vae vae-oid.npz`)".into());
    }
    // Before loading anything: a request without names fails at once.
    pali::task::check_objects(&objects).map_err(|e| e.to_string())?;
    let img = load_image(image, pali::MAX_IMAGE_PIXELS).map_err(|e| e.to_string())?;
    let model = load_model(args, &paths)?;
    let opts = gen_options(args);
    let found = if segment {
        model.segment(&img, &objects, &opts)
    } else {
        model.detect(&img, &objects, &opts)
    }
    .map_err(|e| e.to_string())?;
    if args.json {
        let mut obj = pali::task::to_json(&found);
        if let Some(p) = outs.draw {
            obj["draw"] = serde_json::json!(p.display().to_string());
        }
        if let Some(p) = outs.mask_out {
            obj["mask_out"] = serde_json::json!(p.display().to_string());
        }
        println!("{obj}");
    } else {
        print_located(&found);
    }
    let masks = found.masks();
    if let Some(p) = outs.draw {
        let pic = pali::draw::draw_segments(&img, &found.boxes(), &masks);
        pali::draw::save_png(&pic, p).map_err(|e| e.to_string())?;
    }
    if let Some(p) = outs.mask_out {
        let refs: Vec<&pali::Mask> = masks.into_iter().flatten().collect();
        pali::draw::save_mask_png(&refs, img.width, img.height, p).map_err(|e| e.to_string())?;
    }
    Ok(true)
}

/// The text form of detect / segment: one line per object, warnings on stderr.
fn print_located(found: &pali::Located) {
    for o in &found.objects {
        let b = &o.bbox;
        let [x1, y1, x2, y2] = b.rect().map(|v| v.round() as i64);
        let mut line = format!("{}: {x1},{y1},{x2},{y2}", b.label);
        if let Some(score) = b.score {
            line.push_str(&format!(" score={score:.2}"));
        }
        if let Some(seg) = &o.segment {
            let c: Vec<String> = seg.codes.iter().map(u8::to_string).collect();
            line.push_str(&format!(" codes={}", c.join(",")));
            if let Some(m) = &seg.mask {
                line.push_str(&format!(" area={}", m.area()));
            }
        }
        println!("{line}");
    }
    for wline in &found.warnings {
        eprintln!("warning: {wline}");
    }
    if found.objects.is_empty() {
        eprintln!("no objects found (the model answered {:?})", found.text);
    }
}

/// `pali convert-vae`: the mask decoder GGUF next to the .npz unless `-o` says otherwise.
fn run_convert_vae(npz: &Path, out: Option<PathBuf>, force: bool) -> Result<PathBuf, String> {
    let out = match out {
        Some(o) if o.is_dir() => {
            let stem = npz
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            o.join(format!("{stem}.gguf"))
        }
        Some(o) => o,
        None => npz.with_extension("gguf"),
    };
    if out == npz {
        return Err(format!(
            "{}: output would overwrite the input",
            out.display()
        ));
    }
    ctrlc::set_handler(|| {
        pali_convert::remove_partial_files();
        eprintln!("\ninterrupted: no output written");
        std::process::exit(130);
    })
    .map_err(|e| e.to_string())?;
    pali::convert_vae(npz, &out, force).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Runs one prompt on each image; streams text (or prints JSON Lines); keeps going past bad
/// images. Returns whether all succeeded.
fn generate_each(images: &[PathBuf], task: &Task, args: &ModelArgs) -> Result<bool, String> {
    let model = load_model(args, &model_paths(args, None, false)?)?;
    let opts = gen_options(args);
    let many = images.len() > 1;
    let bar = if many && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(images.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut ok = true;
    // Images are encoded a group at a time and then decoded: in low-memory mode the vision
    // tower and the decoder are loaded once per group, not once per image.
    let group = model.images_per_group();
    let mut encoded = Vec::new();
    for (i, path) in images.iter().enumerate() {
        if i % group == 0 {
            encoded = images[i..images.len().min(i + group)]
                .iter()
                .map(|p| {
                    load_image(p, pali::MAX_IMAGE_PIXELS)
                        .map_err(pali::Error::from)
                        .and_then(|img| model.encode_image(&img))
                })
                .rev()
                .collect();
        }
        let res = encoded.pop().expect("one per image").and_then(|img| {
            let mut stdout = std::io::stdout();
            let stream = !args.json;
            if stream && many {
                print!("{}: ", path.display());
            }
            model.answer_encoded(img, task, &opts, &mut |piece| {
                if stream {
                    print!("{piece}");
                    let _ = stdout.flush();
                }
            })
        });
        match res {
            Ok(g) => {
                if args.json {
                    let mut obj = pali::task::to_json(&g);
                    if many {
                        obj["path"] = serde_json::json!(path.display().to_string());
                    }
                    println!("{obj}");
                } else {
                    println!();
                }
            }
            Err(e) => {
                ok = false;
                if args.json && many {
                    println!(
                        "{}",
                        serde_json::json!({ "path": path.display().to_string(), "error": e.to_string() })
                    );
                } else if many {
                    println!();
                    eprintln!("error: {e}");
                } else {
                    return Err(e.to_string());
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(ok)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run_bench(image: &Path, prompt: &str, runs: usize, args: &ModelArgs) -> Result<(), String> {
    let model = load_model(args, &model_paths(args, None, false)?)?;
    let load_ms = model.load_ms();
    let img = load_image(image, pali::MAX_IMAGE_PIXELS).map_err(|e| e.to_string())?;
    // Like llama-bench's tg: exactly -n tokens, whatever they are.
    let opts = GenerateOptions {
        ignore_eos: true,
        ..gen_options(args)
    };
    let mut rows: Vec<pali::Timings> = Vec::new();
    for i in 0..=runs {
        let g = model
            .generate(&img, prompt, &opts, &mut |_| {})
            .map_err(|e| e.to_string())?;
        if i > 0 {
            rows.push(g.timings);
        }
    }
    let col = |f: fn(&pali::Timings) -> f64| median(&mut rows.iter().map(f).collect::<Vec<_>>());
    let (pre, vis, pf, dec, tps) = (
        col(|t| t.preprocess_ms),
        col(|t| t.vision_ms),
        col(|t| t.prefill_ms),
        col(|t| t.decode_ms),
        col(|t| t.decode_tok_s),
    );
    let n_prefix = rows[0].n_prefix;
    let obj = serde_json::json!({
        "runs": runs, "load_ms": load_ms, "n_prefix": n_prefix, "n_gen": rows[0].n_gen,
        "median_preprocess_ms": pre, "median_vision_ms": vis, "median_prefill_ms": pf,
        "prefill_tok_s": n_prefix as f64 / (pf / 1e3), "median_decode_ms": dec, "median_decode_tok_s": tps,
        "median_ttft_ms": pre + vis + pf, "peak_rss_mb": pali::peak_rss_mb(),
        "vision_backend": model.vision_backend(), "low_mem": model.low_mem(), "cpu_features": pali_ggml::cpu_features(),
        "blas": pali_ggml::blas::library(),
    });
    if args.json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
    }
    Ok(())
}

fn run_eval(set: &Path, args: &ModelArgs) -> Result<(), String> {
    let items = pali::eval::read_set(set).map_err(|e| e.to_string())?;
    let model = load_model(args, &model_paths(args, None, false)?)?;
    let report =
        pali::eval::evaluate(&model, &items, &gen_options(args)).map_err(|e| e.to_string())?;
    let obj = serde_json::json!({ "set": set.display().to_string(), "tasks": report });
    println!(
        "{}",
        if args.json {
            obj.to_string()
        } else {
            serde_json::to_string_pretty(&obj).expect("json")
        }
    );
    Ok(())
}

/// `pali serve`: finds the model files, then loads them while the server already answers.
#[cfg(feature = "serve")]
fn run_serve(flags: serve::ServeArgs, mut args: ModelArgs) -> Result<(), String> {
    let paths = model_paths(&args, flags.vae.as_deref(), true)?;
    // Requests running at once share the cores: ggml's threads spin, and two contexts of
    // all-core threads on 2 cores ran 30x slower than one (BENCHMARKS.md, "Server").
    if args.threads.is_none() && flags.parallel > 1 {
        let t = (pali::default_threads() / flags.parallel as i32).max(1);
        log::info!("--parallel {}: {t} threads per request", flags.parallel);
        args.threads = Some(t);
    }
    let load = move || {
        let model = load_model(&args, &paths)?;
        let id = paths
            .decoder
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pali".into());
        let ctx = if args.ctx_size > 0 {
            args.ctx_size
        } else {
            model.n_ctx_train()
        };
        Ok(serve::PaliEngine {
            defaults: gen_options(&args),
            model,
            id,
            ctx,
        })
    };
    serve::run(flags, load)
}

/// llama.cpp's multi-letter single-dash flags (`-ngl 99`, `-ctk q8_0`), which users type from
/// habit but clap cannot declare (a short flag is one letter): rewritten to their long names.
fn llama_cpp_flag(arg: std::ffi::OsString) -> std::ffi::OsString {
    match arg.to_str() {
        Some("-ngl") => "--n-gpu-layers".into(),
        Some("-ctk") => "--cache-type".into(),
        Some("-ts") => "--tensor-split".into(),
        _ => arg,
    }
}

/// `pali rpc-server`: ggml's RPC server on this machine's device, until killed.
#[cfg(feature = "rpc")]
fn run_rpc_server(host: &str, port: u16, threads: Option<i32>, cache: bool) -> Result<(), String> {
    let endpoint = format!("{host}:{port}");
    let addr = pali_ggml::rpc::parse_endpoint(&endpoint).map_err(|e| e.to_string())?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "warning: ggml's RPC protocol has no authentication or encryption: anyone who can \
             reach {endpoint} can run work on this machine and read what it holds; use it on a \
             trusted network only"
        );
    }
    let cache_dir = cache.then(|| {
        std::env::var_os("LLAMA_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("llama.cpp"))
            })
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/llama.cpp")))
            .unwrap_or_else(|| PathBuf::from(".cache/llama.cpp"))
            .join("rpc")
    });
    let threads = threads.unwrap_or_else(pali::default_threads).max(1) as usize;
    pali_ggml::rpc::serve(&endpoint, threads, cache_dir.as_deref()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    pali_ggml::default_sigpipe();
    pali_ggml::mapped::install_sigbus_report();
    pali_ggml::rpc::install_abort_report();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,llama.cpp=off"),
    )
    .format_timestamp(None)
    .init();
    let cli = Cli::parse_from(std::env::args_os().map(llama_cpp_flag));
    let res: Result<bool, String> = match cli.cmd {
        Command::Convert {
            hf_dir,
            out,
            text_type,
            vision_type,
            force,
            name,
            quiet,
            threads,
        } => run_convert(
            hf_dir,
            out,
            &text_type,
            &vision_type,
            force,
            name,
            quiet,
            threads,
        )
        .map(|o| {
            println!("{}", o.decoder.display());
            println!("{}", o.mmproj.display());
            true
        }),
        Command::ConvertVae { npz, out, force } => run_convert_vae(&npz, out, force).map(|o| {
            println!("{}", o.display());
            true
        }),
        Command::Info {
            backends: true,
            json,
            ..
        } => {
            run_backends(json);
            Ok(true)
        }
        Command::Info { file, .. } => match file {
            Some(file) => run_info(file).map(|_| true),
            None => Err("pali info: give a GGUF file or --backends".into()),
        },
        Command::Caption {
            images,
            lang,
            long,
            model,
        } => {
            let images = expand_images(&images);
            if images.is_empty() {
                Err("no images found".into())
            } else {
                generate_each(&images, &Task::Caption { lang, long }, &model)
            }
        }
        Command::Ask {
            image,
            question,
            lang,
            model,
        } => generate_each(&[image], &Task::Ask { lang, question }, &model),
        Command::Ocr { image, model } => generate_each(&[image], &Task::Ocr, &model),
        Command::Detect {
            image,
            objects,
            draw,
            model,
        } => run_locate(
            &image,
            objects,
            false,
            LocateOutputs {
                draw: draw.as_deref(),
                ..Default::default()
            },
            &model,
        ),
        Command::Segment {
            image,
            objects,
            vae,
            draw,
            mask_out,
            model,
        } => run_locate(
            &image,
            objects,
            true,
            LocateOutputs {
                draw: draw.as_deref(),
                mask_out: mask_out.as_deref(),
                vae: vae.as_deref(),
            },
            &model,
        ),
        Command::Run {
            image,
            prompt,
            model,
        } => generate_each(&[image], &Task::Raw(prompt), &model),
        Command::Bench {
            image,
            prompt,
            runs,
            model,
        } => run_bench(&image, &prompt, runs.max(1), &model).map(|_| true),
        Command::Eval { set, model } => run_eval(&set, &model).map(|_| true),
        #[cfg(feature = "rpc")]
        Command::RpcServer {
            host,
            port,
            threads,
            cache,
        } => run_rpc_server(&host, port, threads, cache).map(|_| true),
        #[cfg(feature = "serve")]
        Command::Serve { serve, model } => run_serve(serve, model).map(|_| true),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
