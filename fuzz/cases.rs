//! The fuzz cases: one function per parser, each calling the entry point a user's file or
//! request reaches, and each required never to panic, abort or hang (errors are fine).
//!
//! This one file is compiled into the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and
//! into `tests/fuzz_regressions.rs`, which replays every committed crasher
//! (`fuzz/regressions/<case>/*`) on stable Rust, so a fixed crash stays fixed.
//!
//! Model files are fuzzed as edits of the bundled demo's real files (see [`edit`]): a
//! mutation then lands in a file that is otherwise valid and gets past the first check,
//! and the inputs stay small however big the file is.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A fuzz case: takes any bytes, must return (never panic, abort or hang).
pub type Case = fn(&[u8]);

/// Every case, by name (the fuzz target and the regression folder have the same name).
pub const CASES: &[(&str, Case)] = &[
    ("gguf_mmproj", gguf_mmproj),
    ("gguf_decoder", gguf_decoder),
    ("gguf_mask", gguf_mask),
    ("gguf_info", gguf_info),
    ("safetensors", safetensors),
    ("checkpoint_json", checkpoint_json),
    ("image", image),
    ("answer", answer),
    ("npz", npz),
    ("chat_request", chat_request),
    ("multipart", multipart),
];

/// The repository root (where `models/demo` is), found from the crate being built.
pub fn root() -> PathBuf {
    let mut d = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !d.join("models/demo").is_dir() {
        assert!(
            d.pop(),
            "no models/demo above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
    d
}

/// The bytes of a committed file, read once per process.
fn base(rel: &'static str) -> &'static [u8] {
    type Files = std::sync::Mutex<Vec<(&'static str, &'static [u8])>>;
    static FILES: OnceLock<Files> = OnceLock::new();
    let mut files = FILES.get_or_init(Default::default).lock().unwrap();
    if let Some((_, b)) = files.iter().find(|(r, _)| *r == rel) {
        return b;
    }
    let bytes: &'static [u8] = std::fs::read(root().join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .leak();
    files.push((rel, bytes));
    bytes
}

/// Reads a fuzz input as an edit of the real file `base`: `[mode][offset: u32 LE][bytes…]`.
/// Mode 0: the file is the bytes (any small file); 1: the bytes overwrite the base at the
/// offset within its first 64 KiB (the headers); 2: the base is cut at the offset and the
/// bytes appended (truncation, a rewritten tail); 3: the bytes overwrite the base anywhere.
pub fn edit(base: &[u8], data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return base.to_vec();
    };
    if mode % 4 == 0 || rest.len() < 4 {
        return rest.to_vec();
    }
    let at = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    let bytes = &rest[4..];
    let (mut out, at) = match mode % 4 {
        1 => (base.to_vec(), at % base.len().clamp(1, 64 << 10)),
        2 => {
            let at = at % base.len().max(1);
            (base[..at].to_vec(), at)
        }
        _ => (base.to_vec(), at % base.len().max(1)),
    };
    let end = at + bytes.len();
    if end > out.len() {
        out.resize(end, 0);
    }
    out[at..end].copy_from_slice(bytes);
    out
}

/// A scratch file, removed when dropped.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `bytes` to a new scratch file named like `name` (in /dev/shm where there is one).
/// Every call gets its own file: rewriting one that another thread has mapped would
/// truncate it under that thread (a SIGBUS).
pub fn scratch(name: &str, bytes: &[u8]) -> Scratch {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = scratch_dir().join(format!("{n}-{name}"));
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    Scratch(p)
}

fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let tmp = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = tmp.join(format!("pali-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

const DEMO_DECODER: &str = "models/demo/pali-demo-F16.gguf";
const DEMO_MMPROJ: &str = "models/demo/mmproj-pali-demo-F16.gguf";
const DEMO_VAE: &str = "models/demo/vae-pali-demo.gguf";
const DEMO_NPZ: &str = "models/demo/vae-shapes.npz";
const FIXTURE_HF: &str = "models/fixtures/tiny-224/hf";

/// A small picture every case that needs one uses.
fn picture() -> pali::RgbImage {
    let (w, h) = (40u32, 30u32);
    let data = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    pali::RgbImage::new(w, h, data).unwrap()
}

/// An mmproj file: load it as `--mmproj` does, then run the tower on a picture.
pub fn gguf_mmproj(data: &[u8]) {
    let path = scratch("mmproj.gguf", &edit(base(DEMO_MMPROJ), data));
    let Ok(enc) = pali::vision::VisionEncoder::load(&path, false, 1) else {
        return;
    };
    let Ok(cfg) = enc.config().preprocess_config() else {
        return;
    };
    let pixels = pali::image::preprocess(&picture(), &cfg);
    let _ = enc.encode(&pixels, pali::vision::VisionOutput::Projected);
}

/// A decoder file: probe and load it as `-m` does, then generate two tokens after a prefix.
pub fn gguf_decoder(data: &[u8]) {
    use pali::decoder::{Decoder, DecoderOptions};
    let path = scratch("decoder.gguf", &edit(base(DEMO_DECODER), data));
    if pali::decoder::Decoder::probe(&path).is_err() {
        return;
    }
    let opts = DecoderOptions {
        n_gpu_layers: 0,
        sliding_window: Default::default(),
        skip_repack: true,
        ..Default::default()
    };
    let Ok(dec) = Decoder::load(&path, &opts) else {
        return;
    };
    let features = vec![0.25f32; 4 * dec.hidden()];
    let Ok(prefix) = dec.prefix(&features, "caption en") else {
        return;
    };
    let opts = pali::GenerateOptions {
        n_predict: 2,
        logprobs: true,
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let _ = dec.generate(prefix, &opts, 1, &mut |_| {});
}

/// A mask decoder file: load it as `--vae` does, then decode one mask.
pub fn gguf_mask(data: &[u8]) {
    let path = scratch("vae.gguf", &edit(base(DEMO_VAE), data));
    if let Ok(m) = pali::MaskDecoder::load(&path, 1) {
        let codes: [u8; pali::tasks::parse::SEG_TOKENS] = std::array::from_fn(|i| (i * 9) as u8);
        let _ = m.decode(&codes);
    }
}

/// Any GGUF, read as `pali info` reads it: every key and the tensor table.
pub fn gguf_info(data: &[u8]) {
    let path = scratch("info.gguf", &edit(base(DEMO_MMPROJ), data));
    if let Ok(f) = pali_ggml::gguf::GgufFile::open(&path) {
        for k in f.keys() {
            let _ = f.get(&k).map(|v| v.to_string());
        }
        let _ = f.tensors();
    }
}

/// A checkpoint's `model.safetensors`: the input is edited into the fixture's file, the
/// checkpoint opened as `pali convert` opens it, and every tensor read.
pub fn safetensors(data: &[u8]) {
    let file = scratch(
        "model.safetensors",
        &edit(base("models/fixtures/tiny-224/hf/model.safetensors"), data),
    );
    if let Ok(ck) = pali_convert::safetensors::Checkpoint::open_files(&[file.to_path_buf()]) {
        for e in ck.tensors().values() {
            let _ = ck.read_f32(e);
        }
    }
}

/// The converter's JSON files: `[which][text…]` with which = 0 config.json, 1
/// model.safetensors.index.json, 2 preprocessor_config.json, read from a checkpoint folder
/// that holds the fixture's other files.
pub fn checkpoint_json(data: &[u8]) {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let dir = scratch_dir().join(format!("checkpoint-{:?}", std::thread::current().id()));
    let _ = std::fs::create_dir_all(&dir);
    let shard = dir.join("model-00001-of-00001.safetensors");
    if !shard.exists() {
        let _ = std::fs::write(
            &shard,
            base("models/fixtures/tiny-224/hf/model.safetensors"),
        );
    }
    match which % 3 {
        0 => {
            let _ = pali_convert::config::PaliGemmaConfig::parse(&String::from_utf8_lossy(text));
        }
        1 => {
            let _ = std::fs::write(dir.join("model.safetensors.index.json"), text);
            let _ = pali_convert::safetensors::Checkpoint::open_dir(&dir);
        }
        _ => {
            let _ = std::fs::write(dir.join("preprocessor_config.json"), text);
            let _ = pali_convert::config::PreprocessorConfig::load(&dir);
        }
    }
    let _ = FIXTURE_HF;
}

/// An image file: decoded as `pali caption IMG` decodes it, then preprocessed to 224 px.
pub fn image(data: &[u8]) {
    if let Ok(img) = pali::image::decode_image(data, pali::MAX_IMAGE_PIXELS) {
        let cfg = pali::image::PreprocessConfig::paligemma(224);
        let _ = pali::image::preprocess(&img, &cfg);
    }
}

/// A model's answer text: parsed as detect and segment answers for a picture whose size
/// the first four bytes give, and each segment's mask box and run-length mask made.
pub fn answer(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let w = u16::from_le_bytes([data[0], data[1]]) as u32;
    let h = u16::from_le_bytes([data[2], data[3]]) as u32;
    let text = String::from_utf8_lossy(&data[4..]);
    let _ = pali::tasks::parse_detections(&text, w, h);
    let segs = pali::tasks::parse_segments(&text, w.min(512), h.min(512));
    for o in &segs.objects {
        let b = pali::mask::mask_box(o.bbox.loc, w.min(512), h.min(512));
        let m = pali::mask::place_mask(&[0.5; 64 * 64], b, w.min(512), h.min(512));
        let rle = m.rle();
        let _ = pali::Mask::from_rle(w.min(512), h.min(512), &rle);
    }
}

/// big_vision's VAE checkpoint: converted as `pali convert-vae` converts it.
pub fn npz(data: &[u8]) {
    let npz = scratch("vae.npz", &edit(base(DEMO_NPZ), data));
    let out = scratch("vae-out.gguf", b"");
    let _ = pali_convert::convert_vae(&npz, &out, true);
}

/// A `/v1/chat/completions` body (JSON with a data URL image).
pub fn chat_request(data: &[u8]) {
    let _ = pali_server::chat::parse(data, None, 16);
}

/// A multipart upload: `[content type]\n[body…]`.
pub fn multipart(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let ct = String::from_utf8_lossy(&data[..split]).into_owned();
    let body = bytes::Bytes::copy_from_slice(&data[(split + 1).min(data.len())..]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _ = rt.block_on(pali_server::input::parse_multipart(&ct, body));
}
