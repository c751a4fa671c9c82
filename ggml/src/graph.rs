//! Safe building blocks for running our own ggml graphs (the SigLIP tower, the segmentation
//! mask decoder) on the same ggml backend llama.cpp uses: a [`Backend`], [`Weights`] that
//! point ggml tensors into a GGUF file (zero-copy mmap on the CPU, uploaded once on a GPU),
//! and a [`Graph`] builder whose [`Tensor`] handles cannot outlive it.

use crate::gguf::GgufFile;
use crate::{sys, Error, GgmlType, Result};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr;

/// A ggml compute backend (CPU, or the GPU of a `cuda`/`vulkan`/`metal` build).
///
/// Everything goes through ggml's device registry (no `ggml_backend_cpu_*` symbols), so the
/// same code runs when the CPU backend is a module picked at run time (`dynamic-backends`).
pub struct Backend {
    raw: sys::ggml_backend_t,
    dev: sys::ggml_backend_dev_t,
    is_cpu: bool,
    threads: i32,
    set_threads: sys::ggml_backend_set_n_threads_t,
}

// SAFETY: a backend handle is only used through &mut self or from one thread at a time.
unsafe impl Send for Backend {}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: owned handle, freed once.
        unsafe { sys::ggml_backend_free(self.raw) }
    }
}

impl Backend {
    /// The GPU backend if `gpu` is asked for and one is compiled in and present, else the CPU.
    pub fn new(gpu: bool, threads: i32) -> Result<Self> {
        crate::logging::init();
        // SAFETY: device queries and init return NULL on failure, which is checked.
        unsafe {
            if gpu {
                let dev = local_gpu_raw();
                if !dev.is_null() {
                    let raw = sys::ggml_backend_dev_init(dev, ptr::null());
                    if !raw.is_null() {
                        return Ok(Backend {
                            raw,
                            dev,
                            is_cpu: false,
                            threads,
                            set_threads: None,
                        });
                    }
                }
                log::warn!("no local GPU backend available; the vision tower runs on the CPU");
            }
            let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
            let raw = if dev.is_null() {
                ptr::null_mut()
            } else {
                sys::ggml_backend_dev_init(dev, ptr::null())
            };
            if raw.is_null() {
                return Err(Error::Backend(
                    "ggml could not start its CPU backend".into(),
                ));
            }
            let set_threads: sys::ggml_backend_set_n_threads_t =
                crate::cpu_proc(c"ggml_backend_set_n_threads").and_then(|f| {
                    std::mem::transmute::<*mut std::ffi::c_void, sys::ggml_backend_set_n_threads_t>(
                        f,
                    )
                });
            let b = Backend {
                raw,
                dev,
                is_cpu: true,
                threads,
                set_threads,
            };
            b.apply_threads();
            Ok(b)
        }
    }

    /// Sets the CPU thread count on the backend (ggml keeps it per backend).
    fn apply_threads(&self) {
        if let Some(f) = self.set_threads {
            // SAFETY: the CPU backend's own setter, called on its backend.
            unsafe { f(self.raw, self.threads.max(1)) }
        }
    }

    /// Whether this is the CPU backend.
    pub fn is_cpu(&self) -> bool {
        self.is_cpu
    }

    /// Threads used on the CPU.
    pub fn threads(&self) -> i32 {
        self.threads
    }

