//! The Gemma 2 decoder on llama.cpp: builds the PaliGemma prefix as ONE batch of embeddings
//! decoded with bidirectional attention (prefix-LM), then generates causally.

use crate::{Error, Result};
use pali_ggml::gguf::GgufFile;
use pali_ggml::llama::{ContextParams, KvCacheType, LlamaContext, LlamaModel, ModelParams};
use pali_ggml::schema::{decoder as names, keys};
use pali_ggml::GgmlType;
use std::path::Path;

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

/// Per-request decoding options.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Threads.
    pub threads: i32,
    /// Flash attention in the decoder (`None` = automatic, see [`FLASH_ATTN_AUTO_TOKENS`]).
    pub flash_attn: Option<bool>,
    /// KV cache type (quantized types turn flash attention on).
    pub kv_type: KvCacheType,
    /// Largest context allowed (`-c`); 0 = prefix + n_predict.
    pub max_ctx: usize,
    /// Do not stop at `<eos>` (benchmarks generate exactly `n_predict` tokens).
    pub ignore_eos: bool,
    /// Record each generated token's log-probability (one pass over the logits per token).
    pub logprobs: bool,
    /// Stop sequences: generation ends where the text first contains one, and the text
    /// ends just before it (OpenAI's `stop`).
    pub stop: Vec<String>,
    /// Checked before the prefix and after every token: once set, generation ends with
    /// [`Error::Cancelled`].
    pub cancel: Option<CancelFlag>,
}

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

/// Rows of the decoder's token embedding table, read straight from the mapped GGUF
/// (dequantized on demand) so the prompt can join the image in one embedding batch.
struct TokenEmbeddings {
    map: pali_ggml::mapped::MappedFile,
    offset: usize,
    ty: GgmlType,
    width: usize,
    rows: usize,
}

impl TokenEmbeddings {
    fn open(path: &Path, f: &GgufFile) -> Result<Self> {
        let t = f
            .tensors()
            .into_iter()
            .find(|t| t.name == names::TOKEN_EMBD)
            .ok_or_else(|| {
                Error::Model(format!(
                    "{}: no {} tensor",
                    path.display(),
                    names::TOKEN_EMBD
                ))
            })?;
        let map =
            pali_ggml::mapped::MappedFile::open(path).map_err(|e| Error::Io(e.to_string()))?;
        let offset = (f.data_offset() + t.offset) as usize;
        if offset as u64 + t.size > map.len() as u64 || t.ne.len() != 2 {
            return Err(Error::Model(format!(
                "{}: {} is truncated or malformed",
                path.display(),
                names::TOKEN_EMBD
            )));
        }
        Ok(TokenEmbeddings {
            map,
            offset,
            ty: t.ty,
            width: t.ne[0] as usize,
            rows: t.ne[1] as usize,
        })
    }

    fn row(&self, id: u32) -> Result<Vec<f32>> {
        let id = id as usize;
        if id >= self.rows {
            return Err(Error::Model(format!(
                "token id {id} is outside the {}-row embedding",
                self.rows
            )));
        }
        let rs = self.ty.row_size(self.width as i64);
        let bytes = &self.map[self.offset + id * rs..self.offset + (id + 1) * rs];
        Ok(pali_ggml::quant::to_f32(self.ty, bytes)?)
    }
}

/// The loaded decoder: llama.cpp model, HF tokenizer and vocabulary facts.
pub struct Decoder {
    model: LlamaModel,
    header: DecoderHeader,
    hidden: usize,
    sliding_window: SlidingWindow,
    /// Whether layers were offloaded (GPU or RPC): only then may llama.cpp send host
    /// layers' batch ops to a device too.
    offloaded: bool,
}

/// The PaliGemma prefix as decoder input rows: `[image × N][<bos>][prompt…]["\n"]`, each
/// already scaled for llama.cpp's input multiplication by √hidden.
pub struct PrefixBatch {
    /// Row-major `[n_tokens][hidden]`.
    pub rows: Vec<f32>,
    /// Text ids after the image rows (`<bos>`, prompt, newline).
    pub text_ids: Vec<u32>,
    /// Image rows.
    pub n_image: usize,
}

impl PrefixBatch {
    /// Number of prefix tokens.
    pub fn len(&self) -> usize {
        self.n_image + self.text_ids.len()
    }

