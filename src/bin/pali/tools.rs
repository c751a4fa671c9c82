//! The commands that are not tasks: convert, convert-lora, convert-vae, info, rpc-server.

use pali_convert::{ConvertOptions, ConvertOutput, LoraConvertOptions, LoraConvertOutput};
use pali_ggml::gguf::GgufFile;
use pali_ggml::quant::FileType;
use std::path::{Path, PathBuf};

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
pub(crate) fn run_convert(
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
    stop_on_ctrl_c()?;
    let bar = progress_bar(quiet);
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

/// Ctrl-C stops a conversion between tensors, leaving no output.
fn stop_on_ctrl_c() -> Result<(), String> {
    ctrlc::set_handler(|| {
        pali_convert::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        pali_convert::remove_partial_files();
        eprintln!("\ninterrupted: no output written");
        std::process::exit(130);
    })
    .map_err(|e| e.to_string())
}

/// A conversion's progress bar on stderr (hidden when quiet or not a terminal).
fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
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
    bar
}

/// `pali convert-lora`: a PEFT adapter folder → the adapter GGUF(s).
pub(crate) fn run_convert_lora(
    adapter_dir: PathBuf,
    out: PathBuf,
    ty: &str,
    force: bool,
    name: Option<String>,
    quiet: bool,
) -> Result<LoraConvertOutput, String> {
    use FileType::*;
    let ty = parse_type(ty, "--type", &[F16, F32, Q8_0])?;
    stop_on_ctrl_c()?;
    let bar = progress_bar(quiet);
    let opts = LoraConvertOptions {
        input: adapter_dir,
        out_dir: out,
        ty,
        force,
        name,
    };
    let mut progress = |done: u64, total: u64, phase: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(phase.to_string());
    };
    let res = pali_convert::convert_lora(&opts, &mut progress).map_err(|e| e.to_string());
    bar.finish_and_clear();
    res
}

pub(crate) fn run_info(file: PathBuf) -> Result<(), String> {
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
pub(crate) fn run_backends(json: bool) {
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

/// `pali convert-vae`: the mask decoder GGUF next to the .npz unless `-o` says otherwise.
pub(crate) fn run_convert_vae(
    npz: &Path,
    out: Option<PathBuf>,
    force: bool,
) -> Result<PathBuf, String> {
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
    pali_convert::convert_vae(npz, &out, force).map_err(|e| e.to_string())?;
    Ok(out)
}

/// `pali rpc-server`: ggml's RPC server on this machine's device, until killed.
#[cfg(feature = "rpc")]
pub(crate) fn run_rpc_server(
    host: &str,
    port: u16,
    threads: Option<i32>,
    cache: bool,
) -> Result<(), String> {
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
