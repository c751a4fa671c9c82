#!/usr/bin/env bash
# The JSON contract of every front end, recorded from one build and compared with another:
# the CLI's --json (demo model and a converted fixture), `pali serve`'s responses and libpali's
# results (examples/c/caption.c, capi/tests/c/api_test.c), plus the refusals (exit status and
# message). Timings, memory figures, response ids and times are left out; everything else
# must be identical.
#
#   PALI=old/pali LIBPALI_DIR=old/lib scripts/json_contract.sh record /tmp/contract
#   cargo build --release && cargo build --release -p pali-capi
#   scripts/json_contract.sh check /tmp/contract          # diff -u, exit 1 on a difference
#
# Used for the house reshaping (issue 25): the same outputs before and after the move.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?record|check}
dir=${2:?output folder}
PALI=$(realpath "${PALI:-target/release/pali}")
LIB=$(realpath "${LIBPALI_DIR:-target/release}")
out=$(mktemp -d)
trap 'rm -rf "$out"; [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true' EXIT

# Drops what differs from run to run and sorts keys.
norm() {
  python3 -c '
import json, sys
DROP = {"timings", "peak_rss_mb", "load_ms", "id", "created", "memory_free", "system_fingerprint"}
def clean(v):
    if isinstance(v, dict):
        return {k: clean(x) for k, x in sorted(v.items()) if k not in DROP}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v
for line in sys.stdin:
    line = line.rstrip("\n")
    # A JSON line, or "name status JSON" (api_test.c), or plain text.
    for i in [0] + [k + 1 for k, c in enumerate(line) if c == " "][:2]:
        try:
            print(line[:i] + json.dumps(clean(json.loads(line[i:])), sort_keys=True))
            break
        except ValueError:
            pass
    else:
        print(line)
'
}

# One CLI case: stdout normalised, then the exit status and stderr.
cli() {
  local name=$1; shift
  set +e
  "$PALI" "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
  local rc=$?
  set -e
  { norm < "$out/$name.stdout"; echo "exit $rc"; grep -v '^\[' "$out/$name.stderr" || true; } > "$out/$name.txt"
  rm "$out/$name.stdout" "$out/$name.stderr"
}

img=examples/images
cli caption_all caption $img --json -t 2
cli caption_text caption $img/one_shape.png -t 2
cli caption_sampled caption $img/three_shapes_wide.png --temp 0.8 --top-k 8 --top-p 0.9 --seed 5 --json
cli caption_length caption $img/three_shapes_wide.png -n 2 --json
cli ask ask $img/three_shapes_wide.png "how many shapes?" --json
cli ocr ocr $img/one_shape.png --json
cli run run --image $img/two_shapes_tall.png -p "caption en" --json
cli detect detect $img/three_shapes_wide.png circle --json
cli detect_two detect $img/three_shapes_wide.png "square ; circle" --json
cli detect_text detect $img/three_shapes_wide.png circle
cli segment segment $img/one_shape.png triangle --json
cli segment_text segment $img/one_shape.png triangle
cli err_missing_image caption /nonexistent.png --json
cli err_no_objects detect $img/one_shape.png " ; " --json
cli err_ctx caption $img/one_shape.png -c 10 --json
cli err_swapped caption $img/one_shape.png -m models/demo/mmproj-pali-demo-F16.gguf --mmproj models/demo/pali-demo-F16.gguf

