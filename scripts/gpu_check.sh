#!/bin/bash
# pali on an NVIDIA GPU: correctness against HF and the CPU, then speed on a full-size random
# PaliGemma 2 3B-224 against HF transformers on the same GPU (BENCHMARKS.md, "GPU").
#
#   scripts/gpu_check.sh BIN_DIR OUT_DIR [all|tests|bench] [SIZE]
#
# BIN_DIR holds a `cargo test --release --features cuda,dynamic-backends --no-run` build: the
# `pali` binary, libllama/libggml*.so, the backend modules (libggml-cpu-*.so, libggml-cuda.so)
# and the `gpu-*` test binary (tests/gpu.rs). The test binary looks for the repository at the
# CARGO_MANIFEST_DIR it was built in, so run this from a checkout at that path. Needs the CUDA
# runtime and cuBLAS libraries (libcudart.so.13, libcublas*.so.13) on the library path, and
# python3 with numpy, sentencepiece, protobuf, torch and transformers for the speed part.
# `tests` stops after the correctness part, `bench` runs only the speed part; SIZE is a
# make_big_checkpoint.py size (default 3b-224). Every step has its own time limit.
set -u
BIN=$(realpath "$1")
OUT=$2
WHAT=${3:-all}
SIZE=${4:-3b-224}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BIN:${LD_LIBRARY_PATH:-}"
cd "$(dirname "$0")/.."
status=0
step() { # name, limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "--- $name: rc $rc, $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
    [ $rc -eq 0 ] || status=1
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
IMG=examples/images/three_shapes_wide.png

if [ "$WHAT" != bench ]; then
# 1. The bundled demo model with every layer and the vision tower on the GPU (llama.cpp's log
#    says how many layers it offloaded).
step demo_gpu 60 env RUST_LOG=llama.cpp=debug "$BIN/pali" caption "$IMG" -ngl 99 --json
grep -E "offloaded|CUDA0 model buffer|using device" "$OUT/demo_gpu.log" | head -5

# 2. tests/gpu.rs: vision tower, whole model and the CLI on the GPU against HF and the CPU.
TEST=$(ls "$BIN"/gpu-* | head -1)
step gpu_tests 200 "$TEST" --test-threads 1 --nocapture
fi
[ "$WHAT" = tests ] && exit $status

# 3. Speed: a full-size random checkpoint (3B-224 by default), Q4_K_M decoder + F16 tower, all
#    on the GPU, against HF transformers bf16 on the same GPU; same image, prompt, greedy 32.
BIG=/tmp/pg2-$SIZE CONV=/tmp/out-$SIZE
step make_$SIZE 150 python3 models/make_big_checkpoint.py "$SIZE" "$BIG" || exit 1
step convert_$SIZE 200 "$BIN/pali" convert "$BIG" -o "$CONV" --type q4_k_m --vision-type f16 --force --quiet || exit 1
DEC=$(ls "$CONV"/*Q4_K_M.gguf) MMP=$(ls "$CONV"/mmproj-*F16.gguf)
step pali_bench_$SIZE 90 "$BIN/pali" bench "$IMG" -m "$DEC" --mmproj "$MMP" -ngl 99 -n 32 -r 5 --json
step hf_bench_$SIZE 150 python3 scripts/hf_bench.py "$BIG" "$IMG" --device cuda --dtype bf16 --n-predict 32 --runs 3
exit $status
