//! The conversion plan: which checkpoint tensor becomes which GGUF tensor, with which
//! shape, type, fix-up and padding (names from [`pali_ggml::schema`]).

use crate::config::PaliGemmaConfig;
use crate::safetensors::{Checkpoint, TensorEntry};
use crate::{ConvertError, Result};
use pali_ggml::schema::{self, Fixup, NameMapEntry};
use pali_ggml::GgmlType;

/// One planned output tensor.
pub(crate) struct Planned<'a> {
    pub(crate) gguf_name: String,
    pub(crate) hf_name: String,
    pub(crate) entry: &'a TensorEntry,
    /// Shape in the GGUF (ggml order), padding included.
    pub(crate) ne: Vec<i64>,
    pub(crate) fixup: Fixup,
    pub(crate) ty: GgmlType,
    pub(crate) pad: Pad,
    /// Every value is multiplied by this on the way (1 = stored as is).
    pub(crate) scale: f32,
}

/// Zero padding on the way into GGUF (see [`pad_vision_ffn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pad {
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
        scale: 1.0,
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

pub(crate) fn decoder_plan<'a>(
    ckpt: &'a Checkpoint,
    cfg: &PaliGemmaConfig,
) -> Result<Vec<Planned<'a>>> {
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

pub(crate) fn vision_plan<'a>(
    ckpt: &'a Checkpoint,
    cfg: &PaliGemmaConfig,
) -> Result<Vec<Planned<'a>>> {
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
pub(crate) fn pad_vision_ffn(vis: &mut [Planned], ffn: usize, block: usize) -> usize {
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
pub(crate) fn report_unused(ckpt: &Checkpoint, used: &[&Planned]) {
    let used: std::collections::HashSet<&str> = used.iter().map(|p| p.hf_name.as_str()).collect();
    for name in ckpt.tensors().keys() {
        if !used.contains(name.as_str()) && !schema::hf_prefixes::LM_HEAD.contains(&name.as_str()) {
            log::warn!("ignoring checkpoint tensor {name}: not part of PaliGemma 2");
        }
    }
}
