//! Per-request options and what every generation reports: [`GenerateOptions`] (with the one
//! validation every front end calls), [`Sampling`], [`CancelFlag`], [`FinishReason`] and
//! [`Timings`].

use crate::system::MemoryUse;
use pali_ggml::llama::KvCacheType;

/// A flag another thread (a server whose client left, a C caller's token callback) sets to
/// end a generation early.
pub type CancelFlag = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model wrote `<eos>`, or the text reached a stop sequence.
    #[default]
    Stop,
    /// `n_predict` tokens were generated.
    Length,
}

/// Token sampling settings.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    #[allow(missing_docs)]
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Per-request options.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum tokens to generate (`-n`).
    pub n_predict: usize,
    /// Sampling (greedy by default).
    pub sampling: Sampling,
    /// Largest context (`-c`); 0 = just what the request needs.
    pub max_ctx: usize,
    /// KV cache type (`--cache-type`): F16 by default; F32 for exactness checks; Q8_0
    /// halves the memory, which matters at 896 px (1.4 GiB at F16 for a 10B), Q4_0 quarters
    /// it. Quantized types turn on flash attention, which llama.cpp needs for them.
    pub kv_type: KvCacheType,
    /// Flash attention in the decoder: `None` = on for prefixes over
    /// [`crate::decoder::FLASH_ATTN_AUTO_TOKENS`] tokens (the 896 px models, where the prefix's
    /// attention matrix would take gigabytes), off otherwise (it is less exact on the CPU).
    pub flash_attn: Option<bool>,
    /// Generate exactly `n_predict` tokens, past `<eos>` (benchmarks).
    pub ignore_eos: bool,
    /// Record [`Generation::token_logprobs`] (used for detection scores).
    pub logprobs: bool,
    /// Stop sequences (OpenAI's `stop`): the text ends just before the first one it
    /// contains.
    pub stop: Vec<String>,
    /// Set it from another thread (or from `on_text`) to end the generation with
    /// [`Error::Cancelled`]; checked before the prefix and after every token.
    pub cancel: Option<CancelFlag>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            n_predict: 64,
            sampling: Sampling::default(),
            max_ctx: 0,
            kv_type: KvCacheType::F16,
            flash_attn: None,
            ignore_eos: false,
            logprobs: false,
            stop: Vec::new(),
            cancel: None,
        }
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// How long [`Model::load`] took.
    pub load_ms: f64,
    #[allow(missing_docs)]
    pub preprocess_ms: f64,
    #[allow(missing_docs)]
    pub vision_ms: f64,
    #[allow(missing_docs)]
    pub prefill_ms: f64,
    #[allow(missing_docs)]
    pub decode_ms: f64,
    /// Prefix tokens (image + text).
    pub n_prefix: usize,
    /// Generated tokens.
    pub n_gen: usize,
    /// Decode speed: single-token decodes (one per generated token after the first, whose
    /// logits come from the prefix) per second, sampling included; what llama-bench's `tg`
    /// counts.
    pub decode_tok_s: f64,
    /// Resident memory right after the prefix was decoded, when llama.cpp's compute buffer
    /// for the whole prefix, the KV cache and the decoder's weights are all in use: the
    /// peak's make-up.
    pub memory_after_prefill: Option<MemoryUse>,
}
