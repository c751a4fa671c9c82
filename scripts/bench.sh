#!/usr/bin/env bash
# Full-size benchmark: a random PaliGemma 2 checkpoint with real shapes (default 3b-224),
# converted by pali (time + peak RSS), then `pali bench` per decoder type (medians).
#   scripts/bench.sh [3b-224] [runs]
# Results are printed as JSON lines; BENCHMARKS.md records them with this command.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${1:-3b-224}
RUNS=${2:-3}
CKPT=models/big/pg2-$SPEC
OUT=models/big/out-$SPEC
IMG=models/fixtures/images/wide.png
cargo build --release -q
[ -f "$CKPT/model.safetensors.index.json" ] || python3 models/make_big_checkpoint.py "$SPEC" "$CKPT"
mkdir -p "$OUT"
measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f '%e %M' -o /tmp/pali-bench-time "$@" >/dev/null
  read -r secs kb < /tmp/pali-bench-time
  echo "{\"step\":\"$label\",\"wall_s\":$secs,\"peak_rss_mib\":$((kb / 1024))}"
}
for T in q4_k_m q8_0; do
  for V in f16 q8_0; do
    measure "convert --type $T --vision-type $V" ./target/release/pali convert "$CKPT" -o "$OUT" --type "$T" --vision-type "$V" --force --quiet
  done
done
NAME=$(basename "$(ls "$OUT"/*-Q4_K_M.gguf)" -Q4_K_M.gguf)
for T in Q4_K_M Q8_0; do
  for V in F16 Q8_0; do
    echo -n "{\"decoder\":\"$T\",\"vision\":\"$V\",\"bench\":"
    ./target/release/pali bench "$IMG" -m "$OUT/$NAME-$T.gguf" --mmproj "$OUT/mmproj-$NAME-$V.gguf" -n 32 -r "$RUNS" --json
    echo "}"
  done
done
