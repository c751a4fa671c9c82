"""Full-size random PaliGemma 2 checkpoints, for speed and memory benchmarks only.

    python models/make_big_checkpoint.py 3b-224 models/big/pg2-3b-224
    python models/make_big_checkpoint.py 10b-896 models/big/pg2-10b-896

Writes an HF folder in the Hub layout with the real shapes (config.json, sharded bf16
safetensors + index, tokenizer.model, tokenizer.json, preprocessor_config.json). Weights are
random N(0, 0.02) (norm offsets 0), written tensor by tensor so memory stays small. The
tokenizer is the fixtures' small SentencePiece model padded with `<unusedN>` pieces to
Gemma's 256000, then `<loc>`/`<seg>` and `<image>` at their real ids (256000..257152), so
ids, vocabulary and embedding sizes match the released checkpoints. Never committed
(models/big/ is git-ignored). Needs numpy, sentencepiece, protobuf (models/fixtures/requirements.txt).
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

SIZES = {
    # name: (text hidden, layers, heads, kv heads, head_dim, intermediate, qpas)
    "3b": (2304, 26, 8, 4, 256, 9216, 256),
    "10b": (3584, 42, 16, 8, 256, 14336, 256),
    "28b": (4608, 46, 32, 16, 128, 36864, 144),
}
VISION = dict(hidden=1152, layers=27, heads=16, intermediate=4304, patch=14)
BASE_VOCAB, N_LOC, N_SEG = 256000, 1024, 128
V_REAL = BASE_VOCAB + N_LOC + N_SEG  # 257152
ROWS = 257216


def tokenizer_files(out: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "tiny-224" / "hf"
    proto = sp_pb2.ModelProto.FromString((fixture / "tokenizer.model").read_bytes())
    small = [p for p in proto.pieces if not p.piece.startswith(("<loc", "<seg"))]
    big = sp_pb2.ModelProto()
    big.CopyFrom(proto)
    del big.pieces[:]
    for p in small:
        big.pieces.append(p)
    for i in range(BASE_VOCAB - len(small)):
        p = big.pieces.add()
        p.piece, p.score, p.type = f"<unused{i}>", 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    for piece in [f"<loc{i:04d}>" for i in range(N_LOC)] + [f"<seg{i:03d}>" for i in range(N_SEG)]:
        p = big.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    assert len(big.pieces) == V_REAL
    (out / "tokenizer.model").write_bytes(big.SerializeToString())

    tj = json.loads((fixture / "tokenizer.json").read_text())
    vocab = {p.piece: i for i, p in enumerate(small)}
    added = [t for t in tj["added_tokens"] if t["id"] < len(small)]
    nxt = len(small)
    for i in range(BASE_VOCAB - len(small)):  # plain (unreachable) BPE vocabulary entries
        vocab[f"<unused{i}>"] = nxt + i
    for k, piece in enumerate([f"<loc{i:04d}>" for i in range(N_LOC)] + [f"<seg{i:03d}>" for i in range(N_SEG)]):
        added.append({"id": BASE_VOCAB + k, "content": piece, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": False})
    added.append({"id": V_REAL, "content": "<image>", "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True})
    tj["added_tokens"] = added
    tj["model"]["vocab"] = vocab
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((fixture / name).read_bytes())


def shapes(size: str, image: int):
    h, layers, heads, kv, hd, inter, _ = SIZES[size]
    d, f, p = VISION["hidden"], VISION["intermediate"], VISION["patch"]
    n = (image // p) ** 2
    t = [("language_model.model.embed_tokens.weight", (ROWS, h))]
    for i in range(layers):
        pre = f"language_model.model.layers.{i}."
        t += [(pre + "self_attn.q_proj.weight", (heads * hd, h)), (pre + "self_attn.k_proj.weight", (kv * hd, h)),
              (pre + "self_attn.v_proj.weight", (kv * hd, h)), (pre + "self_attn.o_proj.weight", (h, heads * hd)),
              (pre + "mlp.gate_proj.weight", (inter, h)), (pre + "mlp.up_proj.weight", (inter, h)),
              (pre + "mlp.down_proj.weight", (h, inter))]
        t += [(pre + n_, (h,)) for n_ in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                          "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")]
    t.append(("language_model.model.norm.weight", (h,)))
    v = "vision_tower.vision_model."
    t += [(v + "embeddings.patch_embedding.weight", (d, 3, p, p)), (v + "embeddings.patch_embedding.bias", (d,)),
          (v + "embeddings.position_embedding.weight", (n, d))]
    for i in range(VISION["layers"]):
        pre = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t += [(pre + f"self_attn.{proj}.weight", (d, d)), (pre + f"self_attn.{proj}.bias", (d,))]
        t += [(pre + "layer_norm1.weight", (d,)), (pre + "layer_norm1.bias", (d,)),
              (pre + "layer_norm2.weight", (d,)), (pre + "layer_norm2.bias", (d,)),
              (pre + "mlp.fc1.weight", (f, d)), (pre + "mlp.fc1.bias", (f,)),
              (pre + "mlp.fc2.weight", (d, f)), (pre + "mlp.fc2.bias", (d,))]
    t += [(v + "post_layernorm.weight", (d,)), (v + "post_layernorm.bias", (d,)),
          ("multi_modal_projector.linear.weight", (h, d)), ("multi_modal_projector.linear.bias", (h,))]
    return t


def write_shards(out: Path, tensors, shard_bytes: int = 4 << 30) -> None:
    rng = np.random.default_rng(0)
    groups, cur, size = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in group:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        total += off
        hj = json.dumps(header).encode()
        hj += b" " * (-len(hj) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for name, shape in group:
                n = int(np.prod(shape))
                is_norm = len(shape) == 1 and "norm" in name
                for start in range(0, n, 1 << 24):
                    m = min(1 << 24, n - start)
                    x = np.zeros(m, np.float32) if is_norm else rng.standard_normal(m, np.float32) * 0.02
                    f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
        print(f"wrote {fname}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def main() -> None:
    spec, out = sys.argv[1], Path(sys.argv[2])
    size, image = spec.split("-")
    image = int(image)
    h, layers, heads, kv, hd, inter, qpas = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    n = (image // 14) ** 2
    config = {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "image_token_index": V_REAL,
        "projection_dim": h, "hidden_size": 2048, "_name_or_path": f"google/paligemma2-{size}-pt-{image}",
        "text_config": {"model_type": "gemma2", "hidden_size": h, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
                        "intermediate_size": inter, "query_pre_attn_scalar": qpas, "vocab_size": ROWS,
                        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                        "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh"},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14,
                          "image_size": image, "num_image_tokens": n, "projection_dim": h,
                          "vision_use_head": False},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    pp = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": image, "width": image},
          "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_seq_length": n}
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    tokenizer_files(out)
    write_shards(out, shapes(size, image))


if __name__ == "__main__":
    main()
