#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` against exactly the llama.cpp that llama-cpp-sys-2 vendors
# (the version pinned in Cargo.toml/Cargo.lock), with the ggml build options our Rust build
# uses, so `pali bench` and `llama-bench` compare the same kernels compiled the same way.
#
#   scripts/build_llama_bench.sh            build target/llama-bench/bin/llama-bench
#   scripts/build_llama_bench.sh --prepare  only build ggml + llama + llama-common (no llama-bench)
#
# Output: target/llama-bench/ (build tree; git-ignored via /target). Idempotent: does nothing
# when target/llama-bench/bin/llama-bench exists and is newer than this script (FORCE=1 rebuilds).
#
# The crate does NOT ship llama-bench's sources: its Cargo.toml `include` list keeps only
# llama.cpp's ggml/, include/, src/, common/, vendor/, cmake/, tools/mtmd and tools/CMakeLists.txt
# (plus every README.md), so tools/llama-bench/ holds only README.md. llama-bench.cpp must come
# from a llama.cpp checkout of the SAME commit, found in this order:
#   1. LLAMA_BENCH_SRC: a llama.cpp checkout, a tools/llama-bench dir, or the llama-bench.cpp file
#   2. the vendored copy itself (if a future crate version ships it)
#   3. llama.cpp submodules of llama-cpp-rs git checkouts under $CARGO_HOME/git/checkouts
#   4. llama-bench.cpp alone from llama-cpp-python's pinned PyPI sdist (see below)
# A checkout is used only if its include/, src/, common/, ggml/include/ and ggml/src/ are
# byte-identical to the vendored ones (i.e. same llama.cpp commit); LLAMA_BENCH_ALLOW_MISMATCH=1
# overrides that. A bare llama-bench.cpp file cannot be checked and is used with a warning.
#
# Env: CARGO_HOME, LLAMA_BENCH_SRC, LLAMA_BENCH_ALLOW_MISMATCH, LLAMA_BENCH_BUILD_TYPE,
#      JOBS (default 2), FORCE, and GGML_* (forwarded to CMake, as llama-cpp-sys-2's build.rs does).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=$ROOT/scripts/build_llama_bench.sh
OUT=$ROOT/target/llama-bench
BIN=$OUT/bin/llama-bench
PREPARE=0
[ "${1:-}" = "--prepare" ] && PREPARE=1

if [ "$PREPARE" = 0 ] && [ -z "${FORCE:-}" ] && [ -x "$BIN" ] && [ "$BIN" -nt "$SCRIPT" ]; then
  echo "llama-bench is up to date: $BIN"
  exit 0
fi

