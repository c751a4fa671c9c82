//! What ggml found on this machine: its registered backends (compiled in, or loaded as
//! modules in a `dynamic-backends` build) and their devices, and which device pali uses
//! (`pali info --backends`, in the spirit of `llama-cli --list-devices`).

use crate::sys;
use std::ffi::CStr;

/// The kind of a ggml device (`enum ggml_backend_dev_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU, system memory.
    Cpu,
    /// A GPU with its own memory.
    Gpu,
    /// An integrated GPU sharing system memory (laptops, Jetson).
    IntegratedGpu,
    /// An accelerator used together with the CPU (BLAS, AMX).
    Accelerator,
    /// Anything else ggml may add.
    Other,
}

impl DeviceKind {
    fn from_raw(t: sys::ggml_backend_dev_type) -> Self {
        match t {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
            _ => DeviceKind::Other,
        }
    }

    /// Short label: `CPU`, `GPU`, `iGPU`, `ACCEL`, `other`.
    pub fn label(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "CPU",
            DeviceKind::Gpu => "GPU",
            DeviceKind::IntegratedGpu => "iGPU",
            DeviceKind::Accelerator => "ACCEL",
            DeviceKind::Other => "other",
        }
    }
}

/// One device of ggml's registry.
#[derive(Debug, Clone)]
pub struct Device {
    /// ggml's device name (`CPU`, `Vulkan0`, `CUDA0`, `RPC0`, …).
    pub name: String,
    /// The backend that registered it (`CPU`, `Vulkan`, `CUDA`, `Metal`, `RPC`, …).
    pub backend: String,
    /// What the driver calls it (`llvmpipe (LLVM 15.0.6, 256 bits)`, the CPU model, …).
    pub description: String,
    /// Its kind.
    pub kind: DeviceKind,
    /// Free memory in bytes, as the device reports it.
    pub memory_free: usize,
    /// Total memory in bytes.
    pub memory_total: usize,
}

/// ggml's registered backends, each with its number of devices, in registry order.
pub fn registered() -> Vec<(String, usize)> {
    crate::logging::init();
    // SAFETY: registry enumeration; names are static strings owned by the backends.
    unsafe {
        (0..sys::ggml_backend_reg_count())
            .map(|i| {
                let reg = sys::ggml_backend_reg_get(i);
                (
                    CStr::from_ptr(sys::ggml_backend_reg_name(reg))
                        .to_string_lossy()
                        .into_owned(),
                    sys::ggml_backend_reg_dev_count(reg),
                )
            })
            .collect()
    }
}

/// Every device in ggml's registry, in registry order.
pub fn devices() -> Vec<Device> {
    crate::logging::init();
    // SAFETY: registry enumeration of valid devices; the strings are copied before the next
    // call.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| describe(sys::ggml_backend_dev_get(i)))
            .collect()
    }
}

/// # Safety
/// `dev` must be a device of ggml's registry.
pub(crate) unsafe fn describe(dev: sys::ggml_backend_dev_t) -> Device {
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NUL-terminated strings owned by the device.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: valid device (caller); the registry and names live as long as the program.
    unsafe {
        sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        Device {
            name: text(sys::ggml_backend_dev_name(dev)),
            backend: if reg.is_null() {
                String::new()
            } else {
                text(sys::ggml_backend_reg_name(reg))
            },
            description: text(sys::ggml_backend_dev_description(dev)),
            kind: DeviceKind::from_raw(sys::ggml_backend_dev_type(dev)),
            memory_free: free,
            memory_total: total,
        }
    }
}

/// The GPU backends this build was compiled with, as (what users call it, ggml's registry
/// name): the cargo features, and Metal on Apple platforms, where ggml's CMake turns it on
/// by default and llama-cpp-sys-2 leaves it on whether or not `metal` is asked for.
pub fn compiled_gpu_backends() -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    if cfg!(feature = "cuda") {
        v.push(("CUDA", "CUDA"));
    }
    if cfg!(feature = "vulkan") {
        v.push(("Vulkan", "Vulkan"));
    }
    if cfg!(feature = "metal") || (cfg!(target_vendor = "apple") && !cfg!(target_os = "watchos")) {
        v.push(("Metal", "MTL"));
    }
    v
}

/// The local GPU pali uses (the decoder's layers with `-ngl`, and the vision tower), as
/// llama.cpp picks: the first discrete GPU, else the first integrated one; RPC devices are
/// another machine's and never take the vision tower. `None` on a CPU-only machine or
/// build.
pub fn local_gpu() -> Option<Device> {
    let dev = crate::graph::local_gpu_raw();
    // SAFETY: a device of the registry (or NULL, checked).
    (!dev.is_null()).then(|| unsafe { describe(dev) })
}

/// Why a GPU build runs on the CPU here, in one line (for the notice printed when no GPU
/// is usable): which GPU backends were compiled in and what ggml made of them. `None` for
/// a CPU-only build (nothing to say) or when a GPU is usable.
pub fn no_gpu_reason() -> Option<String> {
    let compiled = compiled_gpu_backends();
    if compiled.is_empty() || local_gpu().is_some() {
        return None;
    }
    let regs = registered();
    let parts: Vec<String> = compiled
        .iter()
        .map(|(b, reg)| match regs.iter().find(|(r, _)| r == reg) {
            Some((_, 0)) => format!("{b} found no GPU device"),
            Some((_, n)) => format!("{b} has {n} device(s), none usable"),
            None if cfg!(feature = "dynamic-backends") => {
                format!("the {b} module did not load or start: no {b} loader or driver installed?")
            }
            None => format!("{b} did not start: no {b} driver installed?"),
        })
        .collect();
    Some(parts.join("; "))
}
