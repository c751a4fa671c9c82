"""Every answer's to_dict() is what `pali … --json` prints (timings and memory aside), and
the attributes read the same values."""

import pytest

import pali
from conftest import CAPTIONS, IMAGE_NAMES, comparable, image


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_caption_equals_cli(model, cli, name):
    r = model.caption(image(name))
    assert isinstance(r, pali.TextAnswer)
    assert r.text == CAPTIONS[name]
    assert comparable(r.to_dict()) == comparable(cli("caption", image(name)))
    want = cli("caption", image(name))
    assert (r.text, r.tokens, r.finish_reason) == (
        want["text"],
        want["tokens"],
        want["finish_reason"],
    )
    t = r.timings
    assert t.n_gen == len(r.tokens) and t.n_prefix > 0
    assert t.vision_ms > 0 and t.ttft_ms >= t.vision_ms
    assert r.to_dict()["timings"]["n_prefix"] == t.n_prefix


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_detect_equals_cli(model, cli, name):
    d = model.detect(image(name), ["circle", "square", "triangle"])
    assert isinstance(d, pali.Located)
    want = cli("detect", image(name), "circle", "square", "triangle")
    assert comparable(d.to_dict()) == comparable(want)
    assert len(d.objects) == len(want["objects"]) > 0
    for o, w in zip(d.objects, want["objects"]):
        assert o.label == w["label"]
        assert o.box == tuple(w["box"]) and o.box.x2 == w["box"][2]
        assert o.score == w["score"] and 0 < o.score <= 1
        assert o.loc == tuple(w["loc"])
        assert o.mask is None and o.codes is None
    assert d.image == (want["image"]["width"], want["image"]["height"])


def test_detect_names_as_one_string(model):
    a = model.detect(image("three_shapes_wide"), "circle ; square")
    b = model.detect(image("three_shapes_wide"), ["circle", "square"])
    assert comparable(a.to_dict()) == comparable(b.to_dict())


@pytest.mark.parametrize(
    "name, shape",
    [("one_shape", "triangle"), ("two_shapes_tall", "circle"), ("three_shapes_wide", "circle")],
)
def test_segment_equals_cli_with_masks(model, cli, name, shape):
    s = model.segment(image(name), [shape])
    want = cli("segment", image(name), shape)
    assert comparable(s.to_dict()) == comparable(want)
    assert s.objects, want
    w, h = s.image
    for o, wo in zip(s.objects, want["objects"]):
        assert o.mask.dtype == bool and o.mask.shape == (h, w)
        assert int(o.mask.sum()) == o.area == wo["area"] > 0
        assert o.codes == tuple(wo["codes"]) and len(o.codes) == 16
        # COCO's column-major RLE of the JSON is this mask.
        flat = o.mask.T.reshape(-1)
        runs, value, start = [], False, 0
        for i in range(1, len(flat) + 1):
            if i == len(flat) or flat[i] != flat[start]:
                runs.append(i - start)
                start = i
        if flat[0]:
            runs.insert(0, 0)
        assert runs == wo["mask"]["counts"]


def test_segment_without_mask_decoder_warns(model):
    decoder, mmproj, _ = model.paths
    bare = pali.Model(decoder, mmproj)
    s = bare.segment(image("one_shape"), "triangle")
    assert not bare.has_mask_decoder
    assert s.objects[0].mask is None and s.to_dict()["objects"][0]["mask"] is None
    assert any("VQ-VAE" in w for w in s.warnings)


def test_ask_ocr_and_run_equal_cli(model, cli):
    img = image("three_shapes_wide")
    assert comparable(model.ask(img, "how many shapes?").to_dict()) == comparable(
        cli("ask", img, "how many shapes?")
    )
    assert model.ask(img, "how many shapes?").text == "3"
    assert comparable(model.ocr(img).to_dict()) == comparable(cli("ocr", img))
    raw = model.run(img, "detect circle")
    assert comparable(raw.to_dict()) == comparable(
        cli("run", "--image", img, "-p", "detect circle")
    )
    assert raw.text.startswith("<loc")


def test_options_reach_the_library(model, cli):
    img = image("three_shapes_wide")
    r = model.caption(img, max_tokens=3)
    assert (len(r.tokens), r.finish_reason) == (3, "length")
    assert comparable(r.to_dict()) == comparable(cli("caption", img, "-n", "3"))
    r = model.caption(img, stop=" and")
    assert r.text == "a red circle, a blue square" and r.finish_reason == "stop"
    assert model.caption(img, stop=[",", "x"]).text == "a red circle"
    sampled = [
        model.caption(img, temperature=1.5, top_k=40, top_p=0.9, seed=s).to_dict()["tokens"]
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1]
    assert comparable(model.caption(img, temperature=1.5, top_k=40, top_p=0.9, seed=2).to_dict())[
        "tokens"
    ] == sampled[2]
    cli_sampled = cli("caption", img, "--temp", "1.5", "--top-k", "40", "--top-p", "0.9", "--seed", "1")
    assert cli_sampled["tokens"] == sampled[0]
    long = model.caption(img, max_tokens=20, ignore_eos=True)
    assert len(long.tokens) == 20


def test_model_ctx_size_is_every_calls_default(model):
    decoder, mmproj, vae = model.paths
    small = pali.Model(decoder, mmproj, vae, ctx_size=70)
    with pytest.raises(pali.ContextLengthError):
        small.caption(image("one_shape"))
    # A call's own ctx_size wins.
    assert small.caption(image("one_shape"), ctx_size=0).text == "a green triangle"
