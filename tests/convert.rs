//! The converter's contract, on damaged copies of the fixtures and on a generated checkpoint:
//! every failure is a typed error whose message names the file / tensor / key at fault, a
//! failed conversion never leaves a file behind, the three HF tensor layouts give identical
//! GGUFs, and quantized decoders are exactly what llama.cpp's own quantizer makes.

mod common;
use common::*;
use pali_convert::config::PaliGemmaConfig;
use pali_convert::{convert, ConvertError, ConvertOptions, ConvertOutput, INTERRUPTED};
use pali_ggml::gguf::{GgufFile, TensorInfo};
use pali_ggml::quant::{self, FileType};
use pali_ggml::schema::{self, keys, Fixup};
use pali_ggml::GgmlType;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

// ---------------------------------------------------------------------------------------
// Harness

/// Every conversion in this binary holds this for reading; the interruption test, which
/// sets the process-wide [`INTERRUPTED`] flag, holds it for writing.
static FLAG_LOCK: RwLock<()> = RwLock::new(());

fn options(input: &Path, out: &Path, text: FileType, vision: FileType) -> ConvertOptions {
    ConvertOptions {
        input: input.to_path_buf(),
        out_dir: out.to_path_buf(),
        text_type: text,
        vision_type: vision,
        force: false,
        name: Some("tiny".into()),
        threads: 2,
    }
}

fn run(opts: &ConvertOptions) -> Result<ConvertOutput, ConvertError> {
    let _shared = FLAG_LOCK.read().unwrap_or_else(|e| e.into_inner());
    convert(opts, &mut |_, _, _| {})
}

/// Asserts an error's variant and that its message contains every needle.
macro_rules! assert_err {
    ($err:expr, $pat:pat, $($needle:expr),+ $(,)?) => {{
        let e: &ConvertError = &$err;
        assert!(matches!(e, $pat), "wrong error variant: {e:?}");
        let msg = e.to_string();
        $(
            assert!(msg.contains($needle), "error {msg:?} does not mention {:?}", $needle);
        )+
    }};
}

/// Nothing at all in the output folder: neither target file nor any `*.partial`.
fn assert_clean(out: &Path) {
    if out.exists() {
        let left: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.is_empty(),
            "failed conversion left {left:?} in {}",
            out.display()
        );
    }
}

/// Regular files whose name ends with `.partial` in `dir`.
fn partial_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

/// A scratch copy of a fixture's `hf/` folder to damage, and an output folder.
struct Case {
    hf: PathBuf,
    out: PathBuf,
}

impl Case {
    fn new(label: &str, fixture: &str) -> Case {
        let root = scratch_dir(label);
        let hf = root.join("hf");
        copy_dir(&fixture_dir(fixture).join("hf"), &hf);
        Case {
            hf,
            out: root.join("out"),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.hf.join(file)
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.path(file)).unwrap();
    }

    fn edit(&self, file: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        edit_json(&self.path(file), edit);
    }

    fn tensors(&self) -> Vec<StTensor> {
        read_checkpoint(&self.hf)
    }

    /// Replaces the checkpoint (single file or shards) with one `model.safetensors`.
    fn write_single(&self, tensors: &[StTensor]) {
        for e in std::fs::read_dir(&self.hf).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            if n.starts_with("model") && n.contains("safetensors") {
                self.remove(&n);
            }
        }
        write_safetensors(&self.path("model.safetensors"), tensors);
    }

    fn opts(&self, text: FileType, vision: FileType) -> ConvertOptions {
        options(&self.hf, &self.out, text, vision)
    }

    fn convert(&self) -> Result<ConvertOutput, ConvertError> {
        run(&self.opts(FileType::F16, FileType::F16))
    }

    /// Converts expecting failure; checks that nothing was left behind.
    fn fail(&self) -> ConvertError {
        let e = match self.convert() {
            Ok(_) => panic!("conversion of {} should fail", self.hf.display()),
            Err(e) => e,
        };
        assert_clean(&self.out);
        e
    }
}

const EMBED: &str = "language_model.model.embed_tokens.weight";
const NORM0: &str = "language_model.model.layers.0.input_layernorm.weight";

// ---------------------------------------------------------------------------------------
// Missing inputs, foreign and invalid configs

/// Each missing input file gives `Missing` naming that file; nothing is written.
#[test]
fn missing_inputs_are_named() {
    for file in ["config.json", "tokenizer.model", "tokenizer.json"] {
        let c = Case::new(&format!("missing-{file}"), "tiny-224");
        c.remove(file);
        assert_err!(c.fail(), ConvertError::Missing(_), file);
    }

    let c = Case::new("missing-safetensors", "tiny-224");
    c.remove("model.safetensors");
    assert_err!(
        c.fail(),
        ConvertError::Missing(_),
        "model.safetensors",
        "model.safetensors.index.json"
    );

    // The index lists a shard that is not there.
    let c = Case::new("missing-shard", "tiny-swa-98");
    c.remove("model-00002-of-00002.safetensors");
    assert_err!(
        c.fail(),
        ConvertError::Missing(_),
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"
    );

    let c = Case::new("missing-input-dir", "tiny-224");
    let mut o = c.opts(FileType::F16, FileType::F16);
    o.input = c.hf.join("nope");
    let e = run(&o).unwrap_err();
    assert_err!(e, ConvertError::Missing(_), "nope", "not a folder");
    assert_clean(&c.out);
}

/// A non-PaliGemma config names the model type it found; PaliGemma 1 (Gemma 1 decoder) is
/// refused as such.
#[test]
fn foreign_and_first_generation_configs_are_refused() {
    let c = Case::new("config-llama", "tiny-224");
    c.edit("config.json", |v| {
        v["model_type"] = json!("llama");
        v["architectures"] = json!(["LlamaForCausalLM"]);
    });
    assert_err!(
        c.fail(),
        ConvertError::Config(_),
        "config.json",
        "\"llama\"",
        "LlamaForCausalLM",
        "paligemma"
    );

    let c = Case::new("config-paligemma1", "tiny-224");
    c.edit("config.json", |v| {
        v["text_config"]["model_type"] = json!("gemma")
    });
    assert_err!(
        c.fail(),
        ConvertError::Config(_),
        "text_config.model_type",
        "\"gemma\"",
        "PaliGemma 2"
    );
}

/// Configs whose attention scale llama.cpp would compute differently from HF (it derives
/// the scale from the layer count, not from query_pre_attn_scalar) are refused from
/// config.json alone: the checkpoint's tensors are deleted and the error is still `Config`.
#[test]
fn attention_scales_llama_cpp_would_get_wrong_are_refused_before_tensors() {
    // (fixture, qpas, needles): 46 layers use hidden/heads = 16; others use head_dim.
    let cases: &[(&str, f64, &[&str])] = &[
        ("tiny-46l-56", 8.0, &["query_pre_attn_scalar 8", "46-layer"]),
        ("tiny-224", 64.0, &["query_pre_attn_scalar 64", "2-layer"]),
        (
            "tiny-swa-98",
            16.0,
            &["query_pre_attn_scalar 16", "3-layer"],
        ),
        ("tiny-224", 0.0, &["query_pre_attn_scalar"]),
        ("tiny-224", -16.0, &["query_pre_attn_scalar"]),
    ];
    for (i, (fixture, qpas, needles)) in cases.iter().enumerate() {
        let c = Case::new(&format!("qpas-{i}"), fixture);
        c.edit("config.json", |v| {
            v["text_config"]["query_pre_attn_scalar"] = json!(qpas)
        });
        c.write_single(&[]); // no tensors at all: they must not be reached
        let e = c.fail();
        assert!(
            matches!(e, ConvertError::Config(_)),
            "{fixture} {qpas}: {e:?}"
        );
        for n in *needles {
            assert!(e.to_string().contains(n), "{e} lacks {n:?}");
        }
    }
}

