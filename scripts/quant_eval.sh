#!/usr/bin/env bash
# Quantization quality on the demo model (issues 5, 17): converts models/demo/hf to every decoder
# type (and the vision types), runs `pali eval` on freshly generated held-out shape scenes, and
# prints one JSON line per pair (the BENCHMARKS.md table is made from these).
#   scripts/quant_eval.sh [N_IMAGES] [SEED]
#   TYPES="q6_k q3_k_m" scripts/quant_eval.sh 300 7     only some decoder types
# Needs python3 with numpy + Pillow (for models/demo/shapes.py).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300}
SEED=${2:-7}
WORK=${TMPDIR:-/tmp}/pali-quant-eval
rm -rf "$WORK" && mkdir -p "$WORK/gguf"
cargo build --release -q
python3 models/demo/shapes.py "$WORK/set" "$N" --seed "$SEED" >/dev/null
ALL=${TYPES:-"f32 f16 q8_0 q6_k q5_k_m q5_k_s q4_k_m q4_k_s q4_0 iq4_nl iq4_xs q3_k_l q3_k_m q3_k_s iq3_m iq3_s q2_k"}
for T in $ALL; do
  ./target/release/pali convert models/demo/hf -o "$WORK/gguf" --type "$T" --vision-type f16 --name pali-demo --quiet --force >/dev/null
done
for V in f32 q8_0; do
  ./target/release/pali convert models/demo/hf -o "$WORK/gguf" --type f16 --vision-type "$V" --name pali-demo --quiet --force >/dev/null
done
# Every decoder type with the default F16 tower; the first five also with F32 and Q8_0 towers.
for T in $(echo "$ALL" | tr a-z A-Z); do
  case $T in F32|F16|Q8_0|Q4_K_M|Q4_0) VISION="F32 F16 Q8_0" ;; *) VISION="F16" ;; esac
  for V in $VISION; do
    echo -n "{\"decoder\":\"$T\",\"vision\":\"$V\",\"eval\":"
    ./target/release/pali eval "$WORK/set/set.jsonl" -m "$WORK/gguf/pali-demo-$T.gguf" \
      --mmproj "$WORK/gguf/mmproj-pali-demo-$V.gguf" --json | tr -d '\n'
    echo "}"
  done
done
