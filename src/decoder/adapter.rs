//! LoRA adapters on the decoder: checked against the decoder GGUF (architecture, every pair's
//! base tensor and shapes, named in the error), then loaded through llama.cpp's own adapter
//! API and applied per generation context ([`Decoder::generate`]).

use super::load::Decoder;
use crate::adapter::registry::{check_pairs, open_part};
use crate::options::{AdapterId, AdapterScale};
use crate::{Error, Result};
use pali_ggml::gguf::{GgufFile, TensorInfo};
use pali_ggml::llama::LoraAdapter;
use pali_ggml::schema::{adapter as names, keys};
use std::collections::HashMap;
use std::path::Path;

/// Checks a decoder adapter file against the decoder GGUF `base`, as llama.cpp's loader would
/// (and what it would silently do differently: an adapter on the token embedding, which pali
/// also reads itself for the prefix). Returns the adapter's `alpha`.
pub(crate) fn check_adapter(base: &Path, path: &Path) -> Result<f32> {
    let model = |m: String| Error::Model(format!("LoRA adapter {}: {m}", path.display()));
    let (f, alpha) = open_part(
        path,
        &[
            (names::GENERAL_TYPE, names::TYPE_ADAPTER),
            (keys::ARCHITECTURE, keys::ARCH_GEMMA2),
            (names::ADAPTER_TYPE, names::TYPE_LORA),
        ],
        "decoder",
    )?;
    let base_file = GgufFile::open(base)?;
    let base_tensors: HashMap<String, TensorInfo> = base_file
        .tensors()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    check_pairs(
        &f.tensors(),
        &|name| base_tensors.get(name).cloned(),
        &model,
    )?;
    Ok(alpha)
}

impl Decoder {
    /// Checks and loads adapter `id`'s decoder part (llama.cpp's `llama_adapter_lora_init`).
    /// Exclusive access: no generation of this decoder runs meanwhile.
    pub(crate) fn add_adapter(&mut self, id: AdapterId, path: &Path) -> Result<()> {
        if self.adapters.iter().any(|(i, _)| *i == id) {
            return Ok(());
        }
        check_adapter(&self.path, path)?;
        let a = self.model.load_adapter(path)?;
        self.adapters.push((id, a));
        Ok(())
    }

    /// Frees adapter `id`'s decoder part, if loaded.
    pub(crate) fn remove_adapter(&mut self, id: AdapterId) -> Result<()> {
        if let Some(i) = self.adapters.iter().position(|(a, _)| *a == id) {
            let (_, a) = self.adapters.remove(i);
            self.model.free_adapter(a)?;
        }
        Ok(())
    }

    /// llama.cpp's adapters and scales for `lora`: every id must be loaded here.
    pub(super) fn adapter_selection(
        &self,
        lora: &[AdapterScale],
    ) -> Result<Vec<(LoraAdapter, f32)>> {
        lora.iter()
            .map(|s| {
                self.adapters
                    .iter()
                    .find(|(id, _)| *id == s.id)
                    .map(|(_, a)| (*a, s.scale))
                    .ok_or_else(|| {
                        Error::InvalidOption(format!(
                            "LoRA adapter {} has no decoder part loaded (freed?)",
                            s.id
                        ))
                    })
            })
            .collect()
    }
}
