#!/usr/bin/env bash
# Fuzzes every parser (fuzz/cases.rs) with cargo-fuzz, then runs the long fault tests.
#
#   scripts/fuzz.sh [SECONDS]     each target until 1,000,000 runs or SECONDS (default 1200)
#   TARGETS="image npz" scripts/fuzz.sh 60     only some targets
#   SOAK=0 scripts/fuzz.sh ...                 skip the 60 s server soak afterwards
#
# Installs what it needs (a nightly toolchain and cargo-fuzz), makes seed corpora from the
# committed fixtures (fuzz/corpus, not committed), and writes fuzz/results.md: per target the
# executions, seconds, and crashes found (fuzz/logs/ has libFuzzer's output). A crash, hang (> 10 s) or memory blow-up (> 2 GiB)
# is saved by libFuzzer under fuzz/artifacts/TARGET/; copy it into fuzz/regressions/TARGET/
# once fixed, where tests/fuzz_regressions.rs replays it on stable in `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-1200}
RUNS=${RUNS:-1000000}
ALL="gguf_mmproj gguf_decoder gguf_mask gguf_info safetensors checkpoint_json image answer npz chat_request multipart"
TARGETS=${TARGETS:-$ALL}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked

# --- seeds ---------------------------------------------------------------------------------
corpus=fuzz/corpus
mkdir -p "$corpus" fuzz/logs
seed() { # seed TARGET NAME < bytes
  mkdir -p "$corpus/$1"
  cat >"$corpus/$1/$2"
}
# Edits that change nothing yet (the base's own bytes at a few offsets), so that mutations
# have bytes to work on from the start, plus a cut header, a cut data section and a lying count.
python3 - <<'EOF'
import os, struct
bases = {"gguf_mmproj": "models/demo/mmproj-pali-demo-F16.gguf", "gguf_info": "models/demo/mmproj-pali-demo-F16.gguf",
         "gguf_decoder": "models/demo/pali-demo-F16.gguf", "gguf_mask": "models/demo/vae-pali-demo.gguf",
         "npz": "models/demo/vae-shapes.npz", "safetensors": "models/fixtures/tiny-224/hf/model.safetensors"}
for t, path in bases.items():
    b = open(path, "rb").read()
    d = f"fuzz/corpus/{t}"
    os.makedirs(d, exist_ok=True)
    def put(name, mode, at, data=b""):
        open(f"{d}/{name}", "wb").write(bytes([mode]) + struct.pack("<I", at) + data)
    for at in [0, 8, 24, 100, 400, 1500, 6000, 30000, 60000]:
        if at < len(b):
            put(f"same-{at}", 1, at, b[at:at + 48])
    put("tail", 3, len(b) - 64, b[-64:])
    put("cut-header", 2, 200)
    put("cut-data", 2, 70000)
    put("count", 1, 16, b"\xff\xff\xff\xff")
