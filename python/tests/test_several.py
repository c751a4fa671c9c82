"""Several images in one prompt and clips (frames=, fps=): the answers equal the CLI's
`pali run --image A --image B` and `pali caption CLIP --frames K` (--json)."""

import numpy as np
import pytest
from PIL import Image as PILImage

import pali
from conftest import comparable, image

A, B = image("one_shape"), image("two_shapes_tall")


def as_numpy(path):
    return np.asarray(PILImage.open(path).convert("RGB"))


def test_two_images_equal_cli(model, cli):
    r = model.caption([A, B])
    want = cli("run", "--image", A, "--image", B, "-p", "caption en")
    assert comparable(r.to_dict()) == comparable(want)
    assert r.n_images == 2 == want["n_images"]
    assert r.frames is None
    one = model.caption(A)
    assert one.n_images == 1 and "n_images" not in one.to_dict()
    # Two images make a longer prefix than one: the second image is in the prompt.
    assert r.timings.n_prefix > one.timings.n_prefix


def test_list_items_of_every_kind_give_the_same_answer(model):
    want = model.caption([A, B, A]).to_dict()
    kinds = [
        [str(A), B.read_bytes(), as_numpy(A)],
        (pali.Image(A), PILImage.open(B), as_numpy(A)[:, ::-1][:, ::-1]),
    ]
    for images in kinds:
        assert comparable(model.caption(images).to_dict()) == comparable(want)
    bgr = [np.ascontiguousarray(as_numpy(p)[:, :, ::-1]) for p in (A, B, A)]
    assert comparable(model.caption(bgr, bgr=True).to_dict()) == comparable(want)


def test_images_go_in_the_order_given(model, cli):
    for order in [(A, B), (B, A)]:
        got = model.run(list(order), "caption en")
        want = cli("run", "--image", order[0], "--image", order[1], "-p", "caption en")
        assert comparable(got.to_dict()) == comparable(want)


def test_detect_on_two_images_of_one_size(model, cli):
    d = model.detect([A, A], ["triangle"])
    raw = cli("run", "--image", A, "--image", A, "-p", "detect triangle")
    assert d.text == raw["text"] and d.n_images == 2
    w, h = d.image
    for o in d.objects:
        assert 0 <= o.box.x1 <= o.box.x2 <= w and 0 <= o.box.y1 <= o.box.y2 <= h
    with pytest.raises(pali.PromptError, match="one size"):
        model.detect([A, B], ["triangle"])


def test_stream_of_several_images_joins_to_the_answer(model):
    pieces = list(model.stream([A, B], "caption en"))
    assert "".join(pieces) == model.run([A, B], "caption en").text


@pytest.fixture(scope="module")
def gif(tmp_path_factory):
    """An animated GIF of the four example images (one size), 100 ms per frame."""
    names = ["one_shape", "two_shapes_tall", "three_shapes_wide", "two_shapes_small"]
    frames = [PILImage.open(image(n)).convert("RGB").resize((64, 48)) for n in names]
    path = tmp_path_factory.mktemp("clip") / "shapes.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_clip_frames_equal_cli(model, cli, gif):
    r = model.caption(gif, frames=4)
    want = cli("caption", gif, "--frames", "4")
    assert comparable(r.to_dict()) == comparable(want)
    assert r.frames == [0, 1, 2, 3] and r.n_images == 4 and not r.warnings
    # Frame i of K is floor(i * n / K).
    assert model.caption(gif, frames=2).frames == [0, 2]


def test_clip_bytes_and_path_agree(model, gif):
    a = model.detect(gif, ["circle"], frames=3)
    b = model.detect(gif.read_bytes(), ["circle"], frames=3)
    assert comparable(a.to_dict()) == comparable(b.to_dict())
    assert a.frames == [0, 1, 2]


def test_clip_frames_equal_the_same_images_as_a_list(model, gif):
    frames = []
    with PILImage.open(gif) as clip:
        for i in range(clip.n_frames):
            clip.seek(i)
            frames.append(np.asarray(clip.convert("RGB")))
    a, b = model.caption(gif, frames=4), model.caption(frames)
    assert (a.text, a.tokens) == (b.text, b.tokens)


def test_short_clip_repeats_its_frames_with_a_warning(model, cli, gif):
    r = model.caption(gif, frames=6)
    want = cli("caption", gif, "--frames", "6")
    assert comparable(r.to_dict()) == comparable(want)
    assert len(r.frames) == 6 and r.warnings and "repeat" in r.warnings[0]


def test_fps_samples_the_clip_time(model, cli, gif):
    r = model.caption(gif, fps=5)
    want = cli("caption", gif, "--fps", "5")
    assert comparable(r.to_dict()) == comparable(want)
    assert r.frames == [0, 2]


def test_bad_several_and_clip_inputs(model, gif, tmp_path):
    jpeg = tmp_path / "still.jpg"
    PILImage.open(A).convert("RGB").save(jpeg)
    with pytest.raises(pali.ImageError, match="empty list"):
        model.caption([])
    with pytest.raises(pali.ImageError, match="where one image was expected"):
        model.caption([A, [B]])
    with pytest.raises(pali.OptionError, match="not both"):
        model.caption(gif, frames=2, fps=1)
    with pytest.raises(pali.ImageError, match="frames of a clip"):
        model.caption(as_numpy(A), frames=2)
    with pytest.raises(pali.ImageError, match="frames of a clip"):
        model.caption([gif], frames=2)
    with pytest.raises(pali.Error, match="at least 1"):
        model.caption(gif, frames=0)
    with pytest.raises(pali.OptionError, match="frames"):
        model.caption(gif, frames=-1)
    with pytest.raises(pali.ImageError, match="not a clip"):
        model.caption(jpeg, frames=2)
    with pytest.raises(pali.ImageError, match="nope.gif"):
        model.caption("nope.gif", frames=2)
    with pytest.raises(pali.ContextLengthError, match="would fit"):
        model.caption(gif, frames=100000)
