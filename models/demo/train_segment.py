#!/usr/bin/env python3
"""Teach pali's demo model to segment: a mask VQ-VAE for its shapes, then a short fine-tune.

How to run (CPU, two threads, about 25 minutes), after ``train_demo.py``:

    python models/demo/train_segment.py
    pali convert-vae models/demo/vae-shapes.npz -o models/demo/vae-pali-demo.gguf --force
    pali convert models/demo/hf -o models/demo --type f16 --name pali-demo --force

What it does:

1. **Mask VQ-VAE** in the layout of big_vision's ``vae-oid.npz`` (PyTorch ``state_dict``
   names: ``_vq_vae._embedding`` [128, 512], ``decoder.*`` exactly as the real decoder:
   1x1 conv, two residual blocks, four ``ConvTranspose2d(k=4, s=2, p=1)``, 1x1 conv; see
   ``models/fixtures/make_vae_fixture.py``), plus a small training-only encoder saved as
   ``encoder.*`` (the real file carries its encoder too; converters ignore it). Trained on the
   objects of fresh ``shapes.py`` scenes the way PaliGemma's masks are made: each object's
   binary mask cropped to its box and resized to 64x64 (PIL bilinear), 16 codes per mask
   (a 4x4 grid), decoder logits against the soft 64x64 target (binary cross-entropy), with
   the usual VQ codebook/commitment losses (beta 0.25) and dead-code restarts. The saved
   decoder is checked against big_vision's Flax semantics (``bv_decode`` of the fixture
   script) on the saved arrays.
2. **Fine-tune** of the committed ``hf/`` checkpoint with ``segment <shape>`` added to the
   task mixture: per training image two prompts as in ``train_demo.py``, and with
   probability ``P_SEG`` the first one is a segmentation prompt instead. Target, as
   PaliGemma's: per matching object (left to right) its 4 ``<loc>`` tokens, the 16
   ``<segNNN>`` codes of its mask from the VQ-VAE encoder, a space and the query, groups
   joined by `` ; ``; ``none`` if the shape is absent. Same loss as ``train_demo.py`` (loc
   soft targets at the final width of 1 bin; no auxiliary head), AdamW, lr ``LR`` warm-up
   then cosine, ended by the wall clock (``--max-minutes``).
3. **Evaluation** (HF float32, greedy) on held-out scenes: the original tasks
   (``train_demo.evaluate``) and ``segment <shape>``: per ground-truth object, the mask IoU
   of the matched predicted mask placed in the original image as pali and big_vision's
   evaluator do (box edges truncated, PIL bilinear resize of the 64x64 logits, > 0).
   Written to ``models/demo/segment_eval.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "models" / "fixtures"))
sys.path.insert(0, str(HERE))

import make_fixtures as mf  # noqa: E402
import make_vae_fixture as vf  # noqa: E402
import shapes  # noqa: E402
import train_demo as td  # noqa: E402
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor  # noqa: E402

SEED = 17
EVAL_SEED = 2_000_003
NPZ = HERE / "vae-shapes.npz"
D = 512  # codebook width, as in the real vae-oid.npz
MAP = 64
VAE_STEPS = 1500
VAE_BATCH = 64
LR = 6e-4
WARMUP = 30
P_SEG = 0.6
N_SEG_EVAL = 100
SEG_RE = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>){16}) ?([^;<]*)")


# ------------------------------------------------------------------------------ VQ-VAE

def mask64(obj: shapes.Obj) -> np.ndarray:
    """The object's binary mask cropped to its box, resized to 64x64 (PIL bilinear, float)."""
    x1, y1, x2, y2 = obj.box
    crop = obj.mask[y1:y2, x1:x2].astype(np.float32)
    return np.asarray(Image.fromarray(crop, "F").resize((MAP, MAP), Image.BILINEAR), np.float32)


