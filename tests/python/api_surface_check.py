#!/usr/bin/env python3
"""Sends each request of llama-server's API surface through the gateway and straight to the engine,
with the official SDKs, and checks that both answers are the same (the engine's word is the
reference).

    api_surface_check.py compare --gateway URL [--key KEY] [--engine-key KEY]
                                 [--model ID --engine ENDPOINT]
                                 [--embeddings-model ID --embeddings-engine ENDPOINT]
                                 [--rerank-model ID --rerank-engine ENDPOINT] [CASE ...]

URL is the gateway's root (http://127.0.0.1:PORT; a trailing /v1 is ignored). ENDPOINT is where an
engine listens: http://127.0.0.1:PORT or a Unix socket path (the SDKs then go through an httpx2
Unix-socket transport). --key is the gateway's API key (optional: pointing --gateway at an engine
started without --api-key checks that engine against itself); --engine-key is sent to the
engines, for engines started with --api-key.

The chat model (--model) must be written by `make-tiny-model.py --chat-template hermes --ctx 2048`
and served by llama-server with its default --jinja (the tools prompt is ~700 tokens); the
embeddings model served by `llama-server --embeddings --pooling mean`; the rerank model written
with `--rerank` and served with `--reranking`. A case whose model was not given is skipped, and so
is messages-bad-key without --key. Requests use temperature 0 or a fixed seed, so an engine answers
the same request the same way.

Prints one JSON line per case, {"case", "result": "pass"|"fail"|"skip", "seconds", "detail"}, and
exits 1 if any case failed.

What may differ between two identical requests, and so is not compared (see normalise()): `id`,
`call_id` and `item_id` (random per response or tool call), `created`, `created_at` and
`completed_at` (clock), `timings` (speed), `system_fingerprint`, and how much of the prompt came
from the engine's prompt cache: OpenAI's `cached_tokens`, and Anthropic's split of the prompt into
`input_tokens` and `cache_read_input_tokens` (their sum is compared instead). The prompt cache also
moves logprobs in the 7th digit (see case_logprobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Callable

import anthropic
import httpx
import httpx2
import openai
from openai import OpenAI

MODEL_TIMEOUT = 120

MESSAGES = [{"role": "user", "content": "Tell me about the river."}]
TOOL_MESSAGES = [{"role": "user", "content": "Make the kitchen warm."}]

# Enums and bounded integers only: the grammar then leaves the tiny model no way to run on (free
# strings would fill with words until max_tokens).
THERMOSTAT_SCHEMA = {
    "type": "object",
    "properties": {
        "room": {"type": "string", "enum": ["kitchen", "bedroom", "office"]},
        "mode": {"type": "string", "enum": ["heat", "cool", "off"]},
        "celsius": {"type": "integer", "minimum": 10, "maximum": 30},
    },
    "required": ["room", "mode", "celsius"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "set_thermostat",
        "description": "Set the thermostat of a room.",
        "parameters": THERMOSTAT_SCHEMA,
    },
}
TOOL_MAX_TOKENS = 300  # a forced call costs about a token per byte of its JSON: ~100 tokens
LOGPROB_TOLERANCE = 1e-4  # see case_logprobs

QUERY = "the river and the old house"
DOCUMENTS = ["the water of the river", "a house on the hill", "three small boys", "the old man and the sea"]

# Keys whose values differ between two identical requests (see the module docstring); "id" only
# where it is a string (logprobs carry token ids, which must match).
VOLATILE_KEYS = frozenset(
    {"call_id", "item_id", "created", "created_at", "completed_at", "timings", "system_fingerprint", "cached_tokens"}
)


def volatile(key: str, value: Any) -> bool:
    return key in VOLATILE_KEYS or (key == "id" and isinstance(value, str))


def normalise(value: Any) -> Any:
    """The answer without what legitimately differs between two identical requests."""
    if isinstance(value, dict):
        out = {key: normalise(item) for key, item in value.items() if not volatile(key, item)}
        if "cache_read_input_tokens" in out and "input_tokens" in out:
            # Anthropic usage counts cached prompt tokens apart from the others.
            out["input_tokens"] += out.pop("cache_read_input_tokens") or 0
        return out
    if isinstance(value, list):
        return [normalise(item) for item in value]
    return value


def dump(obj: Any) -> Any:
    """An SDK object as the JSON it was parsed from (fields the server sent, nothing defaulted)."""
    return obj.model_dump(mode="json", exclude_unset=True)


def first_difference(a: Any, b: Any, path: str = "$") -> tuple[str, Any, Any] | None:
    """Where two JSON values first differ: (path, a's value there, b's value there), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                return f"{path}.{key}", a.get(key, "<absent>"), b.get(key, "<absent>")
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for index, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{index}]")
            if found:
                return found
        return None if len(a) == len(b) else (f"{path} length", len(a), len(b))
    return None if a == b and type(a) is type(b) else (path, a, b)


