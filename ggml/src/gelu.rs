//! SigLIP's tanh-approximated GELU as one ggml custom op on the CPU.
//!
//! ggml's own CPU `gelu` reads an F16 lookup table (too coarse for HF parity), so pali built
//! the function from seven ggml ops, whose `tanh` is a scalar libm call per element: 0.17 s
//! of the 3B-224 tower (perf). Here it is one pass with the identity
//! `0.5·(1 + tanh(z)) = 1 / (1 + e^(−2z))`, and an `exp` written so that the compiler
//! vectorizes the loop (Cephes' single-precision polynomial, ~1 ulp on the reduced range).

use crate::sys;
use std::ffi::{c_int, c_void};

/// `x·σ(2·√(2/π)·(x + 0.044715·x³))`, the tanh GELU.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let z = (2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-2.0 * z))
}

/// `e^x` in single precision for every finite `x` (clamped where `e^x` leaves f32's range),
/// branch-free so that loops over it vectorize.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·ln2 is exact in its high part (Cephes).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let e = p * r * r + r + 1.0;
    // 2^n by the exponent bits; n is in [-126, 127] after the clamp.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The custom op's body: this thread's share of the elements.
///
/// # Safety
/// Called by ggml's CPU backend on a node made by `Graph::gelu_tanh` (F32, contiguous, the
/// same shape as its source), once per thread `ith` of `nth`.
pub(crate) unsafe extern "C" fn gelu_op(
    dst: *mut sys::ggml_tensor,
    src: *const sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _userdata: *mut c_void,
) {
    let n = sys::ggml_nelements(dst) as usize;
    let per = n.div_ceil(nth.max(1) as usize);
    let (a, b) = (
        (ith as usize * per).min(n),
        ((ith as usize + 1) * per).min(n),
    );
    let x = std::slice::from_raw_parts(((*src).data as *const f32).add(a), b - a);
    let y = std::slice::from_raw_parts_mut(((*dst).data as *mut f32).add(a), b - a);
    for (y, &x) in y.iter_mut().zip(x) {
        *y = gelu_tanh(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        for i in -86_900..=87_900 {
            let x = i as f32 * 1e-3;
            let (ours, libm) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_equals_the_tanh_formula() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 1e-3;
            let xd = x as f64;
            let t = ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh();
            let want = 0.5 * xd * (1.0 + t);
            let got = gelu_tanh(x) as f64;
            // On GELU's own scale, |x|: where the result is tiny (x ≪ 0) its relative error
            // is that of x's rounding amplified, for HF's f32 formula too.
            assert!(
                (got - want).abs() <= 1e-6 * xd.abs().max(1e-3),
                "gelu({x}) = {got}, want {want}"
            );
        }
        assert!(gelu_tanh(-100.0).abs() < 1e-30);
        assert_eq!(gelu_tanh(100.0), 100.0);
    }
}