/// Every other config.json / preprocessor_config.json problem is a `Config` error that
/// names the file and the key.
#[test]
fn invalid_configs_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(&str, Edit, &[&str])] = &[
        (
            "no-text-config",
            |v| {
                v.as_object_mut().unwrap().remove("text_config");
            },
            &["config.json", "text_config"],
        ),
        (
            "no-vision-config",
            |v| {
                v.as_object_mut().unwrap().remove("vision_config");
            },
            &["config.json", "vision_config"],
        ),
        (
            "text-not-object",
            |v| v["text_config"] = json!("gemma2"),
            &["config.json", "text_config", "invalid type"],
        ),
        (
            "text-type",
            |v| v["text_config"]["hidden_size"] = json!("64"),
            &["config.json", "text_config", "hidden_size"],
        ),
        (
            "vision-type",
            |v| v["vision_config"]["num_hidden_layers"] = json!(-1),
            &["config.json", "vision_config", "num_hidden_layers"],
        ),
        (
            "no-image-token",
            |v| {
                v.as_object_mut().unwrap().remove("image_token_index");
            },
            &["image_token_index"],
        ),
        (
            "projection-dim",
            |v| v["projection_dim"] = json!(32),
            &["projection_dim 32", "hidden_size 64"],
        ),
        (
            "gqa",
            |v| v["text_config"]["num_key_value_heads"] = json!(3),
            &["num_attention_heads 4", "num_key_value_heads 3"],
        ),
        (
            "patch",
            |v| v["vision_config"]["image_size"] = json!(225),
            &["image_size 225", "patch_size 14"],
        ),
        (
            "vision-heads",
            |v| v["vision_config"]["num_attention_heads"] = json!(3),
            &["hidden_size 32", "num_attention_heads 3"],
        ),
        (
            "channels",
            |v| v["vision_config"]["num_channels"] = json!(1),
            &["num_channels 1"],
        ),
        (
            "pooling-head",
            |v| v["vision_config"]["vision_use_head"] = json!(true),
            &["vision_use_head"],
        ),
        (
            "act",
            |v| v["vision_config"]["hidden_act"] = json!("relu"),
            &["hidden_act", "relu"],
        ),
        (
            "attn-cap",
            |v| v["text_config"]["attn_logit_softcapping"] = json!(null),
            &["attn_logit_softcapping"],
        ),
        (
            "final-cap",
            |v| v["text_config"]["final_logit_softcapping"] = json!(null),
            &["final_logit_softcapping"],
        ),
        (
            "huge",
            |v| v["text_config"]["intermediate_size"] = json!(1u64 << 40),
            &[
                "text_config.intermediate_size 1099511627776",
                "implausibly large",
            ],
        ),
        (
            "huge-image",
            |v| v["vision_config"]["image_size"] = json!(1u64 << 33),
            &["vision_config.image_size", "implausibly large"],
        ),
    ];
    for (label, edit, needles) in cases {
        let c = Case::new(&format!("config-{label}"), "tiny-224");
        c.edit("config.json", *edit);
        let e = c.fail();
        assert!(matches!(e, ConvertError::Config(_)), "{label}: {e:?}");
        for n in *needles {
            assert!(e.to_string().contains(n), "{label}: {e} lacks {n:?}");
        }
    }

    let c = Case::new("config-json", "tiny-224");
    std::fs::write(c.path("config.json"), "{\"model_type\": ").unwrap();
    assert_err!(
        c.fail(),
        ConvertError::Config(_),
        "config.json",
        "invalid JSON"
    );

    let pp: &[(&str, Edit, &[&str])] = &[
        (
            "mean-len",
            |v| v["image_mean"] = json!([0.5, 0.5]),
            &["image_mean", "3 numbers"],
        ),
        (
            "mean-type",
            |v| v["image_mean"] = json!(["a", "b", "c"]),
            &["image_mean", "numbers"],
        ),
        ("resample", |v| v["resample"] = json!(9), &["resample 9"]),
        (
            "std-zero",
            |v| v["image_std"] = json!([0.5, 0.0, 0.5]),
            &["image_std", "zero"],
        ),
    ];
    for (label, edit, needles) in pp {
        let c = Case::new(&format!("preprocessor-{label}"), "tiny-224");
        c.edit("preprocessor_config.json", *edit);
        let e = c.fail();
        assert!(matches!(e, ConvertError::Config(_)), "{label}: {e:?}");
        for n in needles.iter().chain(&["preprocessor_config.json"]) {
            assert!(e.to_string().contains(n), "{label}: {e} lacks {n:?}");
        }
    }

    let c = Case::new("preprocessor-json", "tiny-224");
    std::fs::write(c.path("preprocessor_config.json"), "{").unwrap();
    assert_err!(
        c.fail(),
        ConvertError::Config(_),
        "preprocessor_config.json",
        "invalid JSON"
    );

    // transformers 5 layout: only processor_config.json, whose image_processor is missing.
    let c = Case::new("processor-nested", "tiny-224");
    c.remove("preprocessor_config.json");
    c.edit("processor_config.json", |v| {
        v.as_object_mut().unwrap().remove("image_processor");
    });
    assert_err!(
        c.fail(),
        ConvertError::Config(_),
        "processor_config.json",
        "image_processor"
    );
}

/// Broken tokenizer files give `Tokenizer` errors naming the file and the entry.
#[test]
fn invalid_tokenizers_are_refused() {
    let c = Case::new("tok-model-garbage", "tiny-224");
    std::fs::write(
        c.path("tokenizer.model"),
        b"this is not a sentencepiece model",
    )
    .unwrap();
    assert_err!(
        c.fail(),
        ConvertError::Tokenizer(_),
        "tokenizer.model",
        "SentencePiece"
    );

    let c = Case::new("tok-model-truncated", "tiny-224");
    let bytes = std::fs::read(c.path("tokenizer.model")).unwrap();
    std::fs::write(c.path("tokenizer.model"), &bytes[..1001]).unwrap();
    assert_err!(c.fail(), ConvertError::Tokenizer(_), "tokenizer");

    let c = Case::new("tok-json", "tiny-224");
    std::fs::write(c.path("tokenizer.json"), "{\"added_tokens\": [").unwrap();
    assert_err!(
        c.fail(),
        ConvertError::Tokenizer(_),
        "tokenizer.json",
        "invalid JSON"
    );

    type Edit = fn(&mut serde_json::Value);
    let cases: &[(&str, Edit, &[&str])] = &[
        (
            "malformed",
            |v| {
                v["added_tokens"][0].as_object_mut().unwrap().remove("id");
            },
            &["tokenizer.json", "malformed added_tokens"],
        ),
        (
            "conflict",
            |v| {
                v["added_tokens"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"id": 5, "content": "<foo>", "special": true}))
            },
            &["id 5", "<foo>", "<0x00>"],
        ),
        (
            "gap",
            |v| {
                v["added_tokens"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"id": 1960, "content": "<foo>", "special": true}))
            },
            &["<foo>", "1960", "gap"],
        ),
    ];
    for (label, edit, needles) in cases {
        let c = Case::new(&format!("tok-{label}"), "tiny-224");
        c.edit("tokenizer.json", *edit);
        let e = c.fail();
        assert!(matches!(e, ConvertError::Tokenizer(_)), "{label}: {e:?}");
        for n in *needles {
            assert!(e.to_string().contains(n), "{label}: {e} lacks {n:?}");
        }
    }

    // More vocabulary entries than embedding rows (checked before any tensor).
    let c = Case::new("tok-rows", "tiny-224");
    c.edit("config.json", |v| {
        v["text_config"]["vocab_size"] = json!(1000)
    });
    assert_err!(c.fail(), ConvertError::Tokenizer(_), "1953", "1000 rows");
}

// ---------------------------------------------------------------------------------------
// Tensors

/// A tensor missing from the checkpoint is named; the failure (decoder, vision or projector,
/// first or last in write order) leaves neither the mmproj nor the decoder file.
#[test]
fn missing_tensors_are_named_and_leave_no_files() {
    for (i, name) in [
        "language_model.model.layers.1.mlp.up_proj.weight",
        "language_model.model.norm.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.bias",
        "vision_tower.vision_model.post_layernorm.bias",
        "multi_modal_projector.linear.bias",
    ]
    .into_iter()
    .enumerate()
    {
        let c = Case::new(&format!("missing-tensor-{i}"), "tiny-224");
        let mut t = c.tensors();
        t.retain(|t| t.name != name);
        c.write_single(&t);
        assert_err!(c.fail(), ConvertError::Tensor(_), name, "missing");
    }
}

