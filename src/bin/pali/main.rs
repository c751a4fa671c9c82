//! The `pali` command line: convert checkpoints, inspect GGUF files, caption, ask, detect,
//! segment, run.
//!
//! Files by concern: `args` (the model and decoding flags), `files` (which model and image
//! files), `run` (the tasks), `tools` (convert, info, rpc-server), `serve` (`pali serve`).
//! The commands parse, call the library and print; policy lives in the library.

#![forbid(unsafe_code)]

mod args;
mod files;
mod run;
#[cfg(feature = "serve")]
mod serve;
mod tools;

use args::{ClipArgs, ModelArgs};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pali::Task;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into
    /// llama.cpp adapter GGUFs: the decoder's part, and an mmproj-… file beside it when the
    /// adapter also changes the vision tower or the projector. Use them with --lora FILE.
    ConvertLora {
        /// The adapter folder PEFT's save_pretrained wrote.
        adapter_dir: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        out: PathBuf,
        /// Type of the LoRA matrices: f16, f32, q8_0 (matrices whose rows are not whole
        /// 32-blocks stay f16).
        #[arg(long = "type", default_value = "f16")]
        ty: String,
        /// Overwrite existing output files.
        #[arg(long)]
        force: bool,
        /// Name used in file names and general.name (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
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
        clip: ClipArgs,
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
        clip: ClipArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Read the text in an image (`ocr`).
    Ocr {
        /// The image.
        image: PathBuf,
        #[command(flatten)]
        clip: ClipArgs,
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
        clip: ClipArgs,
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
        clip: ClipArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Run any prompt on an image.
    Run {
        /// The image; repeated, ONE prompt about all of them in order (several images, or a
        /// clip's frames given as images).
        #[arg(long, required = true)]
        image: Vec<PathBuf>,
        /// Prompt text (the task prefix, e.g. "caption en").
        #[arg(short = 'p', long)]
        prompt: String,
        #[command(flatten)]
        clip: ClipArgs,
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

impl Command {
    /// The model and decoding flags of the commands that have them.
    fn model_args(&self) -> Option<&ModelArgs> {
        match self {
            Command::Caption { model, .. }
            | Command::Ask { model, .. }
            | Command::Ocr { model, .. }
            | Command::Detect { model, .. }
            | Command::Segment { model, .. }
            | Command::Run { model, .. }
            | Command::Bench { model, .. }
            | Command::Eval { model, .. } => Some(model),
            #[cfg(feature = "serve")]
            Command::Serve { model, .. } => Some(model),
            _ => None,
        }
    }

    /// The same, to fill in.
    fn model_args_mut(&mut self) -> Option<&mut ModelArgs> {
        match self {
            Command::Caption { model, .. }
            | Command::Ask { model, .. }
            | Command::Ocr { model, .. }
            | Command::Detect { model, .. }
            | Command::Segment { model, .. }
            | Command::Run { model, .. }
            | Command::Bench { model, .. }
            | Command::Eval { model, .. } => Some(model),
            #[cfg(feature = "serve")]
            Command::Serve { model, .. } => Some(model),
            _ => None,
        }
    }
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
    let matches = Cli::command().get_matches_from(std::env::args_os().map(args::llama_cpp_flag));
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A bad sampling, length or adapter option is a usage error (status 2, as clap's own),
    // refused before anything loads, with the library's message.
    let sub = matches.subcommand().map(|(_, m)| m);
    if let (Some(model), Some(m)) = (cli.cmd.model_args_mut(), sub) {
        if let Err(e) = args::order_adapters(model, m) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(Err(e)) = cli.cmd.model_args().map(args::gen_options) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
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
        } => tools::run_convert(
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
        Command::ConvertLora {
            adapter_dir,
            out,
            ty,
            force,
            name,
            quiet,
        } => tools::run_convert_lora(adapter_dir, out, &ty, force, name, quiet).map(|o| {
            for p in o.decoder.iter().chain(&o.mmproj) {
                println!("{}", p.display());
            }
            true
        }),
        Command::ConvertVae { npz, out, force } => {
            tools::run_convert_vae(&npz, out, force).map(|o| {
                println!("{}", o.display());
                true
            })
        }
        Command::Info {
            backends: true,
            json,
            ..
        } => {
            tools::run_backends(json);
            Ok(true)
        }
        Command::Info { file, .. } => match file {
            Some(file) => tools::run_info(file).map(|_| true),
            None => Err("pali info: give a GGUF file or --backends".into()),
        },
        Command::Caption {
            images,
            lang,
            long,
            clip,
            model,
        } => {
            // Folders are expanded to their images; a clip is a file.
            let images = match clip.selection() {
                Some(_) => images,
                None => files::expand_images(&images),
            };
            if images.is_empty() {
                Err("no images found".into())
            } else {
                let inputs = run::Input::each(images, &clip);
                run::generate_each(&inputs, &Task::Caption { lang, long }, &model)
            }
        }
        Command::Ask {
            image,
            question,
            lang,
            clip,
            model,
        } => run::generate_each(
            &run::Input::each(vec![image], &clip),
            &Task::Ask { lang, question },
            &model,
        ),
        Command::Ocr { image, clip, model } => {
            run::generate_each(&run::Input::each(vec![image], &clip), &Task::Ocr, &model)
        }
        Command::Detect {
            image,
            objects,
            draw,
            clip,
            model,
        } => run::run_locate(
            &run::Input::one(image, &clip),
            &Task::Detect(objects),
            run::LocateOutputs {
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
            clip,
            model,
        } => run::run_locate(
            &run::Input::one(image, &clip),
            &Task::Segment(objects),
            run::LocateOutputs {
                draw: draw.as_deref(),
                mask_out: mask_out.as_deref(),
                vae: vae.as_deref(),
            },
            &model,
        ),
        Command::Run {
            image,
            prompt,
            clip,
            model,
        } => match (image.len(), clip.selection()) {
            (1, _) => {
                run::generate_each(&run::Input::each(image, &clip), &Task::Raw(prompt), &model)
            }
            (_, Some(_)) => Err("--frames / --fps take one clip: give one --image".into()),
            _ => run::generate_each(&[run::Input::Images(image)], &Task::Raw(prompt), &model),
        },
        Command::Bench {
            image,
            prompt,
            runs,
            model,
        } => run::run_bench(&image, &prompt, runs.max(1), &model).map(|_| true),
        Command::Eval { set, model } => run::run_eval(&set, &model).map(|_| true),
        #[cfg(feature = "rpc")]
        Command::RpcServer {
            host,
            port,
            threads,
            cache,
        } => tools::run_rpc_server(&host, port, threads, cache).map(|_| true),
        #[cfg(feature = "serve")]
        Command::Serve { serve, model } => serve::run_serve(serve, model).map(|_| true),
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
