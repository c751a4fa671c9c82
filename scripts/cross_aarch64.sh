#!/bin/bash
# Cross-builds pali for 64-bit ARM Linux (Raspberry Pi 4/5, Jetson, Graviton) from an x86-64
# Debian machine, with ggml's CPU kernels picked at run time (`dynamic-backends`), then runs
# the build under qemu-user on emulated ARM CPUs.
#
#   scripts/cross_aarch64.sh build        # then target/aarch64-unknown-linux-gnu/dist/
#   scripts/cross_aarch64.sh run CPU ARGS # e.g. run cortex-a76 caption examples/images/x.png
#   scripts/cross_aarch64.sh test CPU NAME [ARGS]  # test binary NAME (e.g. parity) on CPU
#   scripts/cross_aarch64.sh capi CPU     # libpali's C example, built for ARM, run on CPU
#
# Host needs (Debian 12): apt-get install -y cmake clang libclang-dev g++-aarch64-linux-gnu
# qemu-user; rustup target add aarch64-unknown-linux-gnu.
#
# Why clang: ggml's aarch64 variants go up to armv9.2 with SME, which Debian 12's cross gcc
# (12) cannot target; clang (14 is enough) can, using the gcc cross toolchain's headers and
# libstdc++. Rust links with the cross gcc.
# To ship: copy target/aarch64-unknown-linux-gnu/dist/ (pali, libllama, libggml, libggml-base
# and every libggml-cpu-armv*.so variant, stripped) to the device and run pali with
# LD_LIBRARY_PATH set to that folder; the best variant for the CPU is loaded at start.
set -eu
cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
OUT=target/$T/release
DIST=target/$T/dist
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=clang CXX_aarch64_unknown_linux_gnu=clang++
# Debian's triple (the last --target wins over cc-rs's aarch64-unknown-linux-gnu), so that clang
# finds the cross binutils (aarch64-linux-gnu-ld) for CMake's test programs.
export CFLAGS_aarch64_unknown_linux_gnu=--target=aarch64-linux-gnu
export CXXFLAGS_aarch64_unknown_linux_gnu=--target=aarch64-linux-gnu
# The emulated machine: its loader and libc from the cross toolchain's sysroot.
qemu() { # cpu, program, args...
    local cpu=$1
    shift
    LD_LIBRARY_PATH="$PWD/$DIST" qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu "$cpu" "$@"
}

case "${1:-build}" in
build)
    cargo build --release --target $T -p pali --features dynamic-backends --bins --tests
    # libpali (the C library) on the same pali build: features unify.
    cargo build --release --target $T -p pali-capi --features dynamic-backends --lib
    rm -rf "$DIST" && mkdir -p "$DIST"
    cp "$OUT"/pali "$OUT"/libpali.so "$OUT"/libpali.a capi/include/pali.h "$DIST"/
    cp -P "$OUT"/build/llama-cpp-sys-2-*/out/build/bin/*.so* "$DIST"/
    find "$DIST" -type f ! -name '*.h' -exec aarch64-linux-gnu-strip --strip-debug {} +
    ls -l "$DIST"
    ;;
run)
    cpu=$2
    shift 2
    qemu "$cpu" "$DIST/pali" "$@"
    ;;
test)
    cpu=$2
    name=$3
    shift 3
    bin=$(ls -t "$OUT"/deps/"$name"-* | grep -v '\.d$' | head -1)
    qemu "$cpu" "$bin" "$@"
    ;;
capi)
    cpu=$2
    aarch64-linux-gnu-gcc -std=c11 -Wall -Werror -o "$DIST"/caption-c examples/c/caption.c \
        -I capi/include -L "$DIST" -Wl,-rpath-link,"$DIST" -lpali
    qemu "$cpu" "$DIST"/caption-c models/demo/pali-demo-F16.gguf \
        models/demo/mmproj-pali-demo-F16.gguf examples/images/three_shapes_wide.png "circle ; square"
    ;;
*)
    echo "usage: $0 build | run CPU ARGS... | test CPU NAME [ARGS...] | capi CPU" >&2
    exit 2
    ;;
esac
