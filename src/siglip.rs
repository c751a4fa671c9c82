//! SigLIP-So400m/14 vision tower as a ggml graph (pre-LN ViT, learned positions, no CLS, no
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

use crate::projector;
use crate::{Error, Result};
use pali_ggml::gguf::GgufFile;
use pali_ggml::graph::{Backend, Graph, Tensor, Weights};
use pali_ggml::schema::{keys, vision as names, vision_block};
use pali_ggml::GgmlType;
use std::path::Path;

/// Largest square input accepted from an mmproj file, in pixels.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// Vision tower and preprocessing settings, read from the mmproj file.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Square input size in pixels.
    pub image_size: usize,
    #[allow(missing_docs)]
    pub patch_size: usize,
    /// Transformer width (1152).
    pub width: usize,
    /// MLP width (4304).
    pub ffn: usize,
    #[allow(missing_docs)]
    pub layers: usize,
    #[allow(missing_docs)]
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Projector output width = decoder hidden size.
    pub projection_dim: usize,
    /// Per-channel mean for normalisation.
    pub mean: [f32; 3],
    /// Per-channel std for normalisation.
    pub std: [f32; 3],
    /// PIL resample code.
    pub resample: u32,
    /// Pixel rescale factor (1/255).
    pub rescale_factor: f32,
}

impl VisionConfig {
    /// Reads the settings from an mmproj file, refusing other kinds of GGUF.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let path = f.path().display().to_string();
        let arch = f.get_str(keys::ARCHITECTURE)?;
        if arch != keys::ARCH_CLIP {
            return Err(Error::Model(format!(
                "{path} is a {arch:?} GGUF, not an mmproj (vision) file{}",
                if arch == keys::ARCH_GEMMA2 {
                    ": it looks like the decoder; pass it with -m"
                } else {
                    ""
                }
            )));
        }
        let proj = f.get_str(keys::CLIP_PROJECTOR_TYPE)?;
        if proj != keys::PROJECTOR_PALIGEMMA {
            return Err(Error::Model(format!(
                "{path}: projector type {proj:?} is not PaliGemma's ({:?})",
                keys::PROJECTOR_PALIGEMMA
            )));
        }
        let triple = |k: &str| -> Result<[f32; 3]> {
            let v = f.get_arr_f32(k)?;
            v.try_into()
                .map_err(|_| Error::Model(format!("{path}: {k} must hold 3 values")))
        };
        let u = |k: &str| f.get_u32(k).map(|v| v as usize);
        let c = VisionConfig {
            image_size: u(keys::V_IMAGE_SIZE)?,
            patch_size: u(keys::V_PATCH_SIZE)?,
            width: u(keys::V_EMBEDDING_LENGTH)?,
            ffn: u(keys::V_FEED_FORWARD_LENGTH)?,
            layers: u(keys::V_BLOCK_COUNT)?,
            heads: u(keys::V_HEAD_COUNT)?,
            eps: f.get_f32(keys::V_LN_EPS)?,
            projection_dim: u(keys::V_PROJECTION_DIM)?,
            mean: triple(keys::V_IMAGE_MEAN)?,
            std: triple(keys::V_IMAGE_STD)?,
            resample: f.get_u32(keys::PALI_RESAMPLE)?,
            rescale_factor: f.get_f32(keys::PALI_RESCALE_FACTOR)?,
        };
        // Zero sizes would make empty tensors, and a huge image size a huge input buffer
        // before any tensor shape is compared: PaliGemma's largest is 896 px.
        let positive = [c.image_size, c.width, c.ffn, c.layers, c.projection_dim];
        if positive.contains(&0)
            || c.image_size > MAX_IMAGE_SIZE
            || c.patch_size == 0
            || !c.image_size.is_multiple_of(c.patch_size)
            || c.heads == 0
            || !c.width.is_multiple_of(c.heads)
        {
            return Err(Error::Model(format!(
                "{path}: inconsistent vision shape {c:?}"
            )));
        }
        Ok(c)
    }

    /// How images are prepared for this tower (size, normalisation, resampling filter).
    pub fn preprocess_config(&self) -> Result<crate::preprocess::PreprocessConfig> {
        Ok(crate::preprocess::PreprocessConfig {
            image_size: self.image_size as u32,
            mean: self.mean,
            std: self.std,
            rescale_factor: self.rescale_factor,
            resample: crate::preprocess::ResampleFilter::from_pil_code(self.resample)?,
            max_pixels: crate::MAX_IMAGE_PIXELS,
        })
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Image tokens per image.
    pub fn n_tokens(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// Cuts CHW pixels into patch rows `[n_tokens][3·p·p]`, each flattened in the conv kernel's
/// (channel, y, x) order, patches row-major (y outer) as HF's `flatten(2)`.
fn patchify(cfg: &VisionConfig, pixels: &[f32]) -> Vec<f32> {
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

/// Which output [`VisionEncoder::encode`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionOutput {
    /// The tower's output after the final LayerNorm, `[n_tokens][width]`.
    Tower,
    /// The projector's output, `[n_tokens][projection_dim]` (what HF calls image features
    /// before its division by √hidden).
    Projected,
}

/// How the tower computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// ggml's fused flash attention wherever the backend has a kernel for the shape (every
    /// CPU; on CUDA some head sizes, SigLIP's 72 among them), else [`AttentionKernel::Plain`].
    #[default]
    Auto,
    /// Explicit `softmax(q·kᵀ·scale)·v`, storing the `tokens² × heads` scores.
    Plain,
}

/// The precision the tower computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VisionPrecision {
    /// [`VisionPrecision::F32`] on every backend for now: the F16 path is checked against HF
    /// on the CPU only, and becomes the GPU default once measured on a real GPU (CUDA, Metal).
    #[default]
    Auto,
    /// F16/BF16 weights widened to F32 in the graph and F32 attention: HF's F32 to float
    /// reassociation, and no slower on the CPU, whose F16 and F32 matmuls run at one rate.
    F32,
    /// F16 weights used as they are (the backend multiplies in F16: tensor cores on a GPU)
    /// and F16 keys/values in flash attention; the matmuls' and the softmax's accumulation,
    /// layer norms, GELU and residuals stay F32. What a GPU needs to be fast; F16-class
    /// precision (tests/parity.rs measures it against HF on the CPU). Refused on Vulkan:
    /// ggml-vulkan corrupted host memory running it on lavapipe (tests/gpu.rs).
    F16,
}