# --- the vendored llama.cpp --------------------------------------------------------------------
# Version from Cargo.lock (what is actually built), else from the "=x.y.z" pin in Cargo.toml.
VER=$(awk '/^name = "llama-cpp-sys-2"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock 2>/dev/null || true)
[ -n "$VER" ] || VER=$(grep -oE 'llama-cpp-sys-2 = \{ *version = "=?[0-9.]+' Cargo.toml | grep -oE '[0-9][0-9.]*$' || true)
[ -n "$VER" ] || { echo "error: cannot find the llama-cpp-sys-2 version in Cargo.lock/Cargo.toml" >&2; exit 1; }
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
LLAMA=
for d in "$CARGO_HOME"/registry/src/*/llama-cpp-sys-2-"$VER"/llama.cpp; do
  [ -f "$d/CMakeLists.txt" ] && { LLAMA=$d; break; }
done
if [ -z "$LLAMA" ]; then
  echo "error: llama-cpp-sys-2-$VER is not unpacked under $CARGO_HOME/registry/src/*/" >&2
  echo "       (run 'cargo fetch' or any cargo build of this workspace first)" >&2
  exit 1
fi
echo "vendored llama.cpp (llama-cpp-sys-2 $VER): $LLAMA"

# --- llama-bench sources -----------------------------------------------------------------------
same_llama() { # checkout-root: is it the vendored commit? (compares what the crate ships)
  local c=$1 sub
  for sub in include src common ggml/include ggml/src; do
    diff -rq -x .git "$LLAMA/$sub" "$c/$sub" >/dev/null 2>&1 || return 1
  done
}
BENCH_DIR=   # a tools/llama-bench directory with llama-bench.cpp (and normally its CMakeLists.txt)
pick() { # dir-with-llama-bench.cpp, checkout-root-or-empty, explicit(0|1)
  local dir=$1 root=$2 explicit=$3
  if [ -n "$root" ]; then
    if same_llama "$root"; then
      echo "llama-bench sources: $dir (checkout matches the vendored llama.cpp)"
    elif [ "$explicit" = 1 ] && [ -n "${LLAMA_BENCH_ALLOW_MISMATCH:-}" ]; then
      echo "warning: $root differs from the vendored llama.cpp; using it anyway (LLAMA_BENCH_ALLOW_MISMATCH)" >&2
    else
      echo "skipping $root: its include/ src/ common/ ggml/ differ from the vendored llama.cpp" >&2
      [ "$explicit" = 1 ] && echo "  (set LLAMA_BENCH_ALLOW_MISMATCH=1 to use it anyway)" >&2
      return 1
    fi
  else
    echo "warning: $dir/llama-bench.cpp is not in a llama.cpp checkout; cannot check it is the vendored commit" >&2
  fi
  BENCH_DIR=$dir
}
if [ -n "${LLAMA_BENCH_SRC:-}" ]; then
  s=$(realpath "$LLAMA_BENCH_SRC")
  if [ -f "$s" ]; then
    d=$(dirname "$s"); r=$(realpath "$d/../.." 2>/dev/null || true)
    [ -f "$r/include/llama.h" ] || r=
    [ "$(basename "$s")" = llama-bench.cpp ] || { echo "error: LLAMA_BENCH_SRC file must be llama-bench.cpp" >&2; exit 1; }
    pick "$d" "$r" 1 || exit 1
  elif [ -f "$s/tools/llama-bench/llama-bench.cpp" ]; then
    pick "$s/tools/llama-bench" "$s" 1 || exit 1
  elif [ -f "$s/llama-bench.cpp" ]; then
    r=$(realpath "$s/../.."); [ -f "$r/include/llama.h" ] || r=
    pick "$s" "$r" 1 || exit 1
  else
    echo "error: no llama-bench.cpp in LLAMA_BENCH_SRC=$LLAMA_BENCH_SRC" >&2; exit 1
  fi
elif [ -f "$LLAMA/tools/llama-bench/llama-bench.cpp" ]; then
  BENCH_DIR=$LLAMA/tools/llama-bench
  echo "llama-bench sources: vendored ($BENCH_DIR)"
else
  for c in "$CARGO_HOME"/git/checkouts/*/*/llama-cpp-sys-2/llama.cpp; do
    [ -f "$c/tools/llama-bench/llama-bench.cpp" ] && pick "$c/tools/llama-bench" "$c" 0 && break
  done
fi
# 4. Fallback: llama-bench.cpp from llama-cpp-python's sdist on PyPI (pinned), which vendors a
#    full llama.cpp tree a few weeks older than ours (ggml 0.25.3 vs 0.26.0). Only the bench
#    DRIVER comes from there: it is compiled against, and linked with, the vendored llama.cpp
#    and ggml, so the kernels and llama_decode measured are exactly pali's.
LCP_VER=0.3.36
if [ -z "$BENCH_DIR" ] && [ "$PREPARE" = 0 ] && [ -z "${LLAMA_BENCH_NO_PYPI:-}" ]; then
  PYPI=$OUT/pypi
  SRC=$PYPI/llama_cpp_python-$LCP_VER/vendor/llama.cpp/tools/llama-bench
  if [ ! -f "$SRC/llama-bench.cpp" ]; then
    mkdir -p "$PYPI"
    python3 -m pip download "llama-cpp-python==$LCP_VER" --no-deps --no-binary :all: -d "$PYPI" -q
    tar xzf "$PYPI/llama_cpp_python-$LCP_VER.tar.gz" -C "$PYPI" \
      "llama_cpp_python-$LCP_VER/vendor/llama.cpp/tools/llama-bench"
  fi
  BENCH_DIR=$SRC
  echo "llama-bench sources: llama-cpp-python $LCP_VER sdist (driver only; libraries are the vendored ones)" >&2
fi
if [ -z "$BENCH_DIR" ] && [ "$PREPARE" = 0 ]; then
  cat >&2 <<EOF
error: llama-bench cannot be built from what is on disk.
  llama-cpp-sys-2 $VER strips llama.cpp's tools/ (only tools/CMakeLists.txt, tools/mtmd and README.md
  files are shipped). Missing, from the llama.cpp commit this crate vendors:
    tools/llama-bench/llama-bench.cpp   (the tool itself)
    tools/llama-bench/CMakeLists.txt    (optional: this script links llama-common + llama itself)
  Everything else it needs IS vendored: ggml, llama, common/ (llama-common: arg.h, common.h,
  download.h, fit.h, build-info) and vendor/ (nlohmann, cpp-httplib).
  The vendored commit is the llama.cpp submodule of llama-cpp-rs at commit
  $(sed -n 's/.*"sha1": *"\([0-9a-f]*\)".*/\1/p' "$LLAMA/../.cargo_vcs_info.json" 2>/dev/null || echo '?') (see .cargo_vcs_info.json); e.g.
    git clone https://github.com/utilityai/llama-cpp-rs && cd llama-cpp-rs && git checkout <that sha>
    git submodule update --init llama-cpp-sys-2/llama.cpp
  then: LLAMA_BENCH_SRC=\$PWD/llama-cpp-sys-2/llama.cpp $0
  (a checkout is accepted only if its sources equal the vendored ones).
  '$0 --prepare' builds everything except llama-bench.cpp now.
