#!/bin/bash
# pali's Vulkan backend on this machine's CPU: installs the Vulkan build tools and Mesa's
# lavapipe (a conformant software Vulkan device), builds `--features vulkan`, and runs the GPU
# test suite (tests/gpu.rs) on lavapipe, then the speed comparison and the one-binary
# (`dynamic-backends,vulkan`) check.
#
#   scripts/vulkan_check.sh [all|setup|build|test|bench|dynamic]   # default: all but dynamic
#   eval "$(scripts/vulkan_check.sh env)"     # the build/run environment for your own commands
#
# Debian 12 (bookworm), run as root (apt-get). What it installs, pinned:
# - bookworm: glslc 2023.2-1 (the shader compiler), mesa-vulkan-drivers 22.3.6-1+deb12u2
#   (lavapipe), libvulkan1 1.3.239.0-1 (the loader), vulkan-tools 1.3.239.0+dfsg1-1
#   (vulkaninfo), and cmake/clang/libclang-dev for the build itself.
# - trixie's Vulkan headers (libvulkan-dev 1.4.309.0-1) and SPIRV-Headers (spirv-headers
#   1.6.1+1.4.309.0-1), unpacked under target/vulkan-sdk and used as VULKAN_SDK: ggml-vulkan
#   needs newer headers than bookworm's 1.3.239 (vk::LayerSettingEXT, VK_HEADER_VERSION
#   >= 283's structures); nothing is installed system-wide from trixie. The loader the
#   program links against stays bookworm's libvulkan.so.1 (a newer header works with an
#   older loader: ggml-vulkan calls every function through a dynamic dispatcher).
#
# lavapipe reports itself as a CPU-type Vulkan device, which ggml-vulkan skips unless asked
# for by index: GGML_VK_VISIBLE_DEVICES=0 (with VK_ICD_FILENAMES naming lavapipe's ICD, so
# that index 0 is lavapipe whatever else is installed).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
SDK=$ROOT/target/vulkan-sdk
LVP_ICD=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
DEBS=(
    "http://deb.debian.org/debian/pool/main/v/vulkan-loader/libvulkan-dev_1.4.309.0-1_amd64.deb 8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a"
    "http://deb.debian.org/debian/pool/main/s/spirv-headers/spirv-headers_1.6.1%2b1.4.309.0-1_all.deb dc18db866d63680351c40ac6b6bece34cb52da64a7799ce1cc4f16f6bff4d064"
)
APT_PKGS=(glslc=2023.2-1 mesa-vulkan-drivers=22.3.6-1+deb12u2 libvulkan1=1.3.239.0-1
    vulkan-tools=1.3.239.0+dfsg1-1)
OUT=$ROOT/target/vulkan-check
mkdir -p "$OUT"

print_env() {
    echo "export VULKAN_SDK=$SDK/usr"
    # lavapipe only, and ggml-vulkan told to take it although it is a CPU-type device.
    echo "export VK_ICD_FILENAMES=$LVP_ICD VK_DRIVER_FILES=$LVP_ICD GGML_VK_VISIBLE_DEVICES=0"
}

setup() {
    local need=()
    command -v cmake >/dev/null || need+=(cmake)
    command -v clang >/dev/null || need+=(clang)
    ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
    for p in "${APT_PKGS[@]}"; do
        [ "$(dpkg-query -W -f='${Version}' "${p%%=*}" 2>/dev/null)" = "${p#*=}" ] || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "apt-get install ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || return 1
    fi
    if [ ! -f "$SDK/usr/include/vulkan/vulkan.hpp" ] || [ ! -f "$SDK/.complete" ]; then
        rm -rf "$SDK" && mkdir -p "$SDK/debs"
        for d in "${DEBS[@]}"; do
            local url=${d% *} sum=${d#* } f
            f=$SDK/debs/$(basename "$url")
            curl -fsSL --retry 3 -o "$f" "$url" || { echo "download failed: $url"; return 1; }
            echo "$sum  $f" | sha256sum -c --quiet || { echo "checksum mismatch: $url"; return 1; }
            dpkg-deb -x "$f" "$SDK"
        done
        # FindVulkan looks for $VULKAN_SDK/{include,lib,bin}: the loader to link is the
        # system's (the unpacked libvulkan.so points at a libvulkan.so.1 we did not unpack),
        # glslc is bookworm's.
        mkdir -p "$SDK/usr/bin"
        ln -sf /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$SDK/usr/lib/libvulkan.so"
        ln -sf "$(command -v glslc)" "$SDK/usr/bin/glslc"
        touch "$SDK/.complete"
    fi
    [ -f "$LVP_ICD" ] || { echo "no lavapipe ICD at $LVP_ICD"; return 1; }
    eval "$(print_env)"
    vulkaninfo --summary 2>/dev/null | grep -E "apiVersion|deviceType|deviceName|driverInfo"
}

# Heavy steps leave a core free for others on a small machine: one cargo job, one CMake job.
build_env() {
    eval "$(print_env)"
    export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-1}
}

build() {
    build_env
    local t0=$SECONDS
    nice -n 15 cargo build --release --features vulkan || return 1
    nice -n 15 cargo test --release --features vulkan --no-run || return 1
    echo "build: $((SECONDS - t0)) s"
}

