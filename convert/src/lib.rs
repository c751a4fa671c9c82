//! `pali convert`: an HF PaliGemma 2 checkpoint → a llama.cpp `gemma2` decoder GGUF and an
//! `mmproj` GGUF (SigLIP + projector + preprocessing metadata).
//!
//! Tensors stream from memmap'd safetensors one at a time; quantized decoders are made by
//! llama.cpp's own quantizer from a lossless intermediate, so a pali Q4_K_M file is what
//! `llama-quantize` makes. Outputs are written as `*.partial`, fsynced and renamed: a failure
//! or Ctrl-C never leaves a file at a target path.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
mod npz;
pub mod safetensors;
pub mod vae;
pub mod vocab;

pub use pali_ggml::atomic_file::remove_partial_files;
pub use vae::convert_vae;

use config::{PaliGemmaConfig, PreprocessorConfig};
use pali_ggml::atomic_file::AtomicFile;
use pali_ggml::gguf::{GgufWriter, Value};
use pali_ggml::quant::{self, FileType};
use pali_ggml::schema::{self, keys, Fixup, NameMapEntry};
use pali_ggml::GgmlType;
use safetensors::{Checkpoint, TensorEntry};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use vocab::Vocab;

/// Converter errors; each names the file, tensor or key concerned.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A required file is absent.
    #[error("missing input: {0}")]
    Missing(String),
    /// config.json / preprocessor_config.json problems.
    #[error("bad config: {0}")]
    Config(String),
    /// Tokenizer files problems.
    #[error("bad tokenizer: {0}")]
    Tokenizer(String),
    /// Corrupt safetensors.
    #[error("bad safetensors: {0}")]
    Safetensors(String),
    /// A tensor is absent or has the wrong shape.
    #[error("bad checkpoint: {0}")]
    Tensor(String),
    /// Bad options (type, output).
    #[error("{0}")]
    Usage(String),
    /// I/O failure.
    #[error("I/O error: {0}")]
    Io(String),
    /// ggml / llama.cpp failure.
    #[error(transparent)]
    Ggml(#[from] pali_ggml::Error),
    /// Interrupted by the user.
    #[error("interrupted")]
    Interrupted,
    /// `convert-vae`: the .npz or the output is unusable (the message names the file and the
    /// array).
    #[error("{0}")]
    Vae(String),
}

impl ConvertError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        ConvertError::Io(format!("{}: {e}", path.display()))
    }
}

/// Result with [`ConvertError`].
pub type Result<T> = std::result::Result<T, ConvertError>;

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// HF checkpoint folder.
    pub input: PathBuf,
    /// Output folder (created if missing).
    pub out_dir: PathBuf,
    /// Decoder file type.
    pub text_type: FileType,
    /// Vision tower type: F16 (default), F32 or Q8_0.
    pub vision_type: FileType,
    /// Overwrite existing outputs.
    pub force: bool,
    /// Model name for file names and `general.name` (default: derived from the folder).
    pub name: Option<String>,
    /// Threads for quantization.
    pub threads: i32,
}

/// Paths written by a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOutput {
    /// The decoder GGUF.
    pub decoder: PathBuf,
    /// The mmproj GGUF.
    pub mmproj: PathBuf,
}

/// Progress reports: `(bytes done, bytes total, phase)`.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64, &str);

/// Renames a finished output into place; its I/O errors stay converter I/O errors.
fn commit(file: AtomicFile) -> Result<()> {
    file.commit().map_err(|e| match e {
        pali_ggml::Error::Io(m) => ConvertError::Io(m),
        e => ConvertError::Ggml(e),
    })
}

