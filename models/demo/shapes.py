#!/usr/bin/env python3
"""Synthetic shape images and PaliGemma-style targets for the pali demo model.

Each image has 1 to 3 filled, non-overlapping shapes (circle, square, triangle) in four
colours (red, green, blue, yellow) on a plain light background. Everything random varies:
image size (48..160 px per side) and aspect ratio (0.5..2), background tone and tint, the
shade of each colour (hue, saturation, value), shape size (18..45 % of the shorter side),
position, triangle apex, and whether edges are anti-aliased (4x supersampled) or hard
(like a plain rasterizer). The runtime squashes every image to the model's square input.

Boxes are the tight box of the pixels a shape covers (alpha >= 1/2), in pixel-edge
coordinates: x1 = first covered column, x2 = last covered column + 1. Targets:

* ``caption en``           -> ``a red circle, a blue square and a green triangle``
  (objects left to right by box centre; "a X" / "a X and a Y" / "a X, a Y and a Z");
* ``detect circle``, ``detect red square``, ``detect square ; triangle``
  -> ``<locY1><locX1><locY2><locX2> label`` groups joined by `` ; ``. Coordinates are
  normalised by the image height/width and binned as round(v * 1023), clipped to 0..1023
  (big_vision's convention); the label is the query phrase; the groups follow the order of
  the queries, and several instances of one query are listed left to right. No match at
  all: ``none``;
* ``answer en how many shapes?`` -> ``2``.

Usage as a script: ``python models/demo/shapes.py OUT_DIR [N] [--seed S]`` writes N PNGs,
a ``targets.json`` with every target and ``set.jsonl``, a ``pali eval`` set (one line per
image and task: ``caption en``, ``answer en how many shapes?``, ``detect <shape>`` for a
shape the image contains, and, reported as their own tasks, ``detect <colour> <shape>`` for a
present object and ``detect <shape> ; <other shape>``); ``python models/demo/shapes.py --examples`` rewrites the four
images of ``examples/images/`` (see ``EXAMPLES``) and their ``truth.json`` (captions, boxes and
masks as COCO RLE).
"""

from __future__ import annotations

import colorsys
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
# hue centre (degrees), hue jitter, saturation range, value range
_HSV = {
    "red": (0.0, 8.0, (0.70, 1.0), (0.65, 1.0)),
    "green": (125.0, 15.0, (0.60, 1.0), (0.45, 0.85)),
    "blue": (222.0, 14.0, (0.60, 1.0), (0.55, 1.0)),
    "yellow": (53.0, 5.0, (0.75, 1.0), (0.88, 1.0)),
}
MIN_SIDE, MAX_SIDE = 48, 160
COUNT_PROMPT = "answer en how many shapes?"
CAPTION_PROMPT = "caption en"


