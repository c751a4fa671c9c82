//! Matmuls of F32 activations on OpenBLAS's GEMM, inside pali's own ggml graphs (the `blas`
//! feature, x86-64 only).
//!
//! ggml's CPU matmul of F32 or F16 weights reaches about 70 GFLOP/s on 2 Zen 4 cores where
//! OpenBLAS's SGEMM reaches 180–190 (BENCHMARKS.md, "CPU time to first token"), and the vision
//! tower of an F16 mmproj is such matmuls. The product is a ggml custom op: each of ggml's
//! CPU threads multiplies its own slice of weight rows with a single-threaded SGEMM, so one
//! thread pool (ggml's) does all the work. ggml's BLAS backend was measured first and not
//! kept: OpenBLAS's own worker threads spin for ~0.1 s after each call (OPENBLAS_THREAD_TIMEOUT
//! is read only at load time) and took a core from ggml's threads between matmuls (tower
//! 2.12 s instead of 1.66 s), and llama.cpp picks that backend up for its decoder too, where
//! dequantize-then-SGEMM was slower than its own repacked kernels (prefill 6.9 s, not 4.9 s).
//!
//! F16 and BF16 weights are widened to F32 a chunk of rows at a time in a per-thread buffer;
//! activations stay F32 (ggml's F16 matmul would round them to F16). Q8_0 weights stay on
//! ggml's int8 kernels (see `supports`).

use crate::sys;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

#[cfg(pali_blas)]
mod ffi {
    use std::ffi::{c_char, c_int};
    pub const ROW_MAJOR: c_int = 101;
    pub const NO_TRANS: c_int = 111;
    pub const TRANS: c_int = 112;
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            order: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        pub fn openblas_set_num_threads(n: c_int);
        pub fn openblas_get_config() -> *const c_char;
        pub fn openblas_get_corename() -> *const c_char;
    }
}

/// Widened weight rows per SGEMM call: up to 4 MiB of F32 per thread (1 MiB chunks or a
/// thread's whole share measured the same within noise; 256 KiB slower).
const CHUNK_FLOATS: usize = 1 << 20;

/// OpenBLAS's build line (version, kernels chosen for this CPU) when pali was built with the
/// `blas` feature and `PALI_NO_BLAS` is not set; `None` otherwise.
pub fn library() -> Option<&'static str> {
    static LIB: OnceLock<Option<String>> = OnceLock::new();
    LIB.get_or_init(|| {
        if std::env::var_os("PALI_NO_BLAS").is_some_and(|v| !v.is_empty() && v != "0") {
            return None;
        }
        config()
    })
    .as_deref()
}

#[cfg(pali_blas)]
fn config() -> Option<String> {
    let chose = choose_kernels();
    // SAFETY: OpenBLAS's own calls; the config string is static. One thread per SGEMM call:
    // the calls run on ggml's threads, each on its own rows (see the module doc).
    let config = unsafe {
        ffi::openblas_set_num_threads(1);
        let s = std::ffi::CStr::from_ptr(ffi::openblas_get_config());
        s.to_string_lossy().trim().to_string()
    };
    Some(match chose {
        Some(note) => format!("{config} ({note})"),
        None => config,
    })
}

/// OpenBLAS's kernels for this CPU, as it named them (`Haswell`, `SkylakeX`, `Prescott`, …).
#[cfg(pali_blas)]
fn core_name() -> String {
    // SAFETY: OpenBLAS returns a static string.
    unsafe { std::ffi::CStr::from_ptr(ffi::openblas_get_corename()) }
        .to_string_lossy()
        .into_owned()
}

/// The kernels OpenBLAS should use on this CPU where it fell back to its SSE3 `Prescott`
/// ones, which it does on a CPU newer than its release: Debian bookworm's 0.3.21 on an
/// Intel Xeon of family 6 model 207 (Emerald Rapids) ran SGEMM at 63 GFLOP/s on 2 cores
/// with them and at 258 with `Cooperlake`'s (BENCHMARKS.md), and ggml's own F16 matmul
/// at 64. `None` where its choice stands.
#[cfg(pali_blas)]
fn better_kernels(current: &str) -> Option<&'static str> {
    if !current.eq_ignore_ascii_case("prescott") {
        return None;
    }
    let avx512 = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512cd");
    if avx512 && std::is_x86_feature_detected!("avx512bf16") {
        Some("Cooperlake")
    } else if avx512 {
        Some("SkylakeX")
    } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        Some("Haswell")
    } else {
        None
    }
}

