//! The vision graph: SigLIP-So400m/14 as a ggml graph (pre-LN ViT, learned positions, no CLS, no
//! pooling head), run on the same ggml backend as the decoder.
//!
//! Precision choices (measured against HF in `tests/parity.rs`):
//! - patches are cut in Rust and embedded with an F32 matmul: `ggml_conv_2d` would round the
//!   pixels to F16, and the patch kernel is stored in F32 for the same reason;
//! - GELU is pali's own CPU op (`pali_ggml` gelu.rs), or built from `tanh` & co. on GPUs:
//!   ggml's CPU `gelu` reads an F16 lookup table;
//! - attention is one fused flash-attention op with F32 K/V and F32 accumulation, so the
//!   N×N score matrix (4096² × 16 heads at 896 px) is never materialised; on the CPU it is
//!   also 5–10 % faster than two matmuls around a softmax at 224 px (measured, 3B Q8_0 and
//!   F16 towers, 2 threads).
//!
//! The graph ends with PaliGemma's projector (one linear layer with bias, no activation,
//! to the decoder's hidden size), as llama.cpp's mtmd ends its vision graphs.
//!
//! LoRA adapters (`adapter.rs`) are not merged: each linear layer an adapter changes gets
//! `scale · alpha / r · B (A x)` added beside `W x + b`, per token (the column dimension of
//! the matmuls), so one loaded base serves every adapter.

use super::config::{VisionConfig, VisionPrecision};
use crate::Result;
use pali_ggml::graph::{Graph, Tensor, Weights};
use pali_ggml::schema::{adapter as lora_names, vision as names, vision_block};
use pali_ggml::GgmlType;

/// One LoRA adapter in a graph: its tensors (on the graph's backend), its `alpha` and the
/// request's scale.
pub(super) struct Lora<'w> {
    pub(super) weights: &'w Weights,
    pub(super) alpha: f32,
    pub(super) scale: f32,
}

/// Cuts CHW pixels into patch rows `[n_tokens][3·p·p]`, each flattened in the conv kernel's
/// (channel, y, x) order, patches row-major (y outer) as HF's `flatten(2)`.
pub(super) fn patchify(cfg: &VisionConfig, pixels: &[f32]) -> Vec<f32> {
    let (r, p, g) = (cfg.image_size, cfg.patch_size, cfg.grid());
    let mut out = Vec::with_capacity(pixels.len());
    for py in 0..g {
        for px in 0..g {
            for c in 0..3 {
                for ky in 0..p {
                    let row = c * r * r + (py * p + ky) * r + px * p;
                    out.extend_from_slice(&pixels[row..row + p]);
                }
            }
        }
    }
    out
}

fn linear<'g, 'w>(
    g: &'g Graph<'w>,
    x: Tensor<'g>,
    (w, b): (&str, &str),
    precision: VisionPrecision,
    lora: &[Lora<'w>],
) -> Result<Tensor<'g>> {
    let product = match precision {
        VisionPrecision::F16 => g.mul_mat_f32_acc(g.weight(w)?, x),
        _ => f32_product(g, g.weight(w)?, x),
    };
    let y = g.add(product, g.weight(b)?);
    with_lora(g, x, y, w, precision, lora)
}

/// `y` plus each adapter's update of the layer whose weight is `w`, for input `x`.
fn with_lora<'g, 'w>(
    g: &'g Graph<'w>,
    x: Tensor<'g>,
    mut y: Tensor<'g>,
    w: &str,
    precision: VisionPrecision,
    lora: &[Lora<'w>],
) -> Result<Tensor<'g>> {
    for l in lora {
        let a = g.weight_from(l.weights, &format!("{w}{}", lora_names::SUFFIX_A))?;
        let b = g.weight_from(l.weights, &format!("{w}{}", lora_names::SUFFIX_B))?;
        let (Some(a), Some(b)) = (a, b) else {
            continue;
        };
        let [n_in, r, ..] = a.ne();
        // A Q8_0 tower stores its MLP zero-padded to whole blocks (config.rs): fc2 reads
        // only the real rows, fc1's update gets zero rows for the padding.
        let x = if n_in < x.ne()[0] {
            g.cont(g.crop_2d(x, 0, 0, n_in, x.ne()[1]))
        } else {
            x
        };
        let product = |w, x| match precision {
            VisionPrecision::F16 => g.mul_mat_f32_acc(w, x),
            _ => f32_product(g, w, x),
        };
        let per_rank = if l.alpha != 0.0 {
            l.alpha / r as f32
        } else {
            1.0
        };
        let mut update = g.scale(product(b, product(a, x)), l.scale * per_rank);
        if update.ne()[0] < y.ne()[0] {
            update = g.pad_rows(update, y.ne()[0]);
        }
        y = g.add(y, update);
    }
    Ok(y)
}

