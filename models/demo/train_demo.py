#!/usr/bin/env python3
"""Train pali's demo model: a tiny PaliGemma 2 that captions, detects and counts shapes.

How to run (CPU, two threads, about 35 minutes in all):

    pip install -r models/fixtures/requirements.txt
    python models/demo/train_demo.py            # trains, saves models/demo/hf/, evaluates
    python models/demo/train_demo.py --eval-only  # re-evaluates the saved checkpoint

then convert with ``pali convert models/demo/hf -o models/demo --type f16 --name pali-demo
--force`` (``tests/demo.rs`` checks the committed GGUFs equal that conversion).

The committed run (2 threads on a 2-core machine shared with other jobs): 4356 steps
(209 088 sequences) in the 34-minute training budget, about 34.5 minutes in all with the
tokenizer, saving and evaluation. Last 100 steps: total loss 4.18 (decoder + auxiliary),
cross-entropy of the non-loc suffix tokens 0.043 (98.6 % top-1), teacher-forced loc-token
argmax error 13.9 bins. Held-out evaluation (HF, float32, greedy, 200 scenes per task):
caption exact match 0.935, counting accuracy 0.995, ``detect <shape>`` mean IoU 0.857,
recall@0.5 0.899, precision@0.5 0.954; ``detect <colour> <shape>`` mean IoU 0.752;
two-class prompts 0.762; absent classes answered ``none`` 91 % of the time
(``models/demo/eval.json``, ``models/demo/train_log.json``).

What it does:

1. **Tokenizer.** A real SentencePiece BPE model (Gemma's trainer settings, base vocabulary
   384) trained on the task text (prompts and answers, loc tokens stripped), with ``<pad>``0
   ``<eos>``1 ``<bos>``2 ``<unk>``3 and a ``"\\n"`` piece, then ``<loc0000>``..``<loc1023>``
   and ``<seg000>``..``<seg127>`` appended as USER_DEFINED pieces (ids 384..1535), and
   ``<image>`` (1536) as an HF added special token; 1600 embedding rows. The functions are
   those of ``models/fixtures/make_fixtures.py`` (imported, with its corpus swapped for ours).
2. **Model.** ``PaliGemmaForConditionalGeneration`` from ``SiglipVisionConfig`` +
   ``Gemma2Config`` built by make_fixtures' ``make_config`` (see ``MODEL``: image 112 px =
   64 tokens, SigLIP 128 wide x 4 layers, Gemma 2 128 wide x 4 layers, 4 heads of 32,
   query_pre_attn_scalar 32, window 4096, soft-caps 50/30; 2.15 M parameters).
   transformers' random init, except (all still trained like every other weight):
   text embedding rows N(0, (1.2/sqrt(H))^2) and final-norm scale 2 (with transformers'
   0.02 init and unit norm every logit is below ~2.6, too flat for a loc bin ever to win a
   greedy argmax against ``none``); the 1024 ``<loc>`` rows = Fourier features of the bin
   index (neighbouring bins start out similar); the ViT position embedding = 2D sin-cos.
3. **Training.** Fresh batches from ``shapes.py`` at every step (an infinite stream; the
   held-out evaluation scenes come from a different seed). Each step draws
   ``IMAGES_PER_STEP`` images and two prompts per image: a detection prompt (see
   ``shapes.random_detect_queries``) and then ``caption en`` / another detection prompt /
   ``answer en how many shapes?`` with probability 0.5 / 0.4 / 0.1 (so 70 % detect, 25 %
   caption, 5 % count). The vision tower runs once per image and its features are shared by
   both prompts. The sequences are PaliGemma's: ``<image>``x64 ``<bos>`` prompt ``"\\n"``
   (the prefix, attended bidirectionally: ``token_type_ids`` 0) then the suffix and
   ``<eos>`` (causal, ``token_type_ids`` 1); the loss is on the suffix and ``<eos>`` only.
   The construction is checked against ``PaliGemmaProcessor(..., suffix=...)``.
   For ``<loc>`` targets the cross-entropy uses a Gaussian soft target over the loc bins,
   its width shrinking from 16 bins to 1 over the first half of training (coarse to fine);
   other tokens use plain cross-entropy.
   Plus a training-only auxiliary head on the projector output (``AuxHead``, discarded):
   per image token the shape, colour, left-to-right rank and box (as loc-bin logits against
   the model's own loc embeddings) of the object under it. It stands in for the pretrained
   SigLIP encoder real PaliGemma starts from. (In 9-minute pilots without it the decoder
   had not begun to localise; a full-budget run with a 3-layer, 1-KV-head decoder and no
   rank target reached 0.68 mean IoU.)
   AdamW (lr 2e-3, betas 0.9/0.98, weight decay 0.01 on matrices), 100 warm-up steps then
   cosine decay to 3 %, gradient clipping 1.0; float32 weights, bf16 autocast for the
   forward matmuls (lm_head and losses in float32).
   The schedule runs for ``STEPS`` steps but ends earlier, with the learning rate annealed
   over the elapsed fraction of ``--max-minutes``, when the wall-clock budget runs out --
   which is what happens on a shared 2-core machine. Everything is seeded, but a run that
   ends by the clock is not bit-reproducible (its step count depends on the machine).
4. **Saving.** ``models/demo/hf/``: float32 ``model.safetensors`` (8.6 MB) in the Hub
   layout (``language_model.model.*``, ``vision_tower.vision_model.*``,
   ``multi_modal_projector.*``; lm_head tied), config.json, tokenizer.model,
   tokenizer.json, tokenizer_config.json, special_tokens_map.json,
   preprocessor_config.json, processor_config.json -- written by make_fixtures.py's
   functions, and reloaded and checked the same way.
5. **Evaluation** of the reloaded checkpoint (float32, greedy, HF ``generate``) on 200
   held-out scenes per task: caption exact match, counting accuracy, and detection (one
   ``detect <shape>`` prompt per scene for a shape it contains: mean IoU over the ground
   truth boxes, each matched one-to-one with a predicted box of the same label, 0 if
   missed; recall and precision at IoU 0.5), plus ``detect <colour> <shape>``, two-class
   prompts and absent classes (``none``). Written to ``models/demo/eval.json``.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning
# threads made a step up to 10x slower (measured); costs ~25 % when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import re
import sys
import tempfile
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
import shapes  # noqa: E402
from transformers import (  # noqa: E402
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

SEED = 5
EVAL_SEED = 1_000_003
HF_DIR = HERE / "hf"  # --out changes it
IMAGE_SIZE = 112  # 8 x 8 = 64 patches of 14 px
N_IMG = (IMAGE_SIZE // mf.PATCH) ** 2
BASE_VOCAB = 384
MODEL = dict(
    name="pali-demo", dtype="f32", image_size=IMAGE_SIZE, shards=1, seed=SEED,
    vision=dict(hidden=128, layers=4, heads=4, intermediate=512),
    text=dict(hidden=128, layers=4, heads=4, kv_heads=4, head_dim=32, qpas=32,
              intermediate=512, sliding_window=4096),
)
STEPS = 6000  # in practice the wall-clock budget (--max-minutes) ends the run first
IMAGES_PER_STEP = 24  # x 2 prompts = 48 sequences per step
LR = 2e-3
WARMUP = 100
MIN_LR_FRAC = 0.03
WEIGHT_DECAY = 0.01
LOC_SIGMA = 1.0  # bins, at the end of training (nearly one-hot: greedy decoding needs peaks)
LOC_SIGMA_START = 16.0  # bins, at the start (coarse to fine)
AUX_WEIGHT = 1.0
EMBED_NORM = 1.2
FINAL_NORM_OFFSET = 1.0
N_EVAL = 200
AUTOCAST_BF16 = True  # bf16 matmuls in the forward (weights, optimizer, lm_head, loss f32)


# ------------------------------------------------------------------------------ data

def task_text_corpus(n_scenes: int = 6000) -> list[str]:
    """Prompts and answers as the model sees them (prefix and suffix are tokenized
    separately), with the <loc> tokens removed (they are appended as whole pieces)."""
    rng = random.Random(SEED + 1)
    lines = []
    for _ in range(n_scenes):
        sc = shapes.make_scene(rng)
        q = shapes.random_detect_queries(sc, rng)
        lines += [shapes.CAPTION_PROMPT, shapes.caption(sc), shapes.COUNT_PROMPT,
                  shapes.count(sc), shapes.detect_prompt(q),
                  re.sub(r"<loc\d{4}>", "", shapes.detect_target(sc, q))]
    return lines


def sample_tasks(sc: shapes.Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Two (prompt, target) pairs for one training scene."""
    q = shapes.random_detect_queries(sc, rng)
    pairs = [(shapes.detect_prompt(q), shapes.detect_target(sc, q))]
    k = rng.random()
    if k < 0.5:
        pairs.append((shapes.CAPTION_PROMPT, shapes.caption(sc)))
    elif k < 0.9:
        q = shapes.random_detect_queries(sc, rng)
        pairs.append((shapes.detect_prompt(q), shapes.detect_target(sc, q)))
    else:
        pairs.append((shapes.COUNT_PROMPT, shapes.count(sc)))
    return pairs


