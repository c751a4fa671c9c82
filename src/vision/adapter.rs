//! LoRA adapters on the vision tower and the projector: an `mmproj-…` adapter file (`pali
//! convert-lora`) checked against the tower (every pair's base layer and shapes, named in the
//! error), then mapped next to the base weights on the same backend. The graph adds each
//! selected adapter's `scale · alpha / r · B (A x)` to the layers it changes (`graph.rs`).

use super::config::VisionConfig;
use crate::adapter::registry::{check_pairs, open_part};
use crate::{Error, Result};
use pali_ggml::gguf::{GgufFile, TensorInfo};
use pali_ggml::graph::{Backend, Weights};
use pali_ggml::schema::{adapter as names, keys, vision_block};
use std::collections::HashMap;
use std::path::Path;

/// A vision adapter's tensors, loaded on the tower's backend.
pub(crate) struct VisionAdapter {
    pub(super) weights: Weights,
    /// `adapter.lora.alpha` (0: each pair at scale 1).
    pub(super) alpha: f32,
}

impl VisionAdapter {
    /// Checks `path` against the tower (`cfg`, its file `base`) and maps it onto `backend`.
    pub(crate) fn load(
        path: &Path,
        cfg: &VisionConfig,
        base: &GgufFile,
        backend: &Backend,
    ) -> Result<Self> {
        let alpha = check_adapter(cfg, base, path)?;
        let weights = Weights::load(path, backend)
            .map_err(|e| Error::Model(format!("LoRA adapter {}: {e}", path.display())))?;
        Ok(VisionAdapter { weights, alpha })
    }
}

/// Checks a vision adapter file against the tower of the mmproj file `base` (settings `cfg`):
/// an adapter for PaliGemma's vision tower, pairs on its linear layers only (q/k/v/out, fc1,
/// fc2, the projector) with shapes that fit them. Returns its `alpha`.
pub(crate) fn check_adapter(cfg: &VisionConfig, base: &GgufFile, path: &Path) -> Result<f32> {
    let model = |m: String| Error::Model(format!("LoRA adapter {}: {m}", path.display()));
    let (f, alpha) = open_part(
        path,
        &[
            (names::GENERAL_TYPE, names::TYPE_ADAPTER),
            (keys::ARCHITECTURE, keys::ARCH_CLIP),
            (names::ADAPTER_TYPE, names::TYPE_LORA),
            (keys::CLIP_PROJECTOR_TYPE, keys::PROJECTOR_PALIGEMMA),
        ],
        "vision",
    )?;
    // The layers an adapter may change, with the shapes it sees: a Q8_0 tower stores its MLP
    // zero-padded to whole blocks, but an adapter was trained on the real width.
    let mut targets: HashMap<String, TensorInfo> = HashMap::new();
    let base_tensors = base.tensors();
    let find = |name: &str| base_tensors.iter().find(|t| t.name == name).cloned();
    let (_, proj_gguf) = names::PROJECTOR_TARGET;
    if let Some(t) = find(proj_gguf) {
        targets.insert(proj_gguf.to_string(), t);
    }
    for l in 0..cfg.layers {
        for &(_, suffix) in names::VISION_TARGETS {
            let name = vision_block(l, suffix);
            if let Some(mut t) = find(&name) {
                if suffix == pali_ggml::schema::vision::FC1_W {
                    t.ne[1] = t.ne[1].min(cfg.ffn as i64);
                } else if suffix == pali_ggml::schema::vision::FC2_W {
                    t.ne[0] = t.ne[0].min(cfg.ffn as i64);
                }
                targets.insert(name, t);
            }
        }
    }
    let tensors = f.tensors();
    for t in &tensors {
        let stem = t
            .name
            .strip_suffix(names::SUFFIX_A)
            .or_else(|| t.name.strip_suffix(names::SUFFIX_B));
        if let Some(stem) = stem {
            if !targets.contains_key(stem) && find(stem).is_some() {
                return Err(model(format!(
                    "tensor {}: LoRA on {stem} is not supported (pali applies adapters to the \
                     attention and MLP matrices of each layer and to the projector)",
                    t.name
                )));
            }
        }
    }
    check_pairs(&tensors, &|name| targets.get(name).cloned(), &model)?;
    Ok(alpha)
}
