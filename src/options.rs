//! Per-request options and what every generation reports: [`GenerateOptions`] (with the one
//! validation every front end calls), [`Sampling`], [`CancelFlag`], [`AdapterScale`],
//! [`FinishReason`] and [`Timings`].

use crate::system::MemoryUse;
use crate::{Error, Result};
use pali_ggml::llama::KvCacheType;

/// A flag another thread (a server whose client left, a C caller's token callback) sets to
/// end a generation early.
pub type CancelFlag = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// A LoRA adapter loaded on a [`crate::Model`] ([`crate::Model::load_adapter`]): ids count
/// from 0 in load order and are not reused, as llama-server's `--lora` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct AdapterId(pub u32);

impl std::fmt::Display for AdapterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One adapter of a request and its scale: the adapter's update `alpha / r · B A x` is
/// multiplied by `scale` (llama.cpp's `--lora-scaled FILE SCALE`; PEFT's `set_scale`); 1 is
/// the adapter as trained, 0 leaves the base model unchanged.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdapterScale {
    #[allow(missing_docs)]
    pub id: AdapterId,
    #[allow(missing_docs)]
    pub scale: f32,
}

impl AdapterScale {
    /// Adapter `id` at `scale`.
    pub fn new(id: AdapterId, scale: f32) -> Self {
        AdapterScale { id, scale }
    }
}

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
    /// Record [`crate::Generation::token_logprobs`] (used for detection scores).
    pub logprobs: bool,
    /// Stop sequences (OpenAI's `stop`): the text ends just before the first one it
    /// contains.
    pub stop: Vec<String>,
    /// Set it from another thread (or from `on_text`) to end the generation with
    /// [`Error::Cancelled`]; checked before the prefix and after every token.
    pub cancel: Option<CancelFlag>,
    /// LoRA adapters applied to this request, each with its scale (llama-server's per-request
    /// `"lora"`); adapters not listed are not applied (empty: the base model). Ids are
    /// [`crate::Model::load_adapter`]'s; an id the model does not have is refused
    /// ([`GenerateOptions::check_adapters`]).
    pub lora: Vec<AdapterScale>,
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
            lora: Vec::new(),
        }
    }
}

/// Most stop sequences a request may have (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Highest sampling temperature accepted (OpenAI's range is 0 to 2).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Per-request settings as a front end receives them, before any check: signed where the
/// front end's own type is (the C library's `int`s, JSON numbers, the CLI's flags), `None`
/// for "the default". [`GenerateOptions::apply`] turns them into options with the one set of
/// rules and messages every front end shares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestValues {
    /// Most tokens to generate (`-n`, `max_tokens`).
    pub n_predict: Option<i64>,
    /// Largest context (`-c`, `n_ctx`); 0 = what the request needs.
    pub max_ctx: Option<i64>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Top-k (0 = off).
    pub top_k: Option<i64>,
    /// Top-p (1 = off).
    pub top_p: Option<f32>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop sequences (empty ones are dropped); `None` keeps the defaults'.
    pub stop: Option<Vec<String>>,
    /// Generate exactly `n_predict` tokens, past `<eos>`.
    pub ignore_eos: Option<bool>,
    /// LoRA adapters and scales (`--lora`, `"lora": [{"id", "scale"}]`); `None` keeps the
    /// defaults'.
    pub lora: Option<Vec<(i64, f64)>>,
}