/// Readies the output folder: one conversion into it at a time (an exclusive lock on the
/// folder, held while the returned handle lives), and whatever a killed run left there
/// (`*.partial`, `*.src.partial`) removed with a warning. Existing targets are refused
/// without `force`, except the ones that run itself committed before it was killed: when
/// leftovers are found and not every target exists, those that do are from that run.
fn prepare_outputs(dir: &Path, targets: &[&Path], force: bool) -> Result<std::fs::File> {
    let lock = std::fs::File::open(dir).map_err(|e| ConvertError::io(dir, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(ConvertError::Usage(format!(
                "another pali convert is writing into {} now: wait for it, or use another -o",
                dir.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(ConvertError::io(dir, e)),
    }
    let mut leftovers = false;
    for t in targets {
        for suffix in [".partial", ".src.partial"] {
            let mut p = t.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            // Only files: anything else in the way fails later, with its own error.
            if p.is_file() {
                log::warn!(
                    "removing {}: left by a conversion that was killed",
                    p.display()
                );
                std::fs::remove_file(&p).map_err(|e| ConvertError::io(&p, e))?;
                leftovers = true;
            }
        }
    }
    let finishing = leftovers && !targets.iter().all(|t| t.exists());
    for t in targets.iter().filter(|t| t.exists()) {
        if finishing {
            log::warn!(
                "replacing {}: written by the conversion that was killed before it finished",
                t.display()
            );
        } else if !force {
            return Err(ConvertError::Usage(format!(
                "{} already exists (use --force to overwrite)",
                t.display()
            )));
        }
    }
    Ok(lock)
}

/// Passes writes through and keeps the first I/O error, so that a failed write (a full
/// disk) is reported with the file's name rather than the tensor's.
struct TrackedWriter<W: Write> {
    inner: W,
    failed: Option<std::io::Error>,
}

impl<W: Write> TrackedWriter<W> {
    fn track<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| {
            let copy = std::io::Error::new(e.kind(), e.to_string());
            self.failed.get_or_insert(e);
            copy
        })
    }
}

impl<W: Write> Write for TrackedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write(buf);
        self.track(r)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.track(r)
    }
}

/// Derives `PaliGemma2-3B-pt-224` from a folder named like `paligemma2-3b-pt-224`.
pub fn model_name(dir: &Path, cfg: &PaliGemmaConfig) -> String {
    let base = cfg
        .name_or_path
        .as_deref()
        .and_then(|s| s.rsplit(['/', '\\']).find(|p| !p.is_empty()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into())
        });
    let lower = base.to_ascii_lowercase();
    if let Some(rest) = lower
        .strip_prefix("paligemma2-")
        .or_else(|| lower.strip_prefix("paligemma-2-"))
    {
        let mut parts: Vec<String> = rest.split('-').map(str::to_string).collect();
        if let Some(size) = parts.first_mut() {
            if size.ends_with('b')
                && size[..size.len() - 1]
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.')
            {
                *size = size.to_ascii_uppercase();
            }
        }
        return format!("PaliGemma2-{}", parts.join("-"));
    }
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One planned output tensor.
struct Planned<'a> {
    gguf_name: String,
    hf_name: String,
    entry: &'a TensorEntry,
    /// Shape in the GGUF (ggml order), padding included.
    ne: Vec<i64>,
    fixup: Fixup,
    ty: GgmlType,
    pad: Pad,
}

/// Zero padding on the way into GGUF (see [`pad_vision_ffn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pad {
    None,
    /// Each row of `from` values is extended with zeros to `ne[0]`.
    RowTail {
        from: usize,
    },
    /// `ne[1] - from` zero rows are appended after the `from` rows.
    ExtraRows {
        from: usize,
    },
}

/// Finds the HF tensor for `suffix` under any of `prefixes`.
fn find<'a>(
    ckpt: &'a Checkpoint,
    prefixes: &[&str],
    suffix: &str,
) -> Option<(String, &'a TensorEntry)> {
    prefixes.iter().find_map(|p| {
        let name = format!("{p}{suffix}");
        ckpt.get(&name).map(|e| (name, e))
    })
}

fn plan_one<'a>(
    ckpt: &'a Checkpoint,
    prefixes: &[&str],
    hf_suffix: &str,
    gguf_name: String,
    fixup: Fixup,
    shape: &[usize],
    out: &mut Vec<Planned<'a>>,
) -> Result<()> {
    let (hf_name, entry) = find(ckpt, prefixes, hf_suffix).ok_or_else(|| {
        // Name the tensor as the checkpoint's own layout would.
        let prefix = prefixes
            .iter()
            .find(|p| ckpt.tensors().keys().any(|k| k.starts_with(*p)))
            .unwrap_or(&prefixes[0]);
        ConvertError::Tensor(format!(
            "tensor {prefix}{hf_suffix} is missing from the checkpoint"
        ))
    })?;
    if entry.shape != shape {
        return Err(ConvertError::Tensor(format!(
            "tensor {hf_name} has shape {:?}, but config.json implies {shape:?}",
            entry.shape
        )));
    }
    let ne = shape.iter().rev().map(|&d| d as i64).collect();
    out.push(Planned {
        gguf_name,
        hf_name,
        entry,
        ne,
        fixup,
        ty: GgmlType::F32,
        pad: Pad::None,
    });
    Ok(())
}

