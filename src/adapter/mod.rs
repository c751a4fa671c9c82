//! LoRA adapters on a loaded [`Model`] (`pali convert-lora`'s files): [`Model::load_adapter`],
//! [`Model::free_adapter`], [`Model::adapters`] and the check of a request's selection,
//! [`Model::check_options`].
//!
//! The decoder part goes to llama.cpp's own adapter API ([`crate::decoder`]), the vision part
//! into pali's vision graph ([`crate::vision`]); neither is merged into the weights, so one
//! loaded base serves every adapter, chosen per request with a scale
//! ([`crate::GenerateOptions::lora`]): requests with different adapters run one after another
//! (or side by side) without reloading anything.

pub(crate) mod registry;

pub use registry::AdapterInfo;

use crate::model::Model;
use crate::options::{AdapterId, AdapterScale, GenerateOptions};
use crate::vision::VisionConfig;
use crate::Result;
use pali_ggml::gguf::GgufFile;
use registry::adapter_files;
use std::path::Path;

impl Model {
    /// Loads a LoRA adapter made by `pali convert-lora`: `path` is either file of its pair
    /// (the decoder's, or the `mmproj-…` one beside it), and both parts are loaded. Each is
    /// checked against this model first (architecture, every changed layer and its shape:
    /// an adapter for another model is refused by name). Nothing is merged into the weights:
    /// requests choose their adapters and scales ([`GenerateOptions::lora`]) by the id
    /// returned, 0, 1, … in load order. Waits for running generations.
    pub fn load_adapter(&self, path: impl AsRef<Path>) -> Result<AdapterId> {
        let registry = self.adapter_registry();
        let mut info = adapter_files(path.as_ref())?;
        let base = self.paths();
        if let Some(d) = &info.decoder {
            crate::decoder::check_adapter(&base.decoder, d)?;
        }
        if let Some(v) = &info.mmproj {
            let f = GgufFile::open(&base.mmproj)?;
            crate::vision::check_adapter(&VisionConfig::from_gguf(&f)?, &f, v)?;
        }
        // An id only for an adapter that passed the checks (a refused one takes none).
        info.id = registry.next_id();
        let id = info.id;
        registry.add(info.clone());
        let loaded = self.update_parts(
            |d| match &info.decoder {
                Some(p) => d.add_adapter(id, p),
                None => Ok(()),
            },
            |v| match &info.mmproj {
                Some(p) => v.add_adapter(id, p),
                None => Ok(()),
            },
        );
        if let Err(e) = loaded {
            let _ = self.free_adapter(id);
            return Err(e);
        }
        log::info!(
            "LoRA adapter {id}: {} ({} decoder pairs, {} vision pairs)",
            info.path.display(),
            info.pairs.0,
            info.pairs.1
        );
        Ok(id)
    }

    /// Unloads adapter `id` (an [`crate::Error::InvalidOption`] if there is none); its id is
    /// not reused. Waits for running generations.
    pub fn free_adapter(&self, id: AdapterId) -> Result<()> {
        let registry = self.adapter_registry();
        if registry.remove(id).is_none() {
            let asked = GenerateOptions {
                lora: vec![AdapterScale::new(id, 1.0)],
                ..Default::default()
            };
            return asked.check_adapters(&registry.ids());
        }
        self.update_parts(
            |d| d.remove_adapter(id),
            |v| {
                v.remove_adapter(id);
                Ok(())
            },
        )
    }

    /// The loaded LoRA adapters, in id order.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.adapter_registry().list()
    }

    /// Checks a request's options as every generation does: [`GenerateOptions::validate`],
    /// then its adapters against the loaded ones ([`GenerateOptions::check_adapters`]). A
    /// front end calls it to refuse a request before queueing it.
    pub fn check_options(&self, opts: &GenerateOptions) -> Result<()> {
        opts.validate()?;
        opts.check_adapters(&self.adapter_registry().ids())
    }
}
