//! The vision tower's settings, read from the mmproj file, and the checks that the file's
//! tensors have the shapes those settings imply.

use crate::image::pillow::ResampleFilter;
use crate::image::PreprocessConfig;
use crate::{Error, Result};
use pali_ggml::gguf::GgufFile;
use pali_ggml::schema::{keys, vision as names, vision_block};

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
    pub fn preprocess_config(&self) -> Result<PreprocessConfig> {
        Ok(PreprocessConfig {
            image_size: self.image_size as u32,
            mean: self.mean,
            std: self.std,
            rescale_factor: self.rescale_factor,
            resample: ResampleFilter::from_pil_code(self.resample)?,
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

    /// Checks that `file` holds every tensor of this tower and its projector with the shape
    /// this configuration implies (errors name the tensor and both shapes).
    pub(super) fn check_tensors(&self, file: &GgufFile) -> Result<()> {
        let c = self;
        let (d, p) = (c.width as i64, c.patch_size as i64);
        let mut want: Vec<(String, Vec<i64>)> = vec![
            (names::PATCH_EMBD_W.into(), vec![p, p, 3, d]),
            (names::PATCH_EMBD_B.into(), vec![d]),
            (names::POS_EMBD.into(), vec![d, c.n_tokens() as i64]),
            (names::POST_LN_W.into(), vec![d]),
            (names::POST_LN_B.into(), vec![d]),
        ];
        // The projector: one linear layer from the vision width to the decoder's hidden size.
        let h = c.projection_dim as i64;
        want.push((names::PROJ_W.into(), vec![d, h]));
        want.push((names::PROJ_B.into(), vec![h]));
        let infos = file.tensors();
        // 16 tensors per layer: a lying block count is refused before the expected table is
        // built (2^31 layers made that loop run for ever: found by fuzzing).
        if c.layers.saturating_mul(16) > infos.len() {
            return Err(Error::Model(format!(
                "{}: {} = {} but the file holds only {} tensors",
                file.path().display(),
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
                    file.path().display()
                ))
            })?;
            if t.ne != ne {
                return Err(Error::Model(format!(
                    "{}: tensor {name} has shape {:?}, expected {ne:?}",
                    file.path().display(),
                    t.ne
                )));
            }
        }
        Ok(())
    }
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
