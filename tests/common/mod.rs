//! Shared helpers for the integration tests: the committed fixtures, converted once per
//! test binary, and HF's recorded outputs.
#![allow(dead_code)]

use pali_convert::safetensors::Checkpoint;
use pali_convert::{ConvertOptions, ConvertOutput};
use pali_ggml::quant::FileType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The fixture checkpoints (see models/fixtures/README.md).
pub const FIXTURES: &[&str] = &["tiny-224", "tiny-swa-98", "tiny-46l-56"];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_dir(name: &str) -> PathBuf {
    root().join("models/fixtures").join(name)
}

pub fn image_path(name: &str) -> PathBuf {
    root()
        .join("models/fixtures/images")
        .join(format!("{name}.png"))
}

/// Converts a fixture once per (fixture, decoder type, vision type) in this test binary.
pub fn converted(name: &str, text: FileType, vision: FileType) -> ConvertOutput {
    type Slot = Arc<OnceLock<ConvertOutput>>;
    static CACHE: OnceLock<Mutex<HashMap<String, Slot>>> = OnceLock::new();
    let key = format!("{name}-{}-{}", text.label(), vision.label());
    let slot = {
        let mut m = CACHE.get_or_init(Default::default).lock().unwrap();
        m.entry(key.clone()).or_default().clone()
    };
    slot.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(bin)
            .join(&key);
        let opts = ConvertOptions {
            input: fixture_dir(name).join("hf"),
            out_dir: out,
            text_type: text,
            vision_type: vision,
            force: true,
            name: Some(name.to_string()),
            threads: 2,
        };
        pali_convert::convert(&opts, &mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("converting {key}: {e}"))
    })
    .clone()
}

/// HF's recorded outputs for a fixture.
pub struct Reference {
    pub json: serde_json::Value,
    tensors: Checkpoint,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let dir = fixture_dir(name);
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tensors = Checkpoint::open_files(&[dir.join("reference.safetensors")]).unwrap();
        Reference { json, tensors }
    }

    pub fn tensor(&self, key: &str) -> Vec<f32> {
        let e = self
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference tensor {key}"));
        self.tensors.read_f32(e).unwrap()
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.get(key).is_some()
    }

    pub fn images(&self) -> Vec<String> {
        self.json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn vocab_real(&self) -> usize {
        self.json["vocab_size_real"].as_u64().unwrap() as usize
    }

    pub fn cases(&self) -> Vec<serde_json::Value> {
        self.json["cases"].as_array().unwrap().clone()
    }
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