EOF
  exit 2
fi

# --- CMake options: the same as llama-cpp-sys-2's build.rs produces for our Cargo setup -------
# Check against target/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt when in doubt.
BUILD_TYPE=${LLAMA_BENCH_BUILD_TYPE:-RelWithDebInfo}
OPTS=()
# build.rs forwards every GGML_* environment variable to CMake (before its own options, which win).
while IFS='=' read -r k v; do OPTS+=("-D$k=$v"); done < <(env | grep -E '^GGML_[A-Z0-9_]+=' || true)
OPTS+=(
  # Optimisation level. build.rs uses "RelWithDebInfo" when cargo's DEBUG is true and "Release"
  # otherwise; our [profile.release] has `debug = 1`, so `cargo build --release` compiles ggml
  # with -O2 -g (RelWithDebInfo), not -O3 (Release). Matching it keeps the kernels identical.
  # LLAMA_BENCH_BUILD_TYPE=Release gives upstream's default -O3 build instead.
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE"
  # cmake-rs passes cc-rs's default flags; same here so codegen matches (-fPIC also on the
  # static libs; -w only silences warnings).
  -DCMAKE_C_FLAGS="-ffunction-sections -fdata-sections -fPIC -m64 -w"
  -DCMAKE_CXX_FLAGS="-ffunction-sections -fdata-sections -fPIC -m64 -w"
  # .cargo/config.toml sets -C target-cpu=native on x86_64 Linux / aarch64 macOS, and build.rs
  # then sets GGML_NATIVE=ON (-march=native): the SIMD kernels chosen depend on this.
  -DGGML_NATIVE=ON
  # Static ggml/llama like our binary (no `dynamic-link` feature): no PLT/dlopen'd backends.
  -DBUILD_SHARED_LIBS=OFF
  # The `openmp` feature is not enabled (default-features = false, and it is not a default
  # feature of llama-cpp-sys-2 anyway), so build.rs sets GGML_OPENMP=OFF: ggml's own threadpool
  # (spin/poll workers) instead of OpenMP. This changes multi-thread timings noticeably.
  -DGGML_OPENMP=OFF
  # No BLAS/accelerators: our default build has no cuda/vulkan/metal feature; ggml's defaults
  # (GGML_BLAS=OFF, GGML_LLAMAFILE=ON, GGML_CPU_REPACK=ON) are left as in our build.
  -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_WEBGPU=OFF
  # Not timing-relevant: no network code (no curl/openssl) and only what llama-bench needs.
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_LLGUIDANCE=OFF
  -DLLAMA_BUILD_COMMON=ON        # llama-bench links llama-common (our Rust build: OFF, unused)
  -DLLAMA_BUILD_TOOLS=OFF        # tools/CMakeLists.txt names ~20 tool dirs the crate strips
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
)

