//! Files written whole or not at all: every file pali writes (the converter's GGUFs,
//! `convert-vae`'s mask decoder, `--draw` and `--mask-out` pictures) goes to a `*.partial`
//! name beside its target, is fsynced, and is renamed into place only when complete. An
//! error, a panic or Ctrl-C on the way leaves nothing at the target (an existing target is
//! untouched until the rename).
//!
//! Partial files being written are registered, so that a program's Ctrl-C handler can
//! remove them before it exits ([`remove_partial_files`]).

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `*.partial` files being written now.
static PARTIAL_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every partial file being written (for signal handlers; the process exits next).
pub fn remove_partial_files() {
    if let Ok(list) = PARTIAL_FILES.lock() {
        for p in list.iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A file written under a temporary name (`target` + `suffix`) and renamed into place by
/// [`AtomicFile::commit`]; dropped without a commit, the temporary file is removed.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl AtomicFile {
    /// Reserves `target` + `suffix` (e.g. `.partial`) as the temporary name; the caller
    /// creates and writes it ([`AtomicFile::path`]), by itself or through a library that
    /// takes a path (llama.cpp's quantizer).
    pub fn new(target: &Path, suffix: &str) -> Self {
        let mut tmp = target.as_os_str().to_owned();
        tmp.push(suffix);
        let tmp = PathBuf::from(tmp);
        if let Ok(mut l) = PARTIAL_FILES.lock() {
            l.push(tmp.clone());
        }
        AtomicFile {
            tmp,
            target: target.to_path_buf(),
            done: false,
        }
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The path the file will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `bytes` through `write` into a new temporary file and commits it: the whole
    /// of an atomic write for contents made in one go. Errors name the target.
    pub fn write_with(
        target: &Path,
        write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
    ) -> Result<()> {
        let name_target = |e: &dyn std::fmt::Display| {
            Error::Io(format!("{}: cannot write: {e}", target.display()))
        };
        if target.file_name().is_none() || target.is_dir() {
            return Err(name_target(&"not a file path"));
        }
        let file = AtomicFile::new(target, ".partial");
        let f = std::fs::File::create(file.path()).map_err(|e| name_target(&e))?;
        let mut w = std::io::BufWriter::new(f);
        write(&mut w).map_err(|e| name_target(&e))?;
        w.into_inner().map_err(|e| name_target(&e.into_error()))?;
        file.commit().map_err(|e| name_target(&e))
    }

    /// Fsyncs the temporary file, renames it to the target and fsyncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let f = std::fs::File::open(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
        if let Ok(mut l) = PARTIAL_FILES.lock() {
            l.retain(|p| p != &self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pali-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_keeps_the_old_file() {
        let d = scratch("fail");
        let target = d.join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        let e = AtomicFile::write_with(&target, |w| {
            std::io::Write::write_all(w, b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("out.bin") && e.contains("disk full"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert!(!d.join("out.bin.partial").exists());
        AtomicFile::write_with(&target, |w| std::io::Write::write_all(w, b"new")).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }

    #[test]
    fn uncommitted_files_are_removed_and_unregistered() {
        let d = scratch("drop");
        let f = AtomicFile::new(&d.join("x.gguf"), ".src.partial");
        std::fs::write(f.path(), b"data").unwrap();
        assert!(PARTIAL_FILES
            .lock()
            .unwrap()
            .contains(&f.path().to_path_buf()));
        let tmp = f.path().to_path_buf();
        drop(f);
        assert!(!tmp.exists());
        assert!(!PARTIAL_FILES.lock().unwrap().contains(&tmp));
        let e = AtomicFile::write_with(&d, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a file path"), "{e}");
    }
}
