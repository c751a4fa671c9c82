"""Python's overhead: `model.caption(numpy_frame)` against `pali bench` on the same files.

    python python/bench/overhead.py [--size 640x480] [--rounds 7] [--runs 10] [-n 1] [-t 2]
                                    [-m DECODER.gguf --mmproj MMPROJ.gguf] [--cli target/release/pali]
                                    [--no-cpu]

The frame is examples/images/three_shapes_wide.png resized to --size (a camera frame),
saved as PNG for `pali bench` and loaded once into a numpy uint8 (H, W, 3) array for Python.
Rounds alternate: A = `pali bench FRAME.png -r RUNS -n N --json` (its median TTFT =
preprocess + vision + prefill), B = RUNS calls of `model.caption(frame, max_tokens=N,
ignore_eos=True)` in this process. For each call: the library's own TTFT; the binding's
overhead = the call's wall time - the generation thread's time (image + `Model::run`),
i.e. argument conversion, the frame's one copy, starting and joining the thread, the JSON
answer into Python objects; and the library's untimed work (its llama.cpp context,
tokenizing: the CLI has it too) = the thread's time - the timed stages. Then the wall time
to the first piece of `model.stream(frame, "caption en")`. And the CPU time per call on
each side (the CLI's from two runs of `pali bench`, RUNS and 2 x RUNS calls; with `-t 1`
this is steady however busy the machine is, since no ggml thread spins waiting for another).
Prints one JSON object: medians of the rounds' medians (and the best round's, least
disturbed by other processes).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

import pali

ROOT = Path(__file__).resolve().parents[2]


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-m", "--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--cli", default=str(ROOT / "target" / "release" / "pali"))
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU time per call")
    args = ap.parse_args()

    w, h = map(int, args.size.split("x"))
    src = PILImage.open(ROOT / "examples" / "images" / "three_shapes_wide.png").convert("RGB")
    tmp = Path(tempfile.mkdtemp())
    png = tmp / f"frame-{w}x{h}.png"
    src.resize((w, h), PILImage.BICUBIC).save(png)
    frame = np.asarray(PILImage.open(png).convert("RGB"))

    if args.model:
        model = pali.Model(args.model, args.mmproj, threads=args.threads, low_mem=False)
        model_flags = ["-m", args.model] + (["--mmproj", args.mmproj] if args.mmproj else [])
    else:
        model = pali.Model.demo(threads=args.threads, low_mem=False)
        decoder, mmproj, _ = model.paths
        model_flags = ["-m", str(decoder), "--mmproj", str(mmproj)]
    bench = [args.cli, "bench", str(png), "-r", str(args.runs), "-n", str(args.n),
             "-t", str(args.threads), "--low-mem", "off", "--json", *model_flags]
    opts = dict(max_tokens=args.n, ignore_eos=True)
    model.caption(frame, **opts)  # warm-up, as pali bench's first run

    med = statistics.median
    # Per round: pali bench's median TTFT, and the median of this process's RUNS calls.
    cli_ttft, py_ttft, binding, untimed, first_piece = [], [], [], [], []
    load = [os.getloadavg()[0]]
    cli_cpu, py_cpu = [], []

    def cpu_ms(who):
        r = resource.getrusage(who)
        return (r.ru_utime + r.ru_stime) * 1e3

    def run_cli(runs):
        c0 = cpu_ms(resource.RUSAGE_CHILDREN)
        cmd = bench[:4] + [str(runs)] + bench[5:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out), cpu_ms(resource.RUSAGE_CHILDREN) - c0

    for _ in range(args.rounds):
        out, cpu = run_cli(args.runs)
        cli_ttft.append(out["median_ttft_ms"])
        # CPU time per call: a second run with twice the calls, the difference per call
        # (loading and the warm-up cancel out). Robust to other processes with -t 1.
        if not args.no_cpu:
            _, cpu2 = run_cli(2 * args.runs)
            cli_cpu.append((cpu2 - cpu) / args.runs)
            c0 = cpu_ms(resource.RUSAGE_SELF)
            for _ in range(args.runs):
                model.caption(frame, **opts)
            py_cpu.append((cpu_ms(resource.RUSAGE_SELF) - c0) / args.runs)
        ttft, over, lib, first = [], [], [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            r = model.caption(frame, **opts)
            wall = (time.perf_counter() - t0) * 1e3
            t = r.timings
            ttft.append(t.ttft_ms)
            over.append(wall - r._run_ms)
            lib.append(r._run_ms - (t.ttft_ms + t.decode_ms))
            t0 = time.perf_counter()
            s = model.stream(frame, "caption en", **opts)
            next(s)
            first.append((time.perf_counter() - t0) * 1e3)
            s.close()
        for acc, v in zip((py_ttft, binding, untimed, first_piece), (ttft, over, lib, first)):
            acc.append(med(v))
        print(f"round {len(cli_ttft)}: pali bench {cli_ttft[-1]:.2f} ms, Python {py_ttft[-1]:.2f}"
              f" ms, binding {binding[-1]:.3f} ms", file=sys.stderr)
    load.append(os.getloadavg()[0])

    a = med(cli_ttft)
    print(json.dumps({
        "cpu": cpu_model(), "threads": args.threads, "frame": f"{w}x{h}",
        "frame_copy_bytes": pali.Image(frame).nbytes, "rounds": args.rounds,
        "runs_per_round": args.runs, "n_gen": args.n,
        "model": "demo" if not args.model else os.path.basename(args.model),
        "cli_ttft_ms_median_min": [round(a, 3), round(min(cli_ttft), 3)],
        "python_ttft_ms_median_min": [round(med(py_ttft), 3), round(min(py_ttft), 3)],
        "python_ttft_vs_cli": f"{(med(py_ttft) / a - 1) * 100:+.2f} %",
        "cli_cpu_ms_per_call": round(med(cli_cpu), 3) if cli_cpu else None,
        "python_cpu_ms_per_call": round(med(py_cpu), 3) if py_cpu else None,
        "binding_overhead_ms": round(med(binding), 3),
        "binding_overhead_ms_min": round(min(binding), 3),
        "binding_overhead_of_cli_ttft": f"{med(binding) / a * 100:.2f} %",
        "library_untimed_ms": round(med(untimed), 3),
        "stream_first_piece_ms": round(med(first_piece), 3),
        "loadavg_start_end": load,
    }, indent=1))


if __name__ == "__main__":
    main()