# A converted fixture (HF's tiny random checkpoint), F32.
"$PALI" convert models/fixtures/tiny-224/hf -o "$out/fx" --type f32 --vision-type f32 -q --force > "$out/convert.txt"
sed -i "s|$out/||" "$out/convert.txt"
m=$(ls "$out"/fx/*.gguf | grep -v mmproj-)
cli fixture_caption caption models/fixtures/images --json -m "$m" -n 12
cli fixture_detect detect models/fixtures/images/$(ls models/fixtures/images | head -1) "cat" --json -m "$m" -n 12

# pali serve.
"$PALI" serve --port 0 -t 2 > /dev/null 2> "$out/serve.log" &
server=$!
for _ in $(seq 100); do grep -q "listening on" "$out/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$out/serve.log" | head -1)
for _ in $(seq 100); do curl -sf "$url/health" > /dev/null && break; sleep 0.1; done
b64=$(base64 -w0 < $img/three_shapes_wide.png)
chat() { # name, extra JSON fields
  curl -s "$url/v1/chat/completions" -H 'content-type: application/json' -d "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"caption en\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64,$b64\"}}]}]$2}" | norm > "$out/serve_$1.txt"
}
chat caption ''
chat sampled ',"temperature":0.8,"top_k":8,"top_p":0.9,"seed":5'
chat stream ',"stream":true'
chat bad_temp ',"temperature":-1'
chat bad_top_p ',"top_p":7'
chat bad_n ',"max_tokens":0'
chat bad_stop ',"stop":["a","b","c","d","e"]'
for task in detect segment; do
  curl -s "$url/v1/$task" -H 'content-type: application/json' -d "{\"image\":\"$b64\",\"objects\":[\"circle\"]}" | norm > "$out/serve_$task.txt"
done
kill "$server"; wait "$server" 2>/dev/null || true; server=
rm "$out/serve.log"

# libpali from C.
cc -std=c11 -o "$out/caption_c" examples/c/caption.c -Icapi/include -L"$LIB" -lpali
cc -std=c11 -o "$out/api_test_c" capi/tests/c/api_test.c -Icapi/include -L"$LIB" -lpali
raw="$out/two_shapes_small.rgb"
python3 - "$img/two_shapes_small.png" "$raw" <<'PY' > "$out/raw_size"
import sys, zlib, struct
# PNG (8-bit RGB/RGBA, no interlace) to raw RGB, without PIL.
data = open(sys.argv[1], "rb").read()
w, h, depth, color = struct.unpack(">IIBB", data[16:26])
idat, i = b"", 8
while i < len(data):
    n, t = struct.unpack(">I4s", data[i:i + 8])
    if t == b"IDAT": idat += data[i + 8:i + 8 + n]
    i += 12 + n
raw = zlib.decompress(idat)
bpp = {2: 3, 6: 4}[color]
rows, prev, stride = [], bytearray(w * bpp), w * bpp
for y in range(h):
    f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for x in range(stride):
        a = line[x - bpp] if x >= bpp else 0
        b, c = prev[x], prev[x - bpp] if x >= bpp else 0
        if f == 1: line[x] = (line[x] + a) & 255
        elif f == 2: line[x] = (line[x] + b) & 255
        elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    prev = line
    rows.append(bytes(line[k] for k in range(stride) if k % bpp < 3))
open(sys.argv[2], "wb").write(b"".join(rows))
print(w, h)
PY
read -r w h < "$out/raw_size"; rm "$out/raw_size"
demo_m=models/demo/pali-demo-F16.gguf; demo_p=models/demo/mmproj-pali-demo-F16.gguf
LD_LIBRARY_PATH="$LIB" "$out/caption_c" $demo_m $demo_p $img/three_shapes_wide.png "circle ; square" 2>/dev/null | norm > "$out/c_caption.txt"
LD_LIBRARY_PATH="$LIB" "$out/api_test_c" $demo_m $demo_p $img/two_shapes_small.png "$raw" "$w" "$h" 2>/dev/null | norm | sed "s|$out/||g" > "$out/c_api_test.txt" || true
rm -f "$out/caption_c" "$out/api_test_c" "$raw"
rm -rf "$out/fx"

case $mode in
  record) rm -rf "$dir"; mkdir -p "$dir"; cp "$out"/*.txt "$dir"/; echo "recorded $(ls "$dir" | wc -l) cases in $dir" ;;
  check) diff -ru "$dir" "$out" && echo "identical: $(ls "$dir" | wc -l) cases" ;;
  *) echo "record or check" >&2; exit 2 ;;
esac