def pixels(img: Image.Image) -> torch.Tensor:
    """PIL bicubic squash to R x R, /255, (x - 0.5) / 0.5: SiglipImageProcessorPil's output
    (make_fixtures.py checks the two agree; run_training asserts it again)."""
    a = np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC),
                   np.float32) / 255.0
    return torch.from_numpy((a - 0.5) / 0.5).permute(2, 0, 1)


class Encoder:
    def __init__(self, tok, v_spm: int):
        self.tok = tok
        self.image_id = v_spm
        self.loc0 = v_spm - 1152
        self.nl = tok("\n", add_special_tokens=False).input_ids
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        r = self.cache.get(text)
        if r is None:
            r = self.tok(text, add_special_tokens=False).input_ids
            if len(self.cache) < 100_000:
                self.cache[text] = r
        return r

    def sequence(self, prompt: str, target: str) -> tuple[list[int], int]:
        """PaliGemma training sequence and its prefix length."""
        prefix = [self.image_id] * N_IMG + [mf.BOS_ID] + self.ids(prompt) + self.nl
        return prefix + self.ids(target) + [mf.EOS_ID], len(prefix)


GRID = IMAGE_SIZE // mf.PATCH


def patch_targets(sc: shapes.Scene):
    """Dense targets of the training-only auxiliary head, per patch of the squashed image:
    shape class (0 = background), colour (0 = background) and the normalised box
    (y1, x1, y2, x2) of the object the patch belongs to. A patch belongs to an object if
    its centre is inside the object's box or it holds the box centre (small objects).
    Also the object's rank from the left among the objects of its shape, and among those of
    its shape and colour (the order in which `detect` lists instances)."""
    w, h = sc.size
    cls = torch.zeros(GRID, GRID, dtype=torch.long)
    col = torch.zeros(GRID, GRID, dtype=torch.long)
    rank = torch.zeros(GRID, GRID, 2, dtype=torch.long)
    box = torch.zeros(GRID, GRID, 4)
    for n, o in enumerate(sc.objects):  # left to right
        r_shape = sum(p.shape == o.shape for p in sc.objects[:n])
        r_both = sum(p.shape == o.shape and p.colour == o.colour for p in sc.objects[:n])
        x1, y1, x2, y2 = o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h
        cells = {(min(GRID - 1, int((y1 + y2) / 2 * GRID)), min(GRID - 1, int((x1 + x2) / 2 * GRID)))}
        for i in range(GRID):
            for j in range(GRID):
                if y1 <= (i + 0.5) / GRID < y2 and x1 <= (j + 0.5) / GRID < x2:
                    cells.add((i, j))
        for i, j in cells:
            cls[i, j] = 1 + shapes.SHAPES.index(o.shape)
            col[i, j] = 1 + shapes.COLOURS.index(o.colour)
            rank[i, j] = torch.tensor([r_shape, r_both])
            box[i, j] = torch.tensor([y1, x1, y2, x2])
    return cls.flatten(), col.flatten(), box.reshape(-1, 4), rank.reshape(-1, 2)


