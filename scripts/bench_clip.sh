#!/usr/bin/env bash
# Clips and several images (issue 26): a K-frame clip on a 224 px model next to one 896 px
# image of the same token count (16 × 256 = 4096), and the vision tower batched vs one frame
# at a time. Results in BENCHMARKS.md, "Clips and several images".
#
#   scripts/bench_clip.sh DIR_224 [DIR_896] [K] [ROUNDS]
#
# DIR_*: folders from `pali convert` (one decoder GGUF and its mmproj-*.gguf). Needs
# `cargo build --release --example clip_bench`. Per round, alternating: the clip with
# --low-mem off and on, then the 896 px image with --low-mem off and on, each its own process
# (peak RSS is the process's VmHWM), `-n 1` (time to first token).
set -euo pipefail
cd "$(dirname "$0")/.."
dir224=${1:?DIR_224}
dir896=${2:-}
k=${3:-16}
rounds=${4:-1}
files() { echo "$(ls "$1"/*.gguf | grep -v '/mmproj-' | head -1) $(ls "$1"/mmproj-*.gguf | head -1)"; }
read -r m224 p224 <<< "$(files "$dir224")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
clip="$out/clip.gif"
lscpu | grep -m1 'Model name' || true
echo "vision, $k frames, batched vs one by one ($rounds+ rounds, alternating):"
target/release/examples/clip_bench "$m224" "$p224" "$k" "$((rounds + 1))" "$clip" | tee "$out/vision.json"
run() { # label, then pali arguments
  local label=$1; shift
  target/release/pali caption "$@" -n 1 --json -t 2 > "$out/run.json"
  python3 - "$label" "$out/run.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[2])); t = v["timings"]
ttft = t["preprocess_ms"] + t["vision_ms"] + t["prefill_ms"]
print(f'{sys.argv[1]:<28} n_prefix {t["n_prefix"]:>5}  vision {t["vision_ms"]/1e3:7.1f} s  prefill {t["prefill_ms"]/1e3:7.1f} s  TTFT {ttft/1e3:7.1f} s  peak RSS {v["peak_rss_mb"]:7.0f} MiB')
PY
}
for r in $(seq "$rounds"); do
  for mode in off on; do
    run "clip $k×224 low-mem $mode" "$clip" --frames "$k" -m "$m224" --mmproj "$p224" --low-mem "$mode"
  done
  if [ -n "$dir896" ]; then
    read -r m896 p896 <<< "$(files "$dir896")"
    for mode in off on; do
      run "one 896 px low-mem $mode" examples/images/three_shapes_wide.png -m "$m896" --mmproj "$p896" --low-mem "$mode"
    done
  fi
done
