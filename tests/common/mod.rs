//! Shared helpers for the integration tests: the committed fixtures, converted once per
//! test binary, and HF's recorded outputs.
#![allow(dead_code)]

use pali_convert::safetensors::Checkpoint;
use pali_convert::{ConvertOptions, ConvertOutput};
use pali_ggml::quant::FileType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// A test whose prerequisite `what` is missing: under CI (`CI=true`, as `.ci/run` is run)
/// it fails, since CI provides every prerequisite; elsewhere it prints why it checked nothing
/// and the caller returns.
pub fn prerequisite_missing(test: &str, what: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: {what}, which CI must provide");
    eprintln!("{test}: skipped, {what} (it fails under CI=true)");
}

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
    converted_from(&fixture_dir(name).join("hf"), name, text, vision)
}

/// Converts the HF checkpoint in `hf_dir` once per (name, decoder type, vision type) in this
/// test binary.
pub fn converted_from(
    hf_dir: &Path,
    name: &str,
    text: FileType,
    vision: FileType,
) -> ConvertOutput {
    static CACHE: Cache<ConvertOutput> = OnceLock::new();
    let key = format!("{name}-{}-{}", text.label(), vision.label());
    once_per_key(&CACHE, &key, || {
        let opts = ConvertOptions {
            input: hf_dir.to_path_buf(),
            out_dir: scratch_root().join(&key),
            text_type: text,
            vision_type: vision,
            force: true,
            name: Some(name.to_string()),
            threads: 2,
        };
        pali_convert::convert(&opts, &mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("converting {key}: {e}"))
    })
}

/// Values made once per key in this test binary, each made by one thread while the others
/// asking for the same key wait.
type Cache<T> = OnceLock<Mutex<HashMap<String, Arc<OnceLock<T>>>>>;

/// `cache[key]`, made by `make` the first time.
fn once_per_key<T: Clone>(cache: &'static Cache<T>, key: &str, make: impl FnOnce() -> T) -> T {
    let slot = {
        let mut m = cache.get_or_init(Default::default).lock().unwrap();
        m.entry(key.to_string()).or_default().clone()
    };
    slot.get_or_init(make).clone()
}

/// This test binary's own folder under cargo's scratch directory (binaries running at once
/// never write the same files).
fn scratch_root() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.file_stem().unwrap().to_string_lossy().into_owned();
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(bin)
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

    pub fn prompts(&self) -> Vec<String> {
        self.json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().into())
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

/// Max |difference| relative to the largest reference value.
pub fn rel_diff(ours: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    max_abs_diff(ours, reference) / scale
}

/// Runs `enc` on every reference image of `r` and returns, per image, the tower's and the
/// projector's errors relative to HF's largest value: `(image, tower, projector)`.
pub fn vision_errors(r: &Reference, enc: &pali::vision::VisionEncoder) -> Vec<(String, f32, f32)> {
    use pali::vision::VisionOutput;
    r.images()
        .into_iter()
        .map(|img| {
            let px = r.tensor(&format!("pixel_values.{img}"));
            let tower = enc.encode(&px, VisionOutput::Tower).unwrap();
            let proj = enc.encode(&px, VisionOutput::Projected).unwrap();
            let dt = rel_diff(&tower, &r.tensor(&format!("vision.{img}")));
            let dp = rel_diff(&proj, &r.tensor(&format!("projector.{img}")));
            (img, dt, dp)
        })
        .collect()
}

/// One fixture case run through pali and compared with HF.
pub struct CaseResult {
    pub image: String,
    pub prompt: String,
    /// First-step max |Δlogit| over the real vocabulary.
    pub logit_diff: f32,
    pub first_token_equal: bool,
    /// Greedy tokens equal before the first divergence.
    pub agreed: usize,
    pub total: usize,
    /// HF's top-1/top-2 margin at the step where pali diverged (∞ if it did not).
    pub margin_at_divergence: f32,
}