impl GenerateOptions {
    /// These options with `values` applied over them, checked by [`GenerateOptions::validate`]:
    /// the CLI, `pali serve`, the C library and the Python package build their options
    /// this way, so a bad value gets the same refusal from each.
    pub fn apply(&self, values: &RequestValues) -> Result<GenerateOptions> {
        let count = |name: &str, v: i64, least: i64, what: &str| -> Result<usize> {
            if v < least {
                return Err(Error::InvalidOption(format!(
                    "{name} = {v}: must be {what}"
                )));
            }
            usize::try_from(v).map_err(|_| Error::InvalidOption(format!("{name} = {v}: too large")))
        };
        let mut o = self.clone();
        if let Some(n) = values.n_predict {
            o.n_predict = count(N_PREDICT, n, 1, "at least 1")?;
        }
        if let Some(c) = values.max_ctx {
            o.max_ctx = count(N_CTX, c, 0, "0 (what the request needs) or more")?;
        }
        if let Some(k) = values.top_k {
            o.sampling.top_k = count(TOP_K, k, 0, "0 (off) or more")?;
        }
        if let Some(t) = values.temperature {
            o.sampling.temperature = t;
        }
        if let Some(p) = values.top_p {
            o.sampling.top_p = p;
        }
        if let Some(s) = values.seed {
            o.sampling.seed = s;
        }
        if let Some(stop) = &values.stop {
            if stop.len() > MAX_STOP_SEQUENCES {
                return Err(too_many_stops(stop.len()));
            }
            o.stop = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        }
        if let Some(i) = values.ignore_eos {
            o.ignore_eos = i;
        }
        if let Some(lora) = &values.lora {
            o.lora = Vec::with_capacity(lora.len());
            for (i, &(id, scale)) in lora.iter().enumerate() {
                let id = u32::try_from(id).map_err(|_| {
                    Error::InvalidOption(format!(
                        "{LORA}[{i}].id = {id}: must be the id of a loaded adapter (0, 1, …)"
                    ))
                })?;
                o.lora.push(AdapterScale::new(AdapterId(id), scale as f32));
            }
        }
        o.validate()?;
        Ok(o)
    }

    /// The one check of per-request options, whichever front end built them (the library
    /// calls it too before it generates): at least one token to generate, a finite
    /// temperature from 0 to [`MAX_TEMPERATURE`], `top_p` in (0, 1], at most
    /// [`MAX_STOP_SEQUENCES`] stop sequences. A refusal is [`Error::InvalidOption`] naming
    /// the field and its value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidOption(m));
        if self.n_predict < 1 {
            return bad(format!(
                "{N_PREDICT} = {}: must be at least 1",
                self.n_predict
            ));
        }
        let t = self.sampling.temperature;
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return bad(format!(
                "{TEMPERATURE} = {t}: must be between 0 and {MAX_TEMPERATURE}"
            ));
        }
        let p = self.sampling.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad(format!("{TOP_P} = {p}: must be in (0, 1]"));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(too_many_stops(self.stop.len()));
        }
        for (i, a) in self.lora.iter().enumerate() {
            if !a.scale.is_finite() {
                return bad(format!(
                    "{LORA}[{i}].scale = {}: must be a finite number",
                    a.scale
                ));
            }
            if self.lora[..i].iter().any(|b| b.id == a.id) {
                return bad(format!("{LORA}[{i}].id = {}: listed twice", a.id));
            }
        }
        Ok(())
    }

    /// The check of [`GenerateOptions::lora`] against the adapters a model has loaded
    /// (`loaded`, in id order): an id it does not have is [`Error::InvalidOption`]. Every
    /// generation of a [`crate::Model`] runs it after [`GenerateOptions::validate`].
    pub fn check_adapters(&self, loaded: &[AdapterId]) -> Result<()> {
        match self
            .lora
            .iter()
            .enumerate()
            .find(|(_, a)| !loaded.contains(&a.id))
        {
            None => Ok(()),
            Some((i, a)) => {
                let have: Vec<String> = loaded.iter().map(|id| id.to_string()).collect();
                Err(Error::InvalidOption(format!(
                    "{LORA}[{i}].id = {}: no such adapter (loaded: {})",
                    a.id,
                    if have.is_empty() {
                        "none; load them with --lora".to_string()
                    } else {
                        have.join(", ")
                    }
                )))
            }
        }
    }
}

// The fields' names in messages: the library's name, then the CLI's and the APIs' spellings.
const N_PREDICT: &str = "n_predict (-n, max_tokens)";
const N_CTX: &str = "n_ctx (-c, --ctx-size)";
const TEMPERATURE: &str = "temperature (--temp)";
const TOP_K: &str = "top_k (--top-k)";
const TOP_P: &str = "top_p (--top-p)";
const LORA: &str = "lora (--lora)";

