//! A strict reader for (sharded) safetensors checkpoints over memmap2. Every header is
//! validated before any tensor is touched, so corrupt files give an error that names the
//! file and the tensor instead of a panic or garbage.

use crate::{ConvertError, Result};
use pali_ggml::mapped::MappedFile;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Element type of a checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    #[allow(missing_docs)]
    F32,
    #[allow(missing_docs)]
    F16,
    #[allow(missing_docs)]
    BF16,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// The matching ggml type.
    pub fn ggml(self) -> pali_ggml::GgmlType {
        match self {
            Dtype::F32 => pali_ggml::GgmlType::F32,
            Dtype::F16 => pali_ggml::GgmlType::F16,
            Dtype::BF16 => pali_ggml::GgmlType::BF16,
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: Dtype,
    /// PyTorch shape (outermost first).
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    map: MappedFile,
    data_start: usize,
}

/// All tensors of a checkpoint (one file or several shards).
pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> ConvertError {
    ConvertError::Safetensors(format!("{}: {msg}", path.display()))
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ConvertError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad(&index, "no \"weight_map\" object"))?;
            let mut files: Vec<String> = Vec::new();
            let mut expected: HashMap<String, String> = HashMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(&index, format!("weight_map[{name}] is not a string")))?;
                if file.contains('/') || file.contains("..") {
                    return Err(bad(
                        &index,
                        format!("shard name {file:?} must be a plain file name"),
                    ));
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
                expected.insert(name.clone(), file.to_string());
            }
            files.sort();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            for p in &paths {
                if !p.exists() {
                    return Err(ConvertError::Missing(format!(
                        "shard {} listed in {} does not exist",
                        p.display(),
                        index.display()
                    )));
                }
            }
            let ckpt = Self::open_files(&paths)?;
            for (name, file) in &expected {
                match ckpt.tensors.get(name) {
                    None => {
                        return Err(bad(
                            &index,
                            format!("tensor {name} is listed in {file} but not stored there"),
                        ))
                    }
                    Some(e)
                        if ckpt.shards[e.file]
                            .path
                            .file_name()
                            .map(|f| f.to_string_lossy() != *file)
                            == Some(true) =>
                    {
                        return Err(bad(
                            &index,
                            format!("tensor {name} is listed in {file} but stored elsewhere"),
                        ))
                    }
                    _ => {}
                }
            }
            Ok(ckpt)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(ConvertError::Missing(format!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            )))
        }
    }

    /// Opens and validates the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let map = MappedFile::open(path).map_err(|e| match e {
                pali_ggml::Error::Io(m) => ConvertError::Io(m),
                e => ConvertError::Ggml(e),
            })?;
            let (data_start, entries) = parse_header(path, &map)?;
            for (name, mut e) in entries {
                e.file = fi;
                if tensors.insert(name.clone(), e).is_some() {
                    return Err(bad(
                        path,
                        format!("tensor {name} is stored in more than one shard"),
                    ));
                }
            }
            shards.push(Shard {
                path: path.clone(),
                map,
                data_start,
            });
        }
        Ok(Checkpoint { shards, tensors })
    }

    /// Tensor names and entries, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// Looks a tensor up.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The raw bytes of a tensor (little-endian, as stored).
    pub fn bytes(&self, e: &TensorEntry) -> &[u8] {
        let s = &self.shards[e.file];
        &s.map[s.data_start + e.start..s.data_start + e.end]
    }

    /// A tensor widened to f32.
    pub fn read_f32(&self, e: &TensorEntry) -> Result<Vec<f32>> {
        pali_ggml::quant::to_f32(e.dtype.ggml(), self.bytes(e)).map_err(ConvertError::from)
    }

    /// Tells the kernel the pages of bytes `start..end` of a tensor can be dropped (keeps
    /// the converter's resident memory at one chunk whatever the model size).
    pub fn release_range(&self, e: &TensorEntry, start: usize, end: usize) {
        let s = &self.shards[e.file];
        let base = s.data_start + e.start;
        s.map.release(base + start, base + end);
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }
}

fn parse_header(path: &Path, map: &[u8]) -> Result<(usize, Vec<(String, TensorEntry)>)> {
    if map.len() < 8 {
        return Err(bad(path, "file too short for a safetensors header"));
    }
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes")) as usize;
    if n > 100 << 20 || 8 + n > map.len() {
        return Err(bad(
            path,
            format!(
                "header length {n} runs past the end of the file ({} bytes)",
                map.len()
            ),
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&map[8..8 + n])
        .map_err(|e| bad(path, format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad(path, "header is not a JSON object"))?;
    let data_start = 8 + n;
    let data_len = map.len() - data_start;
    let mut entries = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| bad(path, format!("tensor {name}: no \"{k}\"")))
        };
        let dtype_s = field("dtype")?.as_str().unwrap_or("?");
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| {
            bad(
                path,
                format!("tensor {name}: unsupported dtype {dtype_s} (expected F32, F16 or BF16)"),
            )
        })?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(path, format!("tensor {name}: bad shape")))?;
        let offs: Vec<usize> = field("data_offsets")?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(path, format!("tensor {name}: bad data_offsets")))?;
        let (start, end) = (offs[0], offs[1]);
        if start > end || end > data_len {
            return Err(bad(
                path,
                format!("tensor {name}: data_offsets [{start}, {end}] past the end of the data ({data_len} bytes)"),
            ));
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| n.checked_mul(dtype.size())) != Some(end - start) {
            return Err(bad(
                path,
                format!(
                    "tensor {name}: shape {shape:?} of {dtype_s} does not fill its {} bytes",
                    end - start
                ),
            ));
        }
        entries.push((
            name.clone(),
            TensorEntry {
                dtype,
                shape,
                file: 0,
                start,
                end,
            },
        ));
    }
    let mut spans: Vec<(usize, usize, &str)> = entries
        .iter()
        .filter(|(_, e)| e.end > e.start)
        .map(|(n, e)| (e.start, e.end, n.as_str()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(
                path,
                format!("tensors {} and {} overlap", w[0].2, w[1].2),
            ));
        }
    }
    Ok((data_start, entries))
}
