//! Generation: the prefix decoded in one non-causal batch (prefix-LM), then one token at a
//! time with sampling, stop sequences and streamed text.

use super::load::{Decoder, SlidingWindow, FLASH_ATTN_AUTO_TOKENS, FULL_ATTENTION_WINDOW};
use super::prefix::PrefixBatch;
use super::sampling::{log_softmax_at, sample, SplitMix64};
use super::stream::{Detokenizer, TextStream};
use crate::options::{FinishReason, GenerateOptions, Timings};
use crate::{Error, Result};
use pali_ggml::llama::{ContextParams, LlamaContext};

/// A finished generation: the decoder's output, with where the time went.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The generated text (special tokens dropped, `<loc>`/`<seg>` kept).
    pub text: String,
    /// Generated token ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Logits of the first generated position, over the real vocabulary.
    pub first_logits: Vec<f32>,
    /// With [`GenerateOptions::logprobs`]: each generated token's log-probability under the
    /// model (softmax of its logits over the real vocabulary, before any temperature).
    pub token_logprobs: Vec<f32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Timings: the decoder's own here; [`crate::Model`] adds loading, preprocessing and
    /// vision.
    pub timings: Timings,
}

impl Decoder {
    /// Decodes the prefix in one non-causal batch on `threads` CPU threads and generates up
    /// to `opts.n_predict` tokens. The prefix is consumed: its rows are freed once llama.cpp
    /// has copied them.
    pub fn generate(
        &self,
        prefix: PrefixBatch,
        opts: &GenerateOptions,
        threads: i32,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let (n_predict, sampling) = (opts.n_predict, &opts.sampling);
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
            threads,
            threads_batch: threads,
            flash_attn: opts.flash_attn.unwrap_or(n > FLASH_ATTN_AUTO_TOKENS),
            kv_type: opts.kv_type,
            op_offload: self.offloaded,
        };
        let mut ctx = LlamaContext::new(&self.model, &params)?;
        let adapters = self.adapter_selection(&opts.lora)?;
        if !adapters.is_empty() {
            ctx.set_adapters(&adapters)?;
        }
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
        let mut out = Generation {
            finish_reason: FinishReason::Length,
            ..Default::default()
        };
        let mut decode_steps = 0usize;
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
                decode_steps += 1;
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
        let decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        out.timings = Timings {
            prefill_ms,
            memory_after_prefill,
            decode_ms,
            n_prefix: n,
            n_gen: out.tokens.len(),
            decode_tok_s: if decode_ms > 0.0 {
                decode_steps as f64 / (decode_ms / 1e3)
            } else {
                0.0
            },
            ..Default::default()
        };
        Ok(out)
    }
}