    /// Whether the prefix is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a generation produced.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    /// Generated token ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Decoded text.
    pub text: String,
    /// Logits of the first generated position (masked to the real vocabulary).
    pub first_logits: Vec<f32>,
    /// Prefix decode time.
    pub prefill_ms: f64,
    /// Resident memory right after the prefix was decoded.
    pub memory_after_prefill: Option<crate::MemoryUse>,
    /// Token-by-token phase: sampling every token, and one llama.cpp decode per token
    /// after the first (whose logits come from the prefix).
    pub decode_ms: f64,
    /// Single-token llama.cpp decodes in `decode_ms`.
    pub decode_steps: usize,
    /// With [`DecodeOptions::logprobs`]: each generated token's log-probability under the
    /// model (softmax of its logits over the real vocabulary, before any temperature).
    pub token_logprobs: Vec<f32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
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

/// What a decoder GGUF says about itself, read from its header and the memory-mapped
/// embedding table, without loading the weights through llama.cpp.
struct DecoderHeader {
    embeddings: TokenEmbeddings,
    tokenizer: tokenizers::Tokenizer,
    /// Ids at or above this are padding / `<image>` and are never generated.
    vocab_real: usize,
    bos: u32,
    newline: Vec<u32>,
    stop: Vec<u32>,
    /// `gemma2.context_length`: the context the model was trained for.
    n_ctx_train: usize,
}

impl DecoderHeader {
    fn facts(&self) -> DecoderFacts {
        DecoderFacts {
            hidden: self.embeddings.width,
            loc_token: self.tokenizer.token_to_id("<loc0000>"),
            n_ctx_train: self.n_ctx_train,
        }
    }

    fn read(path: &Path) -> Result<Self> {
        let f = GgufFile::open(path)?;
        let arch = f.get_str(keys::ARCHITECTURE)?;
        if arch != keys::ARCH_GEMMA2 {
            return Err(Error::Model(format!(
                "{} is a {arch:?} GGUF, not a Gemma 2 decoder{}",
                path.display(),
                if arch == keys::ARCH_CLIP {
                    ": it looks like the mmproj; pass it with --mmproj"
                } else {
                    ""
                }
            )));
        }
        check_for_llama_cpp(path, &f)?;
        let json = f.get_str(keys::TOKENIZER_HF_JSON).map_err(|_| {
            Error::Model(format!(
                "{}: no {} (convert the checkpoint with `pali convert`)",
                path.display(),
                keys::TOKENIZER_HF_JSON
            ))
        })?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            Error::Model(format!("{}: embedded tokenizer.json: {e}", path.display()))
        })?;
        let vocab_real = f.get_u32(keys::PALI_VOCAB_SIZE)? as usize;
        let bos = f.get_u32(keys::TOKENIZER_BOS)?;
        let eos = f.get_u32(keys::TOKENIZER_EOS)?;
        let mut stop = vec![eos];
        if let Some(id) = tokenizer.token_to_id("<end_of_turn>") {
            stop.push(id);
        }
        let newline = tokenizer
            .encode("\n", false)
            .map_err(|e| Error::Model(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        let embeddings = TokenEmbeddings::open(path, &f)?;
        let declared = f.get_u32(keys::EMBEDDING_LENGTH)? as usize;
        if embeddings.width != declared || vocab_real > embeddings.rows {
            return Err(Error::Model(format!(
                "{}: inconsistent embedding table ({} x {}, {} = {declared}, {} real tokens)",
                path.display(),
                embeddings.rows,
                embeddings.width,
                keys::EMBEDDING_LENGTH,
                vocab_real
            )));
        }
        let n_ctx_train = f.get_u32(keys::CONTEXT_LENGTH)? as usize;
        Ok(DecoderHeader {
            embeddings,
            tokenizer,
            vocab_real,
            bos,
            newline,
            stop,
            n_ctx_train,
        })
    }
}

/// Largest head count × head width accepted (the 28B has 32 × 128 = 4096).
const MAX_ATTENTION_WIDTH: u64 = 1 << 20;

/// What llama.cpp's loader would abort on (a failed `GGML_ASSERT` ends the process), checked
/// before it reads the file: the `gemma2.` hyper-parameters (only the keys pali writes, sizes
/// positive, the layer count within llama.cpp's limit) and the vocabulary (the SentencePiece
/// model pali writes, no token text twice).
fn check_for_llama_cpp(path: &Path, f: &GgufFile) -> Result<()> {
    let bad = |why: String| Error::Model(format!("{}: {why}", path.display()));
    if let Some(k) = f
        .keys()
        .into_iter()
        .find(|k| k.starts_with("gemma2.") && !keys::DECODER_HPARAMS.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "metadata key {k} is not one a PaliGemma decoder has (convert the checkpoint with `pali convert`)"
        )));
    }
    let layers = f.get_u32(keys::BLOCK_COUNT)?;
    if !(1..=keys::MAX_DECODER_LAYERS).contains(&layers) {
        return Err(bad(format!(
            "{} = {layers}: must be 1 to {}",
            keys::BLOCK_COUNT,
            keys::MAX_DECODER_LAYERS
        )));
    }
    for k in [
        keys::CONTEXT_LENGTH,
        keys::FEED_FORWARD_LENGTH,
        keys::HEAD_COUNT,
        keys::HEAD_COUNT_KV,
        keys::KEY_LENGTH,
        keys::VALUE_LENGTH,
    ] {
        if f.get_u32(k)? == 0 {
            return Err(bad(format!("{k} = 0: must be at least 1")));
        }
    }
    // llama.cpp multiplies these in 32 bits (n_embd_k_gqa = key_length × head_count_kv): a
    // product that wraps can match the tensor shapes its loader checks and then fail an
    // assert in the graph (found by fuzzing: head_count_kv 0x30000004 × 32 wraps to 128).
    let heads = f.get_u32(keys::HEAD_COUNT)? as u64;
    let kv_heads = f.get_u32(keys::HEAD_COUNT_KV)? as u64;
    for (k, width) in [keys::KEY_LENGTH, keys::VALUE_LENGTH]
        .into_iter()
        .map(|k| f.get_u32(k).map(|v| (k, v as u64)))
        .collect::<std::result::Result<Vec<_>, _>>()?
    {
        if heads * width > MAX_ATTENTION_WIDTH {
            return Err(bad(format!(
                "{} × {k} = {heads} × {width}: larger than any Gemma 2 ({MAX_ATTENTION_WIDTH} at most)",
                keys::HEAD_COUNT
            )));
        }
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(bad(format!(
            "{} = {kv_heads} must divide {} = {heads}",
            keys::HEAD_COUNT_KV,
            keys::HEAD_COUNT
        )));
    }
    let model = f.get_str(keys::TOKENIZER_MODEL)?;
    if model != "llama" {
        return Err(bad(format!(
            "{} = {model:?}: PaliGemma's vocabulary is SentencePiece (\"llama\")",
            keys::TOKENIZER_MODEL
        )));
    }
    let Some(pali_ggml::gguf::Value::ArrStr(tokens)) = f.get(keys::TOKENIZER_TOKENS) else {
        return Err(bad(format!(
            "{} is missing or not a string array",
            keys::TOKENIZER_TOKENS
        )));
    };
    let mut seen = std::collections::HashSet::with_capacity(tokens.len());
    if let Some((id, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| !seen.insert(t.as_str()))
    {
        return Err(bad(format!(
            "{}: token {id} ({t:?}) appears twice in the vocabulary",
            keys::TOKENIZER_TOKENS
        )));
    }
    Ok(())
}

