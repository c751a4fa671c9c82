#!/usr/bin/env python3
"""Check `pali serve` against the real OpenAI Python client.

Usage: python scripts/openai_check.py BASE_URL IMAGE EXPECTED_CAPTION
  e.g. python scripts/openai_check.py http://127.0.0.1:8080/v1 \
           examples/images/one_shape.png "a green triangle"

Install the client first: pip install -r scripts/requirements-serve.txt

Three checks, each counted once: a plain caption, the same caption streamed
(with a usage chunk), and the 400 for a request without an image. Prints
`openai client: N passed, M failed` and exits non-zero if any failed.
"""

import base64
import os
import sys

import openai
from openai import OpenAI


def caption_messages(image_path):
    """One user message: the PaliGemma prompt and the image as a data URL."""
    with open(image_path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "caption en"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            ],
        }
    ]


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def check_plain(client, model, messages, expected):
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0
    )
    content = r.choices[0].message.content
    expect(content == expected, f"content {content!r} != expected {expected!r}")
    expect(r.choices[0].finish_reason == "stop",
           f"finish_reason {r.choices[0].finish_reason!r} != 'stop'")
    expect(r.usage is not None, "no usage in the response")
    expect(r.usage.prompt_tokens > 0, f"usage.prompt_tokens = {r.usage.prompt_tokens}")
    expect(r.usage.completion_tokens > 0,
           f"usage.completion_tokens = {r.usage.completion_tokens}")


def check_stream(client, model, messages, expected):
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    parts, finish_reason, usage = [], None, None
    for chunk in stream:
        # With include_usage the last chunk has no choices, only usage.
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
    content = "".join(parts)
    expect(content == expected, f"streamed content {content!r} != expected {expected!r}")
    expect(finish_reason == "stop", f"final finish_reason {finish_reason!r} != 'stop'")
    expect(usage is not None, "no usage chunk in the stream")
    expect(usage.completion_tokens > 0,
           f"stream usage.completion_tokens = {usage.completion_tokens}")


def check_no_image(client, model):
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "text", "text": "caption en"}]}],
            max_tokens=32,
        )
    except openai.BadRequestError as e:
        expect("no image" in str(e), f"BadRequestError without 'no image': {e}")
        return
    raise AssertionError("a request without an image did not raise BadRequestError")


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    base_url, image, expected = sys.argv[1:]
    client = OpenAI(
        base_url=base_url,
        api_key=os.environ.get("OPENAI_API_KEY", "none"),
        timeout=120,
        max_retries=0,  # a retry would hide a failing first answer
    )
    models = client.models.list().data
    if not models:
        sys.exit("openai client: /v1/models listed no model")
    model = models[0].id
    messages = caption_messages(image)

    checks = [
        ("caption", lambda: check_plain(client, model, messages, expected)),
        ("caption (stream)", lambda: check_stream(client, model, messages, expected)),
        ("no image -> 400", lambda: check_no_image(client, model)),
    ]
    passed = failed = 0
    for name, run in checks:
        try:
            run()
        except Exception as e:  # a failed assertion or an unexpected API error
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"openai client: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