class MaskVae(torch.nn.Module):
    """Training-only encoder + codebook + the real decoder (``vf.TorchVae``'s names)."""

    def __init__(self):
        super().__init__()
        c = lambda i, o: torch.nn.Conv2d(i, o, 4, stride=2, padding=1)  # noqa: E731
        self.encoder = torch.nn.Sequential(
            c(1, 32), torch.nn.ReLU(), c(32, 64), torch.nn.ReLU(), c(64, 128), torch.nn.ReLU(),
            c(128, 128), torch.nn.ReLU(), torch.nn.Conv2d(128, D, 1))
        dec = vf.TorchVae(D)
        self.decoder = dec.decoder
        self.codebook = torch.nn.Parameter(torch.randn(vf.NUM_CODES, D) * 0.1)

    def encode(self, m: torch.Tensor):
        """[B, 64, 64] -> pre-quantisation [B, 16, D] and codes [B, 16]."""
        z = self.encoder(m[:, None]).permute(0, 2, 3, 1).reshape(m.shape[0], 16, D)
        d = torch.cdist(z.reshape(-1, D), self.codebook)
        return z, d.argmin(-1).reshape(m.shape[0], 16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        e = self.codebook[codes.reshape(-1)].reshape(codes.shape[0], 4, 4, D)
        return self.decoder(e.permute(0, 3, 1, 2))[:, 0]

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {"_vq_vae._embedding": self.codebook.detach().numpy().astype(np.float32)}
        for k, v in self.decoder.state_dict().items():
            out[f"decoder.{k}"] = v.numpy().astype(np.float32)
        for k, v in self.encoder.state_dict().items():
            out[f"encoder.{k}"] = v.numpy().astype(np.float32)
        return out


def mask_pool(rng: random.Random, n: int) -> np.ndarray:
    out = []
    while len(out) < n:
        out += [mask64(o) for o in shapes.make_scene(rng).objects]
    return np.stack(out[:n])


def train_vae(rng: random.Random) -> tuple[MaskVae, dict]:
    t0 = time.time()
    train = torch.from_numpy(mask_pool(rng, 12000))
    held = torch.from_numpy(mask_pool(random.Random(EVAL_SEED), 1000))
    print(f"vae: {len(train)} training masks ({time.time() - t0:.0f} s)", flush=True)
    vae = MaskVae()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    usage = torch.zeros(vf.NUM_CODES)
    for step in range(1, VAE_STEPS + 1):
        lr = 1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / VAE_STEPS)))
        for g in opt.param_groups:
            g["lr"] = lr
        m = train[torch.randint(len(train), (VAE_BATCH,))]
        z, codes = vae.encode(m)
        e = vae.codebook[codes]
        vq = F.mse_loss(e, z.detach()) + 0.25 * F.mse_loss(z, e.detach())
        zq = z + (e - z).detach()  # straight-through
        logits = vae.decoder(zq.reshape(-1, 4, 4, D).permute(0, 3, 1, 2))[:, 0]
        rec = F.binary_cross_entropy_with_logits(logits, m)
        loss = rec + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage = 0.99 * usage + torch.bincount(codes.reshape(-1), minlength=vf.NUM_CODES).float()
        if step % 100 == 0 and step < VAE_STEPS * 0.8:  # restart dead codes on encoder outputs
            dead = (usage < 1e-2).nonzero()[:, 0]
            if len(dead):
                with torch.no_grad():
                    src = z.detach().reshape(-1, D)
                    vae.codebook[dead] = src[torch.randint(len(src), (len(dead),))]
        if step % 250 == 0:
            print(f"vae step {step}  rec {rec.item():.4f}  vq {vq.item():.4f}  "
                  f"codes used {(usage > 1e-2).sum().item()}", flush=True)
    with torch.no_grad():
        _, codes = vae.encode(held)
        rec = vae.decode(codes) > 0
        gt = held > 0.5
        iou = ((rec & gt).sum((1, 2)) / (rec | gt).sum((1, 2)).clamp(min=1)).float()
    stats = dict(steps=VAE_STEPS, seconds=round(time.time() - t0, 1),
                 heldout_masks=len(held), heldout_mean_iou_64=float(iou.mean()),
                 codes_used=int(len(codes.unique())))
    print("vae:", json.dumps(stats), flush=True)
    return vae, stats


def save_vae(vae: MaskVae) -> None:
    arrays = vae.state_arrays()
    vf.write_npz(NPZ, arrays)
    NPZ.chmod(0o644)
    # the saved decoder under big_vision's Flax semantics equals the PyTorch decoder
    codes = np.random.default_rng(3).integers(0, vf.NUM_CODES, (4, 16))
    ref = vf.bv_decode(vf.bv_params(arrays), codes)
    with torch.no_grad():
        got = vae.decode(torch.from_numpy(codes)).numpy()
    err = float(np.abs(ref - got).max())
    assert err < 1e-3 * max(1.0, float(np.abs(ref).max())), err
    print(f"{NPZ}: {NPZ.stat().st_size / 1e6:.2f} MB; Flax-semantics decode matches (max err {err:.2e})")


# ------------------------------------------------------------------------------ fine-tune

def seg_tokens(codes) -> str:
    return "".join(f"<seg{int(c):03d}>" for c in codes)


def segment_target(sc: shapes.Scene, query: str, codes: dict[int, list[int]]) -> str:
    w, h = sc.size
    groups = [f"{shapes.loc_tokens(o.box, w, h)}{seg_tokens(codes[i])} {query}"
              for i, o in enumerate(sc.objects) if shapes.matches(o, query)]
    return " ; ".join(groups) if groups else "none"