/// In the transformers >= 4.52 and 5 layouts a missing tensor is named as that layout
/// spells it.
#[test]
fn missing_tensors_are_named_in_the_checkpoints_layout() {
    let cases = [
        (
            "4.52",
            [
                ("language_model.model.", "model.language_model."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
            ],
            "model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias",
        ),
        (
            "5",
            [
                ("language_model.model.", "model.language_model."),
                ("vision_tower.vision_model.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
            ],
            "model.vision_tower.encoder.layers.1.mlp.fc2.bias",
        ),
    ];
    for (label, map, vision_name) in cases {
        for name in [
            "model.language_model.layers.1.self_attn.o_proj.weight",
            vision_name,
            "model.multi_modal_projector.linear.weight",
        ] {
            let c = Case::new(&format!("missing-{label}-{name}"), "tiny-224");
            let mut t = rename(&c.tensors(), &map);
            t.retain(|t| t.name != name);
            c.write_single(&t);
            assert_err!(
                c.fail(),
                ConvertError::Tensor(_),
                &format!("tensor {name} is missing")
            );
        }
    }
}

/// A tensor whose shape disagrees with config.json is named with both shapes.
#[test]
fn shapes_disagreeing_with_config_are_named() {
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(Edit, &[&str])] = &[
        (
            |v| v["text_config"]["intermediate_size"] = json!(256),
            &[
                "language_model.model.layers.0.mlp.gate_proj.weight",
                "[128, 64]",
                "[256, 64]",
            ],
        ),
        (
            |v| v["text_config"]["vocab_size"] = json!(2048),
            &[EMBED, "[1984, 64]", "[2048, 64]"],
        ),
        (
            |v| v["vision_config"]["intermediate_size"] = json!(100),
            &[
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "[64, 32]",
                "[100, 32]",
            ],
        ),
        (
            |v| v["vision_config"]["patch_size"] = json!(16),
            &[
                "vision_tower.vision_model.embeddings.patch_embedding.weight",
                "[32, 3, 14, 14]",
                "[32, 3, 16, 16]",
            ],
        ),
    ];
    for (i, (edit, needles)) in cases.iter().enumerate() {
        let c = Case::new(&format!("shape-{i}"), "tiny-224");
        c.edit("config.json", *edit);
        let e = c.fail();
        assert!(matches!(e, ConvertError::Tensor(_)), "{e:?}");
        for n in *needles {
            assert!(e.to_string().contains(n), "{e} lacks {n:?}");
        }
    }
}

/// Corrupt safetensors headers are `Safetensors` errors naming the file and, where there is
/// one, the tensor; none panics.
#[test]
fn corrupt_safetensors_headers_are_refused() {
    let tensors = read_checkpoint(&fixture_dir("tiny-224").join("hf"));
    let (header, data) = safetensors_parts(&tensors);
    let data_len = data.len();
    let write_edited = |c: &Case, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut h = header.clone();
        edit(&mut h);
        write_raw_safetensors(
            &c.path("model.safetensors"),
            h.to_string().as_bytes(),
            &data,
        );
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let past_end = format!("past the end of the data ({data_len} bytes)");
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "no-dtype",
            Box::new(|h| {
                h[NORM0].as_object_mut().unwrap().remove("dtype");
            }),
            vec![NORM0, "no \"dtype\""],
        ),
        (
            "i64",
            Box::new(|h| h[NORM0]["dtype"] = json!("I64")),
            vec![NORM0, "unsupported dtype I64"],
        ),
        (
            "f8",
            Box::new(|h| h[NORM0]["dtype"] = json!("F8_E4M3")),
            vec![NORM0, "unsupported dtype F8_E4M3"],
        ),
        (
            "bad-shape",
            Box::new(|h| h[NORM0]["shape"] = json!([-64])),
            vec![NORM0, "bad shape"],
        ),
        (
            "shape-bytes",
            Box::new(|h| h[NORM0]["shape"] = json!([65])),
            vec![NORM0, "shape [65] of BF16 does not fill its 128 bytes"],
        ),
        (
            "dtype-bytes",
            Box::new(|h| h[NORM0]["dtype"] = json!("F32")),
            vec![NORM0, "shape [64] of F32 does not fill its 128 bytes"],
        ),
        (
            "offsets-past-end",
            Box::new(move |h| h[NORM0]["data_offsets"] = json!([data_len - 64, data_len + 64])),
            vec![NORM0, &past_end],
        ),
        (
            "offsets-reversed",
            Box::new(|h| h[NORM0]["data_offsets"] = json!([254080, 253952])),
            vec![NORM0, "data_offsets [254080, 253952]"],
        ),
        (
            "offsets-arity",
            Box::new(|h| h[NORM0]["data_offsets"] = json!([253952])),
            vec![NORM0, "bad data_offsets"],
        ),
        (
            "overlap",
            Box::new(|h| h[NORM0]["data_offsets"] = json!([100, 228])),
            vec![EMBED, NORM0, "overlap"],
        ),
    ];
    for (label, edit, needles) in &cases {
        let c = Case::new(&format!("st-{label}"), "tiny-224");
        write_edited(&c, edit.as_ref());
        let e = c.fail();
        assert!(matches!(e, ConvertError::Safetensors(_)), "{label}: {e:?}");
        for n in needles.iter().chain(&["model.safetensors"]) {
            assert!(e.to_string().contains(n), "{label}: {e} lacks {n:?}");
        }
    }

    // Byte-level damage.
    let valid = std::fs::read(fixture_dir("tiny-224").join("hf/model.safetensors")).unwrap();
    let len = valid.len();
    let mut past = valid.clone();
    past[..8].copy_from_slice(&(len as u64).to_le_bytes());
    let mut huge = valid.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut bad_json = valid.clone();
    bad_json[8] = b'[';
    let mut not_object = b"\x08\0\0\0\0\0\0\0[1, 2]  ".to_vec();
    not_object.extend_from_slice(&[0; 16]);
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("empty", vec![], "too short".into()),
        ("short", vec![1, 2, 3], "too short".into()),
        (
            "header-past-end",
            past,
            format!("header length {len} runs past the end of the file ({len} bytes)"),
        ),
        ("header-huge", huge, "runs past the end of the file".into()),
        ("bad-json", bad_json, "header is not valid JSON".into()),
        (
            "not-object",
            not_object,
            "header is not a JSON object".into(),
        ),
    ];
    for (label, bytes, needle) in cases {
        let c = Case::new(&format!("st-{label}"), "tiny-224");
        std::fs::write(c.path("model.safetensors"), bytes).unwrap();
        assert_err!(
            c.fail(),
            ConvertError::Safetensors(_),
            "model.safetensors",
            &needle
        );
    }
}

/// Problems of a sharded checkpoint (index or shard) name the index / shard and tensor.
#[test]
fn corrupt_shards_and_indexes_are_refused() {
    const INDEX: &str = "model.safetensors.index.json";
    const SHARD1: &str = "model-00001-of-00002.safetensors";
    const SHARD2: &str = "model-00002-of-00002.safetensors";

    let c = Case::new("index-json", "tiny-swa-98");
    std::fs::write(c.path(INDEX), "{").unwrap();
    assert_err!(
        c.fail(),
        ConvertError::Safetensors(_),
        INDEX,
        "invalid JSON"
    );

    type Edit = fn(&mut serde_json::Value);
    let cases: &[(&str, Edit, &[&str])] = &[
        (
            "no-map",
            |v| {
                v.as_object_mut().unwrap().remove("weight_map");
            },
            &["weight_map"],
        ),
        (
            "not-string",
            |v| v["weight_map"][EMBED] = json!(1),
            &[EMBED, "not a string"],
        ),
        (
            "path",
            |v| v["weight_map"][EMBED] = json!("../model.safetensors"),
            &["../model.safetensors", "plain file name"],
        ),
        (
            "ghost",
            |v| v["weight_map"]["ghost.weight"] = json!(SHARD1),
            &["ghost.weight", SHARD1, "not stored there"],
        ),
        (
            "elsewhere",
            |v| v["weight_map"][EMBED] = json!(SHARD2),
            &[EMBED, SHARD2, "elsewhere"],
        ),
    ];
    for (label, edit, needles) in cases {
        let c = Case::new(&format!("index-{label}"), "tiny-swa-98");
        c.edit(INDEX, *edit);
        let e = c.fail();
        assert!(matches!(e, ConvertError::Safetensors(_)), "{label}: {e:?}");
        for n in needles.iter().chain(&[INDEX]) {
            assert!(e.to_string().contains(n), "{label}: {e} lacks {n:?}");
        }
    }

    // The same tensor stored in both shards.
    let c = Case::new("shard-duplicate", "tiny-swa-98");
    let one = read_checkpoint_files(&[c.path(SHARD1)]);
    let mut two = read_checkpoint_files(&[c.path(SHARD2)]);
    two.push(one.iter().find(|t| t.name == EMBED).unwrap().clone());
    write_safetensors(&c.path(SHARD2), &two);
    assert_err!(
        c.fail(),
        ConvertError::Safetensors(_),
        EMBED,
        SHARD2,
        "more than one shard"
    );

    // A corrupt header in the second shard names that shard.
    let c = Case::new("shard-header", "tiny-swa-98");
    let mut bytes = std::fs::read(c.path(SHARD2)).unwrap();
    bytes[8] = b'!';
    std::fs::write(c.path(SHARD2), bytes).unwrap();
    assert_err!(
        c.fail(),
        ConvertError::Safetensors(_),
        SHARD2,
        "not valid JSON"
    );
}

