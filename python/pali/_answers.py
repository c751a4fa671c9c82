"""The answers of pali's tasks, built from the library's JSON (``pali ... --json``)."""

import copy
import json
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

try:  # numpy is a dependency; only masks need it
    import numpy
except ImportError:  # pragma: no cover
    numpy = None


class Timings(NamedTuple):
    """Where the time went, in milliseconds (as ``timings`` in ``pali ... --json``)."""

    load_ms: float
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    n_prefix: int
    """Prefix tokens (image + text)."""
    n_gen: int
    """Generated tokens."""
    decode_tok_s: float
    memory_after_prefill: Optional[Dict[str, float]]
    """Resident memory right after the prefix (``rss_mib``, ``anon_mib``, ``file_mib``)."""

    @property
    def ttft_ms(self) -> float:
        """Time to first token: preprocessing + vision tower + prefill."""
        return self.preprocess_ms + self.vision_ms + self.prefill_ms

    @classmethod
    def _from_json(cls, d: Dict[str, Any]) -> "Timings":
        return cls(**{name: d.get(name) for name in cls._fields})


class ImageSize(NamedTuple):
    """An image's size in pixels (the frame of the boxes)."""

    width: int
    height: int


class Box(NamedTuple):
    """A box in the original image's pixels."""

    x1: float
    y1: float
    x2: float
    y2: float


class _Answer:
    # _run_ms: the generation thread's time for this answer (decoding the image + the
    # library's Model::run), which python/bench/overhead.py sets against the call's.
    __slots__ = ("_json", "_run_ms")

    def __init__(self, data: Dict[str, Any]):
        self._json = data
        self._run_ms = None

    @property
    def text(self) -> str:
        """The generated text (special tokens dropped, ``<loc>``/``<seg>`` kept)."""
        return self._json["text"]

    @property
    def tokens(self) -> List[int]:
        """The generated token ids."""
        return list(self._json["tokens"])

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (end of text or a stop sequence) or ``"length"`` (``max_tokens``)."""
        return self._json["finish_reason"]

    @property
    def timings(self) -> Timings:
        """Where the time went."""
        return Timings._from_json(self._json["timings"])

    @property
    def n_images(self) -> int:
        """Images in the prompt (a list of images, or a clip's frames)."""
        return self._json.get("n_images", 1)

    @property
    def frames(self) -> Optional[List[int]]:
        """A clip's frame indices, in the prompt's order (None for images)."""
        frames = self._json.get("frames")
        return None if frames is None else list(frames)

    @property
    def warnings(self) -> List[str]:
        """What to know about the answer, one line each (a clip shorter than the frames
        asked for; for detect / segment also skipped objects, a cut answer, ...)."""
        return list(self._json.get("warnings", []))

    @property
    def peak_rss_mb(self) -> Optional[float]:
        """This process's peak resident memory in MiB when the answer was made."""
        return self._json.get("peak_rss_mb")

    def to_dict(self) -> Dict[str, Any]:
        """The answer as ``pali ... --json`` prints it (a new dict each call)."""
        return copy.deepcopy(self._json)


class TextAnswer(_Answer):
    """The answer of a text task: caption, ask, ocr, run and stream."""

    __slots__ = ()

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"TextAnswer(text={self.text!r}, finish_reason={self.finish_reason!r})"


class LocatedObject:
    """One object found by ``detect`` or ``segment``: ``label``, ``box``, ``score``; for
    ``segment`` also ``codes`` and, with a mask decoder, ``mask`` (a numpy bool array
    (H, W) over the whole image, True inside; None otherwise), ``mask_box`` and ``area``."""

    __slots__ = ("_json", "mask")

    def __init__(self, data: Dict[str, Any], mask: Optional["numpy.ndarray"]):
        self._json = data
        self.mask = mask

    @property
    def label(self) -> str:
        return self._json["label"]

    @property
    def box(self) -> Box:
        """(x1, y1, x2, y2) in the original image's pixels."""
        return Box(*self._json["box"])

    @property
    def score(self) -> Optional[float]:
        """The geometric mean of the model's probabilities for the box's four ``<loc>``
        tokens (0-1)."""
        return self._json["score"]

    @property
    def loc(self) -> Tuple[int, int, int, int]:
        """The raw ``<loc>`` bins (y1, x1, y2, x2), 0-1023."""
        return tuple(self._json["loc"])

    @property
    def codes(self) -> Optional[Tuple[int, ...]]:
        """``segment``: the 16 ``<seg>`` codes; None for ``detect``."""
        codes = self._json.get("codes")
        return None if codes is None else tuple(codes)

    @property
    def mask_box(self) -> Optional[Tuple[int, int, int, int]]:
        """``segment`` with a mask decoder: the whole-pixel box the mask was placed in."""
        b = self._json.get("mask_box")
        return None if b is None else tuple(b)

    @property
    def area(self) -> Optional[int]:
        """``segment`` with a mask decoder: pixels inside the mask."""
        return self._json.get("area")

    def to_dict(self) -> Dict[str, Any]:
        """The object as in ``pali ... --json``."""
        return copy.deepcopy(self._json)

    def __repr__(self) -> str:
        score = "None" if self.score is None else f"{self.score:.2f}"
        box = ", ".join(f"{v:.1f}" for v in self.box)
        return f"LocatedObject(label={self.label!r}, box=({box}), score={score})"


class Located(_Answer):
    """The objects of ``detect`` / ``segment`` (``objects``, in the order the model wrote
    them; boxes in the original image's pixels), the image's size, the raw answer and its
    warnings."""

    __slots__ = ("objects",)

    def __init__(self, data: Dict[str, Any], masks: List[Optional["numpy.ndarray"]]):
        super().__init__(data)
        masks = list(masks) + [None] * (len(data["objects"]) - len(masks))
        self.objects: List[LocatedObject] = [
            LocatedObject(o, m) for o, m in zip(data["objects"], masks)
        ]

    @property
    def image(self) -> ImageSize:
        """The image's size (the boxes' frame)."""
        return ImageSize(self._json["image"]["width"], self._json["image"]["height"])

    def __iter__(self):
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def __repr__(self) -> str:
        return f"Located(objects={self.objects!r})"


def _answer(native: Tuple[str, List[Optional["numpy.ndarray"]], float]):
    text, masks, run_ms = native
    data = json.loads(text)
    answer = Located(data, masks) if "objects" in data else TextAnswer(data)
    answer._run_ms = run_ms
    return answer
