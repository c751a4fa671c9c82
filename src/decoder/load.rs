//! [`Decoder`]: the Gemma 2 decoder loaded through llama.cpp, with the HF tokenizer and the
//! facts of its header ([`super::header`]).

use super::header::{DecoderFacts, DecoderHeader};
use crate::options::AdapterId;
use crate::{Error, Result};
use pali_ggml::llama::{LlamaModel, LoraAdapter, ModelParams};
use pali_ggml::schema::keys;
use std::path::{Path, PathBuf};

/// How the decoder treats Gemma 2's sliding window (see README "Sliding window").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlidingWindow {
    /// Full attention on every layer, as big_vision trained PaliGemma (and as HF computes
    /// whenever the sequence is shorter than the window). The default.
    #[default]
    Off,
    /// llama.cpp's own Gemma 2 behaviour: a past-only window on every other layer, also
    /// inside the prefix. Differs from both HF and big_vision beyond 4096 tokens.
    LlamaCpp,
}

/// Decoder loading options.
#[derive(Debug, Clone, Default)]
pub struct DecoderOptions {
    /// GPU layers (GPU builds).
    pub n_gpu_layers: i32,
    /// Sliding-window treatment.
    pub sliding_window: SlidingWindow,
    /// Keep the weights in the memory map only, without llama.cpp's repacked CPU copies
    /// (low-memory mode).
    pub skip_repack: bool,
    /// Shares of the offloaded layers per device (llama.cpp's `--tensor-split`; empty = by
    /// free memory).
    pub tensor_split: Vec<f32>,
}

/// The window llama.cpp is given for [`SlidingWindow::Off`]: longer than any context pali
/// runs (see [`Decoder::generate`]), so every layer attends to everything. Not larger:
/// llama.cpp reserves window-sized index lists per sequence for each mask it builds (4 GiB
/// of allocation per step at 2^30, found by fuzzing).
pub const FULL_ATTENTION_WINDOW: usize = 1 << 20;

/// Prefix length above which flash attention is used unless asked otherwise: without it the
/// non-causal prefix materialises an n×n score matrix per head (1 GB per layer at 4.1k
/// tokens), with it the first-step logits moved up to 0.16 on the fixtures vs 0.037 without (inside the parity
/// tolerance; tests/parity.rs measures both).
pub const FLASH_ATTN_AUTO_TOKENS: usize = 2048;

/// The loaded decoder: llama.cpp model, HF tokenizer and vocabulary facts.
pub struct Decoder {
    pub(super) model: LlamaModel,
    pub(super) header: DecoderHeader,
    pub(super) hidden: usize,
    pub(super) sliding_window: SlidingWindow,
    /// Whether layers were offloaded (GPU or RPC): only then may llama.cpp send host
    /// layers' batch ops to a device too.
    pub(super) offloaded: bool,
    /// The GGUF it was loaded from (adapters are checked against it).
    pub(super) path: PathBuf,
    /// LoRA adapters loaded onto the llama.cpp model, by pali's id.
    pub(super) adapters: Vec<(AdapterId, LoraAdapter)>,
}

impl Decoder {
    /// Checks a decoder GGUF's header, embedded tokenizer and embedding table and returns
    /// its hidden size and `<loc0000>` id, without loading the weights (llama.cpp reads
    /// the whole file when it loads one: 5.8 GB for a 10B Q4_K_M).
    pub fn probe(path: &Path) -> Result<DecoderFacts> {
        Ok(DecoderHeader::read(path)?.facts())
    }

    /// The same facts for a loaded decoder.
    pub fn facts(&self) -> DecoderFacts {
        self.header.facts()
    }

    /// Loads the decoder GGUF, refusing files that are not pali/llama.cpp gemma2 decoders.
    pub fn load(path: &Path, opts: &DecoderOptions) -> Result<Self> {
        let h = DecoderHeader::read(path)?;
        let mut mp = ModelParams {
            n_gpu_layers: opts.n_gpu_layers,
            skip_repack: opts.skip_repack,
            tensor_split: opts.tensor_split.clone(),
            ..Default::default()
        };
        if opts.sliding_window == SlidingWindow::Off {
            mp.int_overrides.push((
                keys::SLIDING_WINDOW.to_string(),
                FULL_ATTENTION_WINDOW as i64,
            ));
        }
        let model = LlamaModel::load(path, &mp)?;
        let hidden = model.n_embd();
        if h.embeddings.width != hidden || h.embeddings.rows != model.n_vocab() {
            return Err(Error::Model(format!(
                "{}: inconsistent embedding table",
                path.display()
            )));
        }
        Ok(Decoder {
            model,
            header: h,
            hidden,
            sliding_window: opts.sliding_window,
            offloaded: opts.n_gpu_layers > 0,
            path: path.to_path_buf(),
            adapters: Vec::new(),
        })
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Sliding-window mode in use.
    pub fn sliding_window(&self) -> SlidingWindow {
        self.sliding_window
    }

    /// The HF tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.header.tokenizer
    }

    /// The llama.cpp model (for text-only checks).
    pub fn llama(&self) -> &LlamaModel {
        &self.model
    }

    /// Tokenizes prompt text (no special tokens added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .header
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Model(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec())
    }
}
