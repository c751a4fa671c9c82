//! [`VisionEncoder`]: the SigLIP tower and the projector loaded from an mmproj GGUF onto a
//! ggml backend, turning preprocessed pixels into image features.

use super::adapter::VisionAdapter;
use super::config::{AttentionKernel, VisionConfig, VisionPrecision};
use super::graph;
use crate::options::{AdapterId, AdapterScale};
use crate::{Error, Result};
use pali_ggml::gguf::GgufFile;
use pali_ggml::graph::{Backend, Graph, Tensor, Weights};
use std::path::Path;

/// Which output [`VisionEncoder::encode`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionOutput {
    /// The tower's output after the final LayerNorm, `[n_tokens][width]`.
    Tower,
    /// The projector's output, `[n_tokens][projection_dim]` (what HF calls image features
    /// before its division by √hidden).
    Projected,
}

/// The SigLIP tower + projector, loaded from an mmproj GGUF.
pub struct VisionEncoder {
    cfg: VisionConfig,
    weights: Weights,
    backend: Backend,
    attention: AttentionKernel,
    precision: VisionPrecision,
    /// LoRA adapters loaded next to the weights, by id.
    adapters: Vec<(AdapterId, VisionAdapter)>,
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
            adapters: Vec::new(),
        };
        enc.cfg.check_tensors(enc.weights.file())?;
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

    /// Checks adapter `id`'s vision part against this tower and loads it next to the
    /// weights (on the same backend).
    pub(crate) fn add_adapter(&mut self, id: AdapterId, path: &Path) -> Result<()> {
        if !self.adapters.iter().any(|(i, _)| *i == id) {
            let a = VisionAdapter::load(path, &self.cfg, self.weights.file(), &self.backend)?;
            self.adapters.push((id, a));
        }
        Ok(())
    }

    /// Drops adapter `id`'s vision part, if loaded.
    pub(crate) fn remove_adapter(&mut self, id: AdapterId) {
        self.adapters.retain(|(i, _)| *i != id);
    }

    /// Runs the tower (and projector) on preprocessed CHW pixels `[3][R][R]`.
    pub fn encode(&self, pixels: &[f32], output: VisionOutput) -> Result<Vec<f32>> {
        self.encode_batch(&[pixels], output)
    }

    /// Runs the tower (and projector) on several preprocessed images as ONE batch (one
    /// graph: on a GPU the speed lever, on the CPU the same work as one by one): their
    /// features one after another, `[images][n_tokens][width or projection_dim]`, equal to
    /// encoding each alone.
    pub fn encode_batch(&self, images: &[&[f32]], output: VisionOutput) -> Result<Vec<f32>> {
        self.encode_batch_with(images, output, &[])
    }

    /// [`VisionEncoder::encode_batch`] with LoRA adapters (loaded here) at their scales: each
    /// adds its update to the layers it changes; scale 0 adds nothing.
    pub(crate) fn encode_batch_with(
        &self,
        images: &[&[f32]],
        output: VisionOutput,
        lora: &[AdapterScale],
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let want = 3 * c.image_size * c.image_size;
        if images.is_empty() {
            return Err(Error::Model("no image to encode".into()));
        }
        if let Some((i, p)) = images.iter().enumerate().find(|(_, p)| p.len() != want) {
            return Err(Error::Model(format!(
                "image {i}: expected {}x{} pixels, got {} values",
                c.image_size,
                c.image_size,
                p.len()
            )));
        }
        let mut terms = Vec::new();
        for s in lora.iter().filter(|s| s.scale != 0.0) {
            let (_, a) = self
                .adapters
                .iter()
                .find(|(id, _)| *id == s.id)
                .ok_or_else(|| {
                    Error::InvalidOption(format!(
                        "LoRA adapter {} has no vision part loaded (freed?)",
                        s.id
                    ))
                })?;
            terms.push(graph::Lora {
                weights: &a.weights,
                alpha: a.alpha,
                scale: s.scale,
            });
        }
        let mut patches = Vec::with_capacity(want * images.len());
        for pixels in images {
            patches.extend(graph::patchify(c, pixels));
        }
        let g = Graph::new(&self.weights);
        let fused =
            |t: Tensor<'_>| self.attention == AttentionKernel::Auto && g.supports(t, &self.backend);
        let precision = self.precision();
        let frames = images.len() as i64;
        let x = graph::tower(&g, c, patches, frames, precision, &fused, &terms)?;
        let out = match output {
            VisionOutput::Tower => x,
            VisionOutput::Projected => graph::project(&g, x, precision, &terms)?,
        };
        Ok(g.compute(out, &self.backend)?)
    }
}