@dataclass
class Obj:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels (x2, y2 exclusive)
    # coverage >= 0.5, [h, w] bool over the whole image (the segmentation ground truth)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]  # left to right by box centre

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _rgb(colour: str, rng: random.Random) -> tuple[int, int, int]:
    h, dh, (s0, s1), (v0, v1) = _HSV[colour]
    hue = ((h + rng.uniform(-dh, dh)) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return round(r * 255), round(g * 255), round(b * 255)


def _background(rng: random.Random) -> np.ndarray:
    base = rng.uniform(200, 252)
    tint = [rng.uniform(-12, 12) for _ in range(3)]
    return np.array([min(255.0, max(175.0, base + t)) for t in tint])


def _draw_mask(shape: str, x: float, y: float, s: float, apex: float, w: int, h: int,
               ss: int) -> np.ndarray:
    """Coverage in [0,1] of one shape with box (x, y, x+s, y+s), supersampled ss x ss."""
    m = Image.new("L", (w * ss, h * ss), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = x * ss, y * ss, (x + s) * ss - 1, (y + s) * ss - 1
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    else:
        ax = x0 + (x1 - x0) * apex
        d.polygon([(ax, y0), (x1, y1), (x0, y1)], fill=255)
    if ss > 1:
        m = m.resize((w, h), Image.BOX)
    return np.asarray(m, np.float64) / 255.0


def make_scene(rng: random.Random, n: int | None = None, size: tuple[int, int] | None = None,
               ) -> Scene:
    """One random scene with `n` (default 1..3) shapes."""
    if size is None:
        while True:
            w = rng.randint(MIN_SIDE, MAX_SIDE)
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # w / h
            h = round(w / aspect)
            if MIN_SIDE <= h <= MAX_SIDE:
                break
    else:
        w, h = size
    n = n or rng.randint(1, 3)
    bg = _background(rng)
    ss = rng.choice((1, 4))  # hard edges or anti-aliased
    short = min(w, h)
    while True:  # place n non-overlapping shapes (boxes at least 2 px apart)
        placed = []
        for _ in range(n):
            for _attempt in range(50):
                s = max(10.0, rng.uniform(0.18, 0.45) * short)
                s = min(s, w - 2.0, h - 2.0)
                x = rng.uniform(1, w - s - 1)
                y = rng.uniform(1, h - s - 1)
                if all(x + s + 2 <= px or px + ps + 2 <= x or y + s + 2 <= py or py + ps + 2 <= y
                       for px, py, ps, *_ in placed):
                    placed.append((x, y, s, rng.choice(SHAPES), rng.choice(COLOURS),
                                   rng.uniform(0.3, 0.7) if rng.random() < 0.5 else 0.5))
                    break
            else:
                break
        if len(placed) == n:
            break
    img = np.broadcast_to(bg, (h, w, 3)).copy()
    objs = []
    for x, y, s, shape, colour, apex in placed:
        a = _draw_mask(shape, x, y, s, apex, w, h, ss)
        col = np.array(_rgb(colour, rng), np.float64)
        img = img * (1 - a[..., None]) + col * a[..., None]
        ys, xs = np.nonzero(a >= 0.5)
        objs.append(Obj(shape, colour, (int(xs.min()), int(ys.min()),
                                        int(xs.max()) + 1, int(ys.max()) + 1), a >= 0.5))
    objs.sort(key=lambda o: o.cx)
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return Scene(image, objs)


# ------------------------------------------------------------------------------ targets

def caption(scene: Scene) -> str:
    parts = [f"a {o.colour} {o.shape}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def count(scene: Scene) -> str:
    return str(len(scene.objects))


def loc_bin(v: float) -> int:
    return min(1023, max(0, round(v * 1023)))


def loc_tokens(box: tuple[int, int, int, int], w: int, h: int) -> str:
    x1, y1, x2, y2 = box
    return "".join(f"<loc{loc_bin(v):04d}>" for v in (y1 / h, x1 / w, y2 / h, x2 / w))


def matches(o: Obj, query: str) -> bool:
    words = query.split()
    if len(words) == 1:
        return o.shape == words[0]
    return o.colour == words[0] and o.shape == words[1]


def detect_target(scene: Scene, queries: list[str]) -> str:
    w, h = scene.size
    groups = [f"{loc_tokens(o.box, w, h)} {q}" for q in queries for o in scene.objects
              if matches(o, q)]
    return " ; ".join(groups) if groups else "none"


def detect_prompt(queries: list[str]) -> str:
    return "detect " + " ; ".join(queries)


def random_detect_queries(scene: Scene, rng: random.Random) -> list[str]:
    """A training query: `shape` (35 %), `colour shape` (30 %), `shape ; shape` (20 %) or all
    three shapes in a random order (15 %); single queries name a present object 92 % of the
    time (else a random, usually absent, one: the answer is then often `none`)."""
    present = scene.objects
    k = rng.random()
    if k < 0.35:
        if rng.random() < 0.92:
            return [rng.choice(present).shape]
        return [rng.choice(SHAPES)]
    if k < 0.65:
        if rng.random() < 0.92:
            o = rng.choice(present)
            return [f"{o.colour} {o.shape}"]
        return [f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}"]
    if k < 0.85:
        a, b = rng.sample(SHAPES, 2)
        if rng.random() < 0.7:  # put a present shape first most of the time
            a = rng.choice(present).shape
            b = rng.choice([s for s in SHAPES if s != a])
        return [a, b]
    return rng.sample(SHAPES, 3)


def parse_detections(text: str, w: int = 1, h: int = 1) -> list[tuple[str, tuple[float, ...]]]:
    """`<locY1><locX1><locY2><locX2> label ; ...` -> [(label, (x1, y1, x2, y2))], scaled by
    (w, h) (normalised if 1). Malformed groups are skipped."""
    import re
    out = []
    for g in text.split(";"):
        m = re.fullmatch(r"\s*<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>\s*(.*?)\s*", g)
        if not m:
            continue
        y1, x1, y2, x2 = (int(m.group(i)) / 1023 for i in range(1, 5))
        out.append((m.group(5), (x1 * w, y1 * h, x2 * w, y2 * h)))
    return out


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


# examples/images/: (file name, seed, number of shapes, (width, height))
EXAMPLES = [
    ("three_shapes_wide.png", 11, 3, (160, 96)),
    ("two_shapes_tall.png", 12, 2, (72, 136)),
    ("one_shape.png", 13, 1, (120, 120)),
    ("two_shapes_small.png", 14, 2, (96, 60)),
]


def write_examples(out: Path) -> dict[str, dict]:
    """The example images. So that "left to right" is clear to a reader, a scene is redrawn
    (same seeded stream) until consecutive box centres are >= 15 % of the width apart."""
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, seed, n, size in EXAMPLES:
        rng = random.Random(seed)
        while True:
            sc = make_scene(rng, n=n, size=size)
            cx = [o.cx for o in sc.objects]
            if all(b - a >= 0.15 * size[0] for a, b in zip(cx, cx[1:])):
                break
        sc.image.save(out / name, format="PNG", optimize=False, compress_level=9)
        truth[name] = {"caption": caption(sc), "count": count(sc),
                       "detect": {s: detect_target(sc, [s]) for s in SHAPES},
                       "objects": [{"shape": o.shape, "colour": o.colour, "box_xyxy": list(o.box),
                                    "mask": {"size": [sc.size[1], sc.size[0]],
                                             "counts": coco_rle(o.mask)}}
                                   for o in sc.objects]}
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


def coco_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: column-major runs, starting with a run of zeros."""
    flat = np.asarray(mask, bool).flatten(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    return [0] + runs if flat[0] else runs


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[:1] == ["--examples"]:
        root = Path(__file__).resolve().parent.parent.parent
        print(json.dumps(write_examples(root / "examples" / "images"), indent=1))
        return
    seed = 0
    if "--seed" in argv:
        i = argv.index("--seed")
        seed = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out = Path(argv[0])
    n = int(argv[1]) if len(argv) > 1 else 8
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    targets = {}
    lines = []
    for i in range(n):
        sc = make_scene(rng)
        name = f"shapes_{i:03d}.png"
        sc.image.save(out / name)
        q = [rng.choice(sc.objects).shape]
        for prompt, answer in [(CAPTION_PROMPT, caption(sc)), (COUNT_PROMPT, count(sc)),
                               (detect_prompt(q), detect_target(sc, q))]:
            lines.append(json.dumps({"image": name, "prompt": prompt, "answer": answer}))
        # The two harder query forms, reported apart: a colour + shape naming a present
        # object, and two shapes (a present one first).
        o = rng.choice(sc.objects)
        q2 = [o.shape, rng.choice([s for s in SHAPES if s != o.shape])]
        for task, q in [("detect colour shape", [f"{o.colour} {o.shape}"]),
                        ("detect shape ; shape", q2)]:
            lines.append(json.dumps({"image": name, "prompt": detect_prompt(q),
                                     "answer": detect_target(sc, q), "task": task}))
        w, h = sc.size
        targets[name] = {
            "size": [w, h], "caption": caption(sc), "count": count(sc),
            "objects": [{"shape": o.shape, "colour": o.colour, "box_xyxy": list(o.box)}
                        for o in sc.objects],
            "detect": {s: detect_target(sc, [s]) for s in SHAPES},
        }
    (out / "targets.json").write_text(json.dumps(targets, indent=1) + "\n")
    (out / "set.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