/// `w·x` with F32 activations: on the BLAS library's SGEMM where the build has one (the
/// CPU, `blas` feature; F16/BF16 weights widened there), else ggml's matmul on
/// [`f32_weight`].
fn f32_product<'g>(g: &'g Graph, w: Tensor<'g>, x: Tensor<'g>) -> Tensor<'g> {
    g.mul_mat_blas(w, x)
        .unwrap_or_else(|| g.mul_mat(f32_weight(g, w), x))
}

/// ggml's CPU matmul converts the activations to the weight's "vec_dot" type. For F16
/// weights that is F16 activations (~3 decimal digits lost per layer) and buys no speed on
/// the CPU (F16 and F32 matmuls run at the same rate), so F16/BF16 weights are widened to
/// F32 inside the graph; the widened copy lives only in the (reused) compute buffer, one
/// matrix at a time. Q8_0 weights are used as they are, with activations quantized to Q8_0
/// per block of 32 like every matmul of llama.cpp's decoder: int8 dot products run 2.5x
/// faster than the F32 matmul (BENCHMARKS.md, roofline), and choosing a Q8_0 vision tower
/// means choosing speed (its cost in accuracy is measured in BENCHMARKS.md).
pub(crate) fn f32_weight<'g>(g: &'g Graph, w: Tensor<'g>) -> Tensor<'g> {
    match w.ty() {
        GgmlType::F32 | GgmlType::Q8_0 => w,
        _ => g.cast(w, GgmlType::F32),
    }
}

fn layer_norm<'g>(g: &'g Graph, x: Tensor<'g>, w: &str, b: &str, eps: f32) -> Result<Tensor<'g>> {
    Ok(g.add(g.mul(g.norm(x, eps), g.weight(w)?), g.weight(b)?))
}

/// tanh-approximated GELU, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): pali's one-pass op on
/// the CPU (3B-224 tower 1.45-1.51 s instead of 1.56-1.63 s with the ggml ops below,
/// alternating runs), else built from exact ggml ops.
fn gelu_tanh<'g>(g: &'g Graph, x: Tensor<'g>) -> Tensor<'g> {
    if let Some(y) = g.gelu_tanh(x) {
        return y;
    }
    let x3 = g.mul(g.mul(x, x), x);
    let inner = g.add(x, g.scale(x3, 0.044715));
    let t = g.tanh(g.scale(inner, (2.0f32 / std::f32::consts::PI).sqrt()));
    g.mul(x, g.scale_bias(t, 0.5, 0.5))
}

/// Unmasked multi-head attention within each frame: q, k, v `[head_dim, tokens, heads,
/// frames]`, result `[head_dim · heads, tokens · frames]`. ggml's fused flash attention if
/// `fused` accepts its node (see [`AttentionKernel`]), else the plain product.
fn attention<'g>(
    g: &'g Graph,
    (q, k, v): (Tensor<'g>, Tensor<'g>, Tensor<'g>),
    scale: f32,
    precision: VisionPrecision,
    fused: &dyn Fn(Tensor<'g>) -> bool,
) -> Tensor<'g> {
    let [hd, n, heads, frames] = q.ne();
    // F16 keys and values are what GPU flash-attention kernels are fast on (some have no F32
    // kernel at all); the accumulation stays F32 (GGML_PREC_F32).
    let fa = match precision {
        VisionPrecision::F16 => {
            g.flash_attn(q, g.cast(k, GgmlType::F16), g.cast(v, GgmlType::F16), scale)
        }
        _ => g.flash_attn(q, k, v, scale),
    };
    if fused(fa) {
        return g.reshape(fa, &[hd * heads, n * frames]);
    }
    let (q, k) = (g.cont(q), g.cont(k));
    let scores = g.soft_max_scaled(g.mul_mat(k, q), scale); // [keys, queries, heads, frames]
    let vt = g.cont(g.permute(v, [1, 0, 2, 3])); // [keys, head_dim, heads, frames]
    let out = g.mul_mat(vt, scores); // [head_dim, queries, heads, frames]
    g.reshape(
        g.cont(g.permute(out, [0, 2, 1, 3])),
        &[hd * heads, n * frames],
    )
}

