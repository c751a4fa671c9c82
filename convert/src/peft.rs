//! PEFT's `adapter_config.json` for `pali convert-lora` ([`crate::lora`]): which adapters are
//! plain LoRA on linear layers, and each module's rank and scaling (`r`, `lora_alpha`,
//! `rank_pattern`, `alpha_pattern`, `use_rslora`).

use crate::{ConvertError, Result};
use pali_ggml::schema::adapter as names;
use std::path::Path;

/// The parts of `adapter_config.json` that set the arithmetic.
#[derive(Debug)]
pub(crate) struct PeftConfig {
    r: u64,
    /// `lora_alpha`: the `alpha` the files carry.
    pub(crate) alpha: f64,
    rslora: bool,
    rank_pattern: Vec<(String, regex::Regex, u64)>,
    alpha_pattern: Vec<(String, regex::Regex, f64)>,
}

fn config_error(path: &Path, msg: impl std::fmt::Display) -> ConvertError {
    ConvertError::Config(format!("{}: {msg}", path.display()))
}

/// The refusal of an adapter that is not plain LoRA on linear layers, with what to do.
pub(crate) const MERGE_HINT: &str =
    "merge it into the model in PyTorch (PeftModel.merge_and_unload()) and convert the merged checkpoint with `pali convert`";

