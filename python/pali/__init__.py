"""pali: PaliGemma 2 on the edge, from Python.

Caption, ask, read, detect and segment with a PaliGemma 2 model converted by ``pali
convert`` (or the bundled demo model), on the same Rust library as the ``pali`` command
line. Every answer's ``to_dict()`` is exactly what ``pali ... --json`` prints.

    >>> import pali
    >>> model = pali.Model.demo()                  # or pali.Model("model.gguf")
    >>> model.caption("examples/images/one_shape.png").text
    'a green triangle'
    >>> found = model.detect(frame, ["circle"])    # frame: a numpy uint8 (H, W, 3) array
    >>> [(o.label, o.box, o.score) for o in found.objects]

Logs go to Python's ``logging`` (logger ``pali``; llama.cpp's own lines on
``pali.llama_cpp`` at DEBUG).
"""

from __future__ import annotations

import atexit as _atexit
import logging as _logging
import os as _os
import json as _json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _native
from ._answers import (
    Box,
    ImageSize,
    Located,
    LocatedObject,
    TextAnswer,
    Timings,
    _answer,
)
from ._errors import (
    CancelledError,
    ContextLengthError,
    Error,
    ImageError,
    ModelError,
    OptionError,
    PromptError,
)
from ._native import Image

__version__ = _native.__version__
MAX_IMAGE_PIXELS = _native.MAX_IMAGE_PIXELS

__all__ = [
    "Model",
    "Image",
    "Stream",
    "TextAnswer",
    "Located",
    "LocatedObject",
    "Box",
    "ImageSize",
    "Timings",
    "Error",
    "ModelError",
    "ImageError",
    "PromptError",
    "ContextLengthError",
    "OptionError",
    "CancelledError",
]

# A library's logger stays silent until the application configures logging.
_logging.getLogger("pali").addHandler(_logging.NullHandler())
_atexit.register(_native._shutdown)

_PACKAGE_DIR = _os.path.dirname(_os.path.abspath(__file__))

PathLike = Union[str, "_os.PathLike[str]"]
#: What every task takes as ``image``: a path, encoded bytes, a numpy uint8 array (H, W, 3),
#: a PIL image or a ``pali.Image``.
ImageLike = Union[PathLike, bytes, "numpy.ndarray", "PIL.Image.Image", Image]
#: ``image`` of a task: one image, or a list of them (one prompt about all, in order).
Images = Union[ImageLike, Sequence[ImageLike]]
#: ``lora=``: adapter ids, ``(id, scale)`` pairs or a dict ``{id: scale}``; ``[]``: none.
LoraSelection = Union[Sequence[Union[int, Tuple[int, float]]], Dict[int, float], None]