fn read_checkpoint_files(paths: &[PathBuf]) -> Vec<StTensor> {
    let ckpt = pali_convert::safetensors::Checkpoint::open_files(paths).unwrap();
    ckpt.tensors()
        .iter()
        .map(|(name, e)| StTensor {
            name: name.clone(),
            dtype: format!("{:?}", e.dtype),
            shape: e.shape.clone(),
            data: ckpt.bytes(e).to_vec(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Options and outputs

/// Vision types other than f16 / f32 / q8_0 are `Usage` errors, raised before any work.
#[test]
fn unsupported_vision_types_are_usage_errors() {
    let c = Case::new("vision-type", "tiny-224");
    for vt in [FileType::Q4_0, FileType::Q4_K_M, FileType::BF16] {
        let e = run(&c.opts(FileType::F16, vt)).unwrap_err();
        assert_err!(e, ConvertError::Usage(_), "--vision-type", vt.label());
        assert_clean(&c.out);
    }
}

/// `pali convert --type` refuses the llama-quantize types that need an importance matrix by
/// name, an unknown type with the list of valid ones, and bf16, before writing anything.
#[test]
fn cli_decoder_types_needing_an_imatrix_or_unknown_are_refused() {
    let c = Case::new("cli-types", "tiny-224");
    let hf = fixture_dir("tiny-224").join("hf");
    let cases = [
        ("iq2_xxs", "only with an importance matrix"),
        ("Q2_K_S", "only with an importance matrix"),
        ("iq3_xs", "only with an importance matrix"),
        ("q4_1", "choose one of f32, f16, q8_0, q6_k"),
        ("bf16", "choose one of"),
    ];
    for (ty, needle) in cases {
        let out = pali_cmd()
            .args([
                "convert",
                &path_str(&hf),
                "-o",
                &path_str(&c.out),
                "--type",
                ty,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{ty}: {err}");
        assert!(err.contains(needle), "{ty}: {err}");
        assert_clean(&c.out);
    }
}

/// Existing outputs are refused without `force` (and left untouched) and replaced with it.
#[test]
fn existing_outputs_need_force() {
    let c = Case::new("force", "tiny-224");
    let first = c.convert().unwrap();
    let dec = std::fs::read(&first.decoder).unwrap();
    let mm = std::fs::read(&first.mmproj).unwrap();

    let e = c.convert().unwrap_err();
    assert_err!(e, ConvertError::Usage(_), "already exists", "--force");
    assert_eq!(std::fs::read(&first.decoder).unwrap(), dec);

    // Only one of the two outputs present is enough to refuse.
    std::fs::remove_file(&first.decoder).unwrap();
    std::fs::write(&first.mmproj, b"junk").unwrap();
    let e = c.convert().unwrap_err();
    assert_err!(e, ConvertError::Usage(_), "mmproj-tiny-F16.gguf");
    assert_eq!(std::fs::read(&first.mmproj).unwrap(), b"junk");
    assert!(!first.decoder.exists());

    let mut o = c.opts(FileType::F16, FileType::F16);
    o.force = true;
    let second = run(&o).unwrap();
    assert_eq!(std::fs::read(&second.decoder).unwrap(), dec);
    assert_eq!(std::fs::read(&second.mmproj).unwrap(), mm);
    assert!(partial_files(&c.out).is_empty());
}

/// An output folder that cannot be created is an `Io` error naming it.
#[test]
fn unusable_output_folder_is_an_io_error() {
    let c = Case::new("out-is-file", "tiny-224");
    std::fs::write(&c.out, b"a file").unwrap();
    let e = c.convert().unwrap_err();
    assert_err!(e, ConvertError::Io(_), &path_str(&c.out));
}

/// Interrupting a conversion while the mmproj, the decoder, or the quantization is being
/// written (the CLI's Ctrl-C) fails with `Interrupted` and removes every partial file, even
/// though the mmproj was already complete on disk.
#[test]
fn interrupted_conversion_leaves_no_files() {
    let _exclusive = FLAG_LOCK.write().unwrap_or_else(|e| e.into_inner());
    for phase in ["vision", "decoder", "quantizing"] {
        let c = Case::new(&format!("interrupt-{phase}"), "tiny-224");
        let mm_partial = c.out.join("mmproj-tiny-F16.gguf.partial");
        let mut mm_was_written = false;
        let r = convert(&c.opts(FileType::Q4_K_M, FileType::F16), &mut |_, _, p| {
            if p == phase && !INTERRUPTED.load(Ordering::SeqCst) {
                mm_was_written = mm_partial.exists();
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        });
        INTERRUPTED.store(false, Ordering::SeqCst);
        let e = r.unwrap_err();
        assert!(matches!(e, ConvertError::Interrupted), "{phase}: {e:?}");
        assert!(mm_was_written, "{phase}: the mmproj was not being written");
        assert_clean(&c.out);
    }
}

/// A failure after the mmproj is complete (the decoder's file cannot be created, or
/// llama.cpp's quantizer cannot write its output) leaves neither target and no partial file.
#[test]
fn failures_while_writing_leave_no_files() {
    // (text type, the partial path we block with a directory, expected error)
    let cases: &[(FileType, &str, &str)] = &[
        (
            FileType::F16,
            "tiny-F16.gguf.partial",
            "tiny-F16.gguf.partial",
        ),
        (
            FileType::Q4_K_M,
            "tiny-Q4_K_M.gguf.src.partial",
            "tiny-Q4_K_M.gguf.src.partial",
        ),
        (
            FileType::Q4_K_M,
            "tiny-Q4_K_M.gguf.partial",
            "failed to quantize",
        ),
    ];
    for (i, (ty, block, needle)) in cases.iter().enumerate() {
        let c = Case::new(&format!("write-fail-{i}"), "tiny-224");
        std::fs::create_dir_all(c.out.join(block)).unwrap();
        let e = run(&c.opts(*ty, FileType::F16)).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
        assert!(
            matches!(e, ConvertError::Io(_) | ConvertError::Ggml(_)),
            "{e:?}"
        );
        let left: Vec<String> = std::fs::read_dir(&c.out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec![block.to_string()],
            "only our blocking folder may remain"
        );
    }
}

/// Without `name`, file names and `general.name` come from `_name_or_path` (or the folder).
#[test]
fn model_names_come_from_the_checkpoint() {
    let cfg = |name: &str| {
        let mut v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir("tiny-224").join("hf/config.json")).unwrap(),
        )
        .unwrap();
        v["_name_or_path"] = json!(name);
        PaliGemmaConfig::parse(&v.to_string()).unwrap()
    };
    let dir = Path::new("/nonexistent/whatever");
    for (path, want) in [
        ("google/paligemma2-3b-pt-224", "PaliGemma2-3B-pt-224"),
        ("google/paligemma2-10b-mix-448", "PaliGemma2-10B-mix-448"),
        ("/models/paligemma2-28b-pt-896/", "PaliGemma2-28B-pt-896"),
        ("C:\\models\\paligemma2-3b-pt-224", "PaliGemma2-3B-pt-224"),
        ("my model (v2)", "my_model__v2_"),
    ] {
        assert_eq!(pali_convert::model_name(dir, &cfg(path)), want, "{path}");
    }

    let c = Case::new("name-derived", "tiny-224");
    c.edit("config.json", |v| {
        v["_name_or_path"] = json!("someone/paligemma2-3b-pt-224")
    });
    let mut o = c.opts(FileType::F16, FileType::F16);
    o.name = None;
    let out = run(&o).unwrap();
    assert_eq!(out.decoder, c.out.join("PaliGemma2-3B-pt-224-F16.gguf"));
    assert_eq!(
        out.mmproj,
        c.out.join("mmproj-PaliGemma2-3B-pt-224-F16.gguf")
    );
    let g = GgufFile::open(&out.decoder).unwrap();
    assert_eq!(g.get_str(keys::NAME).unwrap(), "PaliGemma2-3B-pt-224");
}

// ---------------------------------------------------------------------------------------
// Checkpoint layouts

fn rename(tensors: &[StTensor], map: &[(&str, &str)]) -> Vec<StTensor> {
    tensors
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if let Some((from, to)) = map.iter().find(|(f, _)| t.name.starts_with(f)) {
                t.name = format!("{to}{}", &t.name[from.len()..]);
            }
            t
        })
        .collect()
}

/// The transformers >= 4.52 layout (with a stored `lm_head.weight` equal to the embedding)
/// and the transformers 5 layout (vision tower without `vision_model`, lm_head stored as
/// F32) convert to the same bytes as the hub layout, single file or shards.
#[test]
fn newer_transformers_layouts_convert_identically() {
    for fixture in FIXTURES {
        let hub = Case::new(&format!("layout-hub-{fixture}"), fixture);
        let want = hub.convert().unwrap();
        let tensors = hub.tensors();
        let embed = tensors.iter().find(|t| t.name == EMBED).unwrap().clone();

        let mut t452 = rename(
            &tensors,
            &[
                ("language_model.model.", "model.language_model."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
            ],
        );
        t452.push(StTensor {
            name: "lm_head.weight".into(),
            ..embed.clone()
        });

        let mut t5 = rename(
            &tensors,
            &[
                ("language_model.model.", "model.language_model."),
                ("vision_tower.vision_model.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
            ],
        );
        let wide: Vec<f32> = pali_ggml::quant::to_f32(
            match embed.dtype.as_str() {
                "BF16" => GgmlType::BF16,
                "F16" => GgmlType::F16,
                _ => GgmlType::F32,
            },
            &embed.data,
        )
        .unwrap();
        t5.push(StTensor::f32("lm_head.weight", &embed.shape, &wide));

        for (label, t) in [("4.52", t452), ("5", t5)] {
            let c = Case::new(&format!("layout-{label}-{fixture}"), fixture);
            c.write_single(&t);
            let got = c.convert().unwrap();
            for (a, b) in [(&want.decoder, &got.decoder), (&want.mmproj, &got.mmproj)] {
                assert!(
                    std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
                    "{fixture}: transformers {label} layout gives a different {}",
                    b.display()
                );
            }
        }
    }
}

/// A stored LM head that is not the embedding (llama.cpp's gemma2 always ties them) is
/// refused, naming the tensor.
#[test]
fn untied_lm_head_is_refused() {
    for (i, head) in ["lm_head.weight", "language_model.lm_head.weight"]
        .into_iter()
        .enumerate()
    {
        let c = Case::new(&format!("lm-head-{i}"), "tiny-224");
        let mut t = c.tensors();
        let mut lm = t.iter().find(|t| t.name == EMBED).unwrap().clone();
        lm.name = head.into();
        lm.data[1] ^= 0x01; // one element differs
        t.push(lm);
        c.write_single(&t);
        assert_err!(c.fail(), ConvertError::Tensor(_), head, "tied");
    }
    let c = Case::new("lm-head-shape", "tiny-224");
    let mut t = c.tensors();
    let emb = t.iter().find(|t| t.name == EMBED).unwrap().clone();
    t.push(StTensor {
        name: "lm_head.weight".into(),
        shape: vec![emb.shape[0] / 2, emb.shape[1]],
        data: emb.data[..emb.data.len() / 2].to_vec(),
        dtype: emb.dtype,
    });
    c.write_single(&t);
    assert_err!(c.fail(), ConvertError::Tensor(_), "lm_head.weight");
}

// ---------------------------------------------------------------------------------------
// Quantization

/// `(GGUF name, hub-layout HF name, fixup)` of every tensor of one GGUF file, in write order.
type NameMap = Vec<(String, String, Fixup)>;

/// The name maps of the decoder and of the mmproj.
fn hub_names(cfg: &PaliGemmaConfig) -> (NameMap, NameMap) {
    let mut dec = Vec::new();
    let lm = "language_model.model.";
    let g = schema::decoder::GLOBAL;
    dec.push((g[0].1.to_string(), format!("{lm}{}", g[0].0), g[0].2));
    for i in 0..cfg.text.num_hidden_layers {
        for &(hf, gg, fix) in schema::decoder::LAYER {
            dec.push((
                schema::decoder_block(i, gg),
                format!("{lm}layers.{i}.{hf}"),
                fix,
            ));
        }
    }
    dec.push((g[1].1.to_string(), format!("{lm}{}", g[1].0), g[1].2));

    let mut vis = Vec::new();
    let vm = "vision_tower.vision_model.";
    // Embeddings first, post-layernorm after the layers.
    let (embeddings, post) = schema::vision::GLOBAL.split_at(3);
    for &(hf, gg, fix) in embeddings {
        vis.push((gg.to_string(), format!("{vm}{hf}"), fix));
    }
    for i in 0..cfg.vision.num_hidden_layers {
        for &(hf, gg, fix) in schema::vision::LAYER {
            vis.push((
                schema::vision_block(i, gg),
                format!("{vm}encoder.layers.{i}.{hf}"),
                fix,
            ));
        }
    }
    for &(hf, gg, fix) in post {
        vis.push((gg.to_string(), format!("{vm}{hf}"), fix));
    }
    for &(hf, gg, fix) in schema::vision::PROJECTOR {
        vis.push((gg.to_string(), format!("multi_modal_projector.{hf}"), fix));
    }
    (dec, vis)
}

/// HF (PyTorch) shape of a hub-layout tensor, from config.json.
fn hub_shape(cfg: &PaliGemmaConfig, name: &str) -> Vec<usize> {
    let t = &cfg.text;
    let (h, i) = (t.hidden_size, t.intermediate_size);
    let (q, kv) = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    let v = &cfg.vision;
    let (d, f, p) = (v.hidden_size, v.intermediate_size, v.patch_size);
    let has = |s: &str| name.ends_with(s);
    if name.starts_with("language_model.") {
        match () {
            _ if has("embed_tokens.weight") => vec![t.vocab_size, h],
            _ if has("q_proj.weight") => vec![q, h],
            _ if has("k_proj.weight") || has("v_proj.weight") => vec![kv, h],
            _ if has("o_proj.weight") => vec![h, q],
            _ if has("gate_proj.weight") || has("up_proj.weight") => vec![i, h],
            _ if has("down_proj.weight") => vec![h, i],
            _ => vec![h],
        }
    } else if name.starts_with("multi_modal_projector.") {
        if has("weight") {
            vec![h, d]
        } else {
            vec![h]
        }
    } else {
        match () {
            _ if has("patch_embedding.weight") => vec![d, 3, p, p],
            _ if has("position_embedding.weight") => vec![cfg.num_image_tokens(), d],
            _ if has("fc1.weight") => vec![f, d],
            _ if has("fc1.bias") => vec![f],
            _ if has("fc2.weight") => vec![d, f],
            _ if name.contains("self_attn.") && has(".weight") => vec![d, d],
            _ => vec![d],
        }
    }
}

/// A test-only checkpoint whose decoder rows are 256 and 512 wide, so that llama.cpp's
/// Q4_K_M uses real Q4_K / Q6_K blocks (the fixtures' 64/96-wide rows fall back to
/// Q5_0 / Q8_0). tiny-224's tokenizer and processor files, random f32 weights (seeded LCG).
fn tiny_k_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("tiny-k").join("hf");
        copy_dir(&fixture_dir("tiny-224").join("hf"), &dir);
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        edit_json(&dir.join("config.json"), |v| {
            v["hidden_size"] = json!(256);
            v["projection_dim"] = json!(256);
            let t = &mut v["text_config"];
            t["hidden_size"] = json!(256);
            t["intermediate_size"] = json!(512);
            // 8 layers, so that the mixes' per-layer choices (first/last eighth, every
            // third layer, the first 2 or 4 attn_v) all show.
            t["num_hidden_layers"] = json!(8);
            t["layer_types"] = json!(["sliding_attention", "full_attention"].repeat(4));
            t["num_attention_heads"] = json!(2);
            t["num_key_value_heads"] = json!(1);
            t["head_dim"] = json!(128);
            t["query_pre_attn_scalar"] = json!(128);
            let vc = &mut v["vision_config"];
            vc["hidden_size"] = json!(32);
            vc["num_hidden_layers"] = json!(1);
            vc["projection_dim"] = json!(256);
        });
        let cfg = PaliGemmaConfig::load(&dir).unwrap();
        let (dec, vis) = hub_names(&cfg);
        let mut rng = Lcg(0x9a11_5eed);
        let tensors: Vec<StTensor> = dec
            .iter()
            .chain(&vis)
            .map(|(_, hf, _)| {
                let shape = hub_shape(&cfg, hf);
                let n = shape.iter().product();
                StTensor::f32(hf, &shape, &rng.fill(n, 0.1))
            })
            .collect();
        write_safetensors(&dir.join("model.safetensors"), &tensors);
        dir
    })
    .clone()
}

/// The checkpoints the quantization tests run on: the fixtures and tiny-k.
fn checkpoints() -> Vec<(&'static str, PathBuf)> {
    let mut v: Vec<(&str, PathBuf)> = FIXTURES
        .iter()
        .map(|f| (*f, fixture_dir(f).join("hf")))
        .collect();
    v.push(("tiny-k", tiny_k_dir()));
    v
}

/// Converts a checkpoint once per (decoder type, vision type) in this binary.
fn converted_once(label: &str, dir: &Path, text: FileType, vision: FileType) -> ConvertOutput {
    type Slot = Arc<OnceLock<ConvertOutput>>;
    static CACHE: OnceLock<Mutex<HashMap<String, Slot>>> = OnceLock::new();
    let key = format!("{label}-{}-{}", text.label(), vision.label());
    let slot = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_default()
        .clone();
    slot.get_or_init(|| {
        let out = scratch_dir(&format!("converted-{key}"));
        run(&options(dir, &out, text, vision)).unwrap_or_else(|e| panic!("{key}: {e}"))
    })
    .clone()
}

/// Every tensor's header entry and data bytes.
fn gguf_tensors(path: &Path) -> Vec<(TensorInfo, Vec<u8>)> {
    let g = GgufFile::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let base = g.data_offset() as usize;
    g.tensors()
        .into_iter()
        .map(|t| {
            let start = base + t.offset as usize;
            let data = bytes[start..start + t.size as usize].to_vec();
            (t, data)
        })
        .collect()
}

/// A ggml type by its `GGML_TYPE_*` value.
fn ty(t: pali_ggml::sys::ggml_type) -> GgmlType {
    GgmlType(t)
}

/// The type llama.cpp gives a decoder tensor in a file of type `ft`: llama-quant.cpp's rules
/// (`llama_tensor_get_type_impl` + `tensor_type_fallback`, llama-cpp-sys-2 0.1.161) written
/// out for gemma2 without an importance matrix (one expert, not Falcon, not a 70B). The tied
/// embedding is treated as the output tensor; attn_v and ffn_down are counted per layer.
fn expected_decoder_type(ft: FileType, t: &TensorInfo, cfg: &PaliGemmaConfig) -> GgmlType {
    use pali_ggml::sys::*;
    use FileType as F;
    if t.ne.len() == 1 {
        return GgmlType::F32;
    }
    if let Some(float) = ft.matrix_type().filter(|m| !m.is_quantized()) {
        return float;
    }
    let n = cfg.text.num_hidden_layers;
    let gqa = cfg.text.num_attention_heads / cfg.text.num_key_value_heads;
    let layer = || -> usize {
        let rest = t.name.strip_prefix("blk.").expect("a layer tensor");
        rest.split('.').next().unwrap().parse().unwrap()
    };
    let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2;
    let default = ty(match ft {
        F::Q8_0 => GGML_TYPE_Q8_0,
        F::Q4_0 => GGML_TYPE_Q4_0,
        F::Q2_K => GGML_TYPE_Q2_K,
        F::Q3_K_S | F::Q3_K_M | F::Q3_K_L => GGML_TYPE_Q3_K,
        F::Q4_K_S | F::Q4_K_M => GGML_TYPE_Q4_K,
        F::Q5_K_S | F::Q5_K_M => GGML_TYPE_Q5_K,
        F::Q6_K => GGML_TYPE_Q6_K,
        F::IQ4_NL => GGML_TYPE_IQ4_NL,
        F::IQ4_XS => GGML_TYPE_IQ4_XS,
        F::IQ3_S | F::IQ3_M => GGML_TYPE_IQ3_S,
        F::F32 | F::F16 | F::BF16 => unreachable!(),
    });
    let ends = |s: &str| t.name.ends_with(s);
    let chosen = if t.name == schema::decoder::TOKEN_EMBD {
        if t.ne[0] % default.block_size() != 0 || default == GgmlType::Q8_0 {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6_K
        }
    } else if ends("attn_v.weight") {
        let i = layer();
        match ft {
            F::Q2_K if gqa >= 4 => GgmlType::Q4_K,
            F::Q2_K => ty(GGML_TYPE_Q3_K),
            F::IQ3_S if gqa >= 4 => GgmlType::Q4_K,
            F::IQ3_M => GgmlType::Q4_K,
            F::Q3_K_M if i < 2 => ty(GGML_TYPE_Q5_K),
            F::Q3_K_M => GgmlType::Q4_K,
            F::Q3_K_L => ty(GGML_TYPE_Q5_K),
            F::IQ4_NL | F::IQ4_XS if gqa >= 4 => ty(GGML_TYPE_Q5_K),
            F::Q4_K_M | F::Q5_K_M if more_bits(i) => GgmlType::Q6_K,
            F::Q4_K_S if i < 4 => ty(GGML_TYPE_Q5_K),
            _ => default,
        }
    } else if ends("ffn_down.weight") {
        let i = layer();
        match ft {
            F::Q2_K => ty(GGML_TYPE_Q3_K),
            F::Q3_K_M if i < n / 16 => ty(GGML_TYPE_Q5_K),
            F::Q3_K_M => GgmlType::Q4_K,
            F::IQ3_M if i < n / 8 => GgmlType::Q4_K,
            F::Q3_K_L => ty(GGML_TYPE_Q5_K),
            F::Q4_K_M | F::Q5_K_M if more_bits(i) => GgmlType::Q6_K,
            F::IQ4_NL | F::IQ4_XS | F::Q4_K_S if i < n / 8 => ty(GGML_TYPE_Q5_K),
            _ => default,
        }
    } else if ends("attn_output.weight") {
        match ft {
            F::Q2_K => ty(GGML_TYPE_Q3_K),
            F::Q3_K_M | F::IQ3_M => GgmlType::Q4_K,
            F::Q3_K_L => ty(GGML_TYPE_Q5_K),
            _ => default,
        }
    } else {
        default
    };
    // Rows that are not whole blocks of the chosen type fall back.
    let ne0 = t.ne[0];
    if ne0 % chosen.block_size() == 0 {
        return chosen;
    }
    let fallback = ty(match chosen.0 {
        GGML_TYPE_IQ4_XS | GGML_TYPE_IQ3_S => GGML_TYPE_IQ4_NL,
        GGML_TYPE_Q2_K | GGML_TYPE_Q3_K => GGML_TYPE_Q4_0,
        GGML_TYPE_Q4_K => GGML_TYPE_Q5_0,
        GGML_TYPE_Q5_K => GGML_TYPE_Q5_1,
        GGML_TYPE_Q6_K => GGML_TYPE_Q8_0,
        other => other,
    });
    if ne0 % fallback.block_size() == 0 {
        fallback
    } else {
        GgmlType::F16
    }
}

/// Every decoder type `pali convert --type` offers (all but BF16).
fn decoder_types() -> Vec<FileType> {
    FileType::all().filter(|t| *t != FileType::BF16).collect()
}

/// For every checkpoint and decoder type the conversion works, `general.file_type` is the
/// requested type, norms are F32, and each matrix has the type llama.cpp's mix gives it;
/// the tensor table (names, shapes) is the same for every type.
#[test]
fn decoder_types_have_the_expected_tensor_types() {
    for (label, dir) in checkpoints() {
        let cfg = PaliGemmaConfig::load(&dir).unwrap();
        // llama.cpp's quantizer orders tensors by layer, then name: compare sorted tables.
        let table = |g: &GgufFile| {
            let mut t: Vec<(String, Vec<i64>)> =
                g.tensors().into_iter().map(|t| (t.name, t.ne)).collect();
            t.sort();
            t
        };
        let reference = table(
            &GgufFile::open(&converted_once(label, &dir, FileType::F32, FileType::F16).decoder)
                .unwrap(),
        );
        for ft in decoder_types() {
            let c = converted_once(label, &dir, ft, FileType::F16);
            let g = GgufFile::open(&c.decoder).unwrap();
            assert_eq!(
                g.get_u32(keys::FILE_TYPE).unwrap(),
                ft.llama_ftype(),
                "{label} {}: general.file_type",
                ft.label()
            );
            assert_eq!(table(&g), reference, "{label} {}: tensor table", ft.label());
            for t in &g.tensors() {
                let want = expected_decoder_type(ft, t, &cfg);
                assert_eq!(t.ty, want, "{label} {}: {} {:?}", ft.label(), t.name, t.ne);
            }
        }
    }
}

/// The mmproj keeps biases, norms, the position table and the patch kernel in F32, and
/// stores matrices in the vision type where their rows fit its blocks (F16 otherwise).
#[test]
fn vision_types_follow_block_sizes() {
    for (label, dir) in checkpoints() {
        for vt in [FileType::F32, FileType::F16, FileType::Q8_0] {
            let c = converted_once(label, &dir, FileType::F32, vt);
            let g = GgufFile::open(&c.mmproj).unwrap();
            assert_eq!(g.get_u32(keys::FILE_TYPE).unwrap(), vt.llama_ftype());
            let (mut seen_q8, mut fits_q8) = (false, false);
            for t in g.tensors() {
                let mt = vt.matrix_type().unwrap();
                let want = if t.ne.len() != 2 || t.name == schema::vision::POS_EMBD {
                    GgmlType::F32
                } else if t.ne[0] % mt.block_size() == 0 {
                    mt
                } else {
                    GgmlType::F16
                };
                seen_q8 |= t.ty == GgmlType::Q8_0;
                fits_q8 |= t.ne.len() == 2 && want != GgmlType::F32 && t.ne[0] % 32 == 0;
                assert_eq!(
                    t.ty,
                    want,
                    "{label} vision {}: {} {:?}",
                    vt.label(),
                    t.name,
                    t.ne
                );
            }
            assert_eq!(seen_q8, vt == FileType::Q8_0 && fits_q8, "{label}");
        }
    }
}

/// An F32 conversion is lossless: every GGUF tensor equals its checkpoint tensor widened
/// to f32 (shape reversed into ggml order), plus 1 for Gemma's RMSNorm weights only.
#[test]
fn f32_conversion_is_exact_and_fixes_rms_norms_only() {
    for (label, dir) in checkpoints() {
        let cfg = PaliGemmaConfig::load(&dir).unwrap();
        let ckpt = pali_convert::safetensors::Checkpoint::open_dir(&dir).unwrap();
        let c = converted_once(label, &dir, FileType::F32, FileType::F32);
        let (dec, vis) = hub_names(&cfg);
        for (file, names) in [(&c.decoder, dec), (&c.mmproj, vis)] {
            let tensors = gguf_tensors(file);
            assert_eq!(tensors.len(), names.len(), "{label}: tensor count");
            for ((info, data), (gguf, hf, fix)) in tensors.iter().zip(&names) {
                assert_eq!(&info.name, gguf, "{label}: tensor order");
                assert_eq!(info.ty, GgmlType::F32);
                let e = ckpt.get(hf).unwrap();
                let ne: Vec<i64> = e.shape.iter().rev().map(|&d| d as i64).collect();
                assert_eq!(info.ne, ne, "{label}: {gguf} shape");
                let mut want = ckpt.read_f32(e).unwrap();
                if *fix == Fixup::AddOne {
                    want.iter_mut().for_each(|v| *v += 1.0);
                }
                let got = quant::to_f32(GgmlType::F32, data).unwrap();
                assert!(got == want, "{label}: {gguf} values differ");
            }
        }
    }
}

/// pali's quantized decoders are exactly llama.cpp's: quantizing pali's F32 decoder with
/// `llama_model_quantize` gives the same metadata, tensor table and tensor bytes as pali's
/// direct `--type` output (which quantizes from the checkpoint's own precision), byte for
/// byte.
#[test]
fn quantized_decoders_equal_llama_quantize_output() {
    for (label, dir) in checkpoints() {
        let f32_file = converted_once(label, &dir, FileType::F32, FileType::F16).decoder;
        let quantized = decoder_types()
            .into_iter()
            .filter(|t| t.matrix_type().is_none_or(|m| m.is_quantized()));
        for ft in quantized {
            let ours = converted_once(label, &dir, ft, FileType::F16).decoder;
            let theirs =
                scratch_dir(&format!("llama-quantize-{label}-{}", ft.label())).join("ref.gguf");
            quant::quantize_model_file(&f32_file, &theirs, ft, 2, 0).unwrap();

            let (a, b) = (
                GgufFile::open(&ours).unwrap(),
                GgufFile::open(&theirs).unwrap(),
            );
            assert_eq!(a.keys(), b.keys(), "{label} {}: metadata keys", ft.label());
            for k in a.keys() {
                assert_eq!(a.get(&k), b.get(&k), "{label} {}: {k}", ft.label());
            }
            let (ta, tb) = (gguf_tensors(&ours), gguf_tensors(&theirs));
            assert_eq!(ta.len(), tb.len());
            for ((ia, da), (ib, db)) in ta.iter().zip(&tb) {
                assert_eq!(ia, ib, "{label} {}: tensor entry", ft.label());
                assert!(da == db, "{label} {}: {} bytes differ", ft.label(), ia.name);
            }
            assert!(
                std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                "{label} {}: files differ",
                ft.label()
            );
        }
    }
}

/// Q8_0 blocks are ggml's: dequantizing each Q8_0 tensor and quantizing it again with
/// ggml's quantizer reproduces its bytes.
#[test]
fn q8_0_blocks_requantize_to_themselves() {
    let mut n = 0;
    for (label, dir) in checkpoints() {
        for file in [
            converted_once(label, &dir, FileType::Q8_0, FileType::F16).decoder,
            converted_once(label, &dir, FileType::F32, FileType::Q8_0).mmproj,
        ] {
            for (t, data) in gguf_tensors(&file) {
                if t.ty != GgmlType::Q8_0 {
                    continue;
                }
                let vals = quant::to_f32(GgmlType::Q8_0, &data).unwrap();
                assert_eq!(vals.len() as i64, t.n_elements());
                let again = quant::convert_f32(GgmlType::Q8_0, &vals, t.ne[0] as usize).unwrap();
                assert!(again == data, "{label}: {} does not requantize", t.name);
                n += 1;
            }
        }
    }
    assert!(n > 50, "only {n} Q8_0 tensors checked");
}

/// On 256-wide rows every mix really uses its k-/i-quants (no fallback type appears: the
/// types are exactly llama-quant.cpp's choices), and every tensor dequantizes close to the
/// F32 weights, within a bound per element type (measured worst, rounded up).
#[test]
fn k_quants_are_used_when_rows_allow() {
    let dir = tiny_k_dir();
    let cfg = PaliGemmaConfig::load(&dir).unwrap();
    let f32_tensors: HashMap<String, Vec<u8>> =
        gguf_tensors(&converted_once("tiny-k", &dir, FileType::F32, FileType::F16).decoder)
            .into_iter()
            .map(|(t, d)| (t.name, d))
            .collect();
    let mut kinds = std::collections::BTreeSet::new();
    let mut worst: std::collections::BTreeMap<String, f64> = Default::default();
    for ft in decoder_types()
        .into_iter()
        .filter(|t| t.matrix_type().is_none())
    {
        let q = gguf_tensors(&converted_once("tiny-k", &dir, ft, FileType::F16).decoder);
        assert_eq!(q.len(), f32_tensors.len());
        for (t, data) in &q {
            if t.ne.len() == 1 {
                continue;
            }
            assert_eq!(t.ty, expected_decoder_type(ft, t, &cfg), "{}", t.name);
            kinds.insert(t.ty.name());
            let got = quant::to_f32(t.ty, data).unwrap();
            let orig = quant::to_f32(GgmlType::F32, &f32_tensors[&t.name]).unwrap();
            let err: f64 = got
                .iter()
                .zip(&orig)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = orig.iter().map(|b| (*b as f64).powi(2)).sum();
            let rel = (err / norm).sqrt();
            let w = worst.entry(t.ty.name()).or_default();
            *w = w.max(rel);
            let bound = match t.ty.name().as_str() {
                // measured worst: 0.013, 0.028, 0.055-0.065, 0.126, 0.144, 0.235
                "q6_K" => 0.02,
                "q5_K" => 0.04,
                "q4_K" | "iq4_nl" | "iq4_xs" => 0.08,
                "q3_K" => 0.16,
                "iq3_s" => 0.18,
                "q2_K" => 0.3,
                other => panic!("{}: unexpected type {other}", t.name),
            };
            assert!(
                rel < bound,
                "{} {} ({}): relative RMS error {rel}",
                ft.label(),
                t.name,
                t.ty
            );
        }
    }
    println!("worst relative RMS error per type: {worst:.3?}");
    let want = [
        "iq3_s", "iq4_nl", "iq4_xs", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K",
    ];
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), want);
}

