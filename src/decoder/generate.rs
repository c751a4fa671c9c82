//! Generation: the prefix decoded in one non-causal batch (prefix-LM), then one token at a
//! time with sampling, stop sequences and streamed text.

use super::load::{Decoder, SlidingWindow, FLASH_ATTN_AUTO_TOKENS, FULL_ATTENTION_WINDOW};
use super::prefix::PrefixBatch;
use super::sampling::{log_softmax_at, sample, SplitMix64};
use super::stream::{Detokenizer, TextStream};
use crate::options::{CancelFlag, FinishReason, Sampling};
use crate::{Error, Result};
use pali_ggml::llama::{ContextParams, KvCacheType, LlamaContext};

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

impl Decoder {
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
