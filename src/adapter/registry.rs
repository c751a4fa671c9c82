//! Which files make one adapter (a decoder part, an `mmproj-…` vision part beside it, or one
//! of them), what [`crate::Model::adapters`] lists, the checks both parts share, and the
//! registry of the adapters a model has loaded, by id.

use crate::options::{AdapterId, AdapterScale};
use crate::{Error, Result};
use pali_ggml::gguf::{GgufFile, TensorInfo, Value};
use pali_ggml::schema::{adapter as names, decoder as base_names, keys};
use pali_ggml::GgmlType;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;

/// A loaded adapter, as [`crate::Model::adapters`] lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AdapterInfo {
    /// Its id in requests.
    pub id: AdapterId,
    /// The file it was loaded from (either file of a pair).
    pub path: PathBuf,
    /// Its `general.name`.
    pub name: String,
    /// The decoder part (llama.cpp adapter GGUF), if any.
    pub decoder: Option<PathBuf>,
    /// The vision tower / projector part (`mmproj-…`), if any.
    pub mmproj: Option<PathBuf>,
    /// LoRA pairs in the decoder part and in the vision part.
    pub pairs: (usize, usize),
    /// Bytes of the adapter's tensors (both parts): about the memory it takes once loaded.
    pub bytes: u64,
}

/// Whether `path` is a GGUF that says it is an adapter (`general.type = adapter`).
pub(crate) fn is_adapter(path: &Path) -> bool {
    GgufFile::open(path)
        .is_ok_and(|f| f.get(names::GENERAL_TYPE) == Some(Value::Str(names::TYPE_ADAPTER.into())))
}

/// The part a file says it is, and whether it says it has a partner.
struct Part {
    vision: bool,
    has_decoder: bool,
    has_vision: bool,
    name: String,
    pairs: usize,
    bytes: u64,
}

fn part(path: &Path) -> Result<Part> {
    let f = GgufFile::open(path).map_err(|e| Error::Model(e.to_string()))?;
    let shown = path.display();
    let ty = f.get(names::GENERAL_TYPE);
    if ty != Some(Value::Str(names::TYPE_ADAPTER.into())) {
        return Err(Error::Model(format!(
            "{shown} is not a LoRA adapter ({} is {}): make one with `pali convert-lora ADAPTER_DIR -o OUT`",
            names::GENERAL_TYPE,
            ty.map_or("missing".into(), |v| v.to_string())
        )));
    }
    let arch = f.get_str(keys::ARCHITECTURE).unwrap_or_default();
    let vision = match arch.as_str() {
        keys::ARCH_GEMMA2 => false,
        keys::ARCH_CLIP => true,
        other => {
            return Err(Error::Model(format!(
                "{shown}: an adapter for architecture {other:?}, not PaliGemma's decoder ({}) or vision tower ({})",
                keys::ARCH_GEMMA2,
                keys::ARCH_CLIP
            )))
        }
    };
    let flag = |k: &str| match f.get(k) {
        Some(Value::Bool(b)) => Some(b),
        _ => None,
    };
    let tensors = f.tensors();
    Ok(Part {
        vision,
        // An adapter from llama.cpp's own converter says nothing: the file alone.
        has_decoder: flag(names::HAS_DECODER).unwrap_or(!vision),
        has_vision: flag(names::HAS_VISION).unwrap_or(vision),
        name: f.get_str(keys::NAME).unwrap_or_default(),
        pairs: tensors.len() / 2,
        bytes: tensors.iter().map(|t| t.size).sum(),
    })
}

/// The files of the adapter `path` belongs to: `path` itself and, when it says the adapter
/// has another part, that part's file beside it (`mmproj-<decoder file name>`, or the
/// decoder file an `mmproj-…` file's name minus the prefix names). Its id is left at 0.
pub(crate) fn adapter_files(path: &Path) -> Result<AdapterInfo> {
    if !path.is_file() {
        return Err(Error::Io(format!(
            "--lora {}: file not found",
            path.display()
        )));
    }
    let me = part(path)?;
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new(""));
    let other_name = if me.vision {
        file.strip_prefix(names::MMPROJ_PREFIX).map(str::to_string)
    } else {
        Some(format!("{}{file}", names::MMPROJ_PREFIX))
    };
    let wants_other = if me.vision {
        me.has_decoder
    } else {
        me.has_vision
    };
    let other = if wants_other {
        let p = other_name.map(|n| dir.join(n)).filter(|p| p.is_file());
        let Some(p) = p else {
            return Err(Error::Model(format!(
                "{}: this adapter also has a {} part, expected beside it as {}: not found \
                 (keep the files `pali convert-lora` wrote together, with their names)",
                path.display(),
                if me.vision { "decoder" } else { "vision" },
                if me.vision {
                    "the same name without the mmproj- prefix".to_string()
                } else {
                    format!("{}{file}", names::MMPROJ_PREFIX)
                }
            )));
        };
        let o = part(&p)?;
        if o.vision == me.vision {
            return Err(Error::Model(format!(
                "{} and {} are both {} adapters: expected a decoder and an mmproj- file",
                path.display(),
                p.display(),
                if me.vision { "vision" } else { "decoder" }
            )));
        }
        Some((p, o))
    } else {
        None
    };
    let mut info = AdapterInfo {
        id: AdapterId(0),
        path: path.to_path_buf(),
        name: me.name.clone(),
        decoder: None,
        mmproj: None,
        pairs: (0, 0),
        bytes: me.bytes,
    };
    for (p, part) in std::iter::once((path.to_path_buf(), me)).chain(other) {
        info.bytes += if p == info.path { 0 } else { part.bytes };
        if part.vision {
            info.mmproj = Some(p);
            info.pairs.1 = part.pairs;
        } else {
            info.decoder = Some(p);
            info.pairs.0 = part.pairs;
        }
    }
    Ok(info)
}

