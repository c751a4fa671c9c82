#!/usr/bin/env bash
# pali side by side with its anchors (issue 6), all in one run on one machine:
#   1. pali bench vs llama.cpp's llama-bench on the SAME decoder GGUFs (Q4_K_M, Q4_0, Q8_0),
#      alternating, one measured run each per round: prefill of the same length (pp) and
#      decode at the same depth (tg 32 at depth n_prefix); flash attention off in both, F16 KV.
#   2. pali with a Q8_0 vision tower, and pali --low-mem (peak RSS).
#   3. cold start: page cache dropped (needs root), then `pali caption` (load + TTFT).
#   4. HF transformers on CPU, f32 and bf16, same checkpoint, image, prompt, threads.
#   5. the roofline: STREAM-like bandwidth and ggml matmul FLOP/s (examples/roofline.rs).
# Every result is one JSON line in $OUT (default target/bench/anchors-SPEC.jsonl);
# scripts/bench_summary.py turns that file into the BENCHMARKS.md tables.
#   scripts/bench_anchors.sh [SPEC=3b-224] [ROUNDS=3] [THREADS=2]
# Skip parts with SKIP="hf cold roofline" (space-separated); PYTHON=… for the HF runs;
# BEFORE=older/pali adds the default files on an older build to every round.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${1:-3b-224}
ROUNDS=${2:-3}
T=${3:-2}
N=32
IMG=examples/images/three_shapes_wide.png
CKPT=models/big/pg2-$SPEC
GG=models/big/out-$SPEC
OUT=${OUT:-target/bench/anchors-$SPEC.jsonl}
SKIP=${SKIP:-}
PY=${PYTHON:-python3}   # a Python with models/fixtures/requirements.txt (torch, transformers)
skip() { [[ " $SKIP " == *" $1 "* ]]; }
mkdir -p "$(dirname "$OUT")" "$GG"
: > "$OUT"
emit() { echo "$1" | tee -a "$OUT"; }

cargo build --release -q --bin pali --example roofline
scripts/build_llama_bench.sh >&2
LB=target/llama-bench/bin/llama-bench
PALI=./target/release/pali
[ -f "$CKPT/config.json" ] || python3 models/make_big_checkpoint.py "$SPEC" "$CKPT"
for TY in q4_k_m q4_0 q8_0; do
  V=f16; [ "$TY" = q8_0 ] && V=q8_0   # the Q8_0 run also writes the Q8_0 vision tower
  [ -n "$(find "$GG" -name "*-${TY^^}.gguf" ! -name 'mmproj-*')" ] &&
    [ -n "$(find "$GG" -name "mmproj-*-${V^^}.gguf")" ] ||
    $PALI convert "$CKPT" -o "$GG" --type "$TY" --vision-type "$V" --force --quiet >&2
done
NAME=$(basename "$(ls "$GG"/*-Q4_K_M.gguf | grep -v mmproj)" -Q4_K_M.gguf)
MM16=$GG/mmproj-$NAME-F16.gguf
MM8=$GG/mmproj-$NAME-Q8_0.gguf
NP=$($PALI bench "$IMG" -m "$GG/$NAME-Q8_0.gguf" --mmproj "$MM16" -n 2 -r 1 -t "$T" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["n_prefix"])')
emit "{\"kind\":\"setup\",\"spec\":\"$SPEC\",\"threads\":$T,\"n_predict\":$N,\"n_prefix\":$NP,\"image\":\"$IMG\",\"cpu\":\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\",\"date\":\"$(date -u +%FT%TZ)\"}"

pali_run() { # label decoder mmproj extra-args...
  local label=$1 dec=$2 mm=$3; shift 3
  emit "{\"kind\":\"pali\",\"label\":\"$label\",\"result\":$($PALI bench "$IMG" -m "$dec" --mmproj "$mm" -n $N -r 1 -t "$T" --json "$@")}"
}
for r in $(seq "$ROUNDS"); do
  for TY in Q4_K_M Q4_0 Q8_0; do
    pali_run "$TY" "$GG/$NAME-$TY.gguf" "$MM16" --low-mem off
    # llama-bench: -r 1 after its own warm-up run, like pali bench -r 1.
    emit "{\"kind\":\"llama-bench\",\"label\":\"$TY\",\"round\":$r,\"pp\":$($LB -m "$GG/$NAME-$TY.gguf" -p "$NP" -n 0 -t "$T" -r 1 -fa 0 -o json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)[0]))'),\"tg\":$($LB -m "$GG/$NAME-$TY.gguf" -p 0 -n $N -d "$NP" -t "$T" -r 1 -fa 0 -o json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)[0]))')}"
  done
  pali_run "Q4_K_M+Q8_0 vision" "$GG/$NAME-Q4_K_M.gguf" "$MM8" --low-mem off
  pali_run "Q4_0+Q8_0 vision" "$GG/$NAME-Q4_0.gguf" "$MM8" --low-mem off
  pali_run "Q4_K_M --low-mem" "$GG/$NAME-Q4_K_M.gguf" "$MM16" --low-mem on
  # The default files without OpenBLAS (ggml's own matmuls: ARM builds, or the code before
  # the blas feature), same binary, same round.
  PALI_NO_BLAS=1 pali_run "Q4_K_M PALI_NO_BLAS" "$GG/$NAME-Q4_K_M.gguf" "$MM16" --low-mem off
  # BEFORE=path/to/an/older/pali: the default files on that binary too, same round.
  if [ -n "${BEFORE:-}" ]; then
    PALI=$BEFORE pali_run "Q4_K_M before" "$GG/$NAME-Q4_K_M.gguf" "$MM16" --low-mem off
  fi
done

if ! skip cold; then
  for LM in off on; do
    sync; echo 3 > /proc/sys/vm/drop_caches || { echo "cannot drop caches (not root?)" >&2; break; }
    s=$(date +%s.%N)
    j=$($PALI caption "$IMG" -m "$GG/$NAME-Q4_K_M.gguf" --mmproj "$MM16" -n 1 -t "$T" --json --low-mem $LM)
    e=$(date +%s.%N)
    emit "{\"kind\":\"cold\",\"label\":\"Q4_K_M --low-mem $LM\",\"process_s\":$(echo "$e - $s" | bc),\"result\":$j}"
  done
fi

if ! skip hf; then
  $PY scripts/hf_bench.py "$CKPT" "$IMG" --dtype f32 --threads "$T" --n-predict $N --runs 2 --warmup 0 |
    while read -r l; do emit "{\"kind\":\"hf\",\"result\":$l}"; done
  $PY scripts/hf_bench.py "$CKPT" "$IMG" --dtype bf16 --threads "$T" --n-predict $N --runs 1 --warmup 0 |
    while read -r l; do emit "{\"kind\":\"hf\",\"result\":$l}"; done
fi

if ! skip roofline; then
  emit "{\"kind\":\"roofline\",\"result\":$(./target/release/examples/roofline --threads "$T" --json)}"
fi
echo "results: $OUT (summary: python3 scripts/bench_summary.py $OUT)" >&2
