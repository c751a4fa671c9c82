#!/usr/bin/env python3
"""Decoder GGUF size per `pali convert --type` for the PaliGemma 2 sizes, without converting.

    python3 scripts/decoder_sizes.py [3b|10b|28b ...]

Applies llama.cpp's per-tensor type choices for gemma2 (the rules `expected_decoder_type` in
tests/convert.rs checks against llama_model_quantize's output) to each model's tensor shapes.
Every measured 3B-224 file and the measured 10B Q4_K_M file are these sums plus 14.2 MB of
metadata (vocabulary and embedded tokenizer.json), which is added here (BENCHMARKS.md,
"Decoder types on full-size checkpoints").
"""
import sys

# Bytes per 256 weights of each ggml type used below.
BYTES_PER_256 = {"F16": 512, "Q8_0": 272, "Q6_K": 210, "Q5_K": 176, "Q4_K": 144, "Q3_K": 110,
                 "Q2_K": 84, "IQ4_NL": 144, "IQ4_XS": 136, "IQ3_S": 110, "Q4_0": 144}
# hidden, layers, heads, kv heads, head dim, ffn (Gemma 2 2B/9B/27B as in PaliGemma 2).
MODELS = {"3b": (2304, 26, 8, 4, 256, 9216), "10b": (3584, 42, 16, 8, 256, 14336),
          "28b": (4608, 46, 32, 16, 128, 36864)}
VOCAB = 257216
METADATA = 14.2e6
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL",
         "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "Q2_K"]
DEFAULT = {"F16": "F16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
           "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL",
           "IQ4_XS": "IQ4_XS", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
           "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "Q2_K": "Q2_K"}


def tensor_type(ft, name, i, n, gqa):
    """llama-quant.cpp's choice for one gemma2 matrix (all rows here are whole blocks)."""
    d = DEFAULT[ft]
    if ft == "F16":
        return d
    more_bits = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
    if name == "token_embd":  # tied with the output: llama.cpp's output rule
        return "Q8_0" if d == "Q8_0" else "Q6_K"
    if name == "attn_v":
        rules = {"Q2_K": "Q4_K" if gqa >= 4 else "Q3_K", "IQ3_M": "Q4_K",
                 "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K"}
        if ft == "IQ3_S" and gqa >= 4:
            return "Q4_K"
        if ft in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            return "Q5_K"
        if ft in ("Q4_K_M", "Q5_K_M") and more_bits:
            return "Q6_K"
        if ft == "Q4_K_S" and i < 4:
            return "Q5_K"
        return rules.get(ft, d)
    if name == "ffn_down":
        if ft == "Q2_K":
            return "Q3_K"
        if ft == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if ft == "IQ3_M" and i < n // 8:
            return "Q4_K"
        if ft == "Q3_K_L":
            return "Q5_K"
        if ft in ("Q4_K_M", "Q5_K_M") and more_bits:
            return "Q6_K"
        if ft in ("IQ4_NL", "IQ4_XS", "Q4_K_S") and i < n // 8:
            return "Q5_K"
        return d
    if name == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "IQ3_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft, d)
    return d


def decoder_bytes(model, ft):
    h, n, heads, kv, hd, ff = MODELS[model]
    gqa = heads // kv
    total = VOCAB * h * BYTES_PER_256[tensor_type(ft, "token_embd", 0, n, gqa)] / 256
    for i in range(n):
        for name, count in [("attn_q", h * heads * hd), ("attn_k", h * kv * hd),
                            ("attn_v", h * kv * hd), ("attn_output", heads * hd * h),
                            ("ffn_gate", h * ff), ("ffn_up", h * ff), ("ffn_down", ff * h)]:
            total += count * BYTES_PER_256[tensor_type(ft, name, i, n, gqa)] / 256
        total += 4 * h * 4  # four F32 norms per layer
    return total + h * 4 + METADATA


if __name__ == "__main__":
    models = sys.argv[1:] or list(MODELS)
    print("| type | " + " | ".join(f"{m.upper()} decoder" for m in models) + " |")
    print("|---|" + "---|" * len(models))
    for ft in TYPES:
        cells = [f"{decoder_bytes(m, ft) / 1e9:.2f} GB ({decoder_bytes(m, ft) / 2**30:.2f} GiB)"
                 for m in models]
        print(f"| {ft} | " + " | ".join(cells) + " |")
