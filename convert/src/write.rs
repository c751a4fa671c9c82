//! Writing the outputs: the folder readied (a lock, leftovers of a killed run removed),
//! tensors streamed chunk by chunk into `*.partial` files through
//! [`pali_ggml::atomic_file::AtomicFile`], renamed into place when whole.

use crate::plan::{Pad, Planned};
use crate::safetensors::Checkpoint;
use crate::{ConvertError, Result};
use pali_ggml::atomic_file::AtomicFile;
use pali_ggml::gguf::GgufWriter;
use pali_ggml::quant;
use pali_ggml::schema::Fixup;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Renames a finished output into place; its I/O errors stay converter I/O errors.
pub(crate) fn commit(file: AtomicFile) -> Result<()> {
    file.commit().map_err(|e| match e {
        pali_ggml::Error::Io(m) => ConvertError::Io(m),
        e => ConvertError::Ggml(e),
    })
}

/// Readies the output folder: one conversion into it at a time (an exclusive lock on the
/// folder, held while the returned handle lives), and whatever a killed run left there
/// (`*.partial`, `*.src.partial`) removed with a warning. Existing targets are refused
/// without `force`, except the ones that run itself committed before it was killed: when
/// leftovers are found and not every target exists, those that do are from that run.
pub(crate) fn prepare_outputs(dir: &Path, targets: &[&Path], force: bool) -> Result<std::fs::File> {
    let lock = std::fs::File::open(dir).map_err(|e| ConvertError::io(dir, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(ConvertError::Usage(format!(
                "another pali convert is writing into {} now: wait for it, or use another -o",
                dir.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(ConvertError::io(dir, e)),
    }
    let mut leftovers = false;
    for t in targets {
        for suffix in [".partial", ".src.partial"] {
            let mut p = t.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            // Only files: anything else in the way fails later, with its own error.
            if p.is_file() {
                log::warn!(
                    "removing {}: left by a conversion that was killed",
                    p.display()
                );
                std::fs::remove_file(&p).map_err(|e| ConvertError::io(&p, e))?;
                leftovers = true;
            }
        }
    }
    let finishing = leftovers && !targets.iter().all(|t| t.exists());
    for t in targets.iter().filter(|t| t.exists()) {
        if finishing {
            log::warn!(
                "replacing {}: written by the conversion that was killed before it finished",
                t.display()
            );
        } else if !force {
            return Err(ConvertError::Usage(format!(
                "{} already exists (use --force to overwrite)",
                t.display()
            )));
        }
    }
    Ok(lock)
}

/// Passes writes through and keeps the first I/O error, so that a failed write (a full
/// disk) is reported with the file's name rather than the tensor's.
struct TrackedWriter<W: Write> {
    inner: W,
    failed: Option<std::io::Error>,
}

impl<W: Write> TrackedWriter<W> {
    fn track<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| {
            let copy = std::io::Error::new(e.kind(), e.to_string());
            self.failed.get_or_insert(e);
            copy
        })
    }
}

impl<W: Write> Write for TrackedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write(buf);
        self.track(r)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.track(r)
    }
}

/// Source bytes converted per step: bounds the converter's working memory whatever the
/// tensor size (the 257216-row embedding is 1.2 GB in bf16).
pub(crate) const CHUNK_BYTES: usize = 32 << 20;

/// Streams one tensor into `out` in chunks of whole rows, dropping the source pages of each
/// chunk once written, so peak memory is one chunk, not one tensor.
pub(crate) fn write_tensor(ckpt: &Checkpoint, p: &Planned, out: &mut dyn Write) -> Result<()> {
    let e = p.entry;
    let row = p.ne[0] as usize;
    let (src_row, extra_rows) = match p.pad {
        Pad::None => (row, 0),
        Pad::RowTail { from } => (from, 0),
        Pad::ExtraRows { from } => (row, p.ne[1] as usize - from),
    };
    let n_rows = e.numel() / src_row;
    let src_row_bytes = src_row * e.dtype.size();
    let rows_per_chunk = (CHUNK_BYTES / src_row_bytes).max(1);
    let bytes = ckpt.bytes(e);
    let tensor_err = |err: String| ConvertError::Tensor(format!("tensor {}: {err}", p.hf_name));
    for r0 in (0..n_rows).step_by(rows_per_chunk) {
        let r1 = (r0 + rows_per_chunk).min(n_rows);
        let src = &bytes[r0 * src_row_bytes..r1 * src_row_bytes];
        if p.fixup == Fixup::None && p.scale == 1.0 && e.dtype.ggml() == p.ty && src_row == row {
            out.write_all(src)
                .map_err(|err| tensor_err(err.to_string()))?;
        } else {
            let mut vals = pali_ggml::quant::to_f32(e.dtype.ggml(), src)?;
            if p.fixup == Fixup::AddOne {
                vals.iter_mut().for_each(|v| *v += 1.0);
            }
            if p.scale != 1.0 {
                vals.iter_mut().for_each(|v| *v *= p.scale);
            }
            if src_row != row {
                vals = vals
                    .chunks(src_row)
                    .flat_map(|r| {
                        r.iter()
                            .copied()
                            .chain(std::iter::repeat_n(0.0, row - src_row))
                    })
                    .collect();
            }
            let conv =
                quant::convert_f32(p.ty, &vals, row).map_err(|err| tensor_err(err.to_string()))?;
            out.write_all(&conv)
                .map_err(|err| tensor_err(err.to_string()))?;
        }
        ckpt.release_range(e, r0 * src_row_bytes, r1 * src_row_bytes);
    }
    if extra_rows > 0 {
        let zeros = quant::convert_f32(p.ty, &vec![0.0; extra_rows * row], row)
            .map_err(|err| tensor_err(err.to_string()))?;
        out.write_all(&zeros)
            .map_err(|err| tensor_err(err.to_string()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn write_gguf(
    path: &Path,
    suffix: &str,
    ckpt: &Checkpoint,
    plan: &[Planned],
    header: &GgufWriter,
    done: &mut u64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64, &str),
    phase: &str,
) -> Result<AtomicFile> {
    let file = AtomicFile::new(path, suffix);
    let f = std::fs::File::create(file.path()).map_err(|e| ConvertError::io(file.path(), e))?;
    let mut w = TrackedWriter {
        inner: BufWriter::with_capacity(1 << 20, f),
        failed: None,
    };
    let write_error = |e: std::io::Error| {
        ConvertError::Io(format!(
            "writing {}: {e} (nothing was left at that path)",
            path.display()
        ))
    };
    let mut err: Option<ConvertError> = None;
    let res = header.write(&mut w, |i, _, out| {
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            err = Some(ConvertError::Interrupted);
            return Err(pali_ggml::Error::Invalid("interrupted".into()));
        }
        let p = &plan[i];
        write_tensor(ckpt, p, out).map_err(|e| {
            let msg = e.to_string();
            err = Some(e);
            pali_ggml::Error::Invalid(msg)
        })?;
        *done += p.entry.numel() as u64 * p.entry.dtype.size() as u64;
        progress(*done, total, phase);
        Ok(())
    });
    if let Err(e) = res {
        if let Some(io) = w.failed.take() {
            return Err(write_error(io));
        }
        return Err(err.unwrap_or(ConvertError::Ggml(e)));
    }
    w.flush().map_err(write_error)?;
    Ok(file)
}

/// Set by a signal handler to stop a conversion between tensors.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
