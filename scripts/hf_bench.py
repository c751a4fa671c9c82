#!/usr/bin/env python3
"""HF transformers anchor for the pali benchmark: PaliGemma 2 on CPU (or a GPU), f32 or bf16.

Usage:

    python3 scripts/hf_bench.py CKPT_DIR IMAGE --dtype f32|bf16 --threads T [--device cuda] \
        --n-predict 32 --prompt "caption en" [--runs R] [--warmup W] [--print-text] \
        [--check-generate]

CKPT_DIR is a Hugging Face PaliGemma 2 checkpoint (the hub layout, e.g. models/demo/hf).
The model is loaded once (``PaliGemmaForConditionalGeneration.from_pretrained`` with
``dtype=torch.float32`` or ``torch.bfloat16``, plus ``AutoProcessor.from_pretrained``), then
W untimed warm-up runs (default 1, like ``pali bench``) and R timed runs (default 1) follow.
Each timed run prints ONE JSON line to stdout. Driving HF follows
models/fixtures/make_fixtures.py: prompt text ``"<image>" + prompt``, image ``convert("RGB")``,
``token_type_ids`` from the processor (all 0 = the whole prefix attended bidirectionally),
greedy argmax over HF's raw (soft-capped) logits. ``torch.set_num_threads(T)``,
``torch.set_num_interop_threads(1)``, ``torch.inference_mode()``, default HF attention
implementation (reported in ``attn``; Gemma 2 has no SDPA path, so the decoder is eager).

Fields (times in seconds, wall clock, ``time.perf_counter``):

* ``dtype``, ``threads``, ``run`` (0-based index of the timed run), ``attn``.
* ``load_s``: from_pretrained of the model + AutoProcessor (once; same value on every line).
* ``preprocess_s``: ``convert("RGB")`` of the loaded PIL image + the processor on image and
  prompt (resize, normalise, tokenize) + the cast of pixel_values to the model dtype.
* ``vision_s``: the image-features path alone, ``model.get_image_features(pixel_values)``
  (SigLIP + multi-modal projector), timed separately; it is NOT subtracted from prefill_s.
* ``prefill_s``: one forward of the whole prefix (image tokens + ``<bos>`` prompt ``\\n``)
  from pixel_values and input_ids, i.e. INCLUDING the vision tower, with token_type_ids,
  building the KV cache, logits for the last position only (``logits_to_keep=1``, as
  ``generate`` does). Gives the first generated token.
* ``ttft_s``: preprocess_s + prefill_s: time to first token from the PIL image.
* ``decode_s``: the remaining n_predict - 1 single-token forwards with the KV cache
  (+ argmax). Exactly n_predict tokens are generated; eos does not stop the loop.
* ``decode_tok_s``: (n_predict - 1) / decode_s, single-token forwards per second: the same
  definition as ``pali bench``'s decode tok/s and llama-bench's tg.
  ``decode_tok_s_incl_first`` = n_predict / decode_s counts the first token too.
* ``n_prefix``: prefix tokens (image tokens + text); ``n_gen``: generated tokens.
* ``peak_rss_mib``: ``getrusage(RUSAGE_SELF).ru_maxrss / 1024`` at the end of the run: the
  process-wide peak so far, load included (monotone over runs).
* with ``--print-text``: ``text`` (the generated tokens before the first eos, decoded with
  ``skip_special_tokens=True``, i.e. what pali prints) and ``tokens`` (all n_predict ids).

``--check-generate`` (after the timed runs, not timed) also runs
``model.generate(do_sample=False, max_new_tokens=n_predict)`` and checks that its tokens
equal the manual loop's up to and including the first eos; it exits non-zero if not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="HF PaliGemma 2 checkpoint folder")
    p.add_argument("image", help="image file")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda); on a GPU every timer waits for the GPU")
    p.add_argument("--n-predict", type=int, default=32)
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--runs", type=int, default=1, help="timed runs (one JSON line each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (pali bench: 1)")
    p.add_argument("--print-text", action="store_true", help='add "text" and "tokens"')
    p.add_argument("--check-generate", action="store_true",
                   help="compare the manual greedy loop with model.generate (untimed)")
    a = p.parse_args()
    if a.n_predict < 1 or a.runs < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--n-predict, --runs and --threads must be >= 1, --warmup >= 0")
    return a


def main() -> int:
    args = parse_args()

    import torch  # after argparse so that --help is fast

    # Before any parallel work: set_num_interop_threads fails once the pool has started.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    from PIL import Image
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.ckpt, dtype=dtype)
    model.to(args.device)
    model.eval()
    dev = torch.device(args.device)

    def now() -> float:
        # GPU work is asynchronous: a timer reads the clock only once the GPU is done.
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    processor = AutoProcessor.from_pretrained(args.ckpt)
    load_s = now() - t0

    with Image.open(args.image) as im:
        im.load()
        image = im.copy()
    text = "<image>" + args.prompt
    n = args.n_predict
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    attn = {"text": model.config.text_config._attn_implementation,
            "vision": model.config.vision_config._attn_implementation}

    # transformers renamed past_key_values to cache (5.2x); accept either.
    import inspect
    cache_kw = ("cache" if "cache" in inspect.signature(model.forward).parameters
                else "past_key_values")

    def cache_of(out):
        return out.cache if hasattr(out, "cache") else out.past_key_values

    def one_run() -> dict:
        t = now()
        enc = processor(text=text, images=image.convert("RGB"), return_tensors="pt")
        input_ids = enc["input_ids"].to(dev)
        token_type_ids = enc["token_type_ids"].to(dev)
        pixel_values = enc["pixel_values"].to(dev, dtype)
        preprocess_s = now() - t

        t = now()
        feats = model.get_image_features(pixel_values).pooler_output
        vision_s = now() - t
        del feats

        t = now()
        out = model(input_ids=input_ids, pixel_values=pixel_values,
                    attention_mask=torch.ones_like(input_ids), token_type_ids=token_type_ids,
                    use_cache=True, logits_to_keep=1)
        tok = int(torch.argmax(out.logits[0, -1]))
        prefill_s = now() - t
        cache = cache_of(out)
        tokens = [tok]

        t = now()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]], device=dev), **{cache_kw: cache},
                        use_cache=True, logits_to_keep=1)
            cache = cache_of(out)
            tok = int(torch.argmax(out.logits[0, -1]))
            tokens.append(tok)
        decode_s = now() - t

        return {
            "preprocess_s": preprocess_s, "vision_s": vision_s, "prefill_s": prefill_s,
            "ttft_s": preprocess_s + prefill_s, "decode_s": decode_s,
            "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "decode_tok_s_incl_first": n / decode_s if n > 1 and decode_s > 0 else None,
            "n_prefix": int(input_ids.shape[1]), "n_gen": len(tokens), "_tokens": tokens,
            "_enc": enc,
        }

    with torch.inference_mode():
        for _ in range(args.warmup):
            one_run()
        last = None
        for r in range(args.runs):
            res = one_run()
            tokens, last = res.pop("_tokens"), res.pop("_enc")
            row = {"dtype": args.dtype, "device": args.device, "threads": args.threads,
                   "run": r, "load_s": load_s}
            row.update(res)
            row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row["attn"] = attn
            if args.print_text:
                cut = next((i for i, x in enumerate(tokens) if x in eos_ids), len(tokens))
                row["text"] = processor.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
                row["tokens"] = tokens
            print(json.dumps(row), flush=True)

        if args.check_generate:
            enc = last
            g = model.generate(input_ids=enc["input_ids"].to(dev),
                               pixel_values=enc["pixel_values"].to(dev, dtype),
                               attention_mask=torch.ones_like(enc["input_ids"]).to(dev),
                               token_type_ids=enc["token_type_ids"].to(dev),
                               do_sample=False, max_new_tokens=n)
            gen = g[0, enc["input_ids"].shape[1]:].tolist()
            cut = next((i + 1 for i, x in enumerate(tokens) if x in eos_ids), len(tokens))
            ok = gen == tokens[:cut]
            print(f"check-generate: {'OK' if ok else 'MISMATCH'} generate={gen} "
                  f"manual={tokens[:cut]}", file=sys.stderr)
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
