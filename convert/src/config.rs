//! The parts of an HF PaliGemma 2 checkpoint's config.json and preprocessor_config.json the
//! converter needs. Every hyper-parameter is read from the files (with transformers' own
//! defaults for keys a config omits), never assumed from the model size.

use crate::{ConvertError, Result};
use serde::Deserialize;
use std::path::Path;

/// Gemma 2 decoder hyper-parameters (`text_config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Must be `gemma2`.
    pub model_type: String,
    #[allow(missing_docs)]
    pub hidden_size: usize,
    #[allow(missing_docs)]
    pub intermediate_size: usize,
    #[allow(missing_docs)]
    pub num_hidden_layers: usize,
    #[allow(missing_docs)]
    pub num_attention_heads: usize,
    #[allow(missing_docs)]
    pub num_key_value_heads: usize,
    #[allow(missing_docs)]
    pub head_dim: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    #[allow(missing_docs)]
    pub rms_norm_eps: f64,
    #[allow(missing_docs)]
    pub rope_theta: f64,
    #[allow(missing_docs)]
    pub attn_logit_softcapping: Option<f64>,
    #[allow(missing_docs)]
    pub final_logit_softcapping: Option<f64>,
    #[allow(missing_docs)]
    pub sliding_window: Option<u64>,
    /// Embedding rows (257216 for the released checkpoints: padded).
    pub vocab_size: usize,
    #[allow(missing_docs)]
    pub max_position_embeddings: usize,
}

impl Default for TextConfig {
    // transformers' Gemma2Config defaults (the 2B shape), used for keys a config omits.
    fn default() -> Self {
        TextConfig {
            model_type: String::new(),
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            query_pre_attn_scalar: 256.0,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            attn_logit_softcapping: Some(50.0),
            final_logit_softcapping: Some(30.0),
            sliding_window: Some(4096),
            vocab_size: 256000,
            max_position_embeddings: 8192,
        }
    }
}

/// SigLIP vision tower hyper-parameters (`vision_config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    #[allow(missing_docs)]
    pub hidden_size: usize,
    #[allow(missing_docs)]
    pub intermediate_size: usize,
    #[allow(missing_docs)]
    pub num_hidden_layers: usize,
    #[allow(missing_docs)]
    pub num_attention_heads: usize,
    #[allow(missing_docs)]
    pub num_channels: usize,
    #[allow(missing_docs)]
    pub image_size: usize,
    #[allow(missing_docs)]
    pub patch_size: usize,
    #[allow(missing_docs)]
    pub layer_norm_eps: f64,
    #[allow(missing_docs)]
    pub hidden_act: String,
    /// PaliGemma has no attention-pooling head.
    pub vision_use_head: Option<bool>,
}

impl Default for VisionConfig {
    // transformers' SiglipVisionConfig defaults.
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            layer_norm_eps: 1e-6,
            hidden_act: "gelu_pytorch_tanh".into(),
            vision_use_head: None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    text_config: Option<serde_json::Value>,
    vision_config: Option<serde_json::Value>,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
    projection_dim: Option<usize>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
}

/// Upper bound for any size in config.json (2^24): products of two stay far from overflow.
const MAX_DIM: usize = 1 << 24;

/// A `Config` error for a config section that failed to deserialize, naming the key at
/// fault (serde's message does not): the first key that fails on its own, the others
/// taking their defaults.
fn section_error<T: serde::de::DeserializeOwned>(
    section: &str,
    v: &serde_json::Value,
    e: serde_json::Error,
) -> ConvertError {
    let key = v.as_object().and_then(|o| {
        o.iter()
            .find(|(k, val)| {
                let one = serde_json::Map::from_iter([((*k).clone(), (*val).clone())]);
                serde_json::from_value::<T>(serde_json::Value::Object(one)).is_err()
            })
            .map(|(k, _)| k.clone())
    });
    match key {
        Some(k) => ConvertError::Config(format!("{section}.{k}: {e}")),
        None => ConvertError::Config(format!("{section}: {e}")),
    }
}