/// A Q8_0 vision tower whose MLP width is not whole Q8_0 blocks (tiny-swa-98: 80, like
/// So400m's 4304) is stored zero-padded to 96: fc1 gains zero rows and zero biases, fc2
/// zero columns, so fc2 can be Q8_0; the real values are those of the F32 conversion
/// (exactly for biases, within Q8_0 rounding for the matrices). Other types keep 80.
#[test]
fn quantized_vision_mlp_is_zero_padded_to_whole_blocks() {
    let dir = fixture_dir("tiny-swa-98").join("hf");
    let exact =
        gguf_tensors(&converted_once("tiny-swa-98", &dir, FileType::F32, FileType::F32).mmproj);
    let q8 =
        gguf_tensors(&converted_once("tiny-swa-98", &dir, FileType::F32, FileType::Q8_0).mmproj);
    let f16 =
        gguf_tensors(&converted_once("tiny-swa-98", &dir, FileType::F32, FileType::F16).mmproj);
    let find = |v: &[(TensorInfo, Vec<u8>)], name: &str| -> (TensorInfo, Vec<f32>) {
        let (t, d) = v.iter().find(|(t, _)| t.name == name).unwrap();
        (t.clone(), quant::to_f32(t.ty, d).unwrap())
    };
    let mut checked = 0;
    for l in 0..2 {
        let (fc1, fc1_b, fc2) = (
            schema::vision_block(l, schema::vision::FC1_W),
            schema::vision_block(l, schema::vision::FC1_B),
            schema::vision_block(l, schema::vision::FC2_W),
        );
        for name in [&fc1, &fc1_b, &fc2] {
            assert_eq!(
                find(&f16, name).0.ne.iter().filter(|&&n| n == 80).count(),
                1
            );
        }
        // fc1: [48, 80] -> [48, 96]; rows 80.. are zero.
        let ((te, e), (tq, q)) = (find(&exact, &fc1), find(&q8, &fc1));
        assert_eq!((te.ne.clone(), tq.ne.clone()), (vec![48, 80], vec![48, 96]));
        assert!(q[48 * 80..].iter().all(|&v| v == 0.0));
        assert_close(&q[..48 * 80], &e, 48);
        // fc1 bias: exact, then zeros.
        let ((_, e), (tq, q)) = (find(&exact, &fc1_b), find(&q8, &fc1_b));
        assert_eq!((tq.ne.clone(), tq.ty), (vec![96], GgmlType::F32));
        assert_eq!(&q[..80], &e[..]);
        assert!(q[80..].iter().all(|&v| v == 0.0));
        // fc2: [80, 48] -> [96, 48], now Q8_0; columns 80.. of each row are zero.
        let ((_, e), (tq, q)) = (find(&exact, &fc2), find(&q8, &fc2));
        assert_eq!((tq.ne.clone(), tq.ty), (vec![96, 48], GgmlType::Q8_0));
        for (r, row) in q.chunks(96).enumerate() {
            assert!(row[80..].iter().all(|&v| v == 0.0));
            assert_close(&row[..80], &e[r * 80..(r + 1) * 80], 80);
        }
        checked += 1;
    }
    assert_eq!(checked, 2);
}