/// A layer of a per-layer table: its index, HF prefix (`layers.` / `encoder.layers.`) and
/// GGUF naming function.
type Layer<'n> = (usize, &'n str, fn(usize, &str) -> String);

fn plan_table<'a>(
    ckpt: &'a Checkpoint,
    prefixes: &[&str],
    table: &[NameMapEntry],
    layer: Option<Layer>,
    shape_of: &dyn Fn(&str) -> Vec<usize>,
    out: &mut Vec<Planned<'a>>,
) -> Result<()> {
    for &(hf, gg, fix) in table {
        let (hf_suffix, gguf_name) = match layer {
            Some((i, hf_layers, gguf_block)) => (format!("{hf_layers}{i}.{hf}"), gguf_block(i, gg)),
            None => (hf.to_string(), gg.to_string()),
        };
        plan_one(
            ckpt,
            prefixes,
            &hf_suffix,
            gguf_name,
            fix,
            &shape_of(hf),
            out,
        )?;
    }
    Ok(())
}

fn decoder_plan<'a>(ckpt: &'a Checkpoint, cfg: &PaliGemmaConfig) -> Result<Vec<Planned<'a>>> {
    let t = &cfg.text;
    let (h, i, q, kv) = (
        t.hidden_size,
        t.intermediate_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    let shape = |hf: &str| -> Vec<usize> {
        match hf {
            "embed_tokens.weight" => vec![t.vocab_size, h],
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
            "mlp.down_proj.weight" => vec![h, i],
            _ => vec![h], // norms
        }
    };
    let pre = schema::hf_prefixes::LANGUAGE_MODEL;
    let mut out = Vec::new();
    plan_table(
        ckpt,
        pre,
        &schema::decoder::GLOBAL[..1],
        None,
        &shape,
        &mut out,
    )?;
    for l in 0..t.num_hidden_layers {
        plan_table(
            ckpt,
            pre,
            schema::decoder::LAYER,
            Some((l, "layers.", schema::decoder_block)),
            &shape,
            &mut out,
        )?;
    }
    plan_table(
        ckpt,
        pre,
        &schema::decoder::GLOBAL[1..],
        None,
        &shape,
        &mut out,
    )?;
    // llama.cpp's gemma2 always ties the head to token_embd: a stored head must equal it.
    for name in schema::hf_prefixes::LM_HEAD {
        if let Some(head) = ckpt.get(name) {
            let emb = out[0].entry;
            let same = head.shape == emb.shape
                && (ckpt.bytes(head) == ckpt.bytes(emb)
                    || ckpt.read_f32(head)? == ckpt.read_f32(emb)?);
            if !same {
                return Err(ConvertError::Tensor(format!(
                    "tensor {name} differs from the embedding; llama.cpp's gemma2 requires a tied output head"
                )));
            }
        }
    }
    Ok(out)
}

fn vision_plan<'a>(ckpt: &'a Checkpoint, cfg: &PaliGemmaConfig) -> Result<Vec<Planned<'a>>> {
    let v = &cfg.vision;
    let (d, f, p) = (v.hidden_size, v.intermediate_size, v.patch_size);
    let n = cfg.num_image_tokens();
    let shape = |hf: &str| -> Vec<usize> {
        match hf {
            "embeddings.patch_embedding.weight" => vec![d, v.num_channels, p, p],
            "embeddings.position_embedding.weight" => vec![n, d],
            "mlp.fc1.weight" => vec![f, d],
            "mlp.fc1.bias" => vec![f],
            "mlp.fc2.weight" => vec![d, f],
            h if h.starts_with("self_attn.") && h.ends_with(".weight") => vec![d, d],
            _ => vec![d],
        }
    };
    let pre = schema::hf_prefixes::VISION;
    let mut out = Vec::new();
    plan_table(
        ckpt,
        pre,
        &schema::vision::GLOBAL[..3],
        None,
        &shape,
        &mut out,
    )?;
    for l in 0..v.num_hidden_layers {
        plan_table(
            ckpt,
            pre,
            schema::vision::LAYER,
            Some((l, "encoder.layers.", schema::vision_block)),
            &shape,
            &mut out,
        )?;
    }
    plan_table(
        ckpt,
        pre,
        &schema::vision::GLOBAL[3..],
        None,
        &shape,
        &mut out,
    )?;
    let h = cfg.text.hidden_size;
    let proj_shape = |hf: &str| {
        if hf.ends_with("weight") {
            vec![h, d]
        } else {
            vec![h]
        }
    };
    plan_table(
        ckpt,
        schema::hf_prefixes::PROJECTOR,
        schema::vision::PROJECTOR,
        None,
        &proj_shape,
        &mut out,
    )?;
    Ok(out)
}