/// A validated PaliGemma 2 configuration.
#[derive(Debug, Clone)]
pub struct PaliGemmaConfig {
    /// Decoder.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Id of `<image>`.
    pub image_token_index: u32,
    /// `_name_or_path`, if the config has one.
    pub name_or_path: Option<String>,
}

impl PaliGemmaConfig {
    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(ConvertError::Missing(format!(
                "{} not found: is {} an HF PaliGemma 2 checkpoint folder?",
                path.display(),
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
        Self::parse(&text).map_err(|e| match e {
            ConvertError::Config(m) => ConvertError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses and validates config.json text.
    pub fn parse(text: &str) -> Result<Self> {
        let cfg = |m: String| ConvertError::Config(m);
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| cfg(format!("invalid JSON: {e}")))?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        if model_type != "paligemma" {
            let arch = raw
                .architectures
                .as_ref()
                .and_then(|a| a.first())
                .cloned()
                .unwrap_or_default();
            return Err(cfg(format!(
                "not a PaliGemma checkpoint: model_type is {model_type:?} (architectures {arch:?}); expected \"paligemma\""
            )));
        }
        let text_v = raw
            .text_config
            .clone()
            .ok_or_else(|| cfg("no text_config".into()))?;
        // transformers 5 writes rope_theta inside rope_parameters.
        let rope_theta = text_v.get("rope_theta").is_none().then(|| {
            text_v
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(|t| t.as_f64())
        });
        let mut tc: TextConfig = serde_json::from_value(text_v.clone())
            .map_err(|e| section_error::<TextConfig>("text_config", &text_v, e))?;
        if let Some(Some(theta)) = rope_theta {
            tc.rope_theta = theta;
        }
        if tc.model_type != "gemma2" {
            return Err(cfg(format!(
                "text_config.model_type is {:?}: only PaliGemma 2 (Gemma 2 decoder, \"gemma2\") is supported",
                tc.model_type
            )));
        }
        let vision_v = raw
            .vision_config
            .clone()
            .ok_or_else(|| cfg("no vision_config".into()))?;
        let vc: VisionConfig = serde_json::from_value(vision_v.clone())
            .map_err(|e| section_error::<VisionConfig>("vision_config", &vision_v, e))?;
        let image_token_index = raw
            .image_token_index
            .or(raw.image_token_id)
            .ok_or_else(|| cfg("no image_token_index".into()))?;
        let c = PaliGemmaConfig {
            text: tc,
            vision: vc,
            image_token_index,
            name_or_path: raw.name_or_path,
        };
        if let Some(p) = raw.projection_dim {
            if p != c.text.hidden_size {
                return Err(cfg(format!(
                    "projection_dim {p} differs from text_config.hidden_size {}",
                    c.text.hidden_size
                )));
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let t = &self.text;
        let v = &self.vision;
        let err = |m: String| Err(ConvertError::Config(m));
        // Sizes far beyond any real model would overflow shape arithmetic: refuse them.
        for (key, n) in [
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.head_dim", t.head_dim),
            ("text_config.vocab_size", t.vocab_size),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
        ] {
            if n > MAX_DIM {
                return err(format!("{key} {n} is implausibly large (limit {MAX_DIM})"));
            }
        }
        if t.num_attention_heads == 0
            || t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return err(format!(
                "text_config: num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return err(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return err(format!(
                "vision_config: hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.num_channels != 3 {
            return err(format!(
                "vision_config: num_channels {} (only RGB, 3, is supported)",
                v.num_channels
            ));
        }
        if v.vision_use_head == Some(true) {
            return err(
                "vision_config: vision_use_head is true, PaliGemma has no pooling head".into(),
            );
        }
        if !v.hidden_act.starts_with("gelu") {
            return err(format!(
                "vision_config: hidden_act {:?} (expected gelu_pytorch_tanh)",
                v.hidden_act
            ));
        }
        // llama.cpp does not read the attention scale from the file: it derives it from the
        // layer count (gemma2.cpp). Refuse configs it would compute differently from HF.
        if !(t.query_pre_attn_scalar > 0.0 && t.query_pre_attn_scalar.is_finite()) {
            return err(format!(
                "text_config: query_pre_attn_scalar {} must be a positive number",
                t.query_pre_attn_scalar
            ));
        }
        let llama_scale = self.llama_cpp_attention_scale();
        let hf_scale = 1.0 / t.query_pre_attn_scalar.sqrt();
        if (llama_scale - hf_scale).abs() > 1e-6 * hf_scale {
            return err(format!(
                "text_config: query_pre_attn_scalar {} gives attention scale {hf_scale:.6}, but llama.cpp's gemma2 \
                 graph derives {llama_scale:.6} for a {}-layer model (1/sqrt(head_dim) = 1/sqrt({}), or \
                 1/sqrt(hidden/heads) at 46 layers); the decoder would be wrong in llama.cpp",
                t.query_pre_attn_scalar, t.num_hidden_layers, t.head_dim
            ));
        }
        Ok(())
    }

    /// The attention scale llama.cpp's gemma2 graph will use for this shape.
    pub fn llama_cpp_attention_scale(&self) -> f64 {
        let t = &self.text;
        if t.num_hidden_layers == 46 {
            1.0 / ((t.hidden_size / t.num_attention_heads) as f64).sqrt()
        } else {
            1.0 / (t.head_dim as f64).sqrt()
        }
    }

    /// Image tokens per image.
    pub fn num_image_tokens(&self) -> usize {
        let n = self.vision.image_size / self.vision.patch_size;
        n * n
    }
}

/// Preprocessing settings from preprocessor_config.json.
#[derive(Debug, Clone)]
pub struct PreprocessorConfig {
    /// PIL resample code (3 = bicubic).
    pub resample: u32,
    #[allow(missing_docs)]
    pub rescale_factor: f32,
    #[allow(missing_docs)]
    pub mean: [f32; 3],
    #[allow(missing_docs)]
    pub std: [f32; 3],
}

impl PreprocessorConfig {
    /// Reads `dir/preprocessor_config.json` (or the `image_processor` part of transformers
    /// 5's `processor_config.json`); falls back to SigLIP's defaults, with a warning, when
    /// neither exists.
    pub fn load(dir: &Path) -> Result<Self> {
        let defaults = PreprocessorConfig {
            resample: 3,
            rescale_factor: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let (path, nested) = match dir.join("preprocessor_config.json") {
            p if p.exists() => (p, false),
            _ => (dir.join("processor_config.json"), true),
        };
        if !path.exists() {
            log::warn!(
                "no preprocessor_config.json in {}: using SigLIP defaults (bicubic, mean=std=0.5)",
                dir.display()
            );
            return Ok(defaults);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ConvertError::Config(format!("{}: invalid JSON: {e}", path.display())))?;
        if nested {
            v = v.get("image_processor").cloned().ok_or_else(|| {
                ConvertError::Config(format!("{}: no \"image_processor\" object", path.display()))
            })?;
        }
        let triple = |k: &str, d: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d),
                Some(serde_json::Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.5) as f32; 3]),
                Some(serde_json::Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(|| {
                            ConvertError::Config(format!(
                                "{}: {k} must hold numbers",
                                path.display()
                            ))
                        })? as f32;
                    }
                    Ok(out)
                }
                Some(_) => Err(ConvertError::Config(format!(
                    "{}: {k} must be 3 numbers",
                    path.display()
                ))),
            }
        };
        let resample = match v.get("resample") {
            None | Some(serde_json::Value::Null) => 3,
            Some(r) => r.as_u64().filter(|&r| r <= 5).ok_or_else(|| {
                ConvertError::Config(format!(
                    "{}: resample {r} is not a PIL filter code 0..5",
                    path.display()
                ))
            })? as u32,
        };
        let rescale_factor = v
            .get("rescale_factor")
            .and_then(|r| r.as_f64())
            .map(|r| r as f32)
            .unwrap_or(defaults.rescale_factor);
        let std = triple("image_std", defaults.std)?;
        if std.contains(&0.0) {
            return Err(ConvertError::Config(format!(
                "{}: image_std has a zero",
                path.display()
            )));
        }
        Ok(PreprocessorConfig {
            resample,
            rescale_factor,
            mean: triple("image_mean", defaults.mean)?,
            std,
        })
    }
}