/// The tower on `frames` images at once (ONE graph: a batch): `patches` holds each frame's
/// patch rows in turn. The tokens of every frame are the columns of one `[width, tokens ·
/// frames]` activation for the linear layers (LoRA terms included), norms and GELU (per
/// token, so batching changes no value), and are split by frame only for the positions and
/// the attention.
pub(super) fn tower<'g, 'w>(
    g: &'g Graph<'w>,
    c: &VisionConfig,
    patches: Vec<f32>,
    frames: i64,
    precision: VisionPrecision,
    fused: &dyn Fn(Tensor<'g>) -> bool,
    lora: &[Lora<'w>],
) -> Result<Tensor<'g>> {
    let linear = |x, w: &str, b: &str| linear(g, x, (w, b), precision, lora);
    let (d, n, p) = (c.width as i64, c.n_tokens() as i64, c.patch_size as i64);
    let (heads, hd) = (c.heads as i64, (c.width / c.heads) as i64);
    let input = g.input(&[3 * p * p, n * frames], patches);
    let kernel = g.reshape(g.weight(names::PATCH_EMBD_W)?, &[3 * p * p, d]);
    let mut x = g.add(g.mul_mat(kernel, input), g.weight(names::PATCH_EMBD_B)?);
    // Every frame gets the same positions: `[d, n]` broadcast over the frames.
    x = g.add(g.reshape(x, &[d, n, frames]), g.weight(names::POS_EMBD)?);
    x = g.reshape(x, &[d, n * frames]);
    let scale = 1.0 / (hd as f32).sqrt();
    for l in 0..c.layers {
        let w = |s: &str| vision_block(l, s);
        let h = layer_norm(g, x, &w(names::LN1_W), &w(names::LN1_B), c.eps)?;
        let heads_of =
            |t: Tensor<'g>| g.permute(g.reshape(t, &[hd, heads, n, frames]), [0, 2, 1, 3]);
        let q = heads_of(linear(h, &w(names::Q_W), &w(names::Q_B))?);
        let k = heads_of(linear(h, &w(names::K_W), &w(names::K_B))?);
        let v = heads_of(linear(h, &w(names::V_W), &w(names::V_B))?);
        let attn = attention(g, (q, k, v), scale, precision, fused);
        x = g.add(x, linear(attn, &w(names::O_W), &w(names::O_B))?);
        let h = layer_norm(g, x, &w(names::LN2_W), &w(names::LN2_B), c.eps)?;
        let h = gelu_tanh(g, linear(h, &w(names::FC1_W), &w(names::FC1_B))?);
        x = g.add(x, linear(h, &w(names::FC2_W), &w(names::FC2_B))?);
    }
    let out = layer_norm(g, x, names::POST_LN_W, names::POST_LN_B, c.eps)?;
    debug_assert_eq!(out.ty(), GgmlType::F32);
    Ok(out)
}

/// `W·x + b` for every vision token: `[width, n] → [hidden, n]`. On OpenBLAS where the build
/// has it (F32 activations: an F16 projector's error against HF drops from ~2e-4 to the F32
/// file's ~1e-5), else ggml's matmul as it is.
pub(super) fn project<'g, 'w>(
    g: &'g Graph<'w>,
    x: Tensor<'g>,
    precision: VisionPrecision,
    lora: &[Lora<'w>],
) -> Result<Tensor<'g>> {
    let w = g.weight(names::PROJ_W)?;
    let product = g.mul_mat_blas(w, x).unwrap_or_else(|| g.mul_mat(w, x));
    let y = g.add(product, g.weight(names::PROJ_B)?);
    with_lora(g, x, y, names::PROJ_W, precision, lora)
}