impl PeftConfig {
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(names::PEFT_CONFIG);
        if !path.is_file() {
            return Err(ConvertError::Missing(format!(
                "no {} in {}: give the folder PEFT's save_pretrained wrote",
                names::PEFT_CONFIG,
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| config_error(&path, format!("invalid JSON: {e}")))?;
        Self::parse(&path, &v)
    }

    fn parse(path: &Path, v: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| Err(config_error(path, m));
        if !v.is_object() {
            return bad("not a JSON object".into());
        }
        match v.get("peft_type").and_then(|t| t.as_str()) {
            Some("LORA") => {}
            Some(t) => {
                return bad(format!(
                    "peft_type {t:?}: only LoRA adapters (\"LORA\") convert; {MERGE_HINT}"
                ))
            }
            None => return bad("no \"peft_type\": not a PEFT adapter config".into()),
        }
        let set = |k: &str| {
            v.get(k).is_some_and(|x| match x {
                serde_json::Value::Null | serde_json::Value::Bool(false) => false,
                serde_json::Value::Array(a) => !a.is_empty(),
                serde_json::Value::Object(o) => !o.is_empty(),
                serde_json::Value::String(s) => !s.is_empty(),
                _ => true,
            })
        };
        let refused: [(&str, &str); 8] = [
            ("use_dora", "DoRA (use_dora) rescales each weight by a learned magnitude, which llama.cpp's adapters cannot express"),
            ("modules_to_save", "modules_to_save stores whole trained layers, not LoRA pairs"),
            ("lora_bias", "lora_bias trains a bias next to B"),
            ("trainable_token_indices", "trainable_token_indices trains embedding rows"),
            ("layer_replication", "layer_replication changes the layer stack"),
            ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) is not supported"),
            ("target_parameters", "target_parameters adapts raw parameters, not linear layers"),
            ("use_qalora", "QA-LoRA (use_qalora) pools the inputs of A"),
        ];
        for (key, why) in refused {
            if set(key) {
                return bad(format!("{key} = {}: {why}; {MERGE_HINT}", v[key]));
            }
        }
        match v.get("bias").and_then(|b| b.as_str()) {
            None | Some("none") => {}
            Some(b) => {
                return bad(format!(
                    "bias = {b:?}: trained biases are not LoRA pairs; {MERGE_HINT}"
                ))
            }
        }
        let r = match v.get("r").and_then(|r| r.as_u64()) {
            Some(r) if r > 0 => r,
            _ => return bad(format!("r = {}: must be a positive integer", v["r"])),
        };
        let alpha = match v.get("lora_alpha") {
            // PEFT's default.
            None | Some(serde_json::Value::Null) => 8.0,
            Some(a) => match a.as_f64() {
                Some(a) if a.is_finite() => a,
                _ => return bad(format!("lora_alpha = {a}: must be a number")),
            },
        };
        let rslora = v.get("use_rslora").and_then(|b| b.as_bool()) == Some(true);
        let pattern = |key: &str| -> Result<Vec<(String, regex::Regex, f64)>> {
            let mut out = Vec::new();
            match v.get(key) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::Object(map)) => {
                    for (k, val) in map {
                        // PEFT: re.match(rf"(.*\.)?({key})$", module name).
                        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| {
                            config_error(path, format!("{key} key {k:?} is not a regular expression pali reads: {e}"))
                        })?;
                        let x = val
                            .as_f64()
                            .filter(|x| x.is_finite() && *x >= 0.0)
                            .ok_or_else(|| {
                                config_error(
                                    path,
                                    format!("{key}[{k:?}] = {val}: must be a number"),
                                )
                            })?;
                        out.push((k.clone(), re, x));
                    }
                }
                Some(other) => {
                    return Err(config_error(
                        path,
                        format!("{key} = {other}: must be an object"),
                    ))
                }
            }
            Ok(out)
        };
        let mut rank_pattern = Vec::new();
        for (k, re, x) in pattern("rank_pattern")? {
            if x < 1.0 || x.fract() != 0.0 {
                return bad(format!(
                    "rank_pattern[{k:?}] = {x}: must be a positive integer"
                ));
            }
            rank_pattern.push((k, re, x as u64));
        }
        Ok(PeftConfig {
            r,
            alpha,
            rslora,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// The one value the patterns give `module`, or `default`; two patterns that match with
    /// different values are an error (PEFT would take the first in the file's order).
    fn lookup<T: Copy + PartialEq + std::fmt::Display>(
        patterns: &[(String, regex::Regex, T)],
        what: &str,
        module: &str,
        default: T,
    ) -> Result<T> {
        let mut found: Option<(&str, T)> = None;
        for (k, re, x) in patterns {
            if re.is_match(module) {
                match found {
                    Some((k0, x0)) if x0 != *x => {
                        return Err(ConvertError::Config(format!(
                            "{what} keys {k0:?} ({x0}) and {k:?} ({x}) both match module {module}"
                        )))
                    }
                    _ => found = Some((k, *x)),
                }
            }
        }
        Ok(found.map_or(default, |(_, x)| x))
    }

    /// The rank and the PEFT scaling of `module`.
    pub(crate) fn module(&self, module: &str) -> Result<(u64, f64)> {
        let r = Self::lookup(&self.rank_pattern, "rank_pattern", module, self.r)?;
        let alpha = Self::lookup(&self.alpha_pattern, "alpha_pattern", module, self.alpha)?;
        let s = if self.rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> Result<PeftConfig> {
        PeftConfig::parse(Path::new("adapter_config.json"), &v)
    }

    #[test]
    fn config_patterns_and_refusals() {
        let base = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"o_proj": 32},
            "use_dora": false, "modules_to_save": null, "bias": "none"});
        let c = cfg(base.clone()).unwrap();
        let m = |s| c.module(s).unwrap();
        assert_eq!(
            m("model.language_model.layers.0.self_attn.q_proj"),
            (8, 2.0)
        );
        assert_eq!(m("model.language_model.layers.0.mlp.down_proj"), (4, 4.0));
        assert_eq!(
            m("model.language_model.layers.1.self_attn.o_proj"),
            (8, 4.0)
        );
        // A pattern matches whole dotted components at the end, as PEFT's re.match.
        assert_eq!(
            m("model.language_model.layers.1.self_attn.xo_proj"),
            (8, 2.0)
        );
        let mut rs = base.clone();
        rs["use_rslora"] = serde_json::json!(true);
        assert_eq!(
            cfg(rs).unwrap().module("a.q_proj").unwrap(),
            (8, 16.0 / 8f64.sqrt())
        );
        for (key, value, needle) in [
            ("peft_type", serde_json::json!("IA3"), "peft_type \"IA3\""),
            ("use_dora", serde_json::json!(true), "DoRA"),
            (
                "modules_to_save",
                serde_json::json!(["lm_head"]),
                "modules_to_save",
            ),
            ("bias", serde_json::json!("all"), "bias = \"all\""),
            ("r", serde_json::json!(0), "r = 0"),
            ("lora_alpha", serde_json::json!("x"), "lora_alpha"),
            (
                "rank_pattern",
                serde_json::json!({"(": 4}),
                "regular expression",
            ),
            (
                "rank_pattern",
                serde_json::json!({"q_proj": 2.5}),
                "positive integer",
            ),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let e = cfg(v).unwrap_err().to_string();
            assert!(e.contains(needle), "{key}: {e}");
        }
        let mut v = base.clone();
        v["alpha_pattern"] = serde_json::json!({"o_proj": 32, "self_attn.o_proj": 8});
        let e = cfg(v).unwrap().module("x.self_attn.o_proj").unwrap_err();
        assert!(e.to_string().contains("both match"), "{e}");
    }
}
