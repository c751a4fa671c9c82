#!/usr/bin/env python3
"""Markdown tables (medians and ratios) from scripts/bench_anchors.sh's JSON lines.

    python3 scripts/bench_summary.py target/bench/anchors-3b-224.jsonl

FLOP counts for the roofline come from the checkpoint's config.json (models/big/pg2-SPEC):
matmul FLOPs only (2 per multiply-add), attention scores and values included, the LM head
once per prefill (llama.cpp computes the last position's logits only).
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def med(xs):
    xs = [x for x in xs if x is not None]
    return st.median(xs) if xs else None


def f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def flops(cfg: dict, n_prefix: int) -> tuple[float, float]:
    """(vision FLOPs per image, LM prefill FLOPs for n_prefix tokens)."""
    v = cfg["vision_config"]
    d, ffn, L = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    n = (v["image_size"] // v["patch_size"]) ** 2
    vision = L * (2 * n * (4 * d * d + 2 * d * ffn) + 4 * n * n * d)
    vision += 2 * n * 3 * v["patch_size"] ** 2 * d + 2 * n * d * cfg["text_config"]["hidden_size"]
    t = cfg["text_config"]
    h, hd, nh, nkv = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    per_tok = 2 * (h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * t["intermediate_size"])
    attn = 4 * n_prefix * n_prefix * nh * hd
    lm = t["num_hidden_layers"] * (n_prefix * per_tok + attn) + 2 * h * t["vocab_size"]
    return vision, lm


def main(path: str) -> None:
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    setup = next(r for r in rows if r["kind"] == "setup")
    print(f"Run: {setup['date']}, {setup['cpu']}, {setup['threads']} threads, "
          f"{setup['n_prefix']} prefix tokens, {setup['n_predict']} generated, image {setup['image']}.\n")
    pali: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "pali":
            pali.setdefault(r["label"], []).append(r["result"])
    lb: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "llama-bench":
            lb.setdefault(r["label"], []).append(r)
    roof = next((r["result"] for r in rows if r["kind"] == "roofline"), None)

    print("### pali vs llama.cpp (llama-bench), same decoder GGUF, alternating runs, medians\n")
    print("| decoder | pali prefill tok/s | llama.cpp pp tok/s | ratio | pali decode tok/s | "
          "llama.cpp tg tok/s (depth = prefix) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for ty, runs in lb.items():
        p = pali.get(ty, [])
        ppf = med([x["prefill_tok_s"] for x in p])
        pdec = med([x["median_decode_tok_s"] for x in p])
        lpp = med([x["pp"]["avg_ts"] for x in runs])
        ltg = med([x["tg"]["avg_ts"] for x in runs])
        print(f"| {ty} | {f(ppf, '{:.1f}')} | {f(lpp, '{:.1f}')} | {f(ppf / lpp if ppf and lpp else None)} "
              f"| {f(pdec)} | {f(ltg)} | {f(pdec / ltg if pdec and ltg else None)} |")
    print(f"\n({len(next(iter(lb.values()), []))} rounds.)\n")

    print("### pali, every stage (medians over rounds)\n")
    print("| decoder + vision | load | preprocess | vision | prefill | TTFT | decode | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for label, p in pali.items():
        lab = label if "vision" in label else label + (" + F16" if "low-mem" not in label else "")
        g = lambda k: med([x[k] for x in p])
        print(f"| {lab} | {f(g('load_ms') / 1e3)} s | {f(g('median_preprocess_ms'), '{:.1f}')} ms "
              f"| {f(g('median_vision_ms') / 1e3)} s | {f(g('median_prefill_ms') / 1e3)} s "
              f"| {f(g('median_ttft_ms') / 1e3)} s | {f(g('median_decode_tok_s'))} tok/s "
              f"| {f(g('peak_rss_mb'), '{:.0f}')} MiB |")

    cold = [r for r in rows if r["kind"] == "cold"]
    if cold:
        print("\n### Cold start (page cache dropped), Q4_K_M + F16, one caption token\n")
        print("| mode | process wall | load | TTFT after load | peak RSS |")
        print("|---|---|---|---|---|")
        for r in cold:
            t = r["result"]["timings"]
            ttft = t["preprocess_ms"] + t["vision_ms"] + t["prefill_ms"]
            print(f"| {r['label']} | {r['process_s']:.2f} s | {t['load_ms'] / 1e3:.2f} s | {ttft / 1e3:.2f} s "
                  f"| {r['result']['peak_rss_mb']:.0f} MiB |")

    hf = [r["result"] for r in rows if r["kind"] == "hf"]
    if hf:
        print("\n### HF transformers on CPU, same checkpoint (medians)\n")
        print("| dtype | runs | load | vision | prefill (incl. vision) | TTFT | decode | peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        for dt in ("f32", "bf16"):
            h = [x for x in hf if x["dtype"] == dt]
            if not h:
                continue
            g = lambda k: med([x[k] for x in h])
            print(f"| {dt} | {len(h)} | {f(g('load_s'))} s | {f(g('vision_s'))} s | {f(g('prefill_s'))} s "
                  f"| {f(g('ttft_s'))} s | {f(g('decode_tok_s'))} tok/s | {f(g('peak_rss_mib') / 1024)} GiB |")
        h32 = [x for x in hf if x["dtype"] == "f32"]
        h16 = [x for x in hf if x["dtype"] == "bf16"]
        if h32:
            print("\n| pali | TTFT | / HF f32 TTFT | / HF bf16 TTFT |")
            print("|---|---|---|---|")
            for label, p in pali.items():
                t = med([x["median_ttft_ms"] for x in p]) / 1e3
                r16 = f"{t / med([x['ttft_s'] for x in h16]):.2f}" if h16 else "-"
                print(f"| {label} | {t:.2f} s | {t / med([x['ttft_s'] for x in h32]):.2f} | {r16} |")

    if roof:
        s = roof["stream"]
        print("\n### Roofline\n")
        print(f"Bandwidth ({roof['threads']} threads): copy {s['copy']:.1f}, triad {s['triad']:.1f}, "
              f"read {s['read']:.1f} GB/s.\n")
        ckpt = Path("models/big") / f"pg2-{setup['spec']}" / "config.json"
        cfg = json.loads(ckpt.read_text()) if ckpt.exists() else None
        print("| decoder | weight bytes / token | decode roofline (read BW) | pali decode | fraction |")
        print("|---|---|---|---|---|")
        for ty, runs in lb.items():
            size = runs[0]["tg"]["model_size"]
            bound = s["read"] * 1e9 / size
            pdec = med([x["median_decode_tok_s"] for x in pali.get(ty, [])])
            print(f"| {ty} | {size / 1e9:.2f} GB | {bound:.1f} tok/s | {f(pdec)} tok/s "
                  f"| {f(pdec / bound if pdec else None, '{:.0%}')} |")
        if cfg:
            vis_fl, lm_fl = flops(cfg, setup["n_prefix"])
            mm = {(m["type"], m["m"]): m for m in roof["matmul"]}
            def best(ty, kernel="ggml"):
                return max((m["gflops"] for m in roof["matmul"]
                            if m["type"].lower() == ty.lower() and m["m"] > 1
                            and m.get("kernel", "ggml") == kernel), default=None)
            blas = {t: best(t, "blas") for t in ("f32", "f16", "bf16") if best(t, "blas")}
            print(f"\nVision {vis_fl / 1e9:.0f} GFLOP per image, LM prefill {lm_fl / 1e9:.0f} GFLOP "
                  f"({setup['n_prefix']} tokens). ggml matmul throughput measured here (best M > 1):"
                  f" {', '.join(f'{t} {best(t):.0f}' for t in sorted({m['type'] for m in roof['matmul']}) if best(t))}"
                  " GFLOP/s" + (f"; pali's OpenBLAS op: {', '.join(f'{t} {g:.0f}' for t, g in blas.items())} GFLOP/s"
                                 if blas else "") + ".\n")
            print("| stage | pali | achieved | roofline type | fraction |")
            print("|---|---|---|---|---|")
            for label, key, ty_w, stage in [
                    ("F16 vision on OpenBLAS (widened to F32)", "Q4_K_M", "F16 OpenBLAS", "vision"),
                    ("F16 vision, PALI_NO_BLAS (ggml, widened)", "Q4_K_M PALI_NO_BLAS", "F32", "vision"),
                    ("Q8_0 vision (int8)", "Q4_K_M+Q8_0 vision", "Q8_0", "vision"),
                    ("Q8_0 vision (int8), vs ggml's best type", "Q4_K_M+Q8_0 vision", "Q4_K", "vision"),
                    ("Q4_K_M decoder", "Q4_K_M", "Q4_K", "prefill"),
                    ("Q4_0 decoder", "Q4_0", "Q4_0", "prefill"),
                    ("Q8_0 decoder", "Q8_0", "Q8_0", "prefill")]:
                p = pali.get(key)
                b = blas.get("f16") if ty_w == "F16 OpenBLAS" else best(ty_w)
                if not p or not b:
                    continue
                secs = med([x["median_vision_ms" if stage == "vision" else "median_prefill_ms"] for x in p]) / 1e3
                fl = vis_fl if stage == "vision" else lm_fl
                print(f"| {stage}, {label} | {secs:.2f} s | {fl / secs / 1e9:.0f} GFLOP/s | {ty_w} {b:.0f} "
                      f"| {fl / secs / 1e9 / b:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1])