/// The SigLIP tower + projector, loaded from an mmproj GGUF.
pub struct VisionEncoder {
    cfg: VisionConfig,
    weights: Weights,
    backend: Backend,
    attention: AttentionKernel,
    precision: VisionPrecision,
}

impl VisionEncoder {
    /// Loads an mmproj file onto the CPU (or the GPU when `gpu`).
    pub fn load(path: &Path, gpu: bool, threads: i32) -> Result<Self> {
        let cfg = VisionConfig::from_gguf(&GgufFile::open(path)?)?;
        let backend = Backend::new(gpu, threads)?;
        let weights = Weights::load(path, &backend)?;
        let enc = VisionEncoder {
            cfg,
            weights,
            backend,
            attention: AttentionKernel::Auto,
            precision: VisionPrecision::Auto,
        };
        enc.check_shapes()?;
        Ok(enc)
    }

    /// The settings read from the file.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Chooses the attention computation (the default, `Auto`, is the fastest the backend
    /// can run; `Plain` is what a backend without a fused kernel for the shape gets).
    pub fn set_attention(&mut self, kernel: AttentionKernel) {
        self.attention = kernel;
    }

    /// Chooses the compute precision (default `Auto`, see [`VisionPrecision::Auto`]).
    ///
    /// F16 on a Vulkan device is an error: on lavapipe ggml-vulkan wrote outside its buffers
    /// in that mode (F16 matmuls over the fixtures' 16-token images, and flash attention over
    /// 49 keys), corrupting the heap, and no real Vulkan GPU has been checked.
    pub fn set_precision(&mut self, precision: VisionPrecision) -> Result<()> {
        let backend = self.backend.name();
        if precision == VisionPrecision::F16 && backend.starts_with("Vulkan") {
            return Err(Error::Model(format!(
                "vision precision f16 is not available on {backend}: ggml-vulkan corrupted \
                 memory in that mode in pali's tests; use f32 (the default)"
            )));
        }
        self.precision = precision;
        Ok(())
    }

