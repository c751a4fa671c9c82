"""Streaming, cancellation, Ctrl-C, threads and the GIL."""

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import pali
from conftest import CAPTIONS, IMAGE_NAMES, comparable, image

IMG = image("three_shapes_wide")
# Far more than the test waits for: ~20 s of decoding on the demo model.
LONG = dict(max_tokens=4000, ignore_eos=True)


def wait_until_idle(seconds=5.0):
    end = time.monotonic() + seconds
    while pali._native.running_generations() and time.monotonic() < end:
        time.sleep(0.01)
    return pali._native.running_generations()


def test_stream_pieces_join_to_the_caption(model):
    for name in IMAGE_NAMES:
        s = model.stream(image(name), "caption en")
        pieces = list(s)
        assert len(pieces) > 1
        assert "".join(pieces) == CAPTIONS[name] == model.caption(image(name)).text
        assert comparable(s.result.to_dict()) == comparable(model.run(image(name), "caption en").to_dict())
        assert not s.cancelled
        assert next(s, None) is None


def test_stream_errors_are_raised_when_iterated(model):
    with pytest.raises(pali.ContextLengthError):
        list(model.stream(IMG, "caption en", ctx_size=10))
    with pytest.raises(pali.OptionError):
        model.stream(IMG, "caption en", top_p=2)


def test_closing_a_stream_cancels_it(model):
    t0 = time.monotonic()
    s = model.stream(IMG, "caption en", **LONG)
    pieces = [next(s) for _ in range(3)]
    assert all(pieces)
    s.close()
    assert pali._native.running_generations() == 0
    assert s.cancelled and s.result is None
    assert next(s, None) is None
    assert time.monotonic() - t0 < 5


def test_breaking_out_of_a_loop_cancels(model):
    t0 = time.monotonic()
    for i, _ in enumerate(model.stream(IMG, "caption en", **LONG)):
        if i == 2:
            break
    assert wait_until_idle() == 0
    assert time.monotonic() - t0 < 5
    with model.stream(IMG, "caption en", **LONG) as s:
        next(s)
    assert s.cancelled and wait_until_idle() == 0


def test_close_from_another_thread_ends_the_iteration(model):
    s = model.stream(IMG, "caption en", **LONG)
    got, errors = [], []

    def consume():
        try:
            for piece in s:
                got.append(piece)
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    reader = threading.Thread(target=consume)
    reader.start()
    end = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < end:
        time.sleep(0.01)
    s.close()
    reader.join(5)
    assert not reader.is_alive() and errors == []
    assert 3 <= len(got) < LONG["max_tokens"]
    assert s.cancelled and s.result is None
    assert wait_until_idle() == 0


def test_two_threads_give_the_same_answers_as_one(model):
    # One ggml thread per generation: two generations of all-core thread pools on a
    # 2-core machine spin against each other (BENCHMARKS.md, "Server").
    decoder, mmproj, vae = model.paths
    model = pali.Model(decoder, mmproj, vae, threads=1)
    tasks = [
        lambda n: model.caption(image(n)),
        lambda n: model.detect(image(n), ["circle", "square", "triangle"]),
        lambda n: model.segment(image(n), ["circle", "square", "triangle"]),
    ]
    jobs = [(t, n) for t in tasks for n in IMAGE_NAMES]
    alone = [comparable(t(n).to_dict()) for t, n in jobs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda j: comparable(j[0](j[1]).to_dict()), jobs * 2))
    assert together == alone * 2


def test_the_gil_is_released_during_a_generation(model):
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        before = ticks
        model.caption(IMG, max_tokens=200, ignore_eos=True)
        during = ticks - before
    finally:
        stop.set()
        counter.join()
    # With the GIL held the counter could not have run at all.
    assert during > 10_000, during


SCRIPT = """
import os, signal, sys, threading, time
import pali
model = pali.Model.demo()
stream = sys.argv[2] == "stream"
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    if stream:
        for piece in model.stream(sys.argv[1], "caption en", max_tokens=4000, ignore_eos=True):
            pass
    else:
        model.caption(sys.argv[1], max_tokens=4000, ignore_eos=True)
    print("finished")
except KeyboardInterrupt:
    t1 = time.monotonic()
    # Interrupted between two pieces (in Python code), a dropped stream's thread stops at
    # its next token, on its own.
    while pali._native.running_generations() and time.monotonic() - t1 < 5:
        time.sleep(0.01)
    print("interrupted", round(t1 - t0, 2), pali._native.running_generations())
"""


@pytest.mark.parametrize("how", ["caption", "stream"])
def test_ctrl_c_cancels_and_raises_keyboard_interrupt(how):
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(IMG), how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    word, seconds, running = p.stdout.split()
    assert word == "interrupted", p.stdout
    assert float(seconds) < 3 and running == "0", p.stdout


def test_exit_with_a_generation_running_is_clean():
    # The interpreter exits while a stream it still holds generates: atexit cancels it and
    # waits for its thread, so nothing is inside llama.cpp while the process tears down.
    script = (
        "import sys, time, pali\n"
        "m = pali.Model.demo()\n"
        "s = m.stream(sys.argv[1], 'caption en', max_tokens=4000, ignore_eos=True)\n"
        "next(s)\n"
        "print(pali._native.running_generations())\n"
    )
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", script, str(IMG)], capture_output=True, text=True, timeout=60
    )
    assert (p.returncode, p.stdout, p.stderr) == (0, "1\n", "")
    assert time.monotonic() - t0 < 10
