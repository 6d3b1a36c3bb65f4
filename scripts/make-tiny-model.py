#!/usr/bin/env python3
"""Write a tiny random-weight LLaMA-architecture GGUF that llama.cpp really loads and runs.

    python3 scripts/make-tiny-model.py OUT.gguf [--seed N] [--eos] [--ctx N] [--width N] [--layers N]
                                       [--chat-template hermes] [--rerank]

Needs the PyPI packages pinned in scripts/requirements-model.txt (gguf, numpy):

    python3 -m venv .venv-model && .venv-model/bin/pip install -r scripts/requirements-model.txt
    .venv-model/bin/python scripts/make-tiny-model.py tiny.gguf

The model: F32, 2 layers, width 64, 4 heads (head dim 16), FFN 128, context --ctx (default 256);
a SentencePiece-style ("llama") vocabulary of 739 tokens: <unk>, <s>, </s>, the 256 byte-fallback
tokens <0x00>..<0xFF>, 198 common English words written with the SentencePiece word-boundary
marker "▁" (U+2581), and every prefix of those words, so the SPM tokenizer can merge prompt text
into word tokens. About 0.73 MB; llama-server loads it in tens of milliseconds.

Readable, deterministic-length output (the logit-bias trick): embedding channel BIAS_CH is the same
constant for every token and no layer ever writes it (that channel's row is zero in every layer's
output projections, attn_output and ffn_down), and the layer norms don't read it (their weight there
is 0) while output_norm passes it (weight 1). So after the final norm that channel is a positive
per-position constant, and the output matrix's column BIAS_CH acts as a per-token logit bias:
positive for whole words, very negative for byte tokens, prefixes, <unk>, <s> and </s>. Generation
is therefore English word salad (always valid UTF-8, each token " word") that never emits EOS and
always runs to the requested max_tokens / n_predict. With --eos, </s> gets a bias above the words,
so generation stops by itself (stop_type "eos", finish_reason "stop") after a number of tokens
that depends on the seed and the prompt (seen: 4 to 36 tokens for seed 1), fixed at temperature 0.

--width/--layers make slower variants for tests that need a stream that lasts (cancel, drain,
timeouts): e.g. --width 512 --layers 8 (~90 MB). Defaults give the tiny model above.

The same --seed gives byte-identical files; different seeds give different models (e.g. for reload
tests that need to tell two models apart).

Without --chat-template the file has no chat template (llama-server then falls back to plain ChatML,
which cannot describe tools). --chat-template hermes embeds a ChatML template with Hermes-style tool
calls (Qwen2.5's, without its default system prompt): tools are listed in the system turn and a call
is written `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. llama-server (--jinja,
its default) learns those markers from the template itself (common/chat.cpp, the differential
autoparser) and, for tool_choice "required", constrains the output with a grammar that still allows
free text before the first call. The vocabulary gains <|im_start|> and <|im_end|> (control tokens;
llama.cpp makes <|im_end|> the end-of-turn token) and <tool_call>, </tool_call> (user-defined, as
in Qwen2.5), all blocked in free text; and the model is wired (wire_tool_calls) to open a call when
the prompt offers tools and to end its turn after </tool_call>: with tool_choice "required" or
"auto" the answer is exactly one complete call, with arguments the schema allows. Without tools it
writes word salad like the default model. The SPM space prefix is off in this vocabulary (it would
also go after every special token). Forced text costs a token per byte: the tools prompt of one
small tool is ~700 tokens and a call ~100, so use --ctx 2048 or more. Keep tool parameters enums
or bounded numbers: a free string would be filled with words until max_tokens.

Embeddings need nothing special: llama-server --embeddings --pooling mean serves /v1/embeddings from
any of these models. --rerank writes a reranker instead: Qwen3 architecture (LLaMA plus per-head
q/k RMS norms, which it requires), a 2-row classifier head `cls.output` labelled ["yes", "no"], and
pooling type "rank"; llama-server --reranking then scores a document as the softmax probability of
"yes" computed from the last token of "<s> query document".
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover
    sys.exit("make-tiny-model.py needs the 'gguf' package: pip install -r scripts/requirements-model.txt")

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 128
RMS_EPS = 1e-5
BIAS_CH = N_EMBD - 1  # the constant channel that carries the per-token logit bias

# Bias values (in units of the normalised bias channel, which is ~1 after output_norm).
WORD_BIAS = 4.0
SELF_PENALTY = 0.1
BLOCK_BIAS = -40.0  # bytes, prefixes, <unk>, <s>, and </s> unless --eos
EOS_BIAS_WITH_EOS = WORD_BIAS + 3.5

WORDS = """
the of and to in is you that it he was for on are as with his they at be this have from or one
had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has look
two more write go see number no way could people my than first water been call who oil its now
find long down day did get come made may part over new sound take only little work know place year
live me back give most very after thing our just name good sentence man think say great where help
through much before line right too mean old any same tell boy follow came want show also around
form three small set put end does another well large must big even such because turn here why ask
went men read need land different home us move try kind hand picture again change off play spell
air away animal house point page letter mother answer found study still learn should world high
""".split()

# --chat-template hermes: Qwen2.5-7B-Instruct's template (ChatML turns, Hermes-style tool calls)
# without its default "You are Qwen ..." system prompt, to keep prompts short.
HERMES_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# The special tokens that template needs, appended after the words (so no other token id moves).
HERMES_TOKENS = [
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
    ("<tool_call>", gguf.TokenType.USER_DEFINED),
    ("</tool_call>", gguf.TokenType.USER_DEFINED),
]
RERANK_LABELS = ["yes", "no"]
# Tool-call wiring of the hermes model (see wire_tool_calls): logit boosts, and the attention score
# with which the last position finds a <tool_call> token in the prompt.
TOOL_BOOST = 70.0
CLOSE_BIAS = -20.0  # </tool_call>: still never in free text, but preferred to spelling it in bytes
MARKER_SCORE = 40.0


def build_vocab(eos: bool, extra_tokens=()):
    """Returns (tokens, scores, types, bias) for a SentencePiece-style vocabulary; extra_tokens,
    (text, type) pairs, come last and get the blocking bias."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    bias: list[float] = [BLOCK_BIAS, BLOCK_BIAS, EOS_BIAS_WITH_EOS if eos else BLOCK_BIAS]

    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
        bias.append(BLOCK_BIAS)

    words = []
    seen = set()
    for w in WORDS:
        piece = "\u2581" + w
        if piece not in seen:
            seen.add(piece)
            words.append(piece)
    prefixes = []
    pseen = set()
    for piece in words:
        for n in range(1, len(piece)):
            p = piece[:n]
            if p not in seen and p not in pseen:
                pseen.add(p)
                prefixes.append(p)
    prefixes.sort(key=lambda p: (len(p), p))

    # SPM merges the highest-scoring pair first; longer pieces score higher so whole words win.
    for piece in words:
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(float(len(piece)))
        bias.append(WORD_BIAS)
    for p in prefixes:
        tokens.append(p)
        types.append(gguf.TokenType.NORMAL)
        scores.append(float(len(p)) - 0.5)
        bias.append(BLOCK_BIAS)
    for text, token_type in extra_tokens:
        tokens.append(text)
        types.append(token_type)
        scores.append(0.0)
        bias.append(BLOCK_BIAS)
    return tokens, scores, types, np.array(bias, dtype=np.float32)