/// Where OpenBLAS fell back to kernels far below this CPU ([`better_kernels`]) and the user
/// did not choose with `OPENBLAS_CORETYPE`, reruns OpenBLAS's own run-time selection (a
/// `DYNAMIC_ARCH` build: `gotoblas_dynamic_quit` / `gotoblas_dynamic_init`, looked up at
/// run time, so any other OpenBLAS build is left alone) with `OPENBLAS_CORETYPE` set, as if
/// the user had set it. Runs once, before pali's first SGEMM. Returns what it did.
#[cfg(pali_blas)]
fn choose_kernels() -> Option<String> {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return None;
    }
    let before = core_name();
    let wanted = better_kernels(&before)?;
    // SAFETY: dlsym on the process's global scope; the symbols, when present, are OpenBLAS's
    // `void f(void)` functions. No OpenBLAS call of pali's is running (this is its first);
    // the variable is set only for the rerun and removed at once.
    unsafe {
        let quit = libc::dlsym(libc::RTLD_DEFAULT, c"gotoblas_dynamic_quit".as_ptr());
        let init = libc::dlsym(libc::RTLD_DEFAULT, c"gotoblas_dynamic_init".as_ptr());
        if quit.is_null() || init.is_null() {
            return None;
        }
        let quit: extern "C" fn() = std::mem::transmute(quit);
        let init: extern "C" fn() = std::mem::transmute(init);
        std::env::set_var("OPENBLAS_CORETYPE", wanted);
        quit();
        init();
        std::env::remove_var("OPENBLAS_CORETYPE");
    }
    let after = core_name();
    let note = format!("OpenBLAS chose {before} for this CPU; pali chose {after}");
    log::info!("{note} (OPENBLAS_CORETYPE overrides)");
    Some(note)
}

#[cfg(not(pali_blas))]
fn config() -> Option<String> {
    None
}

/// Whether [`gemm_op`] can compute `w·x` (`w`: a 2-D contiguous F32, F16 or BF16 weight; `x`:
/// 2-D contiguous F32, as wide as `w`'s rows).
///
/// # Safety
/// Both pointers are valid ggml tensors.
pub(crate) unsafe fn supports(w: *const sys::ggml_tensor, x: *const sys::ggml_tensor) -> bool {
    let (w, x) = (&*w, &*x);
    // Float weights only: a Q8_0 tower keeps ggml's int8 kernels, which run as fast here
    // (1.61 s both ways at 3B-224) and are what ARM builds use.
    let converts = matches!(
        w.type_,
        sys::GGML_TYPE_F32 | sys::GGML_TYPE_F16 | sys::GGML_TYPE_BF16
    );
    library().is_some()
        && converts
        && x.type_ == sys::GGML_TYPE_F32
        && w.ne[0] == x.ne[0]
        && w.ne[2] == 1
        && w.ne[3] == 1
        && x.ne[2] == 1
        && x.ne[3] == 1
        && w.ne[0] <= c_int::MAX as i64
        && w.ne[1] <= c_int::MAX as i64
        && x.ne[1] <= c_int::MAX as i64
        && sys::ggml_is_contiguous(w)
        && sys::ggml_is_contiguous(x)
}

