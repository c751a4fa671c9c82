"""A decoder-only PEFT LoRA adapter for the full-size random 3B (models/make_big_checkpoint.py)
written with numpy alone, for the adapter benchmarks where torch and peft are not installed
(BENCHMARKS.md, "LoRA adapters"):

    python models/make_big_lora_numpy.py 8 models/big/lora-np-r8

The files PEFT's save_pretrained writes for `LoraConfig(r=R, lora_alpha=R, target_modules=
["q_proj","o_proj","k_proj","v_proj","gate_proj","up_proj","down_proj"])` on the decoder's
182 linear layers (transformers 5.x key layout; the vision tower left out), A and B drawn
N(0, 0.02) in float32. models/make_big_lora.py makes the real PEFT adapter (SigLIP included).
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2304, 9216, 26, 8, 4, 256
# module: (group, in, out)
MODULES = {
    "q_proj": ("self_attn", HIDDEN, HEADS * HEAD_DIM),
    "k_proj": ("self_attn", HIDDEN, KV_HEADS * HEAD_DIM),
    "v_proj": ("self_attn", HIDDEN, KV_HEADS * HEAD_DIM),
    "o_proj": ("self_attn", HEADS * HEAD_DIM, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTER),
    "up_proj": ("mlp", HIDDEN, INTER),
    "down_proj": ("mlp", INTER, HIDDEN),
}


def main() -> None:
    r, out = int(sys.argv[1]), Path(sys.argv[2])
    rng = np.random.default_rng(r)
    tensors = {}
    for layer in range(LAYERS):
        for name, (group, n_in, n_out) in MODULES.items():
            key = f"base_model.model.model.language_model.layers.{layer}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, n_in), np.float32) * 0.02
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((n_out, r), np.float32) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for key, t in tensors.items():
        header[key] = {"dtype": "F32", "shape": list(t.shape),
                       "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(out / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.tobytes())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
              "target_modules": sorted(MODULES), "bias": "none", "use_dora": False,
              "use_rslora": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "base_model_name_or_path": "models/big/pg2-3b-224"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"{out}: r={r}, {len(tensors) // 2} adapted layers")


if __name__ == "__main__":
    main()