class Stream:
    """The text of a generation as it is generated (``Model.stream``).

    Iterate over it for the pieces; once the iteration has ended, ``result`` is the
    ``TextAnswer``. ``close()`` (from any thread: an iteration waiting in another thread
    then ends), leaving a ``with`` block, breaking out of a ``for`` loop over it or
    dropping it cancels the generation (it stops at its next token).
    Ctrl-C while waiting for a piece cancels it too and raises ``KeyboardInterrupt``.
    """

    __slots__ = ("_native",)

    def __init__(self, native):
        self._native = native

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._native)

    def close(self) -> None:
        """Cancels the generation if it is still running and waits for it to stop."""
        self._native.close()

    @property
    def result(self) -> Optional[TextAnswer]:
        """The answer once the iteration has ended (None before, or when cancelled)."""
        native = self._native.result
        return None if native is None else _answer(native)

    @property
    def cancelled(self) -> bool:
        """Whether the generation was cancelled (closed early or interrupted)."""
        return self._native.cancelled

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Model:
    """A loaded PaliGemma 2 model: vision tower, decoder and optionally a mask decoder.

    ``Model(model, mmproj=None, vae=None, threads=None, n_gpu_layers=None, ctx_size=None,
    low_mem="auto", lora=None)`` loads the decoder GGUF ``model`` and the vision GGUF
    ``mmproj`` (default: the one ``mmproj-*.gguf`` next to ``model``); ``vae`` is a mask
    decoder made by ``pali convert-vae`` (segment masks). ``threads``: default the physical
    cores; ``n_gpu_layers``: decoder layers on a GPU (GPU builds; default 0); ``ctx_size``:
    the largest context (default: what each request needs); ``low_mem``: ``"auto"``, True
    or False (never hold the vision tower and the decoder in memory at once); ``lora``:
    LoRA adapters made by ``pali convert-lora`` (either file of a pair), each a path or a
    ``(path, scale)`` pair, loaded with ids 0, 1, ... and used by every call unless it says
    otherwise (``pali --lora FILE`` / ``--lora-scaled FILE SCALE``). ``Model.demo()`` loads
    the bundled demo model. Loading releases the GIL.

    Every task takes ``image``: a path (str or ``os.PathLike``), encoded bytes (JPEG, PNG,
    WebP, BMP, GIF), a numpy uint8 array (H, W, 3) in RGB order (strided views too; copied
    once, H x W x 3 bytes), a PIL image or a ``pali.Image`` (decoded once, reused without a
    copy); ``bgr=True`` reads an array as OpenCV's B, G, R.

    Several images, or a clip: a list (or tuple) of images is ONE prompt about all of them,
    in order (HF's processor for a list of images; ``pali run --image A --image B``);
    detect and segment need them of one size, and boxes are in their pixels. With
    ``frames=K`` (K frames spread over the clip: frame i is ``floor(i * n / K)`` of its n)
    or ``fps=F`` (F frames per second of the clip's time), ``image`` is a clip: a video
    file (needs the ``ffmpeg`` command) or an animated GIF / APNG / WebP, as a path or its
    bytes; a clip with fewer than K frames repeats them in order (``warnings`` says so).
    The answer's ``n_images`` and ``frames`` say what was used.

    And these options, checked by the library as the CLI and the server check them
    (``OptionError`` names a bad one): ``max_tokens`` (default 64), ``temperature`` (0 =
    greedy, up to 2), ``top_k`` (0 = off), ``top_p`` (1 = off), ``seed``, ``stop`` (a
    string or up to 4), ``ctx_size``, ``ignore_eos``, ``lora`` (this call's LoRA adapters:
    ids, ``(id, scale)`` pairs or ``{id: scale}``; ``[]`` = the base model; default: the
    model's ``lora``).

    A model is safe to share between threads: calls run at the same time, each on its own
    generation (the vision tower encodes one batch of images at a time), with the GIL
    released; calls with different adapters share the one loaded base.
    Ctrl-C during a call cancels its generation and raises ``KeyboardInterrupt``.
    """

    __slots__ = ("_native",)

    def __init__(
        self,
        model: PathLike,
        mmproj: Optional[PathLike] = None,
        vae: Optional[PathLike] = None,
        threads: Optional[int] = None,
        n_gpu_layers: Optional[int] = None,
        ctx_size: Optional[int] = None,
        low_mem: Union[str, bool, None] = "auto",
        lora: Optional[Sequence[Union[PathLike, Tuple[PathLike, float]]]] = None,
    ):
        self._native = _native.Model(
            model,
            mmproj,
            vae,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            ctx_size=ctx_size,
            low_mem=low_mem,
            lora=lora,
        )

    @classmethod
    def demo(
        cls,
        threads: Optional[int] = None,
        ctx_size: Optional[int] = None,
        low_mem: Union[str, bool, None] = "auto",
    ) -> "Model":
        """The bundled demo model (2.15 M parameters, shipped in the package; it captions,
        counts, detects and segments circles, squares and triangles), with its mask
        decoder: what ``pali`` uses when no ``-m`` is given."""
        self = cls.__new__(cls)
        self._native = _native.Model.demo(
            _PACKAGE_DIR, threads=threads, ctx_size=ctx_size, low_mem=low_mem
        )
        return self

    def caption(
        self,
        image: Images,
        lang: str = "en",
        *,
        long: bool = False,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> TextAnswer:
        """Captions the image (``caption <lang>``; ``long=True``: ``describe <lang>``)."""
        return _answer(
            self._native.run(
                image, "caption", None, lang=lang, long=long, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def ask(
        self,
        image: Images,
        question: str,
        lang: str = "en",
        *,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> TextAnswer:
        """Answers a question about the image (``answer <lang> <question>``)."""
        return _answer(
            self._native.run(
                image, "ask", question, lang=lang, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def ocr(
        self,
        image: Images,
        *,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> TextAnswer:
        """Reads the text in the image (``ocr``)."""
        return _answer(
            self._native.run(
                image, "ocr", None, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def run(
        self,
        image: Images,
        prompt: str,
        *,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> TextAnswer:
        """Runs any PaliGemma prompt (``"caption en"``, ``"detect cat ; dog"``, ...) and
        returns its text, as ``pali run -p PROMPT --json`` (a detect prompt's raw
        ``<loc>`` answer: use ``detect`` for boxes)."""
        return _answer(
            self._native.run(
                image, "prompt", prompt, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def detect(
        self,
        image: Images,
        objects: Union[str, Sequence[str]],
        *,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> Located:
        """Finds objects (``detect a ; b``): ``objects`` is a list of names or one string
        ``"cat ; dog"``. Boxes are in the image's pixels, scored by the model's
        confidence in their ``<loc>`` tokens; ``to_dict()`` is ``pali detect --json``."""
        return _answer(
            self._native.run(
                image, "detect", objects, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def segment(
        self,
        image: Images,
        objects: Union[str, Sequence[str]],
        *,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> Located:
        """Segments objects (``segment a ; b``): boxes, the 16 mask codes and, with a mask
        decoder (``vae=``, or the demo model's), each object's ``mask`` as a numpy bool
        array (H, W). ``to_dict()`` is ``pali segment --json``."""
        return _answer(
            self._native.run(
                image, "segment", objects, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def stream(
        self,
        image: Images,
        prompt: str,
        *,
        bgr: bool = False,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        ctx_size: Optional[int] = None,
        ignore_eos: Optional[bool] = None,
        lora: LoraSelection = None,
        frames: Optional[int] = None,
        fps: Optional[float] = None,
    ) -> Stream:
        """Runs a prompt and yields its text as it is generated::

            for piece in model.stream(image, "caption en"):
                print(piece, end="", flush=True)

        The generation runs on its own thread; breaking out of the loop (or ``close()``)
        cancels it. The pieces join to what ``run(image, prompt).text`` returns."""
        return Stream(
            self._native.stream(
                image, "prompt", prompt, bgr=bgr,
                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, ctx_size=ctx_size, ignore_eos=ignore_eos,
                lora=lora, frames=frames, fps=fps,
            )
        )

    def load_adapter(self, path: PathLike) -> int:
        """Loads a LoRA adapter made by ``pali convert-lora`` (either file of its pair: the
        decoder part and the ``mmproj-...`` vision part beside it are both loaded), checked
        against this model, and returns its id. Calls use it when they name it
        (``lora=[id]``, ``lora={id: 0.5}``) or once it is in ``model.lora``. Nothing is
        merged into the weights. Waits for running calls; releases the GIL."""
        return self._native.load_adapter(path)

    def free_adapter(self, id: int) -> None:
        """Unloads adapter ``id`` (and takes it out of ``model.lora``); ids are not reused."""
        self._native.free_adapter(id)

    @property
    def adapters(self) -> List[Dict[str, Any]]:
        """The loaded adapters, in id order: ``id``, ``path``, ``name``, ``decoder`` and
        ``mmproj`` (its two parts' files, None where it has none), ``pairs`` (LoRA pairs in
        each part), ``bytes``."""
        return _json.loads(self._native.adapters_json())

    @property
    def lora(self) -> List[Tuple[int, float]]:
        """The adapters every call uses unless it passes ``lora=``: ``[(id, scale)]``.
        Set it as a call's ``lora=`` (``model.lora = [(0, 0.5)]``; ``[]`` or None: the base
        model), as ``pali serve``'s ``POST /lora-adapters`` sets the global scales."""
        return self._native.default_lora()

    @lora.setter
    def lora(self, value: LoraSelection) -> None:
        self._native.set_default_lora(value)

    @property
    def paths(self) -> tuple:
        """(decoder, mmproj, mask decoder or None) as loaded."""
        return self._native.paths

    @property
    def has_mask_decoder(self) -> bool:
        """Whether ``segment`` decodes masks."""
        return self._native.has_mask_decoder

    @property
    def low_mem(self) -> bool:
        """Whether low-memory mode is on."""
        return self._native.low_mem

    @property
    def load_ms(self) -> float:
        """How long loading took, in milliseconds."""
        return self._native.load_ms

    @property
    def vision_backend(self) -> str:
        """The vision tower's ggml backend (e.g. ``"CPU"``)."""
        return self._native.vision_backend

    def __repr__(self) -> str:
        decoder, mmproj, vae = self.paths
        return f"pali.Model({str(decoder)!r}, mmproj={str(mmproj)!r}, vae={None if vae is None else str(vae)!r})"
