//! What pali asks of the operating system: cores, RAM, this process's memory, and whether
//! a GPU build found a GPU.

/// Total RAM in bytes (Linux `MemTotal`), if known.
pub fn total_ram_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The one line a GPU build (`--features vulkan|cuda|metal`) prints when this machine has no
/// GPU it can use and everything runs on the CPU; `None` for a CPU-only build or when a
/// GPU is usable.
pub fn no_gpu_notice() -> Option<String> {
    pali_ggml::backends::no_gpu_reason()
        .map(|why| format!("no usable GPU ({why}); running on the CPU"))
}

/// Physical core count (hyper-threads do not help ggml's matmuls); logical CPUs where the
/// topology is unknown.
pub fn default_threads() -> i32 {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    physical_cores().unwrap_or(logical).clamp(1, 64) as i32
}

/// Distinct (package, core) pairs among the CPUs this process may run on (Linux sysfs).
fn physical_cores() -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
        let path = entry.ok()?.path();
        let name = path.file_name()?.to_string_lossy().into_owned();
        if !name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(path.join("topology").join(f)).ok();
        if let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) {
            cores.insert((pkg.trim().to_string(), core.trim().to_string()));
        }
    }
    let logical = std::thread::available_parallelism().map(|n| n.get()).ok()?;
    // Inside a cgroup/affinity limit, never exceed the CPUs we may use.
    (!cores.is_empty()).then(|| cores.len().min(logical))
}

/// This process's resident memory in MiB, split into anonymous pages (heap, KV cache, compute
/// buffers: what must fit in RAM) and file-backed pages (the memory-mapped model files, which
/// the kernel can drop and read again under memory pressure). Linux only.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MemoryUse {
    /// Resident set size (`VmRSS`).
    pub rss_mib: f64,
    /// Anonymous resident pages (`RssAnon`).
    pub anon_mib: f64,
    /// File-backed resident pages (`RssFile`), e.g. mapped weights.
    pub file_mib: f64,
}

impl MemoryUse {
    /// The current split, if `/proc/self/status` has it.
    pub fn now() -> Option<Self> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(MemoryUse {
            rss_mib: status_mib(&s, "VmRSS:")?,
            anon_mib: status_mib(&s, "RssAnon:")?,
            file_mib: status_mib(&s, "RssFile:")?,
        })
    }
}

/// A `/proc/self/status` line's kB value, in MiB.
fn status_mib(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    status_mib(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}