/// For a block-quantized vision type, pads the MLP width (SigLIP-So400m: 4304 = 134.5
/// blocks of 32) to whole blocks with zeros: `fc1` gets zero rows and zero biases, `fc2`
/// zero columns. GELU(0) = 0, so the tower computes exactly the same function, and `fc2`
/// (a third of the tower's FLOPs) can be stored in the quantized type and run as an int8
/// matmul instead of falling back to F16 (widened to F32 at run time): 2.5x its speed.
/// Returns the padded width.
fn pad_vision_ffn(vis: &mut [Planned], ffn: usize, block: usize) -> usize {
    let padded = ffn.div_ceil(block) * block;
    if padded == ffn {
        return ffn;
    }
    for p in vis.iter_mut() {
        let name = p.gguf_name.as_str();
        if name.ends_with(schema::vision::FC1_W) {
            p.ne[1] = padded as i64;
            p.pad = Pad::ExtraRows { from: ffn };
        } else if name.ends_with(schema::vision::FC1_B) || name.ends_with(schema::vision::FC2_W) {
            p.ne[0] = padded as i64;
            p.pad = Pad::RowTail { from: ffn };
        }
    }
    padded
}

/// Checks that every checkpoint tensor is used (warns about the others).
fn report_unused(ckpt: &Checkpoint, used: &[&Planned]) {
    let used: std::collections::HashSet<&str> = used.iter().map(|p| p.hf_name.as_str()).collect();
    for name in ckpt.tensors().keys() {
        if !used.contains(name.as_str()) && !schema::hf_prefixes::LM_HEAD.contains(&name.as_str()) {
            log::warn!("ignoring checkpoint tensor {name}: not part of PaliGemma 2");
        }
    }
}

/// Source bytes converted per step: bounds the converter's working memory whatever the
/// tensor size (the 257216-row embedding is 1.2 GB in bf16).
const CHUNK_BYTES: usize = 32 << 20;

