"""The built wheel (PALI_WHEEL, set by .ci/run): what it holds, and that it installs and
runs in a fresh venv with no source tree and nothing else installed."""

import hashlib
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, image, missing

DEMO = ["pali-demo-F16.gguf", "mmproj-pali-demo-F16.gguf", "vae-pali-demo.gguf"]


@pytest.fixture(scope="module")
def wheel():
    path = os.environ.get("PALI_WHEEL")
    if not path or not Path(path).is_file():
        missing("no built wheel: set PALI_WHEEL (pip wheel --no-deps -w DIR ./python)")
    return Path(path)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_wheel_contents(wheel):
    assert wheel.name.endswith("-cp39-abi3-linux_x86_64.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in DEMO:
            data = z.read(f"pali/models/demo/{f}")
            assert sha(data) == sha((ROOT / "models" / "demo" / f).read_bytes()), f
    package = {n for n in names if not n.startswith("pali-0.1.0.dist-info/")}
    assert package == {
        "pali/__init__.py",
        "pali/_answers.py",
        "pali/_errors.py",
        "pali/_native.abi3.so",
        "pali/_native.pyi",
        "pali/py.typed",
        *(f"pali/models/demo/{f}" for f in DEMO),
    }
    for n in names:
        assert "__pycache__" not in n and not n.endswith((".pyc", ".rs", ".toml")), n


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        timeout=300,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    png = work / "frame.png"
    png.write_bytes(image("one_shape").read_bytes())
    script = (
        "import pali, sys; m = pali.Model.demo()\n"
        "print(pali.__file__); print(m.paths[0])\n"
        "print(m.caption(open('frame.png', 'rb').read()).text)\n"
        "print(m.detect('frame.png', 'triangle').objects[0].label)\n"
        # numpy (a dependency, not installed here) is only needed for arrays and masks,
        # and its absence is an error, not a panic.
        "try: m.segment('frame.png', 'triangle')\n"
        "except pali.Error as e: print(type(e).__name__, e)\n"
        "try: m.caption(42)\n"
        "except pali.ImageError as e: print(type(e).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(
        [python, "-I", "-c", script], cwd=work, capture_output=True, text=True, env=env, timeout=120
    )
    assert p.returncode == 0, p.stderr
    where, decoder, caption, label, no_numpy, bad_type = p.stdout.split("\n")[:6]
    assert where.startswith(str(env_dir)) and decoder.startswith(str(env_dir))
    assert (caption, label) == ("a green triangle", "triangle")
    assert no_numpy.startswith("Error segment's masks needs numpy (pip install numpy)")
    assert bad_type == "ImageError"
    assert p.stderr == ""