/// A decoder file's facts that the rest of the model needs, read without loading its
/// weights ([`Decoder::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderFacts {
    /// Hidden size (the width image features must have).
    pub hidden: usize,
    /// Token id of `<loc0000>`, if the vocabulary has loc tokens.
    pub loc_token: Option<u32>,
    /// The context length the model was trained for (`gemma2.context_length`).
    pub n_ctx_train: usize,
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

    /// Builds the prefix: image rows (projector output, scaled here), `<bos>`, the prompt and
    /// the `"\n"` separator (tokenized separately, as big_vision does).
    pub fn prefix(&self, image_features: &[f32], prompt: &str) -> Result<PrefixBatch> {
        if !image_features.len().is_multiple_of(self.hidden) {
            return Err(Error::Model(format!(
                "image features of width {} do not match the decoder's hidden size {}",
                image_features.len(),
                self.hidden
            )));
        }
        let n_image = image_features.len() / self.hidden;
        let mut rows = image_features.to_vec();
        crate::projector::to_decoder_input(&mut rows, self.hidden);
        let mut text_ids = vec![self.header.bos];
        text_ids.extend(self.tokenize(prompt)?);
        text_ids.extend(&self.header.newline);
        for &id in &text_ids {
            // llama.cpp scales these by √hidden itself, exactly as for token-id input.
            rows.extend(self.header.embeddings.row(id)?);
        }
        Ok(PrefixBatch {
            rows,
            text_ids,
            n_image,
        })
    }

    /// Decodes the prefix in one non-causal batch and generates up to `n_predict` tokens.
    /// The prefix is consumed: its rows are freed once llama.cpp has copied them.
    pub fn generate(
        &self,
        prefix: PrefixBatch,
        n_predict: usize,
        sampling: &Sampling,
        opts: &DecodeOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generated> {
        let cancelled = || {
            opts.cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let n = prefix.len();
        let need = n + n_predict.max(1);
        if opts.max_ctx > 0 && need > opts.max_ctx {
            return Err(Error::ContextLength(format!(
                "the prompt needs {n} prefix tokens + {n_predict} to generate = {need}, more than --ctx-size {}",
                opts.max_ctx
            )));
        }
        if self.sliding_window == SlidingWindow::Off && need > FULL_ATTENTION_WINDOW {
            return Err(Error::ContextLength(format!(
                "the prompt needs {n} prefix tokens + {n_predict} to generate = {need}, more than the {FULL_ATTENTION_WINDOW} tokens pali attends over"
            )));
        }
        let params = ContextParams {
            n_ctx: need.next_multiple_of(256) as u32,
            n_batch: n as u32,
            threads: opts.threads,
            threads_batch: opts.threads,
            flash_attn: opts.flash_attn.unwrap_or(n > FLASH_ATTN_AUTO_TOKENS),
            kv_type: opts.kv_type,
            op_offload: self.offloaded,
        };
        let mut ctx = LlamaContext::new(&self.model, &params)?;
        let t0 = std::time::Instant::now();
        ctx.decode_embeddings(prefix.rows, 0, false)?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let memory_after_prefill = crate::MemoryUse::now();
        if let Some(m) = memory_after_prefill {
            log::info!(
                "after the prefix: resident {:.0} MiB = {:.0} MiB anonymous (KV cache, compute buffers, heap) + {:.0} MiB file-backed (mapped weights)",
                m.rss_mib,
                m.anon_mib,
                m.file_mib
            );
        }
        let t1 = std::time::Instant::now();
        let mut rng = SplitMix64(sampling.seed);
        let mut out = Generated {
            prefill_ms,
            memory_after_prefill,
            finish_reason: FinishReason::Length,
            ..Default::default()
        };
        let mut stream = TextStream::new(&opts.stop);
        let mut detok = Detokenizer::default();
        for step in 0..n_predict {
            let logits = &ctx.logits()[..self.header.vocab_real];
            if step == 0 {
                out.first_logits = logits.to_vec();
            }
            let tok = sample(logits, sampling, &mut rng);
            if self.header.stop.contains(&tok) && !opts.ignore_eos {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            out.tokens.push(tok);
            if opts.logprobs {
                out.token_logprobs
                    .push(log_softmax_at(logits, tok as usize));
            }
            if stream.update(detok.push(&self.header.tokenizer, tok)?, on_text) {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            if cancelled() {
                return Err(Error::Cancelled);
            }
            if step + 1 < n_predict {
                ctx.decode_token(tok as i32, (n + step) as i32)?;
                out.decode_steps += 1;
            }
        }
        out.text = if out.finish_reason == FinishReason::Stop && stream.hit {
            stream.finish(on_text)
        } else {
            // The whole answer decoded at once is the reference text (what HF's decode
            // gives); the pieces streamed were decoded incrementally.
            let full = self
                .header
                .tokenizer
                .decode(&out.tokens, true)
                .map_err(|e| Error::Model(format!("tokenizer: {e}")))?;
            stream.finish_with(full, on_text)
        };
        out.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }
}

/// Incremental detokenization: each step decodes only the tokens since the last complete
/// piece, with the piece before them as context (whose text is then subtracted: a
/// SentencePiece decoder treats the first token of a sequence differently), so a long
/// generation costs linear time, not the quadratic cost of decoding everything each step.
/// Special tokens (dropped from the text anyway) are left out so they cannot pile up in
/// the window.
#[derive(Default)]
struct Detokenizer {
    ids: Vec<u32>,
    text: String,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text so far.
    fn push(&mut self, tokenizer: &tokenizers::Tokenizer, id: u32) -> Result<&str> {
        let special = tokenizer
            .id_to_token(id)
            .is_some_and(|t| tokenizer.get_added_vocabulary().is_special_token(&t));
        if special {
            return Ok(&self.text);
        }
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| Error::Model(format!("tokenizer: {e}")))
        };
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{fffd}') && now.starts_with(&before) {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(&self.text)
    }
}

/// Streams the generated text as it grows: only whole characters (a byte-fallback piece can
/// end mid-UTF-8 and change how earlier bytes decode) that extend what was already shown, and
/// never a tail that could still turn into a stop sequence.
struct TextStream<'a> {
    stop: &'a [String],
    text: String,
    shown: String,
    /// A stop sequence was reached.
    hit: bool,
}