fn too_many_stops(n: usize) -> Error {
    Error::InvalidOption(format!(
        "stop has {n} sequences: at most {MAX_STOP_SEQUENCES}"
    ))
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// How long [`crate::Model::load`] took.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(v: RequestValues) -> String {
        match GenerateOptions::default().apply(&v) {
            Err(Error::InvalidOption(m)) => m,
            other => panic!("{v:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let v = RequestValues::default;
        let t = |t: f32| RequestValues {
            temperature: Some(t),
            ..v()
        };
        assert!(refusal(t(-1.0)).starts_with("temperature (--temp) = -1: must be between 0 and 2"));
        assert!(refusal(t(f32::NAN)).contains("temperature (--temp) = NaN"));
        assert!(refusal(t(2.5)).contains("= 2.5"));
        for p in [0.0, 7.0, -0.5, f32::NAN] {
            let m = refusal(RequestValues {
                top_p: Some(p),
                ..v()
            });
            assert!(
                m.starts_with("top_p (--top-p) = ") && m.ends_with("must be in (0, 1]"),
                "{m}"
            );
        }
        assert_eq!(
            refusal(RequestValues {
                top_k: Some(-1),
                ..v()
            }),
            "top_k (--top-k) = -1: must be 0 (off) or more"
        );
        for n in [0, -3] {
            let m = refusal(RequestValues {
                n_predict: Some(n),
                ..v()
            });
            assert_eq!(
                m,
                format!("n_predict (-n, max_tokens) = {n}: must be at least 1")
            );
        }
        assert!(refusal(RequestValues {
            max_ctx: Some(-1),
            ..v()
        })
        .starts_with("n_ctx (-c, --ctx-size) = -1"));
        let lora = |l: Vec<(i64, f64)>| RequestValues {
            lora: Some(l),
            ..v()
        };
        assert_eq!(
            refusal(lora(vec![(-1, 1.0)])),
            "lora (--lora)[0].id = -1: must be the id of a loaded adapter (0, 1, …)"
        );
        assert_eq!(
            refusal(lora(vec![(0, 1.0), (1, f64::NAN)])),
            "lora (--lora)[1].scale = NaN: must be a finite number"
        );
        assert!(refusal(lora(vec![(0, f64::INFINITY)])).contains("[0].scale = inf"));
        assert_eq!(
            refusal(lora(vec![(2, 1.0), (2, 0.5)])),
            "lora (--lora)[1].id = 2: listed twice"
        );
        let stop = Some(vec!["a".to_string(); 5]);
        assert_eq!(
            refusal(RequestValues { stop, ..v() }),
            "stop has 5 sequences: at most 4"
        );
    }

    #[test]
    fn good_values_apply_over_the_defaults() {
        let base = GenerateOptions {
            n_predict: 9,
            ..Default::default()
        };
        let o = base
            .apply(&RequestValues {
                temperature: Some(0.7),
                top_k: Some(5),
                stop: Some(vec!["".into(), "x".into()]),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(o.n_predict, 9);
        assert_eq!((o.sampling.temperature, o.sampling.top_k), (0.7, 5));
        assert_eq!(o.stop, ["x"]);
        assert!(GenerateOptions::default().validate().is_ok());
        let zero = GenerateOptions {
            n_predict: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let o = GenerateOptions::default()
            .apply(&RequestValues {
                lora: Some(vec![(1, 0.5), (0, -1.0)]),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            o.lora,
            [
                AdapterScale::new(AdapterId(1), 0.5),
                AdapterScale::new(AdapterId(0), -1.0)
            ]
        );
        assert!(o.check_adapters(&[AdapterId(0), AdapterId(1)]).is_ok());
        match o.check_adapters(&[AdapterId(0)]) {
            Err(Error::InvalidOption(m)) => {
                assert_eq!(m, "lora (--lora)[0].id = 1: no such adapter (loaded: 0)")
            }
            other => panic!("{other:?}"),
        }
        match o.check_adapters(&[]) {
            Err(Error::InvalidOption(m)) => {
                assert!(m.ends_with("(loaded: none; load them with --lora)"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