    /// The precision the tower computes in (`Auto` resolved for this backend).
    pub fn precision(&self) -> VisionPrecision {
        match self.precision {
            VisionPrecision::Auto => VisionPrecision::F32,
            p => p,
        }
    }

    /// Name of the backend the tower runs on.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.cfg;
        let (d, p) = (c.width as i64, c.patch_size as i64);
        let mut want: Vec<(String, Vec<i64>)> = vec![
            (names::PATCH_EMBD_W.into(), vec![p, p, 3, d]),
            (names::PATCH_EMBD_B.into(), vec![d]),
            (names::POS_EMBD.into(), vec![d, c.n_tokens() as i64]),
            (names::POST_LN_W.into(), vec![d]),
            (names::POST_LN_B.into(), vec![d]),
        ];
        want.extend(projector::expected_shapes(c));
        let infos = self.weights.file().tensors();
        // 16 tensors per layer: a lying block count is refused before the expected table is
        // built (2^31 layers made that loop run for ever: found by fuzzing).
        if c.layers.saturating_mul(16) > infos.len() {
            return Err(Error::Model(format!(
                "{}: {} = {} but the file holds only {} tensors",
                self.weights.file().path().display(),
                keys::V_BLOCK_COUNT,
                c.layers,
                infos.len()
            )));
        }
        // A quantized tower may store the MLP zero-padded to whole blocks (pali convert
        // does, for Q8_0: 4304 -> 4320); the padding changes nothing in the result.
        let padded = c.ffn.div_ceil(32) * 32;
        let f = match infos
            .iter()
            .find(|t| t.name == vision_block(0, names::FC1_B))
        {
            Some(t) if t.ne == [padded as i64] => padded as i64,
            _ => c.ffn as i64,
        };
        for l in 0..c.layers {
            for (n, s) in [
                (names::Q_W, vec![d, d]),
                (names::K_W, vec![d, d]),
                (names::V_W, vec![d, d]),
                (names::O_W, vec![d, d]),
                (names::FC1_W, vec![d, f]),
                (names::FC1_B, vec![f]),
                (names::FC2_W, vec![f, d]),
            ] {
                want.push((vision_block(l, n), s));
            }
            for n in [
                names::LN1_W,
                names::LN1_B,
                names::LN2_W,
                names::LN2_B,
                names::Q_B,
                names::K_B,
                names::V_B,
                names::O_B,
                names::FC2_B,
            ] {
                want.push((vision_block(l, n), vec![d]));
            }
        }
        for (name, ne) in want {
            let t = infos.iter().find(|t| t.name == name).ok_or_else(|| {
                Error::Model(format!(
                    "{}: tensor {name} is missing",
                    self.weights.file().path().display()
                ))
            })?;
            if t.ne != ne {
                return Err(Error::Model(format!(
                    "{}: tensor {name} has shape {:?}, expected {ne:?}",
                    self.weights.file().path().display(),
                    t.ne
                )));
            }
        }
        Ok(())
    }

    /// Runs the tower (and projector) on preprocessed CHW pixels `[3][R][R]`.
    pub fn encode(&self, pixels: &[f32], output: VisionOutput) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if pixels.len() != 3 * c.image_size * c.image_size {
            return Err(Error::Model(format!(
                "expected {}x{} pixels, got {} values",
                c.image_size,
                c.image_size,
                pixels.len()
            )));
        }
        let g = Graph::new(&self.weights);
        let fused =
            |t: Tensor<'_>| self.attention == AttentionKernel::Auto && g.supports(t, &self.backend);
        let x = tower(&g, c, patchify(c, pixels), self.precision(), &fused)?;
        let out = match output {
            VisionOutput::Tower => x,
            VisionOutput::Projected => projector::project(&g, x)?,
        };
        Ok(g.compute(out, &self.backend)?)
    }
}

