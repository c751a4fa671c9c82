//! Links OpenBLAS for the `blas` feature (see `src/blas.rs`) on x86-64 targets.
//!
//! On ARM, ggml's own dotprod/i8mm kernels stay: no ARM board could be timed here (qemu
//! cannot time), so nothing says a BLAS would win there. The feature is then a no-op, and so
//! it is, with a warning, where no OpenBLAS is found: the build works, only slower.

use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(pali_blas)");
    println!("cargo:rerun-if-env-changed=OPENBLAS_LIB_DIR");
    let wanted = std::env::var_os("CARGO_FEATURE_BLAS").is_some();
    let x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    if !(wanted && x86_64) {
        return;
    }
    let dirs = std::env::var_os("OPENBLAS_LIB_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib64",
                "/usr/lib",
                "/usr/local/lib",
            ]
            .map(PathBuf::from),
        );
    let found = dirs
        .into_iter()
        .find(|d| d.join("libopenblas.so").exists() || d.join("libopenblas.a").exists());
    match found {
        Some(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=openblas");
            println!("cargo:rustc-cfg=pali_blas");
        }
        None => println!(
            "cargo:warning=feature `blas`: no libopenblas found (Debian: apt-get install \
             libopenblas-dev; or set OPENBLAS_LIB_DIR): building without it, the vision \
             tower's float matmuls stay on ggml's slower kernels"
        ),
    }
}
