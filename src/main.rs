//! The `pali` command line: convert checkpoints, inspect GGUF files, caption and ask.

use clap::{Parser, Subcommand};
use pali_convert::{ConvertOptions, ConvertOutput};
use pali_ggml::gguf::GgufFile;
use pali_ggml::quant::FileType;
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
        /// Decoder type: f32, f16, q8_0, q4_0, q4_k_m.
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
    /// Print a GGUF file's metadata and tensor table.
    Info {
        /// The GGUF file.
        file: PathBuf,
    },
}

fn parse_type(s: &str, what: &str, allowed: &[FileType]) -> Result<FileType, String> {
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
    let text_type = parse_type(text_type, "--type", &[F32, F16, Q8_0, Q4_0, Q4KM])?;
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,llama.cpp=off"),
    )
    .format_timestamp(None)
    .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
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
        }),
        Command::Info { file } => run_info(file),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