fn linear<'g>(
    g: &'g Graph,
    x: Tensor<'g>,
    w: &str,
    b: &str,
    precision: VisionPrecision,
) -> Result<Tensor<'g>> {
    let product = match precision {
        VisionPrecision::F16 => g.mul_mat_f32_acc(g.weight(w)?, x),
        _ => f32_product(g, g.weight(w)?, x),
    };
    Ok(g.add(product, g.weight(b)?))
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

/// Unmasked multi-head attention: q, k, v `[head_dim, tokens, heads]`, result `[head_dim ·
/// heads, tokens]`. ggml's fused flash attention if `fused` accepts its node (see
/// [`AttentionKernel`]), else the plain product.
fn attention<'g>(
    g: &'g Graph,
    (q, k, v): (Tensor<'g>, Tensor<'g>, Tensor<'g>),
    scale: f32,
    precision: VisionPrecision,
    fused: &dyn Fn(Tensor<'g>) -> bool,
) -> Tensor<'g> {
    let [hd, n, heads, _] = q.ne();
    // F16 keys and values are what GPU flash-attention kernels are fast on (some have no F32
    // kernel at all); the accumulation stays F32 (GGML_PREC_F32).
    let fa = match precision {
        VisionPrecision::F16 => {
            g.flash_attn(q, g.cast(k, GgmlType::F16), g.cast(v, GgmlType::F16), scale)
        }
        _ => g.flash_attn(q, k, v, scale),
    };
    if fused(fa) {
        return g.reshape(fa, &[hd * heads, n]);
    }
    let (q, k) = (g.cont(q), g.cont(k));
    let scores = g.soft_max_scaled(g.mul_mat(k, q), scale); // [keys, queries, heads]
    let vt = g.cont(g.permute(v, [1, 0, 2, 3])); // [keys, head_dim, heads]
    let out = g.mul_mat(vt, scores); // [head_dim, queries, heads]
    g.reshape(g.cont(g.permute(out, [0, 2, 1, 3])), &[hd * heads, n])
}

fn tower<'g>(
    g: &'g Graph,
    c: &VisionConfig,
    patches: Vec<f32>,
    precision: VisionPrecision,
    fused: &dyn Fn(Tensor<'g>) -> bool,
) -> Result<Tensor<'g>> {
    let linear = |x, w: &str, b: &str| linear(g, x, w, b, precision);
    let (d, n, p) = (c.width as i64, c.n_tokens() as i64, c.patch_size as i64);
    let (heads, hd) = (c.heads as i64, (c.width / c.heads) as i64);
    let input = g.input(&[3 * p * p, n], patches);
    let kernel = g.reshape(g.weight(names::PATCH_EMBD_W)?, &[3 * p * p, d]);
    let mut x = g.add(g.mul_mat(kernel, input), g.weight(names::PATCH_EMBD_B)?);
    x = g.add(x, g.weight(names::POS_EMBD)?);
    let scale = 1.0 / (hd as f32).sqrt();
    for l in 0..c.layers {
        let w = |s: &str| vision_block(l, s);
        let h = layer_norm(g, x, &w(names::LN1_W), &w(names::LN1_B), c.eps)?;
        let heads_of = |t: Tensor<'g>| g.permute(g.reshape(t, &[hd, heads, n]), [0, 2, 1, 3]);
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