    /// The backend's name (`CPU`, `CUDA0`, …).
    pub fn name(&self) -> String {
        // SAFETY: static string owned by the backend.
        unsafe {
            std::ffi::CStr::from_ptr(sys::ggml_backend_name(self.raw))
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// This machine's GPU device for pali's own graphs, or NULL: the first discrete GPU, else the
/// first integrated one (llama.cpp's loader takes integrated GPUs only when there is no
/// discrete one; a laptop's Vulkan device is one). RPC servers register as GPU devices too,
/// but pali's own graphs (the vision tower) stay on this machine.
pub(crate) fn local_gpu_raw() -> sys::ggml_backend_dev_t {
    crate::logging::init();
    // SAFETY: registry enumeration of valid devices.
    unsafe {
        let local: Vec<sys::ggml_backend_dev_t> = (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .filter(|d| !crate::rpc::is_remote(*d))
            .collect();
        [
            sys::GGML_BACKEND_DEVICE_TYPE_GPU,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU,
        ]
        .iter()
        .find_map(|&t| {
            local
                .iter()
                .copied()
                .find(|d| sys::ggml_backend_dev_type(*d) == t)
        })
        .unwrap_or(ptr::null_mut())
    }
}

/// Whether this machine has a GPU device for ggml (a GPU build with a GPU present).
pub fn has_local_gpu() -> bool {
    !local_gpu_raw().is_null()
}

/// ggml's tensor data alignment (`TENSOR_ALIGNMENT` in ggml-impl.h).
const TENSOR_ALIGNMENT: u64 = 32;

/// The tensors of a GGUF file, readable by graphs on one backend.
pub struct Weights {
    file: GgufFile,
    _map: crate::mapped::MappedFile,
    buffer: sys::ggml_backend_buffer_t,
    on_cpu: bool,
}

// SAFETY: the buffer and contexts are owned and not shared with other threads concurrently.
unsafe impl Send for Weights {}

impl Drop for Weights {
    fn drop(&mut self) {
        // SAFETY: owned buffer, freed before the mapping it may point into (field order).
        unsafe { sys::ggml_backend_buffer_free(self.buffer) }
    }
}

impl Weights {
    /// Maps `path` and makes its tensors usable on `backend`: the CPU computes straight from
    /// the page cache; other backends get one upload.
    pub fn load(path: &Path, backend: &Backend) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let map = crate::mapped::MappedFile::open(path)?;
        let data = file.data_offset() as usize;
        let infos = file.tensors();
        // ggml aborts on a host buffer or tensor that is not 32-byte aligned (a file with a
        // small general.alignment, or no tensors and so an unpadded data section).
        if infos.is_empty() {
            return Err(Error::Invalid(format!("{}: no tensors", path.display())));
        }
        if let Some(t) = std::iter::once(data as u64)
            .chain(infos.iter().map(|t| t.offset))
            .position(|o| o % TENSOR_ALIGNMENT != 0)
        {
            let what = if t == 0 {
                "the tensor data".to_string()
            } else {
                format!("tensor {}", infos[t - 1].name)
            };
            return Err(Error::Invalid(format!(
                "{}: {what} is not {TENSOR_ALIGNMENT}-byte aligned in the file (general.alignment too small?)",
                path.display()
            )));
        }
        // The table was checked against the file's length at open; the file may have
        // shrunk since (the mapping is what counts).
        for t in &infos {
            if data as u64 + t.offset + t.size > map.len() as u64 {
                return Err(Error::Invalid(format!(
                    "{}: tensor {} runs past the end of the file (truncated?)",
                    path.display(),
                    t.name
                )));
            }
        }
        let meta = file.raw_meta_ctx();
        // SAFETY: all pointers come from ggml; each tensor's data range was checked above.
        let buffer = unsafe {
            if backend.is_cpu {
                let base = map.as_ptr().add(data) as *mut std::ffi::c_void;
                let size = map.len() - data;
                let buf = sys::ggml_backend_dev_buffer_from_host_ptr(backend.dev, base, size, size);
                if buf.is_null() {
                    return Err(Error::Backend(
                        "ggml could not wrap the mapped weights".into(),
                    ));
                }
                for (t, &raw) in infos.iter().zip(file.raw_tensors()) {
                    sys::ggml_backend_tensor_alloc(buf, raw, base.add(t.offset as usize));
                }
                buf
            } else {
                let buf = sys::ggml_backend_alloc_ctx_tensors(meta, backend.raw);
                if buf.is_null() {
                    return Err(Error::Backend(format!(
                        "could not allocate {} on {}",
                        path.display(),
                        backend.name()
                    )));
                }
                for (t, &raw) in infos.iter().zip(file.raw_tensors()) {
                    let src = map.as_ptr().add(data + t.offset as usize);
                    sys::ggml_backend_tensor_set(raw, src as *const _, 0, t.size as usize);
                }
                buf
            }
        };
        // SAFETY: valid buffer.
        unsafe {
            sys::ggml_backend_buffer_set_usage(buffer, sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        };
        Ok(Weights {
            file,
            _map: map,
            buffer,
            on_cpu: backend.is_cpu,
        })
    }

    /// The GGUF metadata.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// A handle to a tensor of a [`Graph`] (or a weight), valid while the graph lives.
#[derive(Clone, Copy)]
pub struct Tensor<'g> {
    raw: *mut sys::ggml_tensor,
    _g: PhantomData<&'g ()>,
}

impl Tensor<'_> {
    /// ggml shape.
    pub fn ne(&self) -> [i64; 4] {
        // SAFETY: valid tensor for the graph's lifetime.
        unsafe { (*self.raw).ne }
    }

    /// Element type.
    pub fn ty(&self) -> GgmlType {
        // SAFETY: as above.
        GgmlType(unsafe { (*self.raw).type_ })
    }

    /// Whether the elements lie densely in memory in ggml order.
    pub fn is_contiguous(&self) -> bool {
        // SAFETY: as above.
        unsafe { sys::ggml_is_contiguous(self.raw) }
    }
}

/// A computation graph under construction, then run on a backend.
pub struct Graph<'w> {
    ctx: *mut sys::ggml_context,
    gf: *mut sys::ggml_cgraph,
    weights: &'w Weights,
    inputs: std::cell::RefCell<Vec<(*mut sys::ggml_tensor, Vec<u8>)>>,
    galloc: std::cell::Cell<sys::ggml_gallocr_t>,
}

impl Drop for Graph<'_> {
    fn drop(&mut self) {
        // SAFETY: owned allocator and context, freed once.
        unsafe {
            if !self.galloc.get().is_null() {
                sys::ggml_gallocr_free(self.galloc.get());
            }
            sys::ggml_free(self.ctx);
        }
    }
}

const MAX_NODES: usize = 8192;

macro_rules! unary {
    ($(#[$m:meta])* $name:ident, $f:ident) => {
        $(#[$m])*
        pub fn $name(&self, a: Tensor<'_>) -> Tensor<'_> {
            // SAFETY: valid context and tensor.
            self.wrap(unsafe { sys::$f(self.ctx, a.raw) })
        }
    };
}
macro_rules! binary {
    ($(#[$m:meta])* $name:ident, $f:ident) => {
        $(#[$m])*
        pub fn $name(&self, a: Tensor<'_>, b: Tensor<'_>) -> Tensor<'_> {
            // SAFETY: valid context and tensors; ggml asserts shape compatibility.
            self.wrap(unsafe { sys::$f(self.ctx, a.raw, b.raw) })
        }
    };
}

impl<'w> Graph<'w> {
    /// A new, empty graph reading weights from `weights`.
    pub fn new(weights: &'w Weights) -> Self {
        // SAFETY: metadata-only context sized for MAX_NODES tensors and one graph.
        unsafe {
            let mem = sys::ggml_tensor_overhead() * MAX_NODES
                + sys::ggml_graph_overhead_custom(MAX_NODES, false);
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: mem,
                mem_buffer: ptr::null_mut(),
                no_alloc: true,
            });
            let gf = sys::ggml_new_graph_custom(ctx, MAX_NODES, false);
            Graph {
                ctx,
                gf,
                weights,
                inputs: Default::default(),
                galloc: std::cell::Cell::new(ptr::null_mut()),
            }
        }
    }

    fn wrap(&self, raw: *mut sys::ggml_tensor) -> Tensor<'_> {
        assert!(!raw.is_null(), "ggml returned no tensor");
        Tensor {
            raw,
            _g: PhantomData,
        }
    }

    /// A weight of the GGUF file by name.
    pub fn weight(&self, name: &str) -> Result<Tensor<'_>> {
        let raw = self.weights.file.raw_tensor(name).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: tensor {name} is missing",
                self.weights.file.path().display()
            ))
        })?;
        Ok(self.wrap(raw))
    }

    /// A tensor of another file's [`Weights`] loaded on the same backend (a LoRA adapter's,
    /// next to the base weights of [`Graph::new`]), by name; `None` if it has none so named.
    pub fn weight_from(&self, weights: &'w Weights, name: &str) -> Result<Option<Tensor<'_>>> {
        if weights.on_cpu != self.weights.on_cpu {
            return Err(Error::Invalid(format!(
                "{} is loaded on another backend than {}",
                weights.file.path().display(),
                self.weights.file.path().display()
            )));
        }
        Ok(weights.file.raw_tensor(name).map(|raw| self.wrap(raw)))
    }

    /// An F32 input tensor of shape `ne` filled with `data` when the graph runs.
    pub fn input(&self, ne: &[i64], data: Vec<f32>) -> Tensor<'_> {
        assert_eq!(
            ne.iter().product::<i64>() as usize,
            data.len(),
            "input size"
        );
        self.input_bytes(
            ne,
            sys::GGML_TYPE_F32,
            data.iter().flat_map(|v| v.to_ne_bytes()).collect(),
        )
    }

    /// An I32 input tensor of shape `ne` filled with `data` when the graph runs (row indices
    /// for [`Graph::get_rows`]).
    pub fn input_i32(&self, ne: &[i64], data: Vec<i32>) -> Tensor<'_> {
        assert_eq!(
            ne.iter().product::<i64>() as usize,
            data.len(),
            "input size"
        );
        self.input_bytes(
            ne,
            sys::GGML_TYPE_I32,
            data.iter().flat_map(|v| v.to_ne_bytes()).collect(),
        )
    }

    fn input_bytes(&self, ne: &[i64], ty: sys::ggml_type, bytes: Vec<u8>) -> Tensor<'_> {
        // SAFETY: valid context; the tensor is allocated by the graph allocator later.
        let raw = unsafe {
            let t = sys::ggml_new_tensor(self.ctx, ty, ne.len() as i32, ne.as_ptr());
            sys::ggml_set_input(t);
            t
        };
        self.inputs.borrow_mut().push((raw, bytes));
        self.wrap(raw)
    }

    binary!(
        #[doc = "`a·b` over ne0 (weights first): result `[a.ne1, b.ne1, …]`."]
        mul_mat,
        ggml_mul_mat
    );
    /// [`Graph::mul_mat`] with F32 accumulation demanded (`GGML_PREC_F32`): GPU backends
    /// otherwise accumulate F16·F16 products in F16 where the device allows it (ggml-vulkan's
    /// `f16acc` kernels), which over the vision tower's rows tripled its error on lavapipe.
    /// The CPU accumulates in F32 either way.
    pub fn mul_mat_f32_acc(&self, a: Tensor<'_>, b: Tensor<'_>) -> Tensor<'_> {
        // SAFETY: valid context and tensors; set_prec only writes the op's parameters.
        self.wrap(unsafe {
            let t = sys::ggml_mul_mat(self.ctx, a.raw, b.raw);
            sys::ggml_mul_mat_set_prec(t, sys::GGML_PREC_F32);
            t
        })
    }
    /// `w·x` on the BLAS library's SGEMM (see [`crate::blas`]): F32 `[w.ne1, x.ne1]`, with
    /// F32 activations and `w` widened to F32 row by row. `None` where that path does not
    /// apply: a build without the `blas` feature, `PALI_NO_BLAS` set, weights on a GPU, or
    /// operands that are not 2-D, contiguous, F32 activations.
    pub fn mul_mat_blas(&self, w: Tensor<'_>, x: Tensor<'_>) -> Option<Tensor<'_>> {
        // SAFETY: valid tensors of this graph; the op's sources are exactly those `supports`
        // checked, and the callback only reads them and writes its F32 result.
        unsafe {
            if !self.weights.on_cpu || !crate::blas::supports(w.raw, x.raw) {
                return None;
            }
            let mut args = [w.raw, x.raw];
            Some(self.wrap(sys::ggml_custom_4d(
                self.ctx,
                sys::GGML_TYPE_F32,
                (*w.raw).ne[1],
                (*x.raw).ne[1],
                1,
                1,
                args.as_mut_ptr(),
                2,
                Some(crate::blas::gemm_op),
                -1, // GGML_N_TASKS_MAX: every thread of the CPU backend
                ptr::null_mut(),
            )))
        }
    }
    /// SigLIP's tanh GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, in one pass of pali's
    /// own CPU kernel (see `gelu.rs`; ggml's `gelu` uses an F16 table). `None` off the CPU,
    /// for a non-F32 or non-contiguous `x`, and on ARM (measured faster on x86-64 only; no
    /// ARM board could be timed here): build it from ggml ops then.
    pub fn gelu_tanh(&self, x: Tensor<'_>) -> Option<Tensor<'_>> {
        if !cfg!(target_arch = "x86_64")
            || !self.weights.on_cpu
            || x.ty() != GgmlType::F32
            || !x.is_contiguous()
        {
            return None;
        }
        // SAFETY: valid context and tensor; the op writes exactly its own F32 elements.
        Some(self.wrap(unsafe {
            sys::ggml_map_custom1(
                self.ctx,
                x.raw,
                Some(crate::gelu::gelu_op),
                -1,
                ptr::null_mut(),
            )
        }))
    }
    binary!(
        #[doc = "Element-wise sum with broadcasting of `b`."]
        add,
        ggml_add
    );
    binary!(
        #[doc = "Element-wise product with broadcasting of `b`."]
        mul,
        ggml_mul
    );
    unary!(
        #[doc = "tanh."]
        tanh,
        ggml_tanh
    );
    unary!(
        #[doc = "Makes a tensor contiguous."]
        cont,
        ggml_cont
    );
    unary!(
        #[doc = "ReLU, `max(x, 0)`."]
        relu,
        ggml_relu
    );

    /// Rows of `a` (`[n, rows, …]`) picked by the I32 indices in `idx` (`[k]`, see
    /// [`Graph::input_i32`]): result `[n, k]`, F32.
    pub fn get_rows(&self, a: Tensor<'_>, idx: Tensor<'_>) -> Tensor<'_> {
        assert_eq!(
            idx.ty().0,
            sys::GGML_TYPE_I32,
            "get_rows indices must be I32"
        );
        assert!(
            idx.ne()[1..].iter().all(|&d| d == 1) && a.ne()[2..].iter().all(|&d| d == 1),
            "get_rows: 2-D table and 1-D indices only"
        );
        // SAFETY: valid context and tensors; types and ranks checked above (ggml checks
        // each index against the row count when it runs).
        self.wrap(unsafe { sys::ggml_get_rows(self.ctx, a.raw, idx.raw) })
    }

    /// 2-D im2col for a convolution with `kernel` (`[kw, kh, c_in, c_out]`, only its shape is
    /// used) over `data` (`[w, h, c_in, n]`, F32, contiguous), stride 1, zero padding `pad`
    /// on every side, computed in F32 (ggml's `conv_2d` rounds to F16). Result
    /// `[c_in·kh·kw, w_out, h_out, n]`, each column ordered (c_in, ky, kx) like the kernel's
    /// memory, so `mul_mat(reshape(cols, [k, w_out·h_out]), reshape(kernel, [k, c_out]))`
    /// is the convolution, `[w_out·h_out, c_out]`.
    pub fn im2col(&self, kernel: Tensor<'_>, data: Tensor<'_>, pad: i32) -> Tensor<'_> {
        let (k, d) = (kernel.ne(), data.ne());
        assert_eq!(k[2], d[2], "im2col: kernel and data channels differ");
        assert!(
            d[0] + 2 * i64::from(pad) >= k[0] && d[1] + 2 * i64::from(pad) >= k[1],
            "im2col: data smaller than the kernel"
        );
        assert!(
            data.is_contiguous() && data.ty() == GgmlType::F32,
            "im2col: F32 contiguous data"
        );
        // SAFETY: valid context and tensors; shapes checked above.
        self.wrap(unsafe {
            sys::ggml_im2col(
                self.ctx,
                kernel.raw,
                data.raw,
                1,
                1,
                pad,
                pad,
                1,
                1,
                true,
                sys::GGML_TYPE_F32,
            )
        })
    }

    /// Transposed 2-D convolution without padding (PyTorch `ConvTranspose2d(padding=0)`):
    /// `kernel` `[kw, kh, c_out, c_in]` (F32 or F16: the PyTorch `[in, out, kh, kw]` layout
    /// as stored), `data` `[w, h, c_in, n]` F32. Result `[(w-1)·s + kw, (h-1)·s + kh, c_out,
    /// n]`, F32. With an F32 kernel the CPU computes in F32.
    pub fn conv_transpose_2d_p0(
        &self,
        kernel: Tensor<'_>,
        data: Tensor<'_>,
        stride: i32,
    ) -> Tensor<'_> {
        assert_eq!(
            kernel.ne()[3],
            data.ne()[2],
            "conv_transpose_2d: kernel and data channels differ"
        );
        assert!(stride > 0, "conv_transpose_2d: stride must be positive");
        assert!(data.ty() == GgmlType::F32, "conv_transpose_2d: F32 data");
        // SAFETY: valid context and tensors; channels checked above.
        self.wrap(unsafe { sys::ggml_conv_transpose_2d_p0(self.ctx, kernel.raw, data.raw, stride) })
    }

    /// A view of the `w` × `h` window at (`x0`, `y0`) of every plane of `a` (dims 0 and 1
    /// cropped, dims 2 and 3 kept). Not contiguous: follow with [`Graph::cont`] where needed.
    pub fn crop_2d(&self, a: Tensor<'_>, x0: i64, y0: i64, w: i64, h: i64) -> Tensor<'_> {
        let ne = a.ne();
        assert!(
            x0 >= 0 && y0 >= 0 && w > 0 && h > 0 && x0 + w <= ne[0] && y0 + h <= ne[1],
            "crop_2d: window {w}x{h} at ({x0}, {y0}) outside {}x{}",
            ne[0],
            ne[1]
        );
        // SAFETY: valid context and tensor; the window lies inside `a` (checked above), with
        // `a`'s own strides.
        self.wrap(unsafe {
            let nb = (*a.raw).nb;
            sys::ggml_view_4d(
                self.ctx,
                a.raw,
                w,
                h,
                ne[2],
                ne[3],
                nb[1],
                nb[2],
                nb[3],
                x0 as usize * nb[0] + y0 as usize * nb[1],
            )
        })
    }

    /// `a` (`[n, …]`) with zero rows appended along ne0 up to `rows`.
    pub fn pad_rows(&self, a: Tensor<'_>, rows: i64) -> Tensor<'_> {
        let n = a.ne()[0];
        assert!(rows >= n, "pad_rows: {rows} rows is fewer than {n}");
        // SAFETY: valid context and tensor; a non-negative padding.
        self.wrap(unsafe { sys::ggml_pad(self.ctx, a.raw, (rows - n) as i32, 0, 0, 0) })
    }

    /// Normalises over ne0 (mean 0, variance 1): the LayerNorm core.
    pub fn norm(&self, a: Tensor<'_>, eps: f32) -> Tensor<'_> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_norm(self.ctx, a.raw, eps) })
    }

    /// `a·s + b` element-wise.
    pub fn scale_bias(&self, a: Tensor<'_>, s: f32, b: f32) -> Tensor<'_> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_scale_bias(self.ctx, a.raw, s, b) })
    }

    /// `a·s`.
    pub fn scale(&self, a: Tensor<'_>, s: f32) -> Tensor<'_> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_scale(self.ctx, a.raw, s) })
    }

    /// View with a new shape (same number of elements; `a` must be contiguous).
    pub fn reshape(&self, a: Tensor<'_>, ne: &[i64]) -> Tensor<'_> {
        // SAFETY: valid context and tensor; ggml asserts the element count.
        self.wrap(unsafe {
            match ne.len() {
                1 => sys::ggml_reshape_1d(self.ctx, a.raw, ne[0]),
                2 => sys::ggml_reshape_2d(self.ctx, a.raw, ne[0], ne[1]),
                3 => sys::ggml_reshape_3d(self.ctx, a.raw, ne[0], ne[1], ne[2]),
                _ => sys::ggml_reshape_4d(self.ctx, a.raw, ne[0], ne[1], ne[2], ne[3]),
            }
        })
    }

    /// Permutes axes (ggml semantics: axis i of `a` goes to position `axes[i]`).
    pub fn permute(&self, a: Tensor<'_>, axes: [i32; 4]) -> Tensor<'_> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_permute(self.ctx, a.raw, axes[0], axes[1], axes[2], axes[3]) })
    }

    /// Converts to another element type.
    pub fn cast(&self, a: Tensor<'_>, ty: GgmlType) -> Tensor<'_> {
        // SAFETY: valid context and tensor.
        self.wrap(unsafe { sys::ggml_cast(self.ctx, a.raw, ty.0) })
    }

    /// Unmasked attention `softmax(q·kᵀ·scale)·v` in one fused op, accumulating in F32.
    /// q, k, v: `[head_dim, tokens, heads]`. Result: `[head_dim, heads, tokens]`.
    pub fn flash_attn(
        &self,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        scale: f32,
    ) -> Tensor<'_> {
        // SAFETY: valid context and tensors; no mask, no ALiBi, no soft-cap.
        self.wrap(unsafe {
            let t = sys::ggml_flash_attn_ext(
                self.ctx,
                q.raw,
                k.raw,
                v.raw,
                ptr::null_mut(),
                scale,
                0.0,
                0.0,
            );
            sys::ggml_flash_attn_ext_set_prec(t, sys::GGML_PREC_F32);
            t
        })
    }

    /// `softmax(a·scale)` over ne0, unmasked.
    pub fn soft_max_scaled(&self, a: Tensor<'_>, scale: f32) -> Tensor<'_> {
        // SAFETY: valid context and tensor; no mask, no ALiBi.
        self.wrap(unsafe { sys::ggml_soft_max_ext(self.ctx, a.raw, ptr::null_mut(), scale, 0.0) })
    }

    /// Whether `backend` can run the op that makes `t` (a GPU backend may lack a kernel for
    /// some shapes, e.g. flash attention for head sizes it was not built for).
    pub fn supports(&self, t: Tensor<'_>, backend: &Backend) -> bool {
        // SAFETY: valid backend and tensor.
        unsafe { sys::ggml_backend_supports_op(backend.raw, t.raw) }
    }

    /// Runs the graph up to `out` on `backend` and returns `out`'s values (F32).
    /// The compute buffer is freed when the graph is dropped.
    pub fn compute(&self, out: Tensor<'_>, backend: &Backend) -> Result<Vec<f32>> {
        // SAFETY: all tensors belong to this context; the allocator sizes every buffer from
        // the graph; inputs are written with their exact byte sizes.
        unsafe {
            sys::ggml_set_output(out.raw);
            sys::ggml_build_forward_expand(self.gf, out.raw);
            if !self.galloc.get().is_null() {
                return Err(Error::Backend("a graph can only be computed once".into()));
            }
            // A backend aborts the process on an op it has no kernel for: refuse first.
            for i in 0..sys::ggml_graph_n_nodes(self.gf) {
                let node = sys::ggml_graph_node(self.gf, i);
                if !sys::ggml_backend_supports_op(backend.raw, node) {
                    let op = std::ffi::CStr::from_ptr(sys::ggml_op_desc(node)).to_string_lossy();
                    let ne = (*node).ne;
                    return Err(Error::Backend(format!(
                        "{} has no kernel for ggml op {op} of shape {ne:?}",
                        backend.name()
                    )));
                }
            }
            self.galloc.set(sys::ggml_gallocr_new(
                sys::ggml_backend_get_default_buffer_type(backend.raw),
            ));
            if !sys::ggml_gallocr_alloc_graph(self.galloc.get(), self.gf) {
                return Err(Error::Backend(format!(
                    "out of memory for a ggml graph on {}",
                    backend.name()
                )));
            }
            log::debug!(
                "graph: {} nodes, compute buffer {:.1} MiB on {}",
                sys::ggml_graph_n_nodes(self.gf),
                sys::ggml_gallocr_get_buffer_size(self.galloc.get(), 0) as f64 / (1 << 20) as f64,
                backend.name()
            );
            for (t, data) in self.inputs.borrow().iter() {
                sys::ggml_backend_tensor_set(*t, data.as_ptr() as *const _, 0, data.len());
            }
            backend.apply_threads();
            let st = sys::ggml_backend_graph_compute(backend.raw, self.gf);
            if st != sys::GGML_STATUS_SUCCESS {
                return Err(Error::Backend(format!(
                    "ggml graph compute failed with status {st}"
                )));
            }
            if (*out.raw).type_ != sys::GGML_TYPE_F32 {
                return Err(Error::Backend("graph output is not F32".into()));
            }
            let n = sys::ggml_nelements(out.raw) as usize;
            let mut v = vec![0f32; n];
            sys::ggml_backend_tensor_get(out.raw, v.as_mut_ptr() as *mut _, 0, n * 4);
            Ok(v)
        }
    }
}
