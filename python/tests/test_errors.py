"""Bad input raises the right pali.Error subclass with the library's message (the CLI's);
never a panic, an abort or a hang."""

import numpy as np
import pytest

import pali
from conftest import ROOT, image

IMG = image("one_shape")


def cli_error(cli, *args):
    p = cli(*args, json_out=False)
    assert p.returncode != 0, p.stdout
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), p.stderr
    return line[len("error: ") :]


def test_hierarchy():
    for cls in [
        pali.ModelError,
        pali.ImageError,
        pali.PromptError,
        pali.ContextLengthError,
        pali.OptionError,
        pali.CancelledError,
    ]:
        assert issubclass(cls, pali.Error)
    assert issubclass(pali.OptionError, ValueError)
    assert issubclass(pali.ContextLengthError, pali.PromptError)


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        ({"temperature": 5}, ["--temp", "5"]),
        ({"temperature": -1.0}, ["--temp", "-1"]),
        ({"top_p": 0}, ["--top-p", "0"]),
        ({"top_k": -1}, ["--top-k", "-1"]),
        ({"max_tokens": 0}, ["-n", "0"]),
        ({"ctx_size": -2}, ["-c", "-2"]),
    ],
)
def test_bad_options_have_the_clis_message(model, cli, kwargs, flags):
    with pytest.raises(pali.OptionError) as e:
        model.caption(IMG, **kwargs)
    assert str(e.value) == cli_error(cli, "caption", IMG, *flags)
    assert isinstance(e.value, ValueError)


def test_other_bad_options(model):
    with pytest.raises(pali.OptionError, match="stop has 5 sequences: at most 4"):
        model.caption(IMG, stop=list("abcde"))
    with pytest.raises(pali.OptionError, match=r"temperature \(--temp\) = NaN"):
        model.caption(IMG, temperature=float("nan"))
    with pytest.raises(pali.OptionError, match="seed = -1: out of range"):
        model.caption(IMG, seed=-1)
    with pytest.raises(pali.OptionError, match="max_tokens = 1000000000000000000000: out of range"):
        model.caption(IMG, max_tokens=10**21)
    with pytest.raises(TypeError, match="max_tokens"):
        model.caption(IMG, max_tokens="5")
    with pytest.raises(TypeError, match="stop"):
        model.caption(IMG, stop=5)
    with pytest.raises(TypeError):
        model.caption(IMG, max_token=5)
    decoder, mmproj, _ = model.paths
    with pytest.raises(pali.OptionError, match="low_mem = maybe"):
        pali.Model(decoder, mmproj, low_mem="maybe")
    with pytest.raises(pali.OptionError, match=r"n_ctx \(-c, --ctx-size\) = -1"):
        pali.Model(decoder, mmproj, ctx_size=-1)


def test_context_too_small(model, cli):
    with pytest.raises(pali.ContextLengthError) as e:
        model.caption(IMG, ctx_size=10)
    assert str(e.value) == cli_error(cli, "caption", IMG, "-c", "10")


def test_no_object_names(model, cli):
    for names in [[], " ; ", ["", " "]]:
        with pytest.raises(pali.PromptError) as e:
            model.detect(IMG, names)
        assert str(e.value) == cli_error(cli, "detect", IMG, " ; ")
    with pytest.raises(pali.PromptError):
        model.segment(IMG, "")
    with pytest.raises(TypeError):
        model.detect(IMG, 5)


def test_missing_and_corrupt_image_files(model, cli, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(pali.ImageError) as e:
        model.caption(missing)
    assert str(e.value) == cli_error(cli, "caption", missing)
    assert "cannot read image" in str(e.value)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(IMG.read_bytes()[:200])
    with pytest.raises(pali.ImageError) as e:
        model.caption(corrupt)
    assert str(e.value) == cli_error(cli, "caption", corrupt)
    assert "corrupt or truncated" in str(e.value)
    with pytest.raises(pali.ImageError, match="unknown or unsupported format"):
        model.caption(b"not an image at all")
    with pytest.raises(pali.ImageError, match="<in-memory image> is corrupt or truncated"):
        model.caption(IMG.read_bytes()[:200])
    with pytest.raises(pali.ImageError, match="empty"):
        pali.Image(b"")


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((10, 10, 3), np.float32), r"image array has dtype float32: pass uint8 pixels"),
        (np.zeros((10, 10, 3), np.uint16), r"dtype uint16"),
        (np.zeros((10, 10), np.uint8), r"shape \(10, 10\): expected \(H, W, 3\)"),
        (np.zeros((10, 10, 4), np.uint8), r"shape \(10, 10, 4\): expected \(H, W, 3\)"),
        (np.zeros((3, 10, 10), np.uint8), r"shape \(3, 10, 10\)"),
        (np.zeros((0, 10, 3), np.uint8), r"width and height must be at least 1"),
        (np.zeros((2, 10, 10, 3), np.uint8), r"shape \(2, 10, 10, 3\)"),
        (np.zeros((4, 4, 3), object), r"dtype object"),
        # 400 MP without allocating them: refused before any copy.
        (
            np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3)),
            r"shape \(20000, 20000, 3\): over the limit of 178956970 pixels",
        ),
    ],
)
def test_bad_arrays(model, array, message):
    with pytest.raises(pali.ImageError, match=message):
        model.caption(array)
    with pytest.raises(pali.ImageError, match=message):
        pali.Image(array)


def test_bad_image_types(model):
    with pytest.raises(pali.ImageError, match="unsupported image type int"):
        model.caption(42)
    with pytest.raises(pali.ImageError, match="bgr=True is for arrays of pixels"):
        model.caption(IMG, bgr=True)
    with pytest.raises(pali.ImageError, match="bgr=True"):
        model.caption(IMG.read_bytes(), bgr=True)


def test_missing_and_wrong_model_files(model, tmp_path):
    decoder, mmproj, vae = model.paths
    with pytest.raises(pali.ModelError, match="file not found"):
        pali.Model(tmp_path / "missing.gguf", mmproj)
    with pytest.raises(pali.ModelError, match="file not found"):
        pali.Model(decoder, tmp_path / "missing.gguf")
    with pytest.raises(pali.ModelError, match="model.gguf: file not found"):
        pali.Model(tmp_path / "model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(pali.ModelError, match="no mmproj-\\*.gguf next to the model"):
        pali.Model(tmp_path / "model.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(pali.ModelError):
        pali.Model(junk, mmproj)
    with pytest.raises(pali.ModelError):
        pali.Model(mmproj, decoder)
    with pytest.raises(pali.ModelError, match="is not a mask decoder file"):
        pali.Model(decoder, mmproj, vae=decoder)
    # Still works afterwards.
    assert model.caption(IMG).text == "a green triangle"


def test_native_options_are_named(model):
    # The binding takes the wrapper's options by name; a misspelt one is refused, not ignored.
    with pytest.raises(TypeError, match="max_tokns"):
        model._native.run(IMG, "caption", None, max_tokns=3)
