#!/usr/bin/env bash
# What each decoder type costs on a full-size random checkpoint (issue 17): file size, the
# conversion's time and peak RSS, and one caption's timings, decode speed and peak RSS.
#
#   scripts/quant_sizes.sh CHECKPOINT OUT TYPE...     e.g. models/big/pg2-3b-224 /tmp/q q4_k_m q3_k_s
#   CAPTION="--low-mem on --cache-type q8_0" scripts/quant_sizes.sh ...   extra caption flags
#   KEEP=1 ...                                        keep the decoders (default: each is removed
#                                                     after its caption, to save disk)
#
# CHECKPOINT comes from `python models/make_big_checkpoint.py SIZE DIR`. Prints one JSON line
# per type (the BENCHMARKS.md tables are made from these). Captions run with -n 16 -t 2.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1
OUT=$2
shift 2
mkdir -p "$OUT"
cargo build --release -q
PALI=./target/release/pali
IMG=examples/images/three_shapes_wide.png
for T in "$@"; do
  LABEL=$(echo "$T" | tr a-z A-Z)
  /usr/bin/time -f "%e %M" -o "$OUT/convert.time" \
    $PALI convert "$CKPT" -o "$OUT" --type "$T" --vision-type f16 --name big --quiet --force >/dev/null
  read -r CONV_S CONV_KB <"$OUT/convert.time"
  DEC="$OUT/big-$LABEL.gguf"
  MM="$OUT/mmproj-big-F16.gguf"
  # shellcheck disable=SC2086
  CAP=$($PALI caption "$IMG" -m "$DEC" --mmproj "$MM" -n 16 -t 2 --json ${CAPTION:-} | tr -d '\n')
  echo "{\"type\":\"$LABEL\",\"decoder_bytes\":$(stat -c %s "$DEC"),\"mmproj_bytes\":$(stat -c %s "$MM"),\"convert_s\":$CONV_S,\"convert_peak_mb\":$((CONV_KB / 1024)),\"caption_flags\":\"${CAPTION:-}\",\"caption\":$CAP}"
  [ "${KEEP:-0}" = 1 ] || rm -f "$DEC"
done