EOF
for f in models/demo/*.gguf; do            # small real GGUFs as whole files (mode 0)
  for t in gguf_info gguf_mmproj; do
    { printf '\0'; head -c 60000 "$f"; } | seed $t "whole-$(basename "$f")"
  done
done
{ printf '\0'; cat models/fixtures/tiny-224/hf/config.json; } | seed checkpoint_json config
{ printf '\2'; cat models/fixtures/tiny-224/hf/preprocessor_config.json; } | seed checkpoint_json preprocessor
python3 - <<'EOF' | seed checkpoint_json index
import json, struct, sys
raw = open("models/fixtures/tiny-224/hf/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
names = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
index = {"metadata": {"total_size": len(raw)},
         "weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}
sys.stdout.buffer.write(b"\x01" + json.dumps(index).encode())
EOF
for f in models/fixtures/images/*.png examples/images/*.png; do seed image "$(basename "$f")" <"$f"; done
python3 - <<'EOF'
import struct, os
d = "fuzz/corpus/image"
w, h = 3, 2
row = bytes([255, 0, 0] * w) + b"\0" * ((4 - 3 * w % 4) % 4)
pix = row * h
bmp = b"BM" + struct.pack("<IHHI", 54 + len(pix), 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pix), 2835, 2835, 0, 0) + pix
open(os.path.join(d, "tiny.bmp"), "wb").write(bmp)
gif = bytes.fromhex("474946383961010001008000000000ffffff21f90401000000002c00000000010001000002024401003b")
open(os.path.join(d, "tiny.gif"), "wb").write(gif)
EOF
printf '\x00\x02\x00\x02<loc0100><loc0200><loc0300><loc0400> red circle ; <loc0010><loc0020><loc0900><loc1000> square' | seed answer detect
python3 -c "
import sys
seg = ''.join(f'<seg{i*7%128:03d}>' for i in range(16))
sys.stdout.buffer.write(b'\x40\x00\x30\x00' + f'<loc0100><loc0200><loc0300><loc0400> {seg} circle ; <loc0001><loc0002><loc1023><loc1023>{seg}'.encode())
" | seed answer segment
python3 - <<'EOF'
import base64, json
png = open("models/fixtures/images/gray.png", "rb").read()
url = "data:image/png;base64," + base64.b64encode(png).decode()
body = {"model": "pali", "max_tokens": 8, "temperature": 0.5, "stop": ["\n"], "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                                  {"type": "image_url", "image_url": {"url": url}}]}]}
import os
os.makedirs("fuzz/corpus/chat_request", exist_ok=True)
os.makedirs("fuzz/corpus/multipart", exist_ok=True)
open("fuzz/corpus/chat_request/full", "wb").write(json.dumps(body).encode())
body["messages"][0]["content"] = "caption en"
open("fuzz/corpus/chat_request/text-only", "wb").write(json.dumps(body).encode())
mp = (b"multipart/form-data; boundary=XyZ\n--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
      b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n"
      b"detect circle\r\n--XyZ--\r\n")
open("fuzz/corpus/multipart/form", "wb").write(mp)
EOF

# --- dictionary: GGUF keys and tensor names (schema.rs), type tags, JSON and image words ----
dict=fuzz/pali.dict
{
  grep -oh '"[a-z][a-z0-9_.%{}]*\.[a-z0-9_.]*"' ggml/src/schema.rs | sort -u
  for i in 0 1 2 3 4 5 6 7 8 9 10 11 12; do printf '"\\x%02x\\x00\\x00\\x00"\n' $i; done
  printf '"GGUF"\n"\\x03\\x00\\x00\\x00"\n"\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff"\n'
  printf '"\\"dtype\\""\n"\\"shape\\""\n"\\"data_offsets\\""\n"\\"F32\\""\n"\\"BF16\\""\n"\\"weight_map\\""\n'
  printf '"<loc"\n"<seg"\n">"\n";"\n"\\x89PNG"\n"IHDR"\n"IDAT"\n"\\xff\\xd8\\xff"\n"RIFF"\n"WEBP"\n"GIF89a"\n"BM"\n'
  printf '"data:image/png;base64,"\n"image_url"\n"--"\n"Content-Disposition: form-data; name="\n'
} >"$dict"

# --- runs ----------------------------------------------------------------------------------
# One row per target in fuzz/logs/TARGET.row; fuzz/results.md tables every target run so far
# (two copies of this script may run side by side on different TARGETS).
table() {
  echo "| target | executions | seconds | stopped by | crashes found |"
  echo "|---|---|---|---|---|"
  for t in $ALL; do if [ -f fuzz/logs/$t.row ]; then cat fuzz/logs/$t.row; fi; done
}
for t in $TARGETS; do
  echo "== $t: up to $RUNS runs or $SECS s"
  log=fuzz/logs/$t.log
  start=$(date +%s)
  set +e
  cargo +nightly fuzz run -O "$t" "$corpus/$t" -- \
    -runs="$RUNS" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -max_len=65536 -len_control=0 -dict="$dict" -print_final_stats=1 -close_fd_mask=1 >"$log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find fuzz/artifacts/"$t" -maxdepth 1 -type f -newermt "@$start" \( -name 'crash-*' \
    -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' -o -name 'slow-unit-*' \) 2>/dev/null | wc -l)
  if [ "${execs:-0}" -ge "$RUNS" ]; then by="$RUNS runs"; elif [ $rc -ne 0 ]; then by="a crash (rc $rc)"; else by="$SECS s"; fi
  echo "| $t | ${execs:-?} | $secs | $by | $crashes |" | tee fuzz/logs/$t.row
  table >fuzz/results.md
done

if [ "${SOAK:-1}" = 1 ]; then
  echo "== server soak, 60 s"
  PALI_SOAK_SECONDS=60 cargo test --release --test serve hostile_clients -- --nocapture
fi
table | tee fuzz/results.md