status=0
step() { # name, limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "--- $name: rc $rc, $((SECONDS - t0)) s (log: $OUT/$name.log)"
    [ $rc -eq 0 ] || status=1
    return $rc
}

tests() {
    build_env
    step backends 60 target/release/pali info --backends
    cat "$OUT/backends.log"
    grep -q "^used: Vulkan0" "$OUT/backends.log" || { echo "pali does not use lavapipe"; status=1; }
    step demo_vulkan 120 env RUST_LOG=llama.cpp=debug target/release/pali caption \
        examples/images/three_shapes_wide.png -ngl 99 -t 1 --json
    grep -E "offloaded|Vulkan0 model buffer|ggml_vulkan: [0-9]" "$OUT/demo_vulkan.log" | head -5
    tail -n 1 "$OUT/demo_vulkan.log"
    # tests/gpu.rs: vision tower, whole model and the CLI on lavapipe against HF and the CPU.
    step gpu_tests 3600 cargo test --release --features vulkan --test gpu -- --test-threads 1 --nocapture
    grep -E "relative error|first-step|cpu |test result|panicked|FAILED|failed" "$OUT/gpu_tests.log"
}

bench() {
    build_env
    local img=examples/images/three_shapes_wide.png
    for ngl in 0 99; do
        step bench_ngl$ngl 600 target/release/pali bench "$img" -ngl $ngl -r 5 --json
        tail -n 1 "$OUT/bench_ngl$ngl.log"
    done
}

# One binary for every machine: CPU variants and the Vulkan backend as modules picked at run
# time (llama.cpp's release layout), in its own target folder (no -C target-cpu=native).
dynamic() {
    build_env
    local dir=target/dyn dist=target/dyn/dist
    export RUSTFLAGS=
    local t0=$SECONDS
    nice -n 15 cargo build --release --features dynamic-backends,vulkan --target-dir $dir || return 1
    echo "dynamic build: $((SECONDS - t0)) s"
    rm -rf "$dist" && mkdir -p "$dist"
    cp $dir/release/pali "$dist"/
    cp -P $dir/release/build/llama-cpp-sys-2-*/out/build/bin/*.so* "$dist"/
    ls "$dist"
    local img=examples/images/three_shapes_wide.png
    local want="a red circle, a blue square and a green circle"
    # With lavapipe: the Vulkan module is loaded and used (no -ngl: all layers on the GPU).
    step dyn_backends 60 env LD_LIBRARY_PATH="$dist" "$dist/pali" info --backends
    cat "$OUT/dyn_backends.log"
    grep -q "^used: Vulkan0" "$OUT/dyn_backends.log" || { echo "FAIL: Vulkan not used"; status=1; }
    step dyn_vulkan 180 env LD_LIBRARY_PATH="$dist" "$dist/pali" bench "$img" -r 1 -t 1 --json
    tail -n 1 "$OUT/dyn_vulkan.log"
    grep -q '"vision_backend":"Vulkan0"' "$OUT/dyn_vulkan.log" || { echo "FAIL: vision not on Vulkan0"; status=1; }
    step dyn_vulkan_caption 180 env LD_LIBRARY_PATH="$dist" "$dist/pali" caption "$img" -t 1
    grep -qF "$want" "$OUT/dyn_vulkan_caption.log" || { echo "FAIL: caption on Vulkan"; status=1; }
    # No Vulkan driver at all (the ICD hidden): the same binary on the CPU, one notice line.
    step dyn_no_icd 120 env LD_LIBRARY_PATH="$dist" VK_ICD_FILENAMES=/nonexistent.json \
        VK_DRIVER_FILES=/nonexistent.json "$dist/pali" caption "$img" -t 1
    cat "$OUT/dyn_no_icd.log"
    [ "$(grep -c 'running on the CPU' "$OUT/dyn_no_icd.log")" = 1 ] && grep -qF "$want" "$OUT/dyn_no_icd.log" \
        || { echo "FAIL: no notice or wrong caption without a driver"; status=1; }
    # lavapipe present but not asked for: ggml-vulkan skips a CPU-type device, so the CPU.
    step dyn_cpu_device 120 env -u GGML_VK_VISIBLE_DEVICES LD_LIBRARY_PATH="$dist" "$dist/pali" \
        info --backends
    cat "$OUT/dyn_cpu_device.log"
    grep -q "^used: CPU" "$OUT/dyn_cpu_device.log" || { echo "FAIL: a CPU-type device was used"; status=1; }
    # The executable itself does not need the Vulkan loader; only the module does.
    readelf -d "$dist/pali" | grep NEEDED
    readelf -d "$dist/libggml-vulkan.so" | grep -q "libvulkan.so.1" || status=1
}

case "${1:-all}" in
env) print_env ;;
setup) setup || exit 1 ;;
build) setup && build || exit 1 ;;
test) tests ;;
bench) bench ;;
dynamic) setup && dynamic || exit 1 ;;
all)
    setup && build || exit 1
    tests
    bench
    ;;
*)
    echo "usage: $0 [all|setup|build|test|bench|dynamic|env]"
    exit 2
    ;;
esac
exit $status
