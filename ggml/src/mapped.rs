//! A clear report instead of a bare `SIGBUS` when a model file shrinks under pali.
//!
//! pali reads its model files through memory maps (its own tower and token embeddings,
//! llama.cpp's decoder, the converter's checkpoints). Linux cannot stop another process from
//! truncating or rewriting a mapped file in place (`cp new.gguf model.gguf` truncates first;
//! mandatory locks are gone since 5.15), and reading a page past the new end raises
//! `SIGBUS`, which kills the process without a word. Replacing a file by renaming
//! (`mv`, what `pali convert` does) is harmless: the old inode stays mapped.
//!
//! [`MappedFile`] is the one way pali maps a file; its mappings, and llama.cpp's, are
//! registered here ([`watch`]); a program that calls [`install_sigbus_report`]
//! (the pali binary does) then gets, for a fault inside one of them, one line on stderr
//! naming the file and exit status 74 (`EX_IOERR`). A fault anywhere else keeps the default
//! action. The process cannot go on after such a fault: the data it was reading is gone.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const SLOTS: usize = 64;
/// Longest message kept (a longer path is cut).
const MSG: usize = 512;

/// Exit status after a reported fault (`EX_IOERR` from sysexits.h).
pub const EXIT_FILE_CHANGED: i32 = 74;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// The message, in static memory a handler can read at any moment, and its length.
    msg: [AtomicU8; MSG],
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU8 = AtomicU8::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    msg: [ZERO; MSG],
    len: AtomicUsize::new(0),
};
static REGIONS: [Slot; SLOTS] = [EMPTY; SLOTS];

/// A registered mapping; dropping it unregisters the range (before the mapping goes).
#[derive(Debug)]
pub struct Watched {
    slot: Option<usize>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            REGIONS[i].end.store(0, Ordering::SeqCst);
            REGIONS[i].start.store(0, Ordering::SeqCst);
        }
    }
}

/// Registers `len` mapped bytes at `ptr` as the contents of `path`.
pub fn watch(ptr: *const u8, len: usize, path: &std::path::Path) -> Watched {
    if len == 0 {
        return Watched { slot: None };
    }
    let msg = format!(
        "pali: {} was truncated or overwritten while pali was reading it (its memory map lost \
         the pages); stopping. Replace model files with mv, not cp, while pali runs.\n",
        path.display()
    );
    let msg = &msg.as_bytes()[..msg.len().min(MSG)];
    for (i, s) in REGIONS.iter().enumerate() {
        if s.end.load(Ordering::SeqCst) == 0
            && s.start
                .compare_exchange(0, ptr as usize, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            for (d, &b) in s.msg.iter().zip(msg) {
                d.store(b, Ordering::Relaxed);
            }
            s.len.store(msg.len(), Ordering::SeqCst);
            s.end.store(ptr as usize + len, Ordering::SeqCst);
            return Watched { slot: Some(i) };
        }
    }
    log::debug!(
        "more than {SLOTS} mapped files: {} is not watched",
        path.display()
    );
    Watched { slot: None }
}

/// Registers every mapping of `path` this process has (from `/proc/self/maps`): for files
/// that llama.cpp maps itself.
pub fn watch_file_mappings(path: &std::path::Path) -> Vec<Watched> {
    let Ok(real) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let real = real.to_string_lossy();
    maps.lines()
        .filter(|l| l.split_whitespace().nth(5) == Some(&*real) && l.ends_with(&*real))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            let (a, b) = (
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            );
            Some(watch(a as *const u8, b.checked_sub(a)?, path))
        })
        .collect()
}

/// A whole file mapped read-only and registered for the fault report: the only memory map
/// in pali (its tower and mask weights, the decoder's token embeddings, the converter's
/// checkpoints).
pub struct MappedFile {
    // Unregistered before the mapping goes (field order).
    _watch: Watched,
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path`; errors name it.
    pub fn open(path: &std::path::Path) -> crate::Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
        // SAFETY: a read-only, private mapping of a file pali never writes. Another process
        // truncating it makes reads fault (SIGBUS), which the report above names; nothing
        // else can change the bytes under a shared reference.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::Error::io(path, e))?;
        Ok(MappedFile {
            _watch: watch(map.as_ptr(), map.len(), path),
            map,
        })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Tells the kernel that the pages holding `bytes()[start..end]` may be dropped: they
    /// are read from the file again if touched (keeps a streaming reader's resident memory
    /// at what it is working on). Ranges outside the file are clamped.
    pub fn release(&self, start: usize, end: usize) {
        const PAGE: usize = 4096;
        let end = end.min(self.map.len());
        let from = start / PAGE * PAGE;
        if from >= end {
            return;
        }
        // SAFETY: the mapping is private and read-only, so dropping its pages only means they
        // are read from the file again; the range lies inside the mapping.
        #[cfg(unix)]
        unsafe {
            let _ = self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                from,
                end - from,
            );
        }
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(unix)]
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; only
    // async-signal-safe calls (write, _exit, signal) follow, on a stack buffer.
    unsafe {
        let addr = (*info).si_addr() as usize;
        for s in &REGIONS {
            let (start, end) = (s.start.load(Ordering::SeqCst), s.end.load(Ordering::SeqCst));
            if start <= addr && addr < end {
                let mut buf = [0u8; MSG];
                let n = s.len.load(Ordering::SeqCst).min(MSG);
                for (d, b) in buf.iter_mut().zip(&s.msg).take(n) {
                    *d = b.load(Ordering::Relaxed);
                }
                libc::write(2, buf.as_ptr() as *const libc::c_void, n);
                libc::_exit(EXIT_FILE_CHANGED);
            }
        }
        // Not ours: let the fault happen again with the default action.
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Installs the `SIGBUS` handler described in the module documentation (Unix; a no-op
/// elsewhere). For programs, not libraries: a signal handler is process-wide.
pub fn install_sigbus_report() {
    #[cfg(unix)]
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well formed.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}
