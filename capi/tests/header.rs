//! `include/pali.h` is what cbindgen (pinned) makes of `src/lib.rs` today: a stale committed
//! header fails here. `PALI_WRITE_HEADER=1` rewrites it instead.

use std::path::Path;

#[test]
fn committed_header_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/lib.rs"))
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut fresh);
    let fresh = String::from_utf8(fresh).unwrap();
    let path = root.join("include/pali.h");
    if std::env::var_os("PALI_WRITE_HEADER").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/pali.h is stale: regenerate it with PALI_WRITE_HEADER=1 cargo test -p pali-capi --test header"
    );
    for name in [
        "pali_model_load",
        "pali_run",
        "pali_string_free",
        "pali_log_set",
        "PALI_ERR_IMAGE",
        "pali_adapter_load",
        "pali_adapter_free",
        "PALI_ABI_VERSION 2",
    ] {
        assert!(fresh.contains(name), "{name} missing from the header");
    }
}