/// Each value within one Q8_0 step (amax / 127 of its block of 32; the scale is F16).
fn assert_close(got: &[f32], want: &[f32], row: usize) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.chunks(row).zip(want.chunks(row)) {
        for (gb, wb) in g.chunks(32).zip(w.chunks(32)) {
            let amax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in gb.iter().zip(wb) {
                assert!((a - b).abs() <= amax / 127.0 + 1e-6, "{a} vs {b}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Faults: kill -9 and a full disk

/// Files directly in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `pali convert` killed with SIGKILL at 20 moments spread over a whole conversion (the
/// mmproj, the decoder's source, the quantization, the renames): each target path holds
/// nothing or the complete file (byte-equal to an uninterrupted run), and the same command
/// run again, without `--force`, succeeds, cleaning what the killed run left.
#[test]
fn killed_conversions_leave_whole_files_or_none_and_a_rerun_succeeds() {
    let c = Case::new("kill9", "tiny-224");
    let convert_cmd = |out: &Path| {
        let mut cmd = pali_cmd();
        cmd.args(["convert", &path_str(&c.hf), "-o", &path_str(out)])
            .args(["--type", "q4_k_m", "--name", "tiny", "-t", "1", "--quiet"]);
        cmd
    };
    let reference = c.out.with_file_name("reference");
    let t0 = std::time::Instant::now();
    assert_success(&convert_cmd(&reference).output().unwrap());
    let full = t0.elapsed();
    let names = listing(&reference);
    assert_eq!(names.len(), 2, "{names:?}");
    let want: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(reference.join(n)).unwrap())
        .collect();
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..20u32 {
        let out = c.out.with_file_name(format!("killed-{i}"));
        let mut child = convert_cmd(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // From just after the start to the end of an uninterrupted run.
        std::thread::sleep(full.mul_f64(0.02 + 0.98 * f64::from(i) / 19.0));
        let _ = child.kill();
        let status = child.wait().unwrap();
        for (n, bytes) in names.iter().zip(&want) {
            let p = out.join(n);
            if p.exists() {
                assert!(
                    std::fs::read(&p).unwrap() == *bytes,
                    "run {i}: {n} exists but differs from a complete conversion"
                );
            }
        }
        let left = listing(&out);
        *outcomes
            .entry(format!("{} ({})", left.join(" "), status))
            .or_insert(0) += 1;
        let rerun = convert_cmd(&out).output().unwrap();
        if left == names {
            // The kill came after the conversion had finished: a rerun refuses to overwrite.
            assert!(
                !rerun.status.success(),
                "run {i}: finished, rerun must refuse"
            );
            assert!(String::from_utf8_lossy(&rerun.stderr).contains("already exists"));
            continue;
        }
        assert_success(&rerun);
        assert_eq!(listing(&out), names, "run {i}: after the rerun");
        for (n, bytes) in names.iter().zip(&want) {
            assert!(
                std::fs::read(out.join(n)).unwrap() == *bytes,
                "run {i}: {n}"
            );
        }
        let stderr = String::from_utf8_lossy(&rerun.stderr);
        if left.iter().any(|n| n.ends_with(".partial")) {
            assert!(
                stderr.contains("left by a conversion that was killed"),
                "{stderr}"
            );
        }
    }
    eprintln!("states after kill -9 (left behind, exit status): {outcomes:#?}");
    // The one state too brief to hit by chance: killed between the two renames (the decoder
    // in place, the mmproj still partial). The rerun replaces the decoder it finds.
    let out = c.out.with_file_name("between-renames");
    assert_success(&convert_cmd(&out).output().unwrap());
    let mm = out.join(&names[0]);
    let mut partial = mm.clone().into_os_string();
    partial.push(".partial");
    std::fs::rename(&mm, &partial).unwrap();
    let rerun = convert_cmd(&out).output().unwrap();
    assert_success(&rerun);
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(
        stderr.contains("replacing") && stderr.contains(&names[1]),
        "{stderr}"
    );
    assert_eq!(listing(&out), names);
    // The moments must really fall inside the conversion, not only before or after it.
    assert!(
        outcomes.keys().any(|k| k.contains(".partial")),
        "no kill landed while a file was being written: {outcomes:?}"
    );
}

/// A disk that fills up during a conversion: a clear error naming the file being written,
/// and nothing left in the output folder. A 512 KiB tmpfs when this process may mount one
/// (root), else a file size limit (RLIMIT_FSIZE, `ulimit -f`), which fails writes the same
/// way (EFBIG instead of ENOSPC).
#[test]
fn a_full_disk_is_named_and_leaves_nothing() {
    /// Unmounts the tmpfs however the test ends (a mount left behind would break the next
    /// run's scratch folder).
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let stale = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("convert-scratch/disk-full/out");
    let _ = std::process::Command::new("umount")
        .arg(stale)
        .stderr(std::process::Stdio::null())
        .status();
    let c = Case::new("disk-full", "tiny-224");
    std::fs::create_dir_all(&c.out).unwrap();
    let _unmount = Unmount(c.out.clone());
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs", &path_str(&c.out)])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    for ty in ["f16", "q4_k_m"] {
        // The tiny decoder is ~0.5 MiB in F16: the mmproj fits, the decoder does not.
        let script = format!(
            "{limit} exec \"$0\" convert \"$1\" -o \"$2\" --type {ty} --name tiny -t 1 --quiet",
            limit = if mounted {
                ""
            } else {
                "ulimit -f 300; trap '' XFSZ;"
            }
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script, env!("CARGO_BIN_EXE_pali")])
            .args([path_str(&c.hf), path_str(&c.out)])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ty}: the conversion did not fail");
        assert!(
            stderr.contains("No space left on device") || stderr.contains("File too large"),
            "{ty} (tmpfs: {mounted}): {stderr}"
        );
        assert!(
            stderr.contains(&path_str(&c.out)),
            "{ty}: no file named: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(listing(&c.out), Vec::<String>::new(), "{ty}: left behind");
    }
    eprintln!(
        "disk full simulated with {}",
        if mounted {
            "a 512 KiB tmpfs"
        } else {
            "ulimit -f"
        }
    );
}

/// Two conversions into one folder: the second stops at once (the first holds a lock on
/// the folder) and touches nothing.
#[test]
fn a_second_conversion_into_the_same_folder_is_refused() {
    let c = Case::new("locked", "tiny-224");
    std::fs::create_dir_all(&c.out).unwrap();
    let held = std::fs::File::open(&c.out).unwrap();
    held.lock().unwrap();
    let e = c.convert().unwrap_err();
    assert_err!(
        e,
        ConvertError::Usage(_),
        "another pali convert",
        &path_str(&c.out)
    );
    assert_clean(&c.out);
    held.unlock().unwrap();
    c.convert().unwrap();
}