# A wrapper project (in the build tree) adds llama.cpp as a subdirectory plus the llama-bench
# target; the options above are all explicit, so ggml/llama compile exactly as when llama.cpp is
# the top-level project (as in build.rs).
WRAP=$OUT/_wrapper
mkdir -p "$WRAP"
{
  echo "cmake_minimum_required(VERSION 3.14)"
  echo "project(pali-llama-bench C CXX)"
  echo "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY \${CMAKE_BINARY_DIR}/bin)  # -> target/llama-bench/bin"
  echo "add_subdirectory(\"$LLAMA\" llama.cpp)"
  if [ -n "$BENCH_DIR" ]; then
    echo "find_package(Threads REQUIRED)"
    echo "llama_add_compile_flags()  # as llama.cpp's tools/CMakeLists.txt does (warning flags)"
    if [ -f "$BENCH_DIR/CMakeLists.txt" ] && grep -q 'llama-common' "$BENCH_DIR/CMakeLists.txt"; then
      echo "add_subdirectory(\"$BENCH_DIR\" tools/llama-bench)  # upstream's own CMakeLists.txt"
    else # no CMakeLists, or one that predates the llama-common target name
      echo "add_executable(llama-bench \"$BENCH_DIR/llama-bench.cpp\")"
      echo "target_link_libraries(llama-bench PRIVATE llama-common llama \${CMAKE_THREAD_LIBS_INIT})"
      echo "target_compile_features(llama-bench PRIVATE cxx_std_17)"
    fi
  fi
} > "$WRAP/CMakeLists.txt.new"
cmp -s "$WRAP/CMakeLists.txt.new" "$WRAP/CMakeLists.txt" 2>/dev/null \
  && rm "$WRAP/CMakeLists.txt.new" || mv "$WRAP/CMakeLists.txt.new" "$WRAP/CMakeLists.txt"

JOBS=${JOBS:-2}
start=$(date +%s)
cmake -S "$WRAP" -B "$OUT" "${OPTS[@]}" >"$OUT/configure.log" 2>&1 \
  || { tail -n 40 "$OUT/configure.log" >&2; echo "error: cmake configure failed (log: $OUT/configure.log)" >&2; exit 1; }
if [ -n "$BENCH_DIR" ] && [ "$PREPARE" = 0 ]; then
  nice -n 10 cmake --build "$OUT" --target llama-bench -j "$JOBS"
  touch "$BIN"   # newer than the script even when nothing had to be rebuilt
  echo "built $BIN in $(( $(date +%s) - start ))s"
else
  nice -n 10 cmake --build "$OUT" --target llama-common -j "$JOBS"
  echo "prepared ggml + llama + llama-common in $OUT in $(( $(date +%s) - start ))s"
  [ -n "$BENCH_DIR" ] || echo "llama-bench itself still needs tools/llama-bench/llama-bench.cpp (see: $0)"
fi

# Warn if our Rust build's llama.cpp was configured differently (e.g. a changed profile or env).
CACHE=$(ls -t target/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt 2>/dev/null | head -n 1 || true)
if [ -n "$CACHE" ]; then
  for k in CMAKE_BUILD_TYPE GGML_NATIVE GGML_OPENMP BUILD_SHARED_LIBS GGML_CPU_REPACK GGML_LLAMAFILE CMAKE_C_FLAGS; do
    a=$(grep -m1 "^$k:" "$CACHE" | cut -d= -f2- | sed 's/^ *//; s/ *$//' || true)
    b=$(grep -m1 "^$k:" "$OUT/CMakeCache.txt" | cut -d= -f2- | sed 's/^ *//; s/ *$//' || true)
    [ "$a" = "$b" ] || echo "warning: $k differs from the Rust build ($CACHE): '$a' vs '$b'" >&2
  done
fi
