"""A PEFT LoRA adapter for a full-size random checkpoint (models/make_big_checkpoint.py), for
the adapter benchmarks only (BENCHMARKS.md, "LoRA adapters"):

    python models/make_big_lora.py models/big/pg2-3b-224 8 models/big/lora-r8

HF's fine-tuning recipe (smol-vision `paligemma.py`): `LoraConfig(r=R, target_modules=
["q_proj","o_proj","k_proj","v_proj","gate_proj","up_proj","down_proj"], task_type=
"CAUSAL_LM")`, matched by suffix, so SigLIP's q/k/v_proj get adapters too; lora_alpha = r.
`lora_B` is random (PEFT leaves it 0) so that the adapter does change the model. The model
is loaded in bf16 (about 6 GB of RAM for a 3B). Needs models/fixtures/requirements-lora.txt.
"""

import sys

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PaliGemmaForConditionalGeneration


def main() -> None:
    src, r, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(r)
    model = PaliGemmaForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16)
    cfg = LoraConfig(r=r, lora_alpha=r, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_B:
                b = mod.lora_B["default"].weight
                b.copy_(torch.randn(b.shape) * 0.02)
    pm.save_pretrained(out)
    n = sum(1 for m in pm.modules() if isinstance(m, LoraLayer))
    print(f"{out}: r={r}, {n} adapted layers")


if __name__ == "__main__":
    main()