/// Streams one tensor into `out` in chunks of whole rows, dropping the source pages of each
/// chunk once written, so peak memory is one chunk, not one tensor.
fn write_tensor(ckpt: &Checkpoint, p: &Planned, out: &mut dyn Write) -> Result<()> {
    let e = p.entry;
    let row = p.ne[0] as usize;
    let (src_row, extra_rows) = match p.pad {
        Pad::None => (row, 0),
        Pad::RowTail { from } => (from, 0),
        Pad::ExtraRows { from } => (row, p.ne[1] as usize - from),
    };
    let n_rows = e.numel() / src_row;
    let src_row_bytes = src_row * e.dtype.size();
    let rows_per_chunk = (CHUNK_BYTES / src_row_bytes).max(1);
    let bytes = ckpt.bytes(e);
    let tensor_err = |err: String| ConvertError::Tensor(format!("tensor {}: {err}", p.hf_name));
    for r0 in (0..n_rows).step_by(rows_per_chunk) {
        let r1 = (r0 + rows_per_chunk).min(n_rows);
        let src = &bytes[r0 * src_row_bytes..r1 * src_row_bytes];
        if p.fixup == Fixup::None && e.dtype.ggml() == p.ty && src_row == row {
            out.write_all(src)
                .map_err(|err| tensor_err(err.to_string()))?;
        } else {
            let mut vals = pali_ggml::quant::to_f32(e.dtype.ggml(), src)?;
            if p.fixup == Fixup::AddOne {
                vals.iter_mut().for_each(|v| *v += 1.0);
            }
            if src_row != row {
                vals = vals
                    .chunks(src_row)
                    .flat_map(|r| {
                        r.iter()
                            .copied()
                            .chain(std::iter::repeat_n(0.0, row - src_row))
                    })
                    .collect();
            }
            let conv =
                quant::convert_f32(p.ty, &vals, row).map_err(|err| tensor_err(err.to_string()))?;
            out.write_all(&conv)
                .map_err(|err| tensor_err(err.to_string()))?;
        }
        ckpt.release_range(e, r0 * src_row_bytes, r1 * src_row_bytes);
    }
    if extra_rows > 0 {
        let zeros = quant::convert_f32(p.ty, &vec![0.0; extra_rows * row], row)
            .map_err(|err| tensor_err(err.to_string()))?;
        out.write_all(&zeros)
            .map_err(|err| tensor_err(err.to_string()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_gguf(
    path: &Path,
    suffix: &str,
    ckpt: &Checkpoint,
    plan: &[Planned],
    header: &GgufWriter,
    done: &mut u64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64, &str),
    phase: &str,
) -> Result<AtomicFile> {
    let file = AtomicFile::new(path, suffix);
    let f = std::fs::File::create(file.path()).map_err(|e| ConvertError::io(file.path(), e))?;
    let mut w = TrackedWriter {
        inner: BufWriter::with_capacity(1 << 20, f),
        failed: None,
    };
    let write_error = |e: std::io::Error| {
        ConvertError::Io(format!(
            "writing {}: {e} (nothing was left at that path)",
            path.display()
        ))
    };
    let mut err: Option<ConvertError> = None;
    let res = header.write(&mut w, |i, _, out| {
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            err = Some(ConvertError::Interrupted);
            return Err(pali_ggml::Error::Invalid("interrupted".into()));
        }
        let p = &plan[i];
        write_tensor(ckpt, p, out).map_err(|e| {
            let msg = e.to_string();
            err = Some(e);
            pali_ggml::Error::Invalid(msg)
        })?;
        *done += p.entry.numel() as u64 * p.entry.dtype.size() as u64;
        progress(*done, total, phase);
        Ok(())
    });
    if let Err(e) = res {
        if let Some(io) = w.failed.take() {
            return Err(write_error(io));
        }
        return Err(err.unwrap_or(ConvertError::Ggml(e)));
    }
    w.flush().map_err(write_error)?;
    Ok(file)
}

/// Set by a signal handler to stop a conversion between tensors.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a conversion.
pub fn convert(opts: &ConvertOptions, progress: ProgressFn) -> Result<ConvertOutput> {
    pali_ggml::logging::init();
    if !matches!(
        opts.vision_type,
        FileType::F16 | FileType::F32 | FileType::Q8_0
    ) {
        return Err(ConvertError::Usage(format!(
            "unsupported --vision-type {}: use f16, f32 or q8_0",
            opts.vision_type.label()
        )));
    }
    if !opts.input.is_dir() {
        return Err(ConvertError::Missing(format!(
            "{} is not a folder",
            opts.input.display()
        )));
    }
    let cfg = PaliGemmaConfig::load(&opts.input)?;
    let t = &cfg.text;
    let (Some(attn_cap), Some(final_cap)) = (t.attn_logit_softcapping, t.final_logit_softcapping)
    else {
        return Err(ConvertError::Config(
            "text_config: attn_logit_softcapping and final_logit_softcapping must be set (llama.cpp's gemma2 always caps)"
                .into(),
        ));
    };
    let pp = PreprocessorConfig::load(&opts.input)?;
    let vocab = Vocab::load(&opts.input, t.vocab_size, cfg.image_token_index)?;
    let ckpt = Checkpoint::open_dir(&opts.input)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| model_name(&opts.input, &cfg));

    std::fs::create_dir_all(&opts.out_dir).map_err(|e| ConvertError::io(&opts.out_dir, e))?;
    let decoder_path = opts
        .out_dir
        .join(format!("{name}-{}.gguf", opts.text_type.label()));
    let mmproj_path = opts
        .out_dir
        .join(format!("mmproj-{name}-{}.gguf", opts.vision_type.label()));
    let _lock = prepare_outputs(&opts.out_dir, &[&decoder_path, &mmproj_path], opts.force)?;

    let mut dec = decoder_plan(&ckpt, &cfg)?;
    let mut vis = vision_plan(&ckpt, &cfg)?;
    report_unused(&ckpt, &dec.iter().chain(vis.iter()).collect::<Vec<_>>());

    // Decoder element types: norms F32; matrices in the requested float type, or — for
    // quantized files — in the checkpoint's own precision, handed to llama.cpp's quantizer.
    let quantized = opts
        .text_type
        .matrix_type()
        .is_none_or(|t| t.is_quantized());
    for p in dec.iter_mut() {
        p.ty = if p.ne.len() == 1 {
            GgmlType::F32
        } else if quantized {
            p.entry.dtype.ggml()
        } else {
            opts.text_type.matrix_type().expect("float type")
        };
    }
    // Vision: matrices in the vision type (Q8_0 only where rows fit its blocks); the patch
    // kernel stays F32 because an F16 weight makes ggml round the pixels to F16 too.
    let vty = opts.vision_type.matrix_type().expect("checked above");
    if vty.is_quantized() {
        let f = cfg.vision.intermediate_size;
        let padded = pad_vision_ffn(&mut vis, f, vty.block_size() as usize);
        if padded != f {
            log::info!("vision MLP width {f} stored zero-padded to {padded} for {vty:?} blocks");
        }
    }
    for p in vis.iter_mut() {
        p.ty = if p.ne.len() != 2 || p.gguf_name == schema::vision::POS_EMBD {
            GgmlType::F32
        } else if p.ne[0] % vty.block_size() == 0 {
            vty
        } else {
            GgmlType::F16
        };
    }

    let total: u64 = dec
        .iter()
        .chain(vis.iter())
        .map(|p| (p.entry.numel() * p.entry.dtype.size()) as u64)
        .sum();
    let mut done = 0u64;

    // mmproj
    let mut mh = GgufWriter::new(vis.len());
    let n_img = cfg.num_image_tokens() as u32;
    let v = &cfg.vision;
    let kvs: Vec<(&str, Value)> = vec![
        (keys::ARCHITECTURE, Value::Str(keys::ARCH_CLIP.into())),
        (keys::NAME, Value::Str(name.clone())),
        (keys::FILE_TYPE, Value::U32(opts.vision_type.llama_ftype())),
        (keys::CLIP_HAS_VISION, Value::Bool(true)),
        (
            keys::CLIP_PROJECTOR_TYPE,
            Value::Str(keys::PROJECTOR_PALIGEMMA.into()),
        ),
        (keys::CLIP_USE_GELU, Value::Bool(true)),
        (keys::V_IMAGE_SIZE, Value::U32(v.image_size as u32)),
        (keys::V_PATCH_SIZE, Value::U32(v.patch_size as u32)),
        (keys::V_EMBEDDING_LENGTH, Value::U32(v.hidden_size as u32)),
        (
            keys::V_FEED_FORWARD_LENGTH,
            Value::U32(v.intermediate_size as u32),
        ),
        (keys::V_BLOCK_COUNT, Value::U32(v.num_hidden_layers as u32)),
        (keys::V_HEAD_COUNT, Value::U32(v.num_attention_heads as u32)),
        (keys::V_LN_EPS, Value::F32(v.layer_norm_eps as f32)),
        (keys::V_PROJECTION_DIM, Value::U32(t.hidden_size as u32)),
        (keys::V_IMAGE_MEAN, Value::ArrF32(pp.mean.to_vec())),
        (keys::V_IMAGE_STD, Value::ArrF32(pp.std.to_vec())),
        (keys::PALI_RESAMPLE, Value::U32(pp.resample)),
        (keys::PALI_RESCALE_FACTOR, Value::F32(pp.rescale_factor)),
        (keys::PALI_IMAGE_TOKENS, Value::U32(n_img)),
        (keys::PALI_TEXT_HIDDEN, Value::U32(t.hidden_size as u32)),
    ];
    for (k, val) in kvs {
        mh.set(k, val)?;
    }
    for p in &vis {
        mh.add_tensor(&p.gguf_name, p.ty, &p.ne)?;
    }

    // decoder
    let mut dh = GgufWriter::new(dec.len());
    let ftype_in_file = if quantized {
        // Intermediate file: its real (mixed) precision is whatever the checkpoint holds.
        match dec[1].entry.dtype.ggml() {
            GgmlType::BF16 => FileType::BF16,
            GgmlType::F16 => FileType::F16,
            _ => FileType::F32,
        }
    } else {
        opts.text_type
    };
    let kvs: Vec<(&str, Value)> = vec![
        (keys::ARCHITECTURE, Value::Str(keys::ARCH_GEMMA2.into())),
        (keys::NAME, Value::Str(name.clone())),
        (keys::FILE_TYPE, Value::U32(ftype_in_file.llama_ftype())),
        (keys::QUANTIZATION_VERSION, Value::U32(2)),
        (
            keys::CONTEXT_LENGTH,
            Value::U32(t.max_position_embeddings as u32),
        ),
        (keys::EMBEDDING_LENGTH, Value::U32(t.hidden_size as u32)),
        (keys::BLOCK_COUNT, Value::U32(t.num_hidden_layers as u32)),
        (
            keys::FEED_FORWARD_LENGTH,
            Value::U32(t.intermediate_size as u32),
        ),
        (keys::HEAD_COUNT, Value::U32(t.num_attention_heads as u32)),
        (
            keys::HEAD_COUNT_KV,
            Value::U32(t.num_key_value_heads as u32),
        ),
        (keys::KEY_LENGTH, Value::U32(t.head_dim as u32)),
        (keys::VALUE_LENGTH, Value::U32(t.head_dim as u32)),
        (keys::RMS_EPS, Value::F32(t.rms_norm_eps as f32)),
        (
            keys::SLIDING_WINDOW,
            Value::U32(
                t.sliding_window
                    .unwrap_or(t.max_position_embeddings as u64)
                    .min(u32::MAX as u64) as u32,
            ),
        ),
        (keys::ATTN_SOFTCAP, Value::F32(attn_cap as f32)),
        (keys::FINAL_SOFTCAP, Value::F32(final_cap as f32)),
        (keys::ROPE_FREQ_BASE, Value::F32(t.rope_theta as f32)),
        (keys::TOKENIZER_MODEL, Value::Str("llama".into())),
        (
            keys::TOKENIZER_TOKENS,
            Value::ArrStr(vocab.pieces.iter().map(|p| p.text.clone()).collect()),
        ),
        (
            keys::TOKENIZER_SCORES,
            Value::ArrF32(vocab.pieces.iter().map(|p| p.score).collect()),
        ),
        (
            keys::TOKENIZER_TOKEN_TYPE,
            Value::ArrI32(vocab.pieces.iter().map(|p| p.ty).collect()),
        ),
        (keys::TOKENIZER_BOS, Value::U32(2)),
        (keys::TOKENIZER_EOS, Value::U32(1)),
        (keys::TOKENIZER_UNK, Value::U32(3)),
        (keys::TOKENIZER_PAD, Value::U32(0)),
        (keys::TOKENIZER_ADD_BOS, Value::Bool(true)),
        (keys::TOKENIZER_ADD_EOS, Value::Bool(false)),
        (
            keys::TOKENIZER_ADD_SPACE_PREFIX,
            Value::Bool(vocab.add_space_prefix),
        ),
        (keys::TOKENIZER_HF_JSON, Value::Str(vocab.hf_json.clone())),
        (keys::PALI_VOCAB_SIZE, Value::U32(vocab.real_size as u32)),
        (keys::PALI_IMAGE_TOKEN_ID, Value::U32(cfg.image_token_index)),
        (
            keys::PALI_QUERY_PRE_ATTN_SCALAR,
            Value::F32(t.query_pre_attn_scalar as f32),
        ),
    ];
    for (k, val) in kvs {
        dh.set(k, val)?;
    }
    for p in &dec {
        dh.add_tensor(&p.gguf_name, p.ty, &p.ne)?;
    }
    if vocab.n_padding > 0 {
        log::info!(
            "vocabulary padded with {} [PADn] entries to the {} embedding rows",
            vocab.n_padding,
            t.vocab_size
        );
    }

    let mm = write_gguf(
        &mmproj_path,
        ".partial",
        &ckpt,
        &vis,
        &mh,
        &mut done,
        total,
        progress,
        "vision",
    )?;
    let dec_suffix = if quantized {
        ".src.partial"
    } else {
        ".partial"
    };
    let df = write_gguf(
        &decoder_path,
        dec_suffix,
        &ckpt,
        &dec,
        &dh,
        &mut done,
        total,
        progress,
        "decoder",
    )?;
    if quantized {
        progress(done, total, "quantizing");
        let q = AtomicFile::new(&decoder_path, ".partial");
        quant::quantize_model_file(
            df.path(),
            q.path(),
            opts.text_type,
            opts.threads,
            CHUNK_BYTES,
        )?;
        drop(df);
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ConvertError::Interrupted);
        }
        commit(q)?;
    } else {
        commit(df)?;
    }
    commit(mm)?;
    Ok(ConvertOutput {
        decoder: decoder_path,
        mmproj: mmproj_path,
    })
}
