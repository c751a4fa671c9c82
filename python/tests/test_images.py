"""Every kind of image input gives the same answer; arrays are copied once."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import pali
from conftest import comparable, image

NAME = "three_shapes_wide"


def rgb_array():
    return np.asarray(PILImage.open(image(NAME)).convert("RGB"))


@pytest.fixture(scope="module")
def want(model):
    return comparable(model.detect(image(NAME), ["circle", "square"]).to_dict())


def strided_views(a):
    """Views of `a`'s pixels that are not C-contiguous."""
    h, w, _ = a.shape
    wide = np.zeros((h, w * 2, 3), np.uint8)
    wide[:, ::2] = a
    flipped = np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    planar = np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0)
    padded = np.zeros((h + 4, w + 6, 3), np.uint8)
    padded[2 : h + 2, 3 : w + 3] = a
    return {
        "every other column": wide[:, ::2],
        "negative strides": flipped,
        "planar (channels first in memory)": planar,
        "crop of a larger frame": padded[2 : h + 2, 3 : w + 3],
        "fortran order": np.asfortranarray(a),
    }


def inputs(a):
    path = image(NAME)
    yield "str path", str(path), {}
    yield "pathlib.Path", Path(path), {}
    yield "os.PathLike", _PathLike(str(path)), {}
    yield "bytes", path.read_bytes(), {}
    yield "bytearray", bytearray(path.read_bytes()), {}
    yield "PIL RGB", PILImage.open(path), {}
    yield "PIL RGBA", PILImage.open(path).convert("RGBA"), {}
    yield "numpy contiguous", a, {}
    for what, view in strided_views(a).items():
        assert np.array_equal(view, a)
        yield f"numpy {what}", view, {}
    bgr = np.ascontiguousarray(a[..., ::-1])
    yield "bgr=True", bgr, {"bgr": True}
    yield "bgr view, bgr=True", a[..., ::-1], {"bgr": True}
    # picamera2's XRGB8888 arrays: B, G, R, X bytes per pixel; a view drops X.
    xbgr = np.dstack([bgr, np.full(a.shape[:2], 255, np.uint8)])
    yield "XRGB8888 frame[..., :3], bgr=True", xbgr[..., :3], {"bgr": True}
    yield "pali.Image.from_bgr", pali.Image.from_bgr(bgr), {}
    yield "pali.Image", pali.Image(path), {}
    yield "pali.Image(bgr=True)", pali.Image(bgr, bgr=True), {}


class _PathLike(os.PathLike):
    def __init__(self, p):
        self.p = p

    def __fspath__(self):
        return self.p


def test_every_input_gives_the_same_answer(model, want):
    a = rgb_array()
    for what, source, kw in inputs(a):
        got = comparable(model.detect(source, ["circle", "square"], **kw).to_dict())
        assert got == want, what


def test_pali_image_holds_the_pixels_once():
    a = rgb_array()
    h, w, _ = a.shape
    for source in [a, strided_views(a)["every other column"], str(image(NAME))]:
        img = pali.Image(source)
        assert (img.width, img.height, img.size) == (w, h, (w, h))
        assert img.nbytes == w * h * 3
        assert np.array_equal(img.to_numpy(), a)
    assert np.array_equal(pali.Image.from_bgr(a[..., ::-1]).to_numpy(), a)
    assert repr(pali.Image(a)) == f"pali.Image({w}x{h})"


def test_the_array_is_not_kept(model):
    a = np.array(rgb_array())
    img = pali.Image(a)
    a[:] = 0
    assert np.array_equal(img.to_numpy(), rgb_array())


def test_one_image_for_several_tasks(model, want):
    img = pali.Image(image(NAME))
    assert model.caption(img).text == model.caption(image(NAME)).text
    assert comparable(model.detect(img, ["circle", "square"]).to_dict()) == want


def test_gray_and_palette_pil_images_are_converted_like_the_decoder(model):
    path = Path(image("one_shape"))
    for mode in ["L", "P"]:
        pil = PILImage.open(path).convert(mode)
        want = model.caption(np.asarray(pil.convert("RGB"))).to_dict()
        assert comparable(model.caption(pil).to_dict()) == comparable(want), mode