def make_batch(enc: Encoder, rng: random.Random, n_images: int):
    scenes = [shapes.make_scene(rng) for _ in range(n_images)]
    pv = torch.stack([pixels(s.image) for s in scenes])
    aux = [torch.stack(t) for t in zip(*(patch_targets(s) for s in scenes))]
    seqs = [enc.sequence(p, t) for s in scenes for p, t in sample_tasks(s, rng)]
    T = max(len(s) for s, _ in seqs)
    B = len(seqs)
    ids = torch.zeros(B, T, dtype=torch.long)  # <pad> = 0
    am = torch.zeros(B, T, dtype=torch.long)
    tt = torch.ones(B, T, dtype=torch.long)
    tgt_pos, tgt_ids = [], []
    for b, (s, n_pre) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        am[b, :len(s)] = 1
        tt[b, :n_pre] = 0
        for t in range(n_pre, len(s)):  # position t-1 predicts token t
            tgt_pos.append(b * T + t - 1)
            tgt_ids.append(s[t])
    return pv, ids, am, tt, torch.tensor(tgt_pos), torch.tensor(tgt_ids), aux


# ------------------------------------------------------------------------------ model

def init_loc_embeddings_(model, loc0: int) -> None:
    """Output scale and <loc> rows. transformers' init (N(0, 0.02^2) embeddings, unit final
    norm) caps every logit at about |h| |e| = 11.3 x 0.23 = 2.6: far too flat to put one loc
    bin above `none` under greedy decoding. So: text embedding rows N(0, (1.2/sqrt(H))^2)
    (norm ~1.2), the final RMSNorm scale 2 (offset 1), and the 1024 <locK> rows = Fourier
    features of K/1023 (frequencies 0.5..64 cycles, geometric) with the same norm, so that
    neighbouring bins start out similar. All of them are trained like every other weight."""
    emb = model.get_input_embeddings().weight
    h = emb.shape[1]
    with torch.no_grad():
        emb.normal_(0.0, EMBED_NORM / math.sqrt(h))
        model.model.language_model.norm.weight.fill_(FINAL_NORM_OFFSET)
        k = torch.arange(1024, dtype=torch.float32)[:, None] / 1023.0
        freqs = torch.exp(torch.linspace(math.log(0.5), math.log(64.0), h // 2))[None]
        feats = torch.cat([torch.cos(2 * math.pi * freqs * k), torch.sin(2 * math.pi * freqs * k)], 1)
        emb[loc0:loc0 + 1024] = feats * (EMBED_NORM / feats.norm(dim=1, keepdim=True))


def init_vision_positions_(model) -> None:
    """ViT position embedding = 2D sin-cos (MAE style: half the channels for the row, half
    for the column), amplitude 0.5. Trained like every other weight."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    d = emb.shape[1]
    omega = 1.0 / 100.0 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4))
    i, j = torch.meshgrid(torch.arange(GRID, dtype=torch.float32),
                          torch.arange(GRID, dtype=torch.float32), indexing="ij")
    feats = []
    for c in (i.flatten(), j.flatten()):
        a = c[:, None] * omega[None]
        feats += [torch.sin(a), torch.cos(a)]
    with torch.no_grad():
        emb.copy_(0.5 * torch.cat(feats, 1))


class AuxHead(torch.nn.Module):
    """Training-only dense head on the projector output (discarded; not in the checkpoint).
    Per patch: shape class and colour (cross-entropy), and for patches of an object its
    four box coordinates as loc-token logits: four linear maps of the patch feature, scored
    against the model's own (tied) <loc> embedding rows, with the same soft targets as the
    decoder. So the image tokens carry each coordinate in the form the decoder must emit.
    It stands in for the pretrained vision encoder that real PaliGemma starts from."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cls = torch.nn.Linear(hidden, 1 + len(shapes.SHAPES))
        self.col = torch.nn.Linear(hidden, 1 + len(shapes.COLOURS))
        self.coord = torch.nn.Linear(hidden, 4 * hidden)
        self.rank = torch.nn.Linear(hidden, 2 * 3)
        self.last_mae = 0.0

    def loss(self, feats, aux, loc_emb, sigma: float):
        cls, col, box, rank = aux
        f = feats.float()
        l_cls = F.cross_entropy(self.cls(f).flatten(0, 1), cls.flatten())
        l_col = F.cross_entropy(self.col(f).flatten(0, 1), col.flatten())
        m = cls.flatten() > 0
        if not m.any():
            return l_cls + l_col
        fo = f.flatten(0, 1)[m]
        l_rank = F.cross_entropy(self.rank(fo).view(-1, 3), rank.flatten(0, 1)[m].reshape(-1))
        z = self.coord(fo).view(len(fo), 4, -1)  # [P, 4, H]
        logp = F.log_softmax(z @ loc_emb.float().t(), -1)  # [P, 4, 1024]
        k = (box.flatten(0, 1)[m] * 1023).round().clamp(0, 1023)  # [P, 4] (y1, x1, y2, x2)
        q = soft_targets(k.reshape(-1), sigma).view(len(fo), 4, 1024)
        self.last_mae = float((logp.argmax(-1) - k).abs().float().mean())
        return l_cls + l_col + l_rank + -(q * logp).sum(-1).mean()


def soft_targets(bins: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian over the 1024 loc bins around each target bin, normalised."""
    grid = torch.arange(1024, dtype=torch.float32)[None]
    q = torch.exp(-0.5 * ((grid - bins[:, None].float()) / sigma) ** 2)
    return q / q.sum(-1, keepdim=True)


def loc_sigma(frac: float) -> float:
    """Soft-target width in bins: LOC_SIGMA_START at the start, LOC_SIGMA at the end."""
    return LOC_SIGMA_START * (LOC_SIGMA / LOC_SIGMA_START) ** min(1.0, frac / 0.5)


def forward_loss(model, enc: Encoder, batch, aux_head=None, sigma: float = LOC_SIGMA,
                 n_prompts: int = 2):
    pv, ids, am, tt, pos, tgt, aux = batch
    pm = model.model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST_BF16):
        feats = pm.get_image_features(pv).pooler_output
        aux_loss = (aux_head.loss(feats, aux, model.lm_head.weight[enc.loc0:enc.loc0 + 1024], sigma)
                    if aux_head is not None else torch.zeros(()))
        feats = feats.repeat_interleave(n_prompts, 0)
        out = pm(input_ids=ids, attention_mask=am, token_type_ids=tt,
                 mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)})
    h = out.last_hidden_state.float()
    h = h.reshape(-1, h.shape[-1])[pos]
    logits = F.linear(h, model.lm_head.weight)  # float32 (tied to embed_tokens)
    cap = model.config.text_config.final_logit_softcapping
    logits = torch.tanh(logits / cap) * cap
    logp = F.log_softmax(logits.float(), -1)
    is_loc = (tgt >= enc.loc0) & (tgt < enc.loc0 + 1024)
    hard = -logp.gather(1, tgt[:, None])[:, 0]
    loss_tok = hard.clone()
    if is_loc.any():
        q = soft_targets(tgt[is_loc] - enc.loc0, sigma)
        soft = -(q * logp[is_loc][:, enc.loc0:enc.loc0 + 1024]).sum(-1)
        loss_tok[is_loc] = soft
    with torch.no_grad():
        pred = logits.argmax(-1)
        stats = dict(
            text_acc=float((pred[~is_loc] == tgt[~is_loc]).float().mean()),
            text_nll=float(hard[~is_loc].mean()),
            loc_mae=float((logits[is_loc][:, enc.loc0:enc.loc0 + 1024].argmax(-1) + enc.loc0 - tgt[is_loc])
                          .abs().float().mean()) if is_loc.any() else 0.0,
        )
        stats["aux"] = float(aux_loss)
        stats["aux_mae"] = aux_head.last_mae if aux_head is not None else 0.0
    return loss_tok.mean() + AUX_WEIGHT * aux_loss, stats


# ------------------------------------------------------------------------------ tokenizer / io

def build_processor(spm_bytes: bytes, tmp: Path):
    tok = mf.build_hf_tokenizer(spm_bytes, tmp)
    v_spm, _ = mf.check_tokenizer(tok, spm_bytes)
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_resize=True,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=None,
        image_seq_length=N_IMG)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    processor.image_seq_length = N_IMG
    return processor, v_spm


def check_against_processor(processor, enc: Encoder) -> None:
    """Our sequences, prefix split and pixels equal PaliGemmaProcessor(..., suffix=...)."""
    rng = random.Random(7)
    for _ in range(20):
        sc = shapes.make_scene(rng)
        for prompt, target in sample_tasks(sc, rng):
            r = processor(text="<image>" + prompt, images=sc.image, suffix=target,
                          return_tensors="pt")
            seq, n_pre = enc.sequence(prompt, target)
            assert r["input_ids"][0].tolist() == seq, (prompt, target)
            assert r["token_type_ids"][0].tolist() == [0] * n_pre + [1] * (len(seq) - n_pre)
            lab = r["labels"][0].tolist()
            assert lab == [-100] * n_pre + seq[n_pre:]
            assert torch.allclose(r["pixel_values"][0], pixels(sc.image), atol=1e-6)


# ------------------------------------------------------------------------------ eval

@torch.no_grad()
def generate(model, processor, prompt: str, images: list[Image.Image], max_new: int,
             batch: int = 50) -> list[str]:
    outs = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        r = processor(text=["<image>" + prompt] * len(chunk), images=chunk, return_tensors="pt")
        g = model.generate(**r, max_new_tokens=max_new, do_sample=False)
        g = g[:, r["input_ids"].shape[1]:]
        outs += [processor.tokenizer.decode(x, skip_special_tokens=True) for x in g]
    return outs


def match_boxes(gt: list, pred: list) -> list[float]:
    """Greedy one-to-one matching by IoU; returns the IoU of each GT box (0 if unmatched)."""
    pairs = sorted(((shapes.iou(g, p), i, j) for i, g in enumerate(gt) for j, p in enumerate(pred)),
                   reverse=True)
    got, used_g, used_p = [0.0] * len(gt), set(), set()
    for v, i, j in pairs:
        if i not in used_g and j not in used_p and v > 0:
            got[i] = v
            used_g.add(i)
            used_p.add(j)
    return got


def detection_scores(scenes, queries, outputs) -> dict:
    ious, n_pred, n_pred_hit, exact, well_formed = [], 0, 0, 0, 0
    for sc, q, out in zip(scenes, queries, outputs):
        w, h = sc.size
        exact += out == shapes.detect_target(sc, q)
        groups = [g for g in out.split(";")] if out != "none" else []
        dets = shapes.parse_detections(out, w, h)
        well_formed += out == "none" or len(dets) == len(groups)
        for label in q:
            gt = [o.box for o in sc.objects if shapes.matches(o, label)]
            pr = [b for lab, b in dets if lab == label]
            m = match_boxes(gt, pr)
            ious += m
            n_pred += len(pr)
            n_pred_hit += sum(v >= 0.5 for v in match_boxes(pr, gt))
    ious = np.array(ious) if ious else np.zeros(0)
    return dict(n_prompts=len(scenes), n_gt_boxes=int(len(ious)),
                mean_iou=float(ious.mean()) if len(ious) else None,
                recall_at_0_5=float((ious >= 0.5).mean()) if len(ious) else None,
                precision_at_0_5=n_pred_hit / n_pred if n_pred else None,
                exact_match=exact / len(scenes), well_formed=well_formed / len(scenes))


def evaluate(model, processor, n: int | None = None) -> dict:
    n = n or N_EVAL
    rng = random.Random(EVAL_SEED)
    scenes = [shapes.make_scene(rng) for _ in range(n)]
    imgs = [s.image for s in scenes]
    res = {}
    t0 = time.time()
    caps = generate(model, processor, shapes.CAPTION_PROMPT, imgs, 24)
    res["caption"] = dict(n=n, exact_match=float(np.mean(
        [c == shapes.caption(s) for c, s in zip(caps, scenes)])))
    cnt = generate(model, processor, shapes.COUNT_PROMPT, imgs, 4)
    res["count"] = dict(n=n, accuracy=float(np.mean([c == shapes.count(s) for c, s in zip(cnt, scenes)])))

    def run_detect(items):  # items: (scene, queries); grouped by prompt for batching
        by_prompt: dict[str, list[int]] = {}
        for i, (_, q) in enumerate(items):
            by_prompt.setdefault(shapes.detect_prompt(q), []).append(i)
        outs = [None] * len(items)
        for prompt, idx in by_prompt.items():
            for i, o in zip(idx, generate(model, processor, prompt,
                                          [items[i][0].image for i in idx], 48)):
                outs[i] = o
        return detection_scores([s for s, _ in items], [q for _, q in items], outs), outs

    # the main detection metric: `detect <shape>` for a shape present in the scene
    items = [(s, [rng.choice(s.objects).shape]) for s in scenes]
    res["detect_shape"], det_outs = run_detect(items)
    items = [(s, [(lambda o: f"{o.colour} {o.shape}")(rng.choice(s.objects))]) for s in scenes[:n // 2]]
    res["detect_colour_shape"], _ = run_detect(items)
    items = []
    for s in scenes[n // 2:]:
        a = rng.choice(s.objects).shape
        items.append((s, [a, rng.choice([x for x in shapes.SHAPES if x != a])]))
    res["detect_two_shapes"], _ = run_detect(items)
    items = [(s, [rng.choice([x for x in shapes.SHAPES if x not in {o.shape for o in s.objects}])])
             for s in scenes if len({o.shape for o in s.objects}) < 3][:n // 2]
    outs = run_detect(items)[1]
    res["detect_absent_shape"] = dict(n=len(items), none_rate=float(np.mean([o == "none" for o in outs])))
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["examples"] = [dict(size=s.size, caption=c, truth=shapes.caption(s), detect=d, count=k)
                       for s, c, d, k in list(zip(scenes, caps, det_outs, cnt))[:5]]
    return res


# ------------------------------------------------------------------------------ main

def run_training(args) -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    mf.synthetic_corpus = lambda n_lines=0: task_text_corpus()  # make_fixtures trains on this
    spm_bytes = mf.train_sentencepiece(base_vocab=BASE_VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        processor, v_spm = build_processor(spm_bytes, Path(tmp))
        enc = Encoder(processor.tokenizer, v_spm)
        check_against_processor(processor, enc)
        for text in ["a red circle, a blue square and a green triangle", "none", "3",
                     "detect yellow triangle ; square", shapes.COUNT_PROMPT]:
            ids = enc.ids(text)
            assert 3 not in ids, text  # <unk>
        print(f"tokenizer: V_spm={v_spm} (base {BASE_VOCAB}), <image>={v_spm}; "
              f"'a red circle, a blue square' -> {enc.ids('a red circle, a blue square')}")

        cfg = mf.make_config(MODEL, v_spm)
        cfg.text_config._attn_implementation = "eager"
        model = PaliGemmaForConditionalGeneration(cfg)
        init_loc_embeddings_(model, enc.loc0)
        init_vision_positions_(model)
        aux_head = AuxHead(cfg.text_config.hidden_size) if AUX_WEIGHT > 0 else None
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.3f} M parameters, image {IMAGE_SIZE} ({N_IMG} tokens), "
              f"rows {cfg.text_config.vocab_size}")

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        if aux_head is not None:
            no_decay += list(aux_head.parameters())
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=LR, betas=(0.9, 0.98), eps=1e-8)
        budget = args.max_minutes * 60
        t0 = time.time()
        hist = []
        step = 0
        for step in range(1, args.steps + 1):
            frac = max(step / args.steps, (time.time() - t0) / budget)
            if frac >= 1.0:
                print(f"wall-clock budget reached at step {step}")
                break
            lr = LR * min(1.0, step / WARMUP) * (
                MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            batch = make_batch(enc, rng, IMAGES_PER_STEP)
            loss, st = forward_loss(model, enc, batch, aux_head, loc_sigma(frac))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(
                list(model.parameters()) + (list(aux_head.parameters()) if aux_head else []), 1.0)
            opt.step()
            hist.append((loss.item(), st["text_nll"], st["text_acc"], st["loc_mae"], st["aux"], st["aux_mae"]))
            if step % args.log_every == 0 or step == 1:
                h = np.array(hist[-args.log_every:])
                print(f"step {step:5d}  {time.time() - t0:6.0f}s  lr {lr:.2e}  loss {h[:, 0].mean():.4f}"
                      f"  text_nll {h[:, 1].mean():.4f}  text_acc {h[:, 2].mean():.4f}"
                      f"  loc_mae {h[:, 3].mean():6.2f} bins  aux {h[:, 4].mean():.3f} (loc mae {h[:, 5].mean():5.1f})  gnorm {float(gn):.2f}", flush=True)
        train_s = time.time() - t0
        last = np.array(hist[-100:])
        summary = dict(steps=len(hist), train_seconds=round(train_s, 1),
                       sequences=len(hist) * IMAGES_PER_STEP * 2,
                       final_loss_last100=float(last[:, 0].mean()),
                       final_text_nll_last100=float(last[:, 1].mean()),
                       final_text_acc_last100=float(last[:, 2].mean()),
                       final_loc_mae_bins_last100=float(last[:, 3].mean()),
                       n_params=n_params)
        print("training:", json.dumps(summary))

        # save in the Hub layout with make_fixtures' functions, then reload and check
        if HF_DIR.exists():
            for f in HF_DIR.iterdir():
                f.unlink()
        HF_DIR.mkdir(parents=True, exist_ok=True)
        model.eval()
        sd = mf.hub_state_dict(model, mf.DTYPES[MODEL["dtype"]])
        mf.save_weights(sd, HF_DIR, 1)
        cfg.save_pretrained(str(HF_DIR))
        mf.save_tokenizer_files(processor, spm_bytes, HF_DIR)
        for f in HF_DIR.iterdir():
            f.chmod(0o644)
    (HF_DIR.parent / "train_log.json").write_text(json.dumps(
        dict(summary=summary, config=MODEL, steps_planned=args.steps, images_per_step=IMAGES_PER_STEP,
             lr=LR, loc_sigma=LOC_SIGMA,
             curve=[dict(step=i + 1, loss=round(float(np.mean([x[0] for x in hist[max(0, i - 49):i + 1]])), 4))
                    for i in range(49, len(hist), 50)]), indent=1) + "\n")


def load_and_eval() -> None:
    saved = mf.load_saved_weights(HF_DIR)
    model = mf.reload_and_check(HF_DIR, saved)
    processor = PaliGemmaProcessor.from_pretrained(str(HF_DIR))
    assert processor.image_seq_length == N_IMG
    size = sum(f.stat().st_size for f in HF_DIR.iterdir())
    print(f"checkpoint {HF_DIR}: {size / 1e6:.2f} MB, reloaded and checked")
    res = evaluate(model, processor)
    res["checkpoint_bytes"] = size
    (HF_DIR.parent / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))
    for e in res["examples"]:
        print(e)


def main() -> None:
    global HF_DIR, N_EVAL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--max-minutes", type=float, default=34.0,
                    help="wall-clock budget for the training loop (default 34)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HF_DIR, help="checkpoint folder (default models/demo/hf)")
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
    args = ap.parse_args()
    HF_DIR, N_EVAL = args.out.resolve(), args.n_eval
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        run_training(args)
    load_and_eval()


if __name__ == "__main__":
    main()