def object_codes(vae: MaskVae, scenes) -> list[dict[int, list[int]]]:
    masks = [mask64(o) for s in scenes for o in s.objects]
    with torch.no_grad():
        _, codes = vae.encode(torch.from_numpy(np.stack(masks)))
    out, k = [], 0
    for s in scenes:
        out.append({i: codes[k + i].tolist() for i in range(len(s.objects))})
        k += len(s.objects)
    return out


def segment_query(sc: shapes.Scene, rng: random.Random) -> str:
    present = sorted({o.shape for o in sc.objects})
    absent = [s for s in shapes.SHAPES if s not in present]
    return rng.choice(absent) if absent and rng.random() < 0.1 else rng.choice(present)


def make_batch(enc: td.Encoder, vae: MaskVae, rng: random.Random, n_images: int):
    scenes = [shapes.make_scene(rng) for _ in range(n_images)]
    codes = object_codes(vae, scenes)
    pv = torch.stack([td.pixels(s.image) for s in scenes])
    seqs = []
    for s, c in zip(scenes, codes):
        pairs = td.sample_tasks(s, rng)
        if rng.random() < P_SEG:
            q = segment_query(s, rng)
            pairs[0] = (f"segment {q}", segment_target(s, q, c))
        seqs += [enc.sequence(p, t) for p, t in pairs]
    T = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    am = torch.zeros(len(seqs), T, dtype=torch.long)
    tt = torch.ones(len(seqs), T, dtype=torch.long)
    pos, tgt = [], []
    for b, (s, n_pre) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        am[b, :len(s)] = 1
        tt[b, :n_pre] = 0
        for t in range(n_pre, len(s)):
            pos.append(b * T + t - 1)
            tgt.append(s[t])
    return pv, ids, am, tt, torch.tensor(pos), torch.tensor(tgt), None


