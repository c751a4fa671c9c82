"""LoRA adapters from Python: `Model(lora=...)`, per-call `lora=`, `model.lora`,
`load_adapter` / `free_adapter`, on the tiny random fixture and its PEFT adapter
(models/fixtures/lora/hf: decoder + vision parts): PEFT's greedy tokens, the CLI's
`--lora` / `--lora-scaled` answers, scale 0 and `lora=[]` = the base model."""

import json
import subprocess

import pytest

import pali
from conftest import ROOT, comparable

FIXTURES = ROOT / "models" / "fixtures"
IMAGES = ["wide", "tall", "gray"]


def fixture_image(name):
    return FIXTURES / "images" / f"{name}.png"


@pytest.fixture(scope="module")
def files(cli, tmp_path_factory):
    """The tiny-224 fixture and its `hf` adapter converted by the CLI (F32)."""
    out = tmp_path_factory.mktemp("lora")
    exe = cli.exe
    for args in [
        ["convert", FIXTURES / "tiny-224" / "hf", "-o", out / "base", "--type", "f32",
         "--vision-type", "f32", "-q"],
        ["convert-lora", FIXTURES / "lora" / "hf" / "adapter", "-o", out / "lora",
         "--type", "f32", "-q"],
    ]:
        p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    decoder = next(p for p in (out / "base").glob("*.gguf") if not p.name.startswith("mmproj"))
    adapter = next(p for p in (out / "lora").glob("*.gguf") if not p.name.startswith("mmproj"))
    return decoder, adapter


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURES / "lora" / "hf" / "reference.json").read_text())


@pytest.fixture(scope="module")
def tuned(files):
    decoder, adapter = files
    return pali.Model(decoder, threads=1, lora=[adapter])


@pytest.fixture(scope="module")
def base(files):
    return pali.Model(files[0], threads=1)


def agree_with_peft(tokens, case, where):
    """Greedy tokens equal PEFT's up to and including its first near-tie (top-2 logit
    margin < 0.1; the default F16 KV cache may flip a near-tie): returns how many were
    compared."""
    greedy, margins = case["greedy"], case["margins"]
    n = next((i for i, m in enumerate(margins) if m < 0.1), len(greedy))
    assert tokens[:n] == greedy[:n], (where, tokens, greedy, margins)
    return n


def test_adapter_answers_equal_peft(tuned, reference):
    assert tuned.lora == [(0, 1.0)]
    compared = 0
    for case in reference["cases"]:
        r = tuned.run(fixture_image(case["image"]), case["prompt"], max_tokens=10)
        compared += agree_with_peft(r.tokens, case, (case["image"], case["prompt"]))
    for case in reference["scaled_cases"]["0.5"]:
        r = tuned.run(fixture_image(case["image"]), case["prompt"], max_tokens=10, lora={0: 0.5})
        compared += agree_with_peft(r.tokens, case, ("scale 0.5", case["image"], case["prompt"]))
    # 18 answers of up to 10 tokens: most are compared, not only the first few.
    assert compared >= 40, compared


def test_calls_equal_the_cli(tuned, files, cli):
    decoder, adapter = files
    img = fixture_image("wide")
    common = ["run", "-m", decoder, "--image", img, "-p", "caption en", "-n", "8", "-t", "1"]
    r = tuned.run(img, "caption en", max_tokens=8)
    assert comparable(r.to_dict()) == comparable(cli(*common, "--lora", adapter))
    r = tuned.run(img, "caption en", max_tokens=8, lora=[(0, 0.5)])
    assert comparable(r.to_dict()) == comparable(cli(*common, "--lora-scaled", adapter, "0.5"))


def test_no_adapter_and_scale_zero_are_the_base(tuned, base):
    for name in IMAGES:
        img = fixture_image(name)
        want = base.run(img, "caption en", max_tokens=8).tokens
        tuned_tokens = tuned.run(img, "caption en", max_tokens=8).tokens
        assert tuned_tokens != want, name
        assert tuned.run(img, "caption en", max_tokens=8, lora=[]).tokens == want
        assert tuned.run(img, "caption en", max_tokens=8, lora=[(0, 0.0)]).tokens == want


def test_defaults_load_and_free(files, base):
    decoder, adapter = files
    m = pali.Model(decoder, threads=1)
    img = fixture_image("tall")
    want_base = base.run(img, "caption en", max_tokens=8).tokens
    assert m.lora == [] and m.adapters == []
    a = m.load_adapter(adapter)
    b = m.load_adapter(adapter.parent / ("mmproj-" + adapter.name))
    assert (a, b) == (0, 1)
    info = m.adapters
    assert [x["id"] for x in info] == [0, 1]
    assert info[0]["decoder"] and info[0]["mmproj"] and info[0]["pairs"][1] > 0
    # Loaded, not applied until asked.
    assert m.run(img, "caption en", max_tokens=8).tokens == want_base
    one = m.run(img, "caption en", max_tokens=8, lora=[a]).tokens
    assert one != want_base
    m.lora = [b]
    assert m.lora == [(1, 1.0)]
    assert m.run(img, "caption en", max_tokens=8).tokens == one
    m.free_adapter(b)
    assert m.lora == [] and [x["id"] for x in m.adapters] == [0]
    with pytest.raises(pali.OptionError, match="no such adapter"):
        m.run(img, "caption en", lora=[b])
    with pytest.raises(pali.OptionError, match="no such adapter"):
        m.lora = [7]
    with pytest.raises(pali.OptionError, match="no such adapter"):
        m.free_adapter(b)
    m.lora = None
    assert m.lora == []


def test_bad_adapters_and_selections(files, tuned):
    decoder, adapter = files
    img = fixture_image("wide")
    with pytest.raises(pali.Error, match="adapter"):
        tuned.load_adapter(decoder)  # a model, not an adapter
    with pytest.raises(pali.Error, match="nope.gguf"):
        pali.Model(decoder, lora=["nope.gguf"])
    with pytest.raises(pali.OptionError, match="finite"):
        pali.Model(decoder, lora=[(adapter, float("nan"))])
    with pytest.raises(pali.OptionError, match="listed twice"):
        tuned.run(img, "caption en", lora=[0, (0, 0.5)])
    with pytest.raises(pali.OptionError, match="must be the id"):
        tuned.run(img, "caption en", lora=[-1])
    with pytest.raises(TypeError, match="lora"):
        tuned.run(img, "caption en", lora="0")
    with pytest.raises(TypeError, match="lora"):
        pali.Model(decoder, lora=str(adapter))
    # The model is still fine after every refusal.
    assert tuned.lora == [(0, 1.0)]
    assert tuned.run(img, "caption en", max_tokens=2).tokens


def test_two_threads_with_different_adapters_at_once(tuned):
    from concurrent.futures import ThreadPoolExecutor

    images = [fixture_image(n) for n in IMAGES]
    selections = [[], [(0, 1.0)], {0: 0.5}]
    want = {
        (i, j): tuned.run(img, "caption en", max_tokens=8, lora=sel).tokens
        for i, img in enumerate(images)
        for j, sel in enumerate(selections)
    }
    with ThreadPoolExecutor(2) as pool:
        got = dict(
            zip(
                want,
                pool.map(
                    lambda key: tuned.run(
                        images[key[0]], "caption en", max_tokens=8, lora=selections[key[1]]
                    ).tokens,
                    want,
                ),
            )
        )
    assert got == want
    assert len({tuple(v) for v in want.values()}) > len(images)
