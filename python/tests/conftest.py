"""Shared fixtures: the demo model (loaded once), the example images, the `pali` CLI."""

import json
import os
import subprocess
from pathlib import Path

import pytest

import pali

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"
IMAGE_NAMES = ["one_shape", "three_shapes_wide", "two_shapes_small", "two_shapes_tall"]
# What the demo model answers (models/demo/README.md).
CAPTIONS = {
    "one_shape": "a green triangle",
    "three_shapes_wide": "a red circle, a blue square and a green circle",
    "two_shapes_small": "a blue square and a blue square",
    "two_shapes_tall": "a green square and a red circle",
}


def missing(what):
    """A prerequisite is missing: skip, but fail under CI=true (as the Rust tests do)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (required under CI=true)")
    pytest.skip(what)


def image(name):
    return IMAGES / f"{name}.png"


@pytest.fixture(scope="session")
def model():
    return pali.Model.demo()


@pytest.fixture(scope="session")
def cli():
    """`pali ARGS… --json` (the bundled model, from the repository root) as a dict."""
    exe = Path(os.environ.get("PALI_CLI", ROOT / "target" / "release" / "pali"))
    if not exe.is_file():
        missing(f"no pali CLI at {exe} (cargo build --release, or set PALI_CLI)")

    def run(*args, json_out=True):
        cmd = [str(exe), *map(str, args)] + (["--json"] if json_out else [])
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if not json_out:
            return p
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    run.exe = exe
    return run


def comparable(d):
    """An answer's dict without what differs between two runs (time and memory)."""
    d = dict(d)
    d.pop("timings", None)
    d.pop("peak_rss_mb", None)
    return d