def finetune(model, enc, vae, rng, minutes: float) -> dict:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": td.WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98))
    model.train()
    t0, hist, step = time.time(), [], 0
    while True:
        frac = (time.time() - t0) / (minutes * 60)
        if frac >= 1.0:
            break
        step += 1
        lr = LR * min(1.0, step / WARMUP) * (
            td.MIN_LR_FRAC + (1 - td.MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = make_batch(enc, vae, rng, td.IMAGES_PER_STEP)
        loss, st = td.forward_loss(model, enc, batch, None, td.LOC_SIGMA)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append((loss.item(), st["text_nll"], st["text_acc"], st["loc_mae"]))
        if step % 50 == 0 or step == 1:
            h = np.array(hist[-50:])
            print(f"step {step:5d}  {time.time() - t0:6.0f}s  lr {lr:.2e}  loss {h[:, 0].mean():.4f}"
                  f"  text_nll {h[:, 1].mean():.4f}  text_acc {h[:, 2].mean():.4f}"
                  f"  loc_mae {h[:, 3].mean():6.2f}", flush=True)
    last = np.array(hist[-100:])
    model.eval()
    return dict(steps=step, seconds=round(time.time() - t0, 1),
                sequences=step * td.IMAGES_PER_STEP * 2,
                final_loss_last100=float(last[:, 0].mean()),
                final_text_nll_last100=float(last[:, 1].mean()),
                final_text_acc_last100=float(last[:, 2].mean()),
                final_loc_mae_bins_last100=float(last[:, 3].mean()))


# ------------------------------------------------------------------------------ evaluation

def place(logits64: np.ndarray, loc: list[int], w: int, h: int) -> np.ndarray:
    """As pali's vae::place_mask / big_vision's evaluator: truncated box, bilinear, > 0."""
    y1, x1, y2, x2 = (int(b / 1023 * s) for b, s in zip(loc, (h, w, h, w)))
    out = np.zeros((h, w), bool)
    if x2 <= x1 or y2 <= y1:
        return out
    r = np.asarray(Image.fromarray(logits64.astype(np.float32), "F").resize((x2 - x1, y2 - y1),
                                                                           Image.BILINEAR))
    out[y1:y2, x1:x2] = (r > 0)[:h - y1, :w - x1]
    return out


def segment_eval(model, processor, vae: MaskVae, n: int) -> dict:
    rng = random.Random(EVAL_SEED)
    scenes = [shapes.make_scene(rng) for _ in range(n)]
    queries = [rng.choice(s.objects).shape for s in scenes]
    outs = [None] * n
    for q in shapes.SHAPES:
        idx = [i for i in range(n) if queries[i] == q]
        for i, o in zip(idx, td.generate(model, processor, f"segment {q}",
                                         [scenes[i].image for i in idx], 80)):
            outs[i] = o
    mask_ious, box_ious, exact_codes, n_codes = [], [], 0, 0
    for sc, q, out in zip(scenes, queries, outs):
        w, h = sc.size
        preds = []
        for m in SEG_RE.finditer(out):
            loc = [int(v) for v in re.findall(r"\d{4}", m.group(1))]
            codes = [int(v) for v in re.findall(r"\d{3}", m.group(2))]
            with torch.no_grad():
                logits = vae.decode(torch.tensor([codes]))[0].numpy()
            box = (loc[1] / 1023 * w, loc[0] / 1023 * h, loc[3] / 1023 * w, loc[2] / 1023 * h)
            preds.append((box, place(logits, loc, w, h)))
        gts = [o for o in sc.objects if shapes.matches(o, q)]
        pairs = sorted(((shapes.iou(g.box, p[0]), i, j) for i, g in enumerate(gts)
                        for j, p in enumerate(preds)), reverse=True)
        got, used = {}, set()
        for v, i, j in pairs:
            if i not in got and j not in used and v > 0:
                got[i] = j
                used.add(j)
        for i, g in enumerate(gts):
            if i in got:
                pm = preds[got[i]][1]
                mask_ious.append(float((pm & g.mask).sum() / max(1, (pm | g.mask).sum())))
                box_ious.append(shapes.iou(g.box, preds[got[i]][0]))
            else:
                mask_ious.append(0.0)
                box_ious.append(0.0)
        truth = segment_target(sc, q, object_codes(vae, [sc])[0])
        t_codes = re.findall(r"<seg\d{3}>", truth)
        p_codes = re.findall(r"<seg\d{3}>", out)
        n_codes += len(t_codes)
        exact_codes += sum(a == b for a, b in zip(t_codes, p_codes))
    mi = np.array(mask_ious)
    return dict(n_prompts=n, n_gt_objects=len(mi), mean_mask_iou=float(mi.mean()),
                mask_recall_at_0_5=float((mi >= 0.5).mean()), mean_box_iou=float(np.mean(box_ious)),
                seg_code_accuracy=exact_codes / max(1, n_codes),
                examples=[dict(size=s.size, query=q, answer=o) for s, q, o in
                          list(zip(scenes, queries, outs))[:3]])


def main() -> None:
    global NPZ, VAE_STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-minutes", type=float, default=14.0, help="fine-tune budget (default 14)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true", help="evaluate hf/ with vae-shapes.npz")
    ap.add_argument("--hf", type=Path, default=td.HF_DIR, help="checkpoint folder, updated in place")
    ap.add_argument("--npz", type=Path, default=NPZ, help="VQ-VAE output (.npz)")
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    ap.add_argument("--n-eval", type=int, default=N_SEG_EVAL)
    args = ap.parse_args()
    NPZ, VAE_STEPS = args.npz, args.vae_steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    hf = args.hf
    processor = PaliGemmaProcessor.from_pretrained(str(hf))
    model = PaliGemmaForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32)
    model.config.text_config._attn_implementation = "eager"
    enc = td.Encoder(processor.tokenizer, model.config.image_token_index)
    assert enc.ids("<seg012>") == [enc.loc0 + 1024 + 12], enc.ids("<seg012>")
    assert 3 not in enc.ids("segment triangle")
    log: dict = {}
    if args.eval_only:
        vae = MaskVae()
        arrays = dict(np.load(NPZ))
        vae.codebook.data = torch.from_numpy(arrays["_vq_vae._embedding"])
        vae.decoder.load_state_dict({k[8:]: torch.from_numpy(v) for k, v in arrays.items()
                                     if k.startswith("decoder.")})
        vae.encoder.load_state_dict({k[8:]: torch.from_numpy(v) for k, v in arrays.items()
                                     if k.startswith("encoder.")})
    else:
        vae, log["vae"] = train_vae(rng)
        for p in vae.parameters():
            p.requires_grad_(False)
        save_vae(vae)
        log["finetune"] = finetune(model, enc, vae, rng, args.max_minutes)
        print("fine-tune:", json.dumps(log["finetune"]), flush=True)
        sd = mf.hub_state_dict(model, mf.DTYPES[td.MODEL["dtype"]])
        mf.save_weights(sd, hf, 1)
        for f in hf.iterdir():
            f.chmod(0o644)
        model = mf.reload_and_check(hf, mf.load_saved_weights(hf))
        model.config.text_config._attn_implementation = "eager"
    model.eval()
    t0 = time.time()
    log["segment"] = segment_eval(model, processor, vae, args.n_eval)
    print("segment:", json.dumps({k: v for k, v in log["segment"].items() if k != "examples"}), flush=True)
    log["tasks"] = td.evaluate(model, processor, args.n_eval)
    log["eval_seconds"] = round(time.time() - t0, 1)
    log["config"] = dict(lr=LR, p_seg=P_SEG, vae_steps=VAE_STEPS, vae_batch=VAE_BATCH, d=D,
                         max_minutes=args.max_minutes)
    (hf.parent / "segment_eval.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: v for k, v in log["tasks"].items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