def build_tensors(n_vocab: int, bias: np.ndarray, seed: int, rerank: bool) -> dict[str, np.ndarray]:
    """Numpy shapes are (rows=out, cols=in); gguf stores them as llama.cpp expects (ne reversed).
    With rerank, the Qwen3 extras: per-head q/k norms and the classifier head."""
    rng = np.random.default_rng(seed)

    def rand(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t: dict[str, np.ndarray] = {}
    embd = rand(n_vocab, N_EMBD, scale=1.0)
    embd[:, BIAS_CH] = 1.0  # constant for every token
    t["token_embd.weight"] = embd

    layer_norm = np.ones(N_EMBD, dtype=np.float32)
    layer_norm[BIAS_CH] = 0.0  # layers don't read the bias channel ...
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = layer_norm.copy()
        t[p + "attn_q.weight"] = rand(N_HEAD * HEAD_DIM, N_EMBD, scale=1.0 / np.sqrt(N_EMBD))
        t[p + "attn_k.weight"] = rand(N_HEAD_KV * HEAD_DIM, N_EMBD, scale=1.0 / np.sqrt(N_EMBD))
        t[p + "attn_v.weight"] = rand(N_HEAD_KV * HEAD_DIM, N_EMBD, scale=1.0 / np.sqrt(N_EMBD))
        wo = rand(N_EMBD, N_HEAD * HEAD_DIM, scale=0.5 / np.sqrt(N_EMBD))
        wo[BIAS_CH, :] = 0.0  # ... and never write it
        t[p + "attn_output.weight"] = wo
        if rerank:
            t[p + "attn_q_norm.weight"] = np.ones(HEAD_DIM, dtype=np.float32)
            t[p + "attn_k_norm.weight"] = np.ones(HEAD_DIM, dtype=np.float32)
        t[p + "ffn_norm.weight"] = layer_norm.copy()
        t[p + "ffn_gate.weight"] = rand(N_FF, N_EMBD, scale=1.0 / np.sqrt(N_EMBD))
        t[p + "ffn_up.weight"] = rand(N_FF, N_EMBD, scale=1.0 / np.sqrt(N_EMBD))
        wd = rand(N_EMBD, N_FF, scale=0.5 / np.sqrt(N_FF))
        wd[BIAS_CH, :] = 0.0
        t[p + "ffn_down.weight"] = wd

    t["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)  # passes the bias channel
    # Keep the random part of the logits (std ~2) and the repeat penalty the same at any width.
    width_factor = (64 - 1) / (N_EMBD - 1)
    out = rand(n_vocab, N_EMBD, scale=0.3 * np.sqrt(width_factor))
    # Discourage repeating the previous token ("their their their"): the residual stream carries the
    # last token's embedding, so subtract a little of each token's own embedding from its output row.
    out -= (SELF_PENALTY * width_factor) * embd
    out[:, BIAS_CH] = bias  # the per-token logit bias
    t["output.weight"] = out
    if rerank:
        # One row per label over the final-normed last hidden state (each channel ~1): logits of
        # std ~1, so documents get clearly different scores; the constant bias channel is ignored.
        cls = rand(len(RERANK_LABELS), N_EMBD, scale=1.0 / np.sqrt(N_EMBD))
        cls[:, BIAS_CH] = 0.0
        t["cls.output.weight"] = cls
    return t


def wire_tool_calls(t: dict[str, np.ndarray], call: int, call_end: int, im_end: int, newline: int) -> None:
    """Makes the hermes model call a tool whenever the prompt offers tools, and end its turn after
    the call. llama-server's grammar for tool_choice "required" still allows free text before the
    first <tool_call> (common/chat-auto-parser-generator.cpp: optional(content(until(marker)))), and
    words, with their positive bias, would fill max_tokens; so the wish to call must come from the
    model. Three more channels work like the bias channel (no layer reads or writes them, except as
    said here):

    - MARK: 1 in the embedding of <tool_call>, which the template's tools prompt contains (and so, in
      the last position, 1 right after the model wrote <tool_call>);
    - TOOLS: written only by layer 0, head 0, whose query is constant (it reads the bias channel)
      and whose key is large only at MARK tokens: every position attends to the <tool_call> tokens
      before it, if any (score ~MARKER_SCORE against 0; the pair of dimensions used rotates least
      under RoPE, and the rope base is 1e6), and copies their MARK value; so TOOLS is ~1 after a
      tools prompt and exactly 0 without one;
    - CALL_END: 1 in the embedding of </tool_call>.

    Logits: <tool_call> gains TOOL_BOOST * (TOOLS - MARK - CALL_END), the newline byte
    TOOL_BOOST * MARK, <|im_end|> TOOL_BOOST * CALL_END. So with tools the first token is
    <tool_call>, then a newline (the grammar wants "<tool_call>\n"; any other text would still be
    content), then the grammar forces the call (the arguments are whatever the random weights pick
    among what the schema allows), and right after </tool_call> the turn ends, even where the
    grammar would allow a second call. Without tools nothing changes: word salad as before."""
    tools_ch, mark_ch, call_end_ch = N_EMBD - 2, N_EMBD - 3, N_EMBD - 4
    special = [tools_ch, mark_ch, call_end_ch]

    embd = t["token_embd.weight"]
    embd[:, special] = 0.0
    embd[call, mark_ch] = 1.0
    embd[call_end, call_end_ch] = 1.0
    for i in range(N_LAYER):
        p = f"blk.{i}."
        for norm in ("attn_norm.weight", "ffn_norm.weight"):
            t[p + norm][special] = 0.0
        t[p + "attn_output.weight"][special, :] = 0.0
        t[p + "ffn_down.weight"][special, :] = 0.0

    # Layer 0, head 0 (rows 0..HEAD_DIM-1 of q, k, v). RoPE (LLaMA: adjacent pairs) turns the pair
    # (HEAD_DIM-2, HEAD_DIM-1) slowest, so a query and a key put there keep their dot product
    # ~q*k*cos(distance * 1e6^(-(HEAD_DIM-2)/HEAD_DIM)): cos > 0.98 for distances up to 32k.
    p = "blk.0."
    t[p + "attn_norm.weight"][[BIAS_CH, mark_ch]] = 1.0  # this layer's norm passes both ...
    wq, wk, wv, wo = (t[p + f"attn_{name}.weight"] for name in ("q", "k", "v", "output"))
    for w in (wq, wk, wv):
        w[:, [BIAS_CH, mark_ch]] = 0.0  # ... and only the weights set below read them
    wq[:HEAD_DIM, :] = 0.0
    wk[:HEAD_DIM, :] = 0.0
    r = HEAD_DIM - 2
    # The norm divides each position by its RMS; undo that for the marker token, so its key is
    # exactly `scaled` and its value exactly 1 (the query side varies by ~10% with the token).
    marker_rms = float(np.sqrt(np.mean(embd[call] ** 2) + RMS_EPS))
    scaled = np.sqrt(MARKER_SCORE * np.sqrt(HEAD_DIM))  # attention scores are q.k / sqrt(HEAD_DIM)
    wq[r, BIAS_CH] = scaled
    wk[r, mark_ch] = scaled * marker_rms
    wv[r, :] = 0.0
    wv[r, mark_ch] = marker_rms
    wo[:, r] = 0.0
    wo[tools_ch, r] = 1.0

    out = t["output.weight"]
    out[:, special] = 0.0
    out[call, tools_ch] = TOOL_BOOST
    out[call, call_end_ch] = -TOOL_BOOST
    out[call, mark_ch] = -TOOL_BOOST
    out[newline, mark_ch] = TOOL_BOOST
    out[im_end, call_end_ch] = TOOL_BOOST
    out[call_end, BIAS_CH] = CLOSE_BIAS


def main() -> int:
    global N_EMBD, N_LAYER, HEAD_DIM, N_FF, BIAS_CH
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="path of the .gguf file to write")
    ap.add_argument("--seed", type=int, default=1, help="weights seed (default 1)")
    ap.add_argument("--eos", action="store_true", help="let the model emit </s> (stop by itself)")
    ap.add_argument("--ctx", type=int, default=256, help="training context length (default 256)")
    ap.add_argument("--width", type=int, default=N_EMBD,
                    help=f"embedding width, a multiple of {N_HEAD} (default {N_EMBD}); wider is slower")
    ap.add_argument("--layers", type=int, default=N_LAYER, help=f"block count (default {N_LAYER})")
    ap.add_argument("--name", default=None, help="general.name (default tiny-random-llama-s<seed>, ...)")
    ap.add_argument("--chat-template", choices=["hermes"], default=None,
                    help="embed a chat template (hermes: ChatML with Hermes-style tool calls) and its tokens")
    ap.add_argument("--rerank", action="store_true",
                    help="a reranker (Qwen3 architecture with a yes/no classifier head) for llama-server --reranking")
    args = ap.parse_args()
    if args.ctx < 8:
        ap.error("--ctx must be at least 8")
    if args.width < 16 or args.width % (2 * N_HEAD) or args.layers < 1:
        ap.error(f"--width must be a multiple of {2 * N_HEAD} (>= 16) and --layers >= 1")
    if args.rerank and args.chat_template:
        ap.error("--rerank and --chat-template don't go together")  # wire_tool_calls assumes LLaMA's RoPE
    N_EMBD, N_LAYER = args.width, args.layers
    HEAD_DIM, N_FF, BIAS_CH = N_EMBD // N_HEAD, 2 * N_EMBD, N_EMBD - 1

    tokens, scores, types, bias = build_vocab(args.eos, HERMES_TOKENS if args.chat_template == "hermes" else ())
    tensors = build_tensors(len(tokens), bias, args.seed, args.rerank)
    if args.chat_template == "hermes":
        ids = [tokens.index(text) for text in ("<tool_call>", "</tool_call>", "<|im_end|>", "<0x0A>")]
        wire_tool_calls(tensors, *ids)

    tmp = args.out + ".tmp"
    w = gguf.GGUFWriter(tmp, arch="qwen3" if args.rerank else "llama")
    kind = "qwen3-rerank" if args.rerank else "llama" + (f"-{args.chat_template}" if args.chat_template else "")
    w.add_name(args.name or f"tiny-random-{kind}-s{args.seed}{'-eos' if args.eos else ''}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(args.ctx)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(1e6 if args.chat_template == "hermes" else 10000.0)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # The SPM tokenizer's space prefix goes before every text that follows a special token too
    # ("<|im_start|>assistant" -> "<|im_start|> assistant"), which would break the template's
    # turns (and llama-server's check of the tool-call grammar against the generation prompt).
    w.add_add_space_prefix(args.chat_template is None)
    if args.chat_template == "hermes":
        w.add_chat_template(HERMES_TEMPLATE)
    if args.rerank:
        w.add_pooling_type(gguf.PoolingType.RANK)
        w.add_classifier_output_labels(RERANK_LABELS)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, args.out)

    n_words = sum(1 for b in bias if b == WORD_BIAS)
    print(
        f"wrote {args.out}: {os.path.getsize(args.out)} bytes, vocab {len(tokens)} "
        f"({n_words} words), {N_LAYER} layers, width {N_EMBD}, ctx {args.ctx}, seed {args.seed}, "
        f"eos {'on' if args.eos else 'off'}"
        + (f", chat template {args.chat_template}" if args.chat_template else "")
        + (", reranker (qwen3)" if args.rerank else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
