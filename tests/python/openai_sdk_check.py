#!/usr/bin/env python3
"""Drives orchestratord with the official OpenAI Python SDK and checks every answer against the
same request sent straight to the engine behind it (the engine's word is the reference).

    openai_sdk_check.py compare --api URL/v1 --key KEY --pool MODEL=ENDPOINT [--pool …]
                                [--max-tokens N] [--no-stream-usage]
    openai_sdk_check.py close-mid-stream --api URL/v1 --key KEY --model MODEL --engine ENDPOINT

ENDPOINT is where pool-managerd says the engine listens: http://127.0.0.1:PORT or a Unix socket
path (the SDK then talks to the engine through httpx's Unix transport). Requests use temperature 0,
so the engine's output is the same each time and can be compared byte for byte.

`compare`, per pool: chat and completions, streaming (with and without the usage chunk) and not,
with a stop sequence, and the SDK's typed errors (unknown model, bad key, bad parameter).
`--no-stream-usage` is for engines that send no usage chunk in streams (llama-cpp-python's
server): orchestratord then has no usage to give either, and says so with `usage: null`.

`close-mid-stream`: reads a few chunks of a long stream, checks on the engine's /slots that a slot
is busy, closes the stream, and waits until llama-server shows every slot idle again.

Prints one `ok …` line per checked case and finally `cases=N`; any failed check raises, so the
exit status is non-zero and the traceback names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import httpx
import openai
from openai import OpenAI

PROMPT = "the river and the old house"
MESSAGES = [{"role": "user", "content": "Tell me about the river."}]


def engine_http(endpoint: str) -> tuple[str, httpx.Client]:
    """A base URL and an httpx client that reach the engine at ENDPOINT."""
    if endpoint.startswith("/"):
        return "http://engine", httpx.Client(transport=httpx.HTTPTransport(uds=endpoint), timeout=60)
    return endpoint.rstrip("/"), httpx.Client(timeout=60)


def engine_client(endpoint: str) -> OpenAI:
    base, http = engine_http(endpoint)
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, http_client=http)


@dataclasses.dataclass
class Answer:
    text: str
    finish_reason: str | None
    usage: tuple[int, int] | None  # (prompt_tokens, completion_tokens)
    content_chunks: int = 0
    models: frozenset[str] = frozenset()


def usage_of(usage) -> tuple[int, int] | None:
    if usage is None:
        return None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    return (usage.prompt_tokens, usage.completion_tokens)


def ask(client: OpenAI, api: str, model: str, stream: bool, include_usage: bool = False, **params) -> Answer:
    params = {"model": model, "temperature": 0, **params}
    if api == "chat":
        params["messages"] = MESSAGES
        create = client.chat.completions.create
    else:
        params["prompt"] = PROMPT
        create = client.completions.create
    if not stream:
        response = create(**params)
        assert len(response.choices) == 1, response
        choice = response.choices[0]
        text = choice.message.content if api == "chat" else choice.text
        return Answer(text or "", choice.finish_reason, usage_of(response.usage), models=frozenset([response.model]))
    if include_usage:
        params["stream_options"] = {"include_usage": True}
    answer = Answer("", None, None)
    models = set()
    saw_usage_chunk_at = None
    with create(stream=True, **params) as chunks:
        for index, chunk in enumerate(chunks):
            models.add(chunk.model)
            assert saw_usage_chunk_at is None, f"a chunk after the usage chunk: {chunk}"
            if chunk.usage is not None:
                assert answer.usage is None, f"usage twice: {chunk}"
                answer.usage = usage_of(chunk.usage)
                if not chunk.choices:
                    saw_usage_chunk_at = index
                    continue
            assert len(chunk.choices) == 1, chunk
            choice = chunk.choices[0]
            piece = choice.delta.content if api == "chat" else choice.text
            if piece:
                answer.text += piece
                answer.content_chunks += 1
            if choice.finish_reason is not None:
                assert answer.finish_reason is None, f"two finish reasons: {chunk}"
                answer.finish_reason = choice.finish_reason
    answer.models = frozenset(models)
    return answer


def same(label: str, ours, engines) -> None:
    assert ours == engines, f"{label}: orchestratord gave {ours!r}, the engine {engines!r}"


def compare_pool(api_client: OpenAI, model: str, endpoint: str, max_tokens: int, stream_usage: bool) -> int:
    engine = engine_client(endpoint)
    cases = 0
    for api in ("chat", "completions"):
        reference = ask(engine, api, model, stream=False, max_tokens=max_tokens)
        assert reference.finish_reason == "length", f"{api}: the engine stopped early: {reference}"
        assert reference.usage is not None and reference.usage[1] == max_tokens, reference
        assert reference.text.strip(), f"{api}: the engine generated no text: {reference}"

        ours = ask(api_client, api, model, stream=False, max_tokens=max_tokens)
        same(f"{model} {api} text", ours.text, reference.text)
        same(f"{model} {api} finish_reason", ours.finish_reason, reference.finish_reason)
        # The engine's own non-streaming answer comes back: its usage too.
        same(f"{model} {api} usage", ours.usage, reference.usage)
        same(f"{model} {api} model", ours.models, frozenset([model]))
        print(f"ok {model} {api} non-stream: {max_tokens} tokens, usage {ours.usage}", flush=True)
        cases += 1

        for include_usage in (True, False):
            # The same stream straight from the engine: orchestratord relays it as it is (llama-server
            # puts usage on the last /v1/completions chunk whether asked or not, for example).
            direct = ask(engine, api, model, stream=True, include_usage=include_usage, max_tokens=max_tokens)
            ours = ask(api_client, api, model, stream=True, include_usage=include_usage, max_tokens=max_tokens)
            same(f"{model} {api} streamed text", ours.text, reference.text)
            same(f"{model} {api} streamed finish_reason", ours.finish_reason, "length")
            same(f"{model} {api} streamed usage (include_usage={include_usage})", ours.usage, direct.usage)
            if include_usage and stream_usage:
                same(f"{model} {api} streamed usage", ours.usage, reference.usage)
            # One token per chunk: the model's tokens are whole words.
            same(f"{model} {api} content chunks", ours.content_chunks, max_tokens)
            same(f"{model} {api} engine's content chunks", direct.content_chunks, max_tokens)
            print(
                f"ok {model} {api} stream include_usage={include_usage}: "
                f"{ours.content_chunks} chunks, usage {ours.usage}",
                flush=True,
            )
            cases += 1

        # A stop sequence: the first word of the reference that does not occur before itself.
        words = reference.text.split()
        stop = next(
            " " + word
            for position, word in enumerate(words)
            if position >= 2 and (" " + word) not in " ".join([""] + words[:position])
        )
        reference_stop = ask(engine, api, model, stream=False, max_tokens=max_tokens, stop=[stop])
        assert reference_stop.finish_reason == "stop", reference_stop
        for stream in (False, True):
            ours = ask(api_client, api, model, stream=stream, include_usage=True, max_tokens=max_tokens, stop=[stop])
            same(f"{model} {api} stop text", ours.text, reference_stop.text)
            same(f"{model} {api} stop finish_reason", ours.finish_reason, "stop")
            if stream_usage:
                same(f"{model} {api} stop usage", ours.usage, reference_stop.usage)
                assert ours.usage[1] < max_tokens, ours
            print(f"ok {model} {api} stop={stop!r} stream={stream}: {ours.text!r}", flush=True)
            cases += 1
    return cases


def check_errors(api_url: str, key: str, model: str) -> int:
    client = OpenAI(base_url=api_url, api_key=key, max_retries=0)
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as error:
        assert error.status_code == 404, error
    wrong_key = OpenAI(base_url=api_url, api_key="not-the-key-at-all", max_retries=0)
    try:
        wrong_key.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as error:
        assert error.status_code == 401, error
    # A token limit of the wrong type, and n beyond every pool's slots, are refused before queueing
    # (values of the right type go to the engine, which judges them: llama.cpp takes -1).
    for bad in ({"max_tokens": "ten"}, {"n": 99}):
        try:
            client.completions.create(model=model, prompt=PROMPT, **bad)
            raise AssertionError(f"{bad} was accepted")
        except openai.BadRequestError as error:
            assert error.status_code == 400, error
    listed = {entry.id for entry in client.models.list()}
    assert model in listed, listed
    print(f"ok errors: 404 unknown model, 401 wrong key, 400 bad parameters; models {sorted(listed)}", flush=True)
    return 1


def compare(args) -> int:
    client = OpenAI(base_url=args.api, api_key=args.key, max_retries=0, timeout=120)
    cases = 0
    for pool in args.pool:
        model, _, endpoint = pool.partition("=")
        cases += compare_pool(client, model, endpoint, args.max_tokens, not args.no_stream_usage)
    first_model = args.pool[0].partition("=")[0]
    cases += check_errors(args.api, args.key, first_model)
    return cases


def busy_slots(endpoint: str) -> list[dict]:
    base, http = engine_http(endpoint)
    slots = http.get(f"{base}/slots").raise_for_status().json()
    return [slot for slot in slots if slot["is_processing"]]


def close_mid_stream(args) -> int:
    client = OpenAI(base_url=args.api, api_key=args.key, max_retries=0, timeout=120)
    assert not busy_slots(args.engine), "a slot is busy before the request"
    stream = client.chat.completions.create(
        model=args.model, messages=MESSAGES, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 5:
                break
    busy = busy_slots(args.engine)
    assert len(busy) == 1, f"expected one busy slot while streaming, got {busy}"
    stream.close()
    closed = time.monotonic()
    while busy_slots(args.engine):
        assert time.monotonic() - closed < 10, "the engine kept generating for 10 s after the client left"
        time.sleep(0.005)
    print(f"ok close-mid-stream: slot idle {1000 * (time.monotonic() - closed):.1f} ms after close", flush=True)
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--api", required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--pool", action="append", required=True, help="MODEL=ENDPOINT")
    c.add_argument("--max-tokens", type=int, default=12)
    c.add_argument("--no-stream-usage", action="store_true")
    m = sub.add_parser("close-mid-stream")
    m.add_argument("--api", required=True)
    m.add_argument("--key", required=True)
    m.add_argument("--model", required=True)
    m.add_argument("--engine", required=True)
    m.add_argument("--max-tokens", type=int, default=3000)
    args = parser.parse_args()
    print(f"openai SDK {openai.__version__}", file=sys.stderr)
    cases = compare(args) if args.command == "compare" else close_mid_stream(args)
    print(f"cases={cases}")


if __name__ == "__main__":
    main()