def same(label: str, gateway: Any, engine: Any) -> None:
    found = first_difference(normalise(gateway), normalise(engine))
    if found:
        path, ours, theirs = found
        raise AssertionError(
            f"{label}: at {path} the gateway gave {json.dumps(ours)[:500]}, the engine {json.dumps(theirs)[:500]}"
        )


@dataclasses.dataclass
class Side:
    """One place to send requests to: the gateway, or an engine directly."""

    base: str  # root URL (http://engine for a Unix socket)
    openai: OpenAI
    anthropic: anthropic.Anthropic
    http: httpx.Client  # for the routes no SDK covers (rerank, input_tokens)
    key: str | None

    @classmethod
    def connect(cls, endpoint: str, key: str | None) -> "Side":
        # No connection reuse for the SDKs, which also stream: llama-server closes the connection
        # after every streamed response although it announced Keep-Alive, and a request sent on
        # the pooled connection before the close arrives fails ("Server disconnected without
        # sending a response"; 12 times in 300 tries here).
        limits = httpx2.Limits(max_keepalive_connections=0)
        if endpoint.startswith("/"):
            base = "http://engine"
            transport = httpx2.HTTPTransport(uds=endpoint, limits=limits)
            sdk_http = httpx2.Client(transport=transport, timeout=MODEL_TIMEOUT)
            raw_http = httpx.Client(transport=httpx.HTTPTransport(uds=endpoint), timeout=MODEL_TIMEOUT)
        else:
            base = endpoint.rstrip("/").removesuffix("/v1")
            sdk_http = httpx2.Client(limits=limits, timeout=MODEL_TIMEOUT)
            raw_http = httpx.Client(timeout=MODEL_TIMEOUT)
        return cls(
            base=base,
            openai=OpenAI(base_url=f"{base}/v1", api_key=key or "unused", max_retries=0, http_client=sdk_http),
            # The Anthropic SDK sends the key as x-api-key, which llama-server accepts too.
            anthropic=anthropic.Anthropic(base_url=base, api_key=key or "unused", max_retries=0, http_client=sdk_http),
            http=raw_http,
            key=key,
        )

    def post(self, path: str, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        response = self.http.post(f"{self.base}{path}", json=body, headers=headers)
        assert response.status_code == 200, f"POST {path}: {response.status_code} {response.text[:500]}"
        return response.json()


@dataclasses.dataclass
class Context:
    gateway: Side
    engine: Side  # the engine that serves the case's model
    model: str
    gateway_url: str


# --- checks of an answer's content ---------------------------------------------------------


def check_thermostat(arguments: Any) -> dict:
    """`arguments` (a JSON text or an object) satisfies THERMOSTAT_SCHEMA; returns it parsed."""
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(value, dict), f"not an object: {arguments!r}"
    properties = THERMOSTAT_SCHEMA["properties"]
    assert set(value) == set(properties), f"keys {sorted(value)} are not {sorted(properties)}"
    for name, spec in properties.items():
        if "enum" in spec:
            assert value[name] in spec["enum"], f"{name}={value[name]!r} is not one of {spec['enum']}"
        else:
            assert (
                isinstance(value[name], int) and spec["minimum"] <= value[name] <= spec["maximum"]
            ), f"{name}={value[name]!r} is not an integer in [{spec['minimum']}, {spec['maximum']}]"
    return value


def tool_call_of(message: dict) -> dict:
    calls = message.get("tool_calls") or []
    assert len(calls) == 1, f"expected one tool call, got {message}"
    function = calls[0]["function"]
    assert function["name"] == "set_thermostat", calls[0]
    return check_thermostat(function["arguments"])


def assemble_tool_calls(chunks: list[dict]) -> list[dict]:
    """message.tool_calls from streamed chat chunks (deltas concatenated by index)."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in (choice.get("delta") or {}).get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"id": None, "function": {"name": "", "arguments": ""}})
                call["id"] = call["id"] or delta.get("id")
                function = delta.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[index] for index in sorted(calls)]


def finish_reasons(chunks: list[dict]) -> list[str]:
    return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]


# --- cases ----------------------------------------------------------------------------------------


def chat(side: Side, ctx: Context, **params) -> dict:
    return dump(side.openai.chat.completions.create(model=ctx.model, **params))


def chat_stream(side: Side, ctx: Context, **params) -> list[dict]:
    with side.openai.chat.completions.create(model=ctx.model, stream=True, **params) as stream:
        return [dump(chunk) for chunk in stream]


TOOL_REQUEST = dict(
    messages=TOOL_MESSAGES, tools=[TOOL], tool_choice="required", temperature=0, max_tokens=TOOL_MAX_TOKENS
)


def case_tool_call(ctx: Context) -> dict:
    engine = chat(ctx.engine, ctx, **TOOL_REQUEST)
    gateway = chat(ctx.gateway, ctx, **TOOL_REQUEST)
    same("tool call", gateway, engine)
    choice = gateway["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    return {"arguments": tool_call_of(choice["message"]), "usage": gateway["usage"]}


def case_tool_call_stream(ctx: Context) -> dict:
    engine = chat_stream(ctx.engine, ctx, **TOOL_REQUEST)
    gateway = chat_stream(ctx.gateway, ctx, **TOOL_REQUEST)
    same("streamed tool call chunks", gateway, engine)
    calls = assemble_tool_calls(gateway)
    arguments = tool_call_of({"tool_calls": calls})
    assert calls[0]["id"], f"the first tool-call delta has no id: {calls}"
    assert finish_reasons(gateway) == ["tool_calls"], finish_reasons(gateway)
    # The same request without streaming calls the tool with the same arguments.
    whole = tool_call_of(chat(ctx.gateway, ctx, **TOOL_REQUEST)["choices"][0]["message"])
    assert arguments == whole, f"streamed {arguments}, not streamed {whole}"
    return {"chunks": len(gateway), "arguments": arguments}


def split_logprobs(value: Any, floats: list[float]) -> Any:
    """`value` without its "logprob" numbers, which are appended to `floats` in document order."""
    if isinstance(value, dict):
        if "logprob" in value:
            floats.append(value["logprob"])
        return {key: split_logprobs(item, floats) for key, item in value.items() if key != "logprob"}
    if isinstance(value, list):
        return [split_logprobs(item, floats) for item in value]
    return value


def case_logprobs(ctx: Context) -> dict:
    request = dict(messages=MESSAGES, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    engine = chat(ctx.engine, ctx, **request)
    gateway = chat(ctx.gateway, ctx, **request)
    # Logprobs of the first generated token differ in the 7th digit when the engine's prompt cache
    # held the prompt (it then evaluates only the last prompt token, in a batch of one); the tokens,
    # text and everything else are the same.
    gateway_floats: list[float] = []
    engine_floats: list[float] = []
    same("logprobs", split_logprobs(gateway, gateway_floats), split_logprobs(engine, engine_floats))
    assert len(gateway_floats) == len(engine_floats) and all(
        abs(a - b) <= LOGPROB_TOLERANCE for a, b in zip(gateway_floats, engine_floats)
    ), f"logprobs differ by more than {LOGPROB_TOLERANCE}: {gateway_floats} vs {engine_floats}"
    content = gateway["choices"][0]["logprobs"]["content"]
    assert len(content) == 8 and all(len(token["top_logprobs"]) == 3 for token in content), content
    return {"tokens": [token["token"] for token in content], "first": content[0]}


def case_json_schema(ctx: Context) -> dict:
    request = dict(
        messages=MESSAGES,
        temperature=0,
        max_tokens=TOOL_MAX_TOKENS,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thermostat", "strict": True, "schema": THERMOSTAT_SCHEMA},
        },
    )
    engine = chat(ctx.engine, ctx, **request)
    gateway = chat(ctx.gateway, ctx, **request)
    same("json_schema", gateway, engine)
    choice = gateway["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return {"content": check_thermostat(choice["message"]["content"])}


def case_seed(ctx: Context) -> dict:
    # A fixed seed makes sampling at a temperature above 0 repeatable too.
    request = dict(messages=MESSAGES, temperature=1.0, seed=1234, max_tokens=12)
    engine = chat(ctx.engine, ctx, **request)
    first = chat(ctx.gateway, ctx, **request)
    second = chat(ctx.gateway, ctx, **request)
    same("seed (first)", first, engine)
    same("seed (second)", second, engine)
    greedy = chat(ctx.gateway, ctx, messages=MESSAGES, temperature=0, seed=1234, max_tokens=12)
    same(
        "seed with temperature 0",
        greedy,
        chat(ctx.engine, ctx, messages=MESSAGES, temperature=0, seed=1234, max_tokens=12),
    )
    return {"text": first["choices"][0]["message"]["content"]}


def case_n2(ctx: Context) -> dict:
    # At temperature 0 both choices would be the same text; with a seed they differ and still
    # repeat (llama-server seeds each choice differently, deterministically). Each choice takes a
    # slot of its own (n may not exceed the engine's slots: 400 otherwise), and `usage` counts the
    # first choice's tokens only.
    request = dict(messages=MESSAGES, temperature=1.0, seed=1234, max_tokens=8, n=2)
    engine = chat(ctx.engine, ctx, **request)
    gateway = chat(ctx.gateway, ctx, **request)
    same("n=2", gateway, engine)
    choices = gateway["choices"]
    assert [c["index"] for c in choices] == [0, 1], choices
    return {"texts": [c["message"]["content"] for c in choices], "usage": gateway["usage"]}


def embeddings(side: Side, ctx: Context, text) -> dict:
    return dump(side.openai.embeddings.create(model=ctx.model, input=text))


def case_embeddings(ctx: Context) -> dict:
    engine = embeddings(ctx.engine, ctx, QUERY)
    gateway = embeddings(ctx.gateway, ctx, QUERY)
    same("embeddings", gateway, engine)
    vector = gateway["data"][0]["embedding"]
    return {"dimensions": len(vector), "head": vector[:3], "usage": gateway["usage"]}


def case_embeddings_batch(ctx: Context) -> dict:
    engine = embeddings(ctx.engine, ctx, DOCUMENTS)
    gateway = embeddings(ctx.gateway, ctx, DOCUMENTS)
    same("batch embeddings", gateway, engine)
    assert [d["index"] for d in gateway["data"]] == list(range(len(DOCUMENTS))), gateway["data"]
    return {"vectors": len(gateway["data"]), "usage": gateway["usage"]}


def case_rerank(ctx: Context) -> dict:
    request = {"model": ctx.model, "query": QUERY, "documents": DOCUMENTS, "top_n": 3}
    engine = ctx.engine.post("/v1/rerank", request)
    gateway = ctx.gateway.post("/v1/rerank", request)
    same("rerank", gateway, engine)
    scores = [r["relevance_score"] for r in gateway["results"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True), gateway
    return {"results": gateway["results"], "usage": gateway["usage"]}


# The Anthropic SDK has no `temperature` argument any more; llama-server still reads it.
ANTHROPIC_REQUEST = dict(max_tokens=12, system="You are terse.", messages=MESSAGES, extra_body={"temperature": 0})


def case_messages(ctx: Context) -> dict:
    engine = dump(ctx.engine.anthropic.messages.create(model=ctx.model, **ANTHROPIC_REQUEST))
    gateway_message = ctx.gateway.anthropic.messages.create(model=ctx.model, **ANTHROPIC_REQUEST)
    gateway = dump(gateway_message)
    same("anthropic message", gateway, engine)
    assert gateway_message.stop_reason == "max_tokens" and gateway_message.content[0].type == "text", gateway
    return {"text": gateway_message.content[0].text, "usage": gateway["usage"]}


def case_messages_stream(ctx: Context) -> dict:
    def events(side: Side) -> list[dict]:
        with side.anthropic.messages.create(model=ctx.model, stream=True, **ANTHROPIC_REQUEST) as stream:
            return [dump(event) for event in stream]

    engine = events(ctx.engine)
    gateway = events(ctx.gateway)
    same("anthropic events", gateway, engine)
    types = [event["type"] for event in gateway]
    assert types[0] == "message_start" and types[-1] == "message_stop", types
    text = "".join(e["delta"]["text"] for e in gateway if e["type"] == "content_block_delta")
    whole = dump(ctx.gateway.anthropic.messages.create(model=ctx.model, **ANTHROPIC_REQUEST))
    assert text == whole["content"][0]["text"], f"streamed {text!r}, not streamed {whole}"
    return {"events": len(types), "types": sorted(set(types))}


def case_count_tokens(ctx: Context) -> dict:
    request = dict(model=ctx.model, system="You are terse.", messages=MESSAGES)
    engine = dump(ctx.engine.anthropic.messages.count_tokens(**request))
    gateway = dump(ctx.gateway.anthropic.messages.count_tokens(**request))
    same("count_tokens", gateway, engine)
    assert gateway["input_tokens"] > 0, gateway
    return gateway


def case_messages_bad_key(ctx: Context) -> dict:
    wrong = anthropic.Anthropic(
        base_url=ctx.gateway_url, api_key="not-the-key-at-all", max_retries=0, timeout=MODEL_TIMEOUT
    )
    try:
        wrong.messages.create(model=ctx.model, **ANTHROPIC_REQUEST)
    except anthropic.AuthenticationError as error:
        assert error.status_code == 401, error
        return {"status": error.status_code, "body": error.body}
    raise AssertionError("a wrong key was accepted")


RESPONSES_REQUEST = dict(
    input="Tell me about the river.", instructions="You are terse.", temperature=0, max_output_tokens=12
)


def case_responses(ctx: Context) -> dict:
    engine = dump(ctx.engine.openai.responses.create(model=ctx.model, **RESPONSES_REQUEST))
    gateway_response = ctx.gateway.openai.responses.create(model=ctx.model, **RESPONSES_REQUEST)
    gateway = dump(gateway_response)
    same("response", gateway, engine)
    assert gateway_response.output_text, gateway
    return {"text": gateway_response.output_text, "usage": gateway["usage"]}


def case_responses_stream(ctx: Context) -> dict:
    def events(side: Side) -> list[dict]:
        with side.openai.responses.create(model=ctx.model, stream=True, **RESPONSES_REQUEST) as stream:
            return [dump(event) for event in stream]

    engine = events(ctx.engine)
    gateway = events(ctx.gateway)
    same("response events", gateway, engine)
    types = [event["type"] for event in gateway]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    text = "".join(e["delta"] for e in gateway if e["type"] == "response.output_text.delta")
    whole = ctx.gateway.openai.responses.create(model=ctx.model, **RESPONSES_REQUEST).output_text
    assert text == whole, f"streamed {text!r}, not streamed {whole!r}"
    return {"events": len(types), "types": sorted(set(types))}


def case_responses_input_tokens(ctx: Context) -> dict:
    request = {
        "model": ctx.model,
        "input": RESPONSES_REQUEST["input"],
        "instructions": RESPONSES_REQUEST["instructions"],
    }
    engine = ctx.engine.post("/v1/responses/input_tokens", request)
    gateway = ctx.gateway.post("/v1/responses/input_tokens", request)
    same("responses input_tokens", gateway, engine)
    assert gateway["object"] == "response.input_tokens" and gateway["input_tokens"] > 0, gateway
    return gateway


def case_chat_input_tokens(ctx: Context) -> dict:
    request = {"model": ctx.model, "messages": MESSAGES}
    engine = ctx.engine.post("/v1/chat/completions/input_tokens", request)
    gateway = ctx.gateway.post("/v1/chat/completions/input_tokens", request)
    same("chat input_tokens", gateway, engine)
    # The count is that of the prompt the chat request itself evaluates.
    usage = chat(ctx.gateway, ctx, messages=MESSAGES, temperature=0, max_tokens=1)["usage"]
    assert gateway["input_tokens"] == usage["prompt_tokens"], (gateway, usage)
    return gateway


# name -> (check, which engine serves the model it needs)
CASES: dict[str, tuple[Callable[[Context], dict], str]] = {
    "tool-call": (case_tool_call, "chat"),
    "tool-call-stream": (case_tool_call_stream, "chat"),
    "logprobs": (case_logprobs, "chat"),
    "json-schema": (case_json_schema, "chat"),
    "seed": (case_seed, "chat"),
    "n2": (case_n2, "chat"),
    "embeddings": (case_embeddings, "embeddings"),
    "embeddings-batch": (case_embeddings_batch, "embeddings"),
    "rerank": (case_rerank, "rerank"),
    "messages": (case_messages, "chat"),
    "messages-stream": (case_messages_stream, "chat"),
    "count-tokens": (case_count_tokens, "chat"),
    "messages-bad-key": (case_messages_bad_key, "chat"),
    "responses": (case_responses, "chat"),
    "responses-stream": (case_responses_stream, "chat"),
    "responses-input-tokens": (case_responses_input_tokens, "chat"),
    "chat-input-tokens": (case_chat_input_tokens, "chat"),
}


def compare(args) -> int:
    gateway_url = args.gateway.rstrip("/").removesuffix("/v1")
    gateway = Side.connect(gateway_url, args.key)
    engines = {
        "chat": (args.model, args.engine),
        "embeddings": (args.embeddings_model, args.embeddings_engine),
        "rerank": (args.rerank_model, args.rerank_engine),
    }
    connected: dict[str, Side] = {}
    failed = 0
    for name in args.cases or list(CASES):
        check, kind = CASES[name]
        model, endpoint = engines[kind]
        started = time.monotonic()
        if not (model and endpoint):
            options = "--model/--engine" if kind == "chat" else f"--{kind}-model/--{kind}-engine"
            result, detail = "skip", f"no {options} given"
        elif name == "messages-bad-key" and not args.key:
            result, detail = "skip", "no --key given: the gateway (or engine) accepts any key"
        else:
            if kind not in connected:
                connected[kind] = Side.connect(endpoint, args.engine_key)
            ctx = Context(gateway=gateway, engine=connected[kind], model=model, gateway_url=gateway_url)
            try:
                result, detail = "pass", check(ctx)
            except (AssertionError, openai.APIError, anthropic.APIError, httpx.HTTPError, httpx2.HTTPError) as error:
                result, detail = "fail", f"{type(error).__name__}: {error}"
                failed += 1
        line = {"case": name, "result": result, "seconds": round(time.monotonic() - started, 3), "detail": detail}
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--gateway", required=True, help="the gateway's root URL")
    c.add_argument("--key", help="the gateway's API key")
    c.add_argument("--engine", help="the chat engine: http://127.0.0.1:PORT or a socket path")
    c.add_argument("--engine-key", help="API key of engines started with --api-key")
    c.add_argument("--model", help="the chat model's id (hermes template)")
    c.add_argument("--embeddings-model")
    c.add_argument("--embeddings-engine")
    c.add_argument("--rerank-model")
    c.add_argument("--rerank-engine")
    c.add_argument("cases", nargs="*", metavar="CASE", help=f"default: all of {', '.join(CASES)}")
    args = parser.parse_args()
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    print(f"openai SDK {openai.__version__}, anthropic SDK {anthropic.__version__}", file=sys.stderr)
    sys.exit(compare(args))


if __name__ == "__main__":
    main()