/// Opens one part of an adapter and checks its header: each `(key, value)` of `expected`
/// (string values: the file's type, architecture, …; `part` says which `pali convert-lora`
/// output was expected) and a finite `adapter.lora.alpha` (0 when absent). Returns the file
/// and its alpha; errors name the file.
pub(crate) fn open_part(
    path: &Path,
    expected: &[(&str, &str)],
    part: &str,
) -> Result<(GgufFile, f32)> {
    let model = |m: String| Error::Model(format!("LoRA adapter {}: {m}", path.display()));
    let f = GgufFile::open(path).map_err(|e| model(e.to_string()))?;
    for &(key, want) in expected {
        let got = f.get(key);
        if got != Some(Value::Str(want.into())) {
            return Err(model(format!(
                "{key} is {}, expected {want:?} (a {part} adapter from `pali convert-lora`)",
                got.map_or("missing".into(), |v| v.to_string())
            )));
        }
    }
    let alpha = match f.get(names::LORA_ALPHA) {
        None => 0.0,
        Some(Value::F32(a)) if a.is_finite() => a,
        Some(v) => {
            return Err(model(format!(
                "{} = {v}: not a finite float",
                names::LORA_ALPHA
            )))
        }
    };
    Ok((f, alpha))
}

/// The checks shared by both parts: names end in `.lora_a` / `.lora_b`, pairs are whole,
/// each base tensor exists (via `base`) and is not the token embedding, and the shapes fit
/// it: `A` `[in, r]`, `B` `[r, out]` for a base `[in, out]`.
pub(crate) fn check_pairs(
    tensors: &[TensorInfo],
    base: &dyn Fn(&str) -> Option<TensorInfo>,
    error: &dyn Fn(String) -> Error,
) -> Result<()> {
    if tensors.is_empty() {
        return Err(error("no LoRA tensors".into()));
    }
    for t in tensors {
        let (stem, is_a) = if let Some(s) = t.name.strip_suffix(names::SUFFIX_A) {
            (s, true)
        } else if let Some(s) = t.name.strip_suffix(names::SUFFIX_B) {
            (s, false)
        } else {
            return Err(error(format!(
                "tensor {} is not a LoRA matrix (…{} / …{})",
                t.name,
                names::SUFFIX_A,
                names::SUFFIX_B
            )));
        };
        if !matches!(
            t.ty,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
        ) {
            return Err(error(format!(
                "tensor {} is {}: LoRA matrices are F32, F16, BF16 or Q8_0",
                t.name, t.ty
            )));
        }
        if stem == base_names::TOKEN_EMBD {
            return Err(error(format!(
                "tensor {}: an adapter on {stem} is not supported (Gemma 2 ties it to the output head, and pali reads it itself for the prompt)",
                t.name
            )));
        }
        let partner = format!(
            "{stem}{}",
            if is_a {
                names::SUFFIX_B
            } else {
                names::SUFFIX_A
            }
        );
        let Some(other) = tensors.iter().find(|o| o.name == partner) else {
            return Err(error(format!("tensor {} has no partner {partner}", t.name)));
        };
        if !is_a {
            continue; // each pair once, from its A
        }
        let Some(w) = base(stem) else {
            return Err(error(format!(
                "tensor {} changes {stem}, which the base model does not have: the adapter is for another model",
                t.name
            )));
        };
        let (a, b) = (&t.ne, &other.ne);
        let fits = a.len() == 2
            && b.len() == 2
            && w.ne.len() == 2
            && a[1] >= 1
            && a[1] == b[0]
            && a[0] == w.ne[0]
            && b[1] == w.ne[1];
        if !fits {
            return Err(error(format!(
                "tensors {} {a:?} and {partner} {b:?} do not fit {stem} {:?} of the base model \
                 (expected [{}, r] and [r, {}]): the adapter is for another model",
                t.name,
                w.ne,
                w.ne.first().copied().unwrap_or(0),
                w.ne.get(1).copied().unwrap_or(0)
            )));
        }
    }
    Ok(())
}

/// The adapters a model has loaded, by id.
#[derive(Default)]
pub(crate) struct Registry {
    entries: RwLock<Vec<AdapterInfo>>,
    next: AtomicU32,
}

impl Registry {
    /// A fresh id (never reused).
    pub(crate) fn next_id(&self) -> AdapterId {
        AdapterId(self.next.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn add(&self, info: AdapterInfo) {
        self.write().push(info);
    }

    /// Removes `id`, returning what it was.
    pub(crate) fn remove(&self, id: AdapterId) -> Option<AdapterInfo> {
        let mut e = self.write();
        let i = e.iter().position(|a| a.id == id)?;
        Some(e.remove(i))
    }

    /// Every loaded adapter, in id order.
    pub(crate) fn list(&self) -> Vec<AdapterInfo> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn ids(&self) -> Vec<AdapterId> {
        self.list().iter().map(|a| a.id).collect()
    }

    /// The adapters of `lora` that change one part (`vision`: the tower and projector, else
    /// the decoder), in id order, scale 0 left out (it changes nothing).
    pub(crate) fn selection(&self, lora: &[AdapterScale], vision: bool) -> Vec<AdapterScale> {
        let entries = self.list();
        let mut out: Vec<AdapterScale> = lora
            .iter()
            .filter(|a| a.scale != 0.0)
            .filter(|a| {
                entries.iter().any(|e| {
                    e.id == a.id
                        && if vision {
                            e.mmproj.is_some()
                        } else {
                            e.decoder.is_some()
                        }
                })
            })
            .copied()
            .collect();
        out.sort_by_key(|a| a.id);
        out
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<AdapterInfo>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }
}
