//! `pali convert-vae`: big_vision's segmentation VQ-VAE (`vae-oid.npz`, PyTorch names and
//! layouts) into a mask decoder GGUF (architecture `paligemma-vae`, F32; names and layouts
//! in [`pali_ggml::schema::vae`]), which the runtime's mask decoder loads.

use crate::npz::read_npz;
use crate::{ConvertError, Result};
use pali_ggml::gguf::{GgufWriter, Value};
use pali_ggml::schema::{keys, vae as names};
use pali_ggml::GgmlType;
use std::path::Path;

/// Converts big_vision's `vae-oid.npz` (the VQ-VAE in PyTorch naming and layouts) into a
/// mask decoder GGUF at `out` (architecture `paligemma-vae`, F32 tensors; the encoder's
/// arrays are left out). Writes `out.partial`, fsyncs and renames it, so an error leaves no
/// file at `out`; an existing `out` is replaced only with `force`. The codebook width D is
/// read from the file. Returns the number of tensors written.
///
/// Errors name the file and the array: not an `.npz`, a missing array, an unsupported dtype
/// (only little-endian float32, C order), a wrong shape.
pub fn convert_vae(npz: &Path, out: &Path, force: bool) -> Result<usize> {
    if out.is_dir() || out.file_name().is_none() {
        return Err(ConvertError::Vae(format!(
            "{}: not a file path",
            out.display()
        )));
    }
    if out.exists() && !force {
        return Err(ConvertError::Vae(format!(
            "{} exists: pass --force to overwrite it",
            out.display()
        )));
    }
    let cb = read_npz(npz, &[names::NPZ_CODEBOOK])?;
    let d = match cb[names::NPZ_CODEBOOK].shape.as_slice() {
        &[n, d] if n == names::NUM_CODES && d > 0 => d,
        s => {
            return Err(ConvertError::Vae(format!(
                "{}: array {} has shape {s:?}, expected [{}, D]",
                npz.display(),
                names::NPZ_CODEBOOK,
                names::NUM_CODES
            )))
        }
    };
    let specs = names::tensors(d);
    let wanted: Vec<&str> = specs.iter().map(|(n, _, _)| n.as_str()).collect();
    let arrays = read_npz(npz, &wanted)?;
    for (npz_name, _, shape) in &specs {
        let got = &arrays[npz_name].shape;
        if got != shape {
            return Err(ConvertError::Vae(format!(
                "{}: array {npz_name} has shape {got:?}, expected {shape:?} (codebook width D = {d})",
                npz.display()
            )));
        }
    }

    let mut w = GgufWriter::new(specs.len());
    let name = npz
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vae".into());
    for (k, v) in [
        (keys::ARCHITECTURE, Value::Str(names::ARCH.into())),
        (keys::NAME, Value::Str(name)),
        (names::CODEBOOK_SIZE, Value::U32(names::NUM_CODES as u32)),
        (names::CODEBOOK_DIM, Value::U32(d as u32)),
        (names::MAP_SIZE, Value::U32(names::MAP as u32)),
        (keys::FILE_TYPE, Value::U32(0)), // LLAMA_FTYPE_ALL_F32
    ] {
        w.set(k, v)?;
    }
    for (_, gguf, shape) in &specs {
        let ne: Vec<i64> = shape.iter().rev().map(|&s| s as i64).collect();
        w.add_tensor(gguf, GgmlType::F32, &ne)?;
    }

    pali_ggml::atomic_file::AtomicFile::write_with(out, |bw| {
        w.write(bw, |i, _, dst| {
            dst.write_all(&arrays[&specs[i].0].data)
                .map_err(|e| pali_ggml::Error::Io(e.to_string()))
        })
        .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|e| ConvertError::Vae(e.to_string()))?;
    Ok(specs.len())
}
