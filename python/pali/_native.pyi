"""Type stubs of pali's PyO3 module (python/src). Use the ``pali`` package: its ``Model``
wraps this one and turns the JSON answers into ``TextAnswer`` / ``Located``."""

import os
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy

__version__: str
MAX_IMAGE_PIXELS: int

_Path = Union[str, os.PathLike]
# (the answer's JSON, exactly `pali … --json`; segment masks, one per object; the
# generation thread's milliseconds: image decoding + the library's Model::run)
_Answer = Tuple[str, List[Optional[numpy.ndarray]], float]

class Image:
    """A decoded RGB image, ready for any number of calls (pixels are not copied again).

    ``source``: a path, encoded bytes (JPEG, PNG, WebP, BMP, GIF), a numpy uint8 array
    (H, W, 3), strided or not (copied once: H x W x 3 bytes), a PIL image or another
    ``pali.Image``; ``bgr=True`` reads an array's channels as B, G, R (OpenCV's order).
    """

    def __init__(self, source: Any, *, bgr: bool = False) -> None: ...
    @staticmethod
    def from_bgr(array: numpy.ndarray) -> "Image":
        """An image from an OpenCV frame: a uint8 array (H, W, 3) in B, G, R order."""
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) in pixels."""
    @property
    def nbytes(self) -> int:
        """Bytes of pixels held: width x height x 3."""
    def to_numpy(self) -> numpy.ndarray:
        """The pixels as a new numpy uint8 array (H, W, 3), RGB."""

class Stream:
    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
    @property
    def result(self) -> Optional[_Answer]: ...
    @property
    def cancelled(self) -> bool: ...

class Model:
    def __init__(
        self,
        model: _Path,
        mmproj: Optional[_Path] = None,
        vae: Optional[_Path] = None,
        *,
        threads: Optional[int] = None,
        n_gpu_layers: Optional[int] = None,
        ctx_size: Optional[int] = None,
        low_mem: Union[str, bool, None] = None,
        lora: Optional[Sequence[Union[_Path, Tuple[_Path, float]]]] = None,
    ) -> None: ...
    @staticmethod
    def demo(
        root: _Path,
        *,
        threads: Optional[int] = None,
        ctx_size: Optional[int] = None,
        low_mem: Union[str, bool, None] = None,
    ) -> "Model": ...
    def run(
        self,
        image: Any,
        task: str,
        arg: Union[str, Sequence[str], None] = None,
        *,
        lang: str = "en",
        long: bool = False,
        bgr: bool = False,
        **options: Any,
    ) -> _Answer:
        """``task``: caption, ask (arg: the question), ocr, detect / segment (arg: the
        object names), prompt (arg: any prompt). ``image``: one image or a list (one
        prompt); with ``frames`` / ``fps`` a clip file (path or bytes). ``options``: the
        ``pali.Model`` calls' keyword arguments (max_tokens, temperature, top_k, top_p,
        seed, stop, ctx_size, ignore_eos, lora, frames, fps); any other name is a
        ``TypeError``."""
    def stream(
        self,
        image: Any,
        task: str,
        arg: Union[str, Sequence[str], None] = None,
        *,
        lang: str = "en",
        long: bool = False,
        bgr: bool = False,
        **options: Any,
    ) -> Stream: ...
    def load_adapter(self, path: _Path) -> int: ...
    def free_adapter(self, id: int) -> None: ...
    def adapters_json(self) -> str: ...
    def default_lora(self) -> List[Tuple[int, float]]: ...
    def set_default_lora(
        self, value: Union[Sequence[Union[int, Tuple[int, float]]], Dict[int, float], None]
    ) -> None: ...
    @property
    def paths(self) -> Tuple[pathlib.Path, pathlib.Path, Optional[pathlib.Path]]: ...
    @property
    def low_mem(self) -> bool: ...
    @property
    def load_ms(self) -> float: ...
    @property
    def vision_backend(self) -> str: ...
    @property
    def has_mask_decoder(self) -> bool: ...
    @property
    def n_ctx_train(self) -> int: ...

def running_generations() -> int:
    """Generation threads running now (a cancelled stream's thread ends at its next token)."""

def _shutdown() -> None: ...
def _refresh_logging() -> None: ...
