"""Logs go to Python's logging, never straight to stderr."""

import logging
import subprocess
import sys

import pali
from conftest import image


class Records(logging.Handler):
    def __init__(self):
        super().__init__(level=1)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_llama_cpp_lines_arrive_at_debug(model):
    logger = logging.getLogger("pali")
    handler = Records()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        decoder, mmproj, _ = model.paths
        pali.Model(decoder, mmproj).caption(image("one_shape"))
    finally:
        logger.setLevel(old)
        logger.removeHandler(handler)
        pali._native._refresh_logging()
    names = {r.name for r in handler.records}
    assert "pali.llama_cpp" in names, names
    llama = [r for r in handler.records if r.name == "pali.llama_cpp"]
    assert any("gemma2" in r.getMessage() for r in llama)
    assert all(r.levelno <= logging.WARNING for r in llama)
    assert {r.levelno for r in llama} >= {logging.DEBUG}
    # Once the level is back, nothing below it is even formatted.
    handler.records.clear()
    model.caption(image("one_shape"))
    assert handler.records == []


def test_nothing_is_printed_to_stderr():
    script = (
        "import pali, sys; m = pali.Model.demo(); "
        "print(m.caption(sys.argv[1]).text); print(m.segment(sys.argv[1], 'triangle').objects[0].area)"
    )
    p = subprocess.run(
        [sys.executable, "-c", script, str(image("one_shape"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["a green triangle", "885"]
    assert p.stderr == ""


def test_basic_config_shows_pali_lines():
    script = (
        "import logging, pali, sys; logging.basicConfig(level=logging.DEBUG, format='%(name)s %(levelname)s %(message)s'); "
        "pali.Model.demo().caption(sys.argv[1])"
    )
    p = subprocess.run(
        [sys.executable, "-c", script, str(image("one_shape"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "pali.llama_cpp DEBUG" in p.stderr