/// Runs every case of fixture `name` (image × prompt, greedy as long as HF's) on `m`.
pub fn run_cases(m: &pali::Model, name: &str, base: pali::GenerateOptions) -> Vec<CaseResult> {
    let r = Reference::load(name);
    run_reference_cases(m, &r, &r.cases(), "", base)
}

/// Judges one decoder × vision type's cases against HF: the worst first-step |Δlogit| must
/// stay under `logit_bound`, at least `min_first_top1` of the first tokens must equal HF's,
/// and with `near_ties_only` every divergence must come right after a near-tie in HF's own
/// logits (margin < `logit_bound`). Prints the summary; returns what failed.
pub fn judge(
    label: &str,
    rows: &[CaseResult],
    logit_bound: f32,
    min_first_top1: f32,
    near_ties_only: bool,
) -> Vec<String> {
    let n = rows.len();
    let worst = rows.iter().map(|r| r.logit_diff).fold(0f32, f32::max);
    let top1 = rows.iter().filter(|r| r.first_token_equal).count();
    let agreed: usize = rows.iter().map(|r| r.agreed).sum();
    let total: usize = rows.iter().map(|r| r.total).sum();
    println!(
        "{label}: first-step max |dlogit| {worst:.3e}, first-token top-1 {top1}/{n}, greedy tokens before divergence {agreed}/{total}"
    );
    let mut failures = Vec::new();
    if worst >= logit_bound {
        failures.push(format!("{label}: logits off by {worst}"));
    }
    if top1 as f32 + 1e-3 < min_first_top1 * n as f32 {
        failures.push(format!("{label}: first-token top-1 {top1}/{n}"));
    }
    if near_ties_only {
        for r in rows.iter().filter(|r| r.agreed < r.total) {
            if r.margin_at_divergence >= logit_bound {
                failures.push(format!(
                    "{label}: {} {:?} diverged at step {} at an HF margin of {}",
                    r.image, r.prompt, r.agreed, r.margin_at_divergence
                ));
            }
        }
    }
    failures
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------
// Scratch checkpoints: copies of the fixtures (or generated ones) that tests may damage.

/// A fresh, empty folder `CARGO_TARGET_TMPDIR/<test binary>-scratch/<name>`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.file_stem().unwrap().to_string_lossy().into_owned();
    let bin = bin.split('-').next().unwrap_or(&bin).to_string();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{bin}-scratch"))
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies the regular files of `src` into `dst` (created if missing).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Reads, edits and rewrites a JSON file.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// One tensor of a safetensors file written by [`write_safetensors`].
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    pub name: String,
    /// Safetensors dtype string (`F32`, `F16`, `BF16`, …).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

impl StTensor {
    /// An F32 tensor.
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        StTensor {
            name: name.to_string(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Every tensor of a checkpoint folder (single file or shards), sorted by name.
pub fn read_checkpoint(dir: &Path) -> Vec<StTensor> {
    let ckpt = Checkpoint::open_dir(dir).unwrap();
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

/// The safetensors header for `tensors` stored back to back in the given order, with
/// `{"format": "pt"}` metadata, and the concatenated data.
pub fn safetensors_parts(tensors: &[StTensor]) -> (serde_json::Value, Vec<u8>) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [start, data.len()],
            }),
        );
    }
    (serde_json::Value::Object(header), data)
}

/// Writes a safetensors file: 8-byte little-endian header length, the header bytes
/// (space-padded to a multiple of 8, as the reference writer does), then the data.
pub fn write_raw_safetensors(path: &Path, header: &[u8], data: &[u8]) {
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Writes `tensors` as one valid safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[StTensor]) {
    let (header, data) = safetensors_parts(tensors);
    write_raw_safetensors(path, header.to_string().as_bytes(), &data);
}

/// Deterministic pseudo-random numbers (64-bit LCG, Knuth's MMIX constants).
pub struct Lcg(pub u64);