/// The custom op's body: `dst[n, m] = Σ_k w[k, n]·x[k, m]` for this thread's rows of `w`.
///
/// # Safety
/// Called by ggml's CPU backend on a node made by `Graph::mul_mat_blas` (sources checked by
/// [`supports`], `dst` F32 `[w.ne1, x.ne1]`), once per thread `ith` of `nth`.
pub(crate) unsafe extern "C" fn gemm_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _userdata: *mut c_void,
) {
    let (w, x) = (&*(*dst).src[0], &*(*dst).src[1]);
    let (k, n, m) = (w.ne[0] as usize, w.ne[1] as usize, x.ne[1] as usize);
    let per = n.div_ceil(nth.max(1) as usize);
    let (r0, r1) = (
        (ith as usize * per).min(n),
        ((ith as usize + 1) * per).min(n),
    );
    if r0 == r1 {
        return;
    }
    let (xs, out) = (x.data as *const f32, (*dst).data as *mut f32);
    if w.type_ == sys::GGML_TYPE_F32 {
        sgemm(
            m,
            r1 - r0,
            k,
            xs,
            (w.data as *const f32).add(r0 * k),
            out.add(r0),
            n,
        );
        return;
    }
    let Some(to_float) = (*sys::ggml_get_type_traits(w.type_)).to_float else {
        return; // unreachable: `supports` checked it
    };
    let rows = (CHUNK_FLOATS / k).clamp(1, r1 - r0);
    // Not zero-filled: every row SGEMM reads is written first (a zeroed 4 MiB per op and
    // thread would be ~1 GB of memset per 3B-224 image).
    let mut buf: Vec<f32> = Vec::with_capacity(rows * k);
    let mut c0 = r0;
    while c0 < r1 {
        let c1 = (c0 + rows).min(r1);
        for r in c0..c1 {
            let src = (w.data as *const u8).add(r * w.nb[1]) as *const c_void;
            widen(
                w.type_,
                src,
                buf.as_mut_ptr().add((r - c0) * k),
                k,
                to_float,
            );
        }
        sgemm(m, c1 - c0, k, xs, buf.as_ptr(), out.add(c0), n);
        c0 = c1;
    }
}

/// One weight row to F32. F16 and BF16 rows are converted here with SIMD: ggml's generic
/// row converter (`ggml_fp16_to_fp32_row`) is scalar and took 0.26 s of a 3B-224 tower's
/// 1.7 s (perf), the F16C loop about half of that (alternating runs: tower 1.57-1.75 s instead of
/// 1.69-1.87 s); the values are the same (every F16/BF16 value is exact in F32).
///
/// # Safety
/// `src` holds `k` values of type `ty`; `dst` has room for `k` F32 (initialized or not).
unsafe fn widen(
    ty: sys::ggml_type,
    src: *const c_void,
    dst: *mut f32,
    k: usize,
    to_float: ToFloat,
) {
    match ty {
        #[cfg(target_arch = "x86_64")]
        sys::GGML_TYPE_F16 if std::arch::is_x86_feature_detected!("f16c") => {
            f16_to_f32_f16c(src as *const u16, dst, k)
        }
        sys::GGML_TYPE_BF16 => {
            let src = std::slice::from_raw_parts(src as *const u16, k);
            for (i, &h) in src.iter().enumerate() {
                dst.add(i).write(f32::from_bits(u32::from(h) << 16));
            }
        }
        _ => to_float(src, dst, k as i64),
    }
}

type ToFloat = unsafe extern "C" fn(*const c_void, *mut f32, i64);

/// F16 → F32 with the F16C instruction, 8 values at a time (the tail one by one).
///
/// # Safety
/// `src` holds `n` F16 values and `dst` has room for `n` F32; the CPU has F16C (checked by
/// the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: *const u16, dst: *mut f32, n: usize) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(src.add(i) as *const __m128i);
        _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for j in i..n {
        let h = _mm_cvtsi32_si128(i32::from(*src.add(j)));
        dst.add(j).write(_mm_cvtss_f32(_mm_cvtph_ps(h)));
    }
}

/// `c[i, j] = Σ_l a[i, l]·b[j, l]` (row-major; `c`'s rows are `ldc` apart).
#[cfg(pali_blas)]
unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    // The sizes fit c_int: `supports` checked them.
    ffi::cblas_sgemm(
        ffi::ROW_MAJOR,
        ffi::NO_TRANS,
        ffi::TRANS,
        m as c_int,
        n as c_int,
        k as c_int,
        1.0,
        a,
        k as c_int,
        b,
        k as c_int,
        0.0,
        c,
        ldc as c_int,
    );
}

#[cfg(not(pali_blas))]
unsafe fn sgemm(_: usize, _: usize, _: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize) {
    unreachable!("library() is None without the blas feature, so no BLAS op is built")
}

#[cfg(all(test, pali_blas))]
mod tests {
    use super::*;

    /// After pali's set-up, OpenBLAS runs kernels that fit this CPU, not its SSE3 fallback
    /// (unless the user chose them with OPENBLAS_CORETYPE).
    #[test]
    fn kernels_fit_the_cpu() {
        let config = config().expect("a blas build");
        let name = core_name();
        println!("{config}; kernels {name}");
        if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
            assert_eq!(better_kernels(&name), None, "{config}");
        }
        assert!(config.contains(&name), "{config} names {name}");
    }
}