impl<'a> TextStream<'a> {
    fn new(stop: &'a [String]) -> Self {
        TextStream {
            stop,
            text: String::new(),
            shown: String::new(),
            hit: false,
        }
    }

    /// Takes the whole text decoded so far; returns true when it reached a stop sequence
    /// (the text is then cut just before it).
    fn update(&mut self, text: &str, on_text: &mut dyn FnMut(&str)) -> bool {
        // A stop sequence can only begin in what was not shown yet.
        let from = self.shown.len();
        let hit = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.get(from..)?.find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(cut) = hit {
            self.text = text[..cut].to_string();
            self.hit = true;
            return true;
        }
        self.text.clear();
        self.text.push_str(text);
        if self.text.ends_with('\u{fffd}') {
            return false;
        }
        let ready = self.text.len() - self.held_back();
        if ready > self.shown.len() && self.text.starts_with(self.shown.as_str()) {
            on_text(&self.text[self.shown.len()..ready]);
            self.shown = self.text[..ready].to_string();
        }
        false
    }

    /// Bytes at the end of the text that begin some stop sequence (a suffix that is valid
    /// UTF-8 on its own starts on a character boundary).
    fn held_back(&self) -> usize {
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| self.text.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    /// Shows the rest of `full` (the final text) and returns it.
    fn finish_with(mut self, full: String, on_text: &mut dyn FnMut(&str)) -> String {
        self.text = full;
        self.finish(on_text)
    }

    /// Shows what was held back and returns the final text.
    fn finish(self, on_text: &mut dyn FnMut(&str)) -> String {
        if self.text.len() > self.shown.len() && self.text.starts_with(self.shown.as_str()) {
            on_text(&self.text[self.shown.len()..]);
        }
        self.text
    }
}

/// Deterministic RNG for sampling (`--seed`).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy, or temperature / top-k / top-p sampling.
/// `log softmax(logits)[i]`, computed stably in f64.
fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(logits[i] - max) - sum.ln()) as f32
}

fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i] - max) / s.temperature).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= s.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let r = rng.next_f32();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if r < acc {
            return i as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest() {
        let mut rng = SplitMix64(1);
        assert_eq!(
            sample(&[0.1, 3.0, -1.0, 2.9], &Sampling::default(), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let l = [0.5, 1.0, 0.9, 0.2];
        let s = Sampling {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 7,
        };
        assert_eq!(sample(&l, &s, &mut SplitMix64(7)), 1);
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut r = SplitMix64(7);
            (0..20).map(|_| sample(&l, &s, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = SplitMix64(7);
            (0..20).map(|_| sample(&l, &s, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != 1),
            "temperature 1 should not always pick the top token"
        );
    }

    /// Feeds `steps` (the whole text after each token) and returns (pieces shown, final text,
    /// whether a stop sequence was hit).
    fn stream(stop: &[&str], steps: &[&str]) -> (Vec<String>, String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut t = TextStream::new(&stop);
        let mut pieces = Vec::new();
        let mut hit = false;
        for s in steps {
            if t.update(s, &mut |p| pieces.push(p.to_string())) {
                hit = true;
                break;
            }
        }
        let text = t.finish(&mut |p| pieces.push(p.to_string()));
        (pieces, text, hit)
    }

    #[test]
    fn stop_sequences_end_the_text_and_are_never_streamed() {
        let (pieces, text, hit) = stream(&["square"], &["a red", "a red squ", "a red square and"]);
        assert!(hit);
        assert_eq!(text, "a red ");
        assert_eq!(pieces.concat(), "a red ");
        assert!(pieces.iter().all(|p| !p.contains("squ")), "{pieces:?}");
        // A held-back tail that does not become the stop sequence is shown later.
        let (pieces, text, hit) = stream(&["square"], &["a squ", "a squid"]);
        assert!(!hit);
        assert_eq!(text, "a squid");
        assert_eq!(pieces, ["a ", "squid"]);
        // Without stop sequences every step shows its new characters, but never half of one.
        let (pieces, text, _) = stream(&[], &["a", "a\u{fffd}", "a\u{e9}"]);
        assert_eq!(text, "a\u{e9}");
        assert_eq!(pieces, ["a", "\u{e9}"]);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds almost all the mass: top_p 0.5 must always pick it.
        let l = [10.0, 0.0, 0.0, 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 3,
        };
        let mut r = SplitMix64(3);
        assert!((0..50).all(|_| sample(&l, &s, &mut r) == 0));
    }
}