impl Lcg {
    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// The `pali` binary, run from the repository root.
pub fn pali_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pali"));
    c.current_dir(root());
    c
}

/// Asserts that a `pali` run succeeded, showing its stderr if not.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pali info --backends --json`, asserted to succeed.
pub fn info_backends() -> serde_json::Value {
    let out = pali_cmd()
        .args(["info", "--backends", "--json"])
        .output()
        .unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `pali` with `args` (one thread, `--json` appended), asserts success and parses its
/// single JSON object.
pub fn pali_json(args: &[&str]) -> serde_json::Value {
    let out = pali_cmd()
        .args(args)
        .args(["-t", "1", "--json"])
        .output()
        .unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// [`run_cases`] for any recorded set: `cases` of reference `r` (a base fixture's or a LoRA
/// adapter's), first-step logits under `{logits_prefix}logits.<img>.<k>`, on `m` with `base`.
pub fn run_reference_cases(
    m: &pali::Model,
    r: &Reference,
    cases: &[serde_json::Value],
    logits_prefix: &str,
    base: pali::GenerateOptions,
) -> Vec<CaseResult> {
    let prompts = r.prompts();
    cases
        .iter()
        .map(|case| {
            let img = case["image"].as_str().unwrap();
            let k = case["prompt_index"].as_u64().unwrap() as usize;
            let want: Vec<u32> = ids(&case["greedy"])
                .into_iter()
                .filter(|&t| t != 1)
                .collect();
            let image = pali::image::load_image(&image_path(img), pali::MAX_IMAGE_PIXELS).unwrap();
            let opts = pali::GenerateOptions {
                n_predict: want.len().max(1),
                ..base.clone()
            };
            let g = m.generate(&image, &prompts[k], &opts, &mut |_| {}).unwrap();
            let hf = r.tensor(&format!("{logits_prefix}logits.{img}.{k}"));
            let agreed = g
                .tokens
                .iter()
                .zip(&want)
                .take_while(|(a, b)| a == b)
                .count();
            CaseResult {
                image: img.to_string(),
                prompt: prompts[k].clone(),
                logit_diff: max_abs_diff(&g.first_logits, &hf[..r.vocab_real()]),
                first_token_equal: g.tokens.first() == want.first(),
                agreed,
                total: want.len(),
                margin_at_divergence: floats(&case["margins"])
                    .get(agreed)
                    .copied()
                    .unwrap_or(f32::INFINITY),
            }
        })
        .collect()
}

/// A LoRA adapter fixture's folder (models/fixtures/lora/NAME).
pub fn lora_dir(name: &str) -> PathBuf {
    fixture_dir("lora").join(name)
}

/// PEFT's recorded outputs for a LoRA adapter fixture.
pub fn lora_reference(name: &str) -> Reference {
    Reference::load(&format!("lora/{name}"))
}

/// The base fixture a LoRA adapter fixture was made on.
pub fn base_of(name: &str) -> String {
    lora_reference(name).json["base"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Converts a LoRA adapter fixture once per (adapter, type) in this test binary.
pub fn converted_lora(name: &str, ty: FileType) -> pali_convert::LoraConvertOutput {
    static CACHE: Cache<pali_convert::LoraConvertOutput> = OnceLock::new();
    let key = format!("{name}-{}", ty.label());
    once_per_key(&CACHE, &key, || {
        let opts = pali_convert::LoraConvertOptions {
            input: lora_dir(name).join("adapter"),
            out_dir: scratch_root().join("lora-adapters").join(&key),
            ty,
            force: true,
            name: Some(name.to_string()),
        };
        pali_convert::convert_lora(&opts, &mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("converting {key}: {e}"))
    })
}

/// Either file of a converted adapter (the decoder's when there is one).
pub fn adapter_file(name: &str, ty: FileType) -> PathBuf {
    let c = converted_lora(name, ty);
    c.decoder.or(c.mmproj).unwrap()
}
