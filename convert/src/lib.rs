//! `pali convert`: an HF PaliGemma 2 checkpoint → a llama.cpp `gemma2` decoder GGUF and an
//! `mmproj` GGUF (SigLIP + projector + preprocessing metadata); `pali convert-lora`
//! ([`lora`]): a PEFT LoRA adapter → the same two-file layout of llama.cpp adapter GGUFs.
//!
//! Tensors stream from memmap'd safetensors one at a time; quantized decoders are made by
//! llama.cpp's own quantizer from a lossless intermediate, so a pali Q4_K_M file is what
//! `llama-quantize` makes. Outputs are written as `*.partial`, fsynced and renamed: a failure
//! or Ctrl-C never leaves a file at a target path.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
mod error;
pub mod lora;
mod npz;
mod peft;
mod plan;
pub mod safetensors;
pub mod vae;
pub mod vocab;
mod write;

pub use error::{ConvertError, Result};
pub use lora::{convert_lora, LoraConvertOptions, LoraConvertOutput};
pub use pali_ggml::atomic_file::remove_partial_files;
pub use vae::convert_vae;
pub use write::INTERRUPTED;

use config::{PaliGemmaConfig, PreprocessorConfig};
use pali_ggml::atomic_file::AtomicFile;
use pali_ggml::gguf::{GgufWriter, Value};
use pali_ggml::quant::{self, FileType};
use pali_ggml::schema::{self, keys};
use pali_ggml::GgmlType;
use plan::{decoder_plan, pad_vision_ffn, report_unused, vision_plan};
use safetensors::Checkpoint;
use std::path::{Path, PathBuf};
use vocab::Vocab;
use write::{commit, prepare_outputs, write_gguf, CHUNK_BYTES};

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
