"""The OpenAI-compatible server over real HTTP on loopback, with the `openai` client as the client.

Most tests use a tiny random Llama with a small word-level tokenizer and chat template (fast, and its
text is real words so streaming deltas are meaningful); a few use the demo model. Every server runs
in a background thread of this process on 127.0.0.1 and a free port, so the library's own `generate`
on the same LLM object is the reference for every output.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import full_prefills, write_tiny_hf_model  # noqa: E402

from edgespec import LLM  # noqa: E402
from edgespec.server import Job, ServerSettings, make_server  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the quick brown fox jumps over lazy dog hello world how are you today a an is was it of and to in "
         "that for on with as at by from this be or not but what all were when we there can more if no out so "
         "said up its about into than them only other new some could time these two may then do first any my "
         "now such like our man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people mr too little state good very make "
         "user assistant system").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}")
TINY_CONTEXT = 4096
WAIT_S = 60.0  # upper bound for anything the tests wait on; a hang fails instead of blocking CI


def write_tiny_chat_model(directory: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny random Llama (4096 context) with a word-level tokenizer whose vocabulary matches the
    model's (unknown words map to <unk>), EOS = <|im_end|>, and optionally a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + [".", ",", "?", "!", ":"] + list(dict.fromkeys(WORDS)))}
    write_tiny_hf_model(directory, "llama", seed=seed, vocab_size=len(vocab), max_position_embeddings=TINY_CONTEXT,
                        eos_token_id=vocab["<|im_end|>"])
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "unk_token": "<unk>"}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(llm: LLM, **settings: Any) -> Iterator[str]:
    """Serve `llm` on 127.0.0.1 in a background thread; yields the base URL; stops it afterwards."""
    settings.setdefault("model_name", "tiny")
    settings.setdefault("shutdown_timeout", 2.0)
    server = make_server(llm, ServerSettings(**settings), host="127.0.0.1", port=free_port(), log_level="warning")
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the server did not stop"


def client(base: str, api_key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=WAIT_S)


def health(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/health", timeout=WAIT_S).json()


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_openai_error(resp: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The response is a 4xx in the OpenAI error format; returns its `error` object."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if status is not None:
        assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The engine's CPU ops are tiny here; with a shared, oversubscribed 2-core machine an OpenMP team
    # of 2 spends more time waiting for a core than computing (measured: 15 ms vs 0.01 ms per call).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    path = write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    return LLM.load(str(path), device="cpu", dtype=torch.float32)


@pytest.fixture
def exact_tiny(tiny_llm) -> Iterator[LLM]:
    """tiny_llm, whose runs of one prompt agree bit for bit during the test (values compared exactly)."""
    with full_prefills(tiny_llm):
        yield tiny_llm


@pytest.fixture
def exact_demo(demo_llm) -> Iterator[LLM]:
    with full_prefills(demo_llm):
        yield demo_llm


@pytest.fixture(scope="module")
def tiny_server(tiny_llm) -> Iterator[str]:
    with running_server(tiny_llm, max_tokens_limit=TINY_CONTEXT) as base:
        yield base


MESSAGES = [[{"role": "user", "content": "hello world, how are you today?"}],
            [{"role": "system", "content": "you are a lazy dog."},
             {"role": "user", "content": "what did the fox do?"},
             {"role": "assistant", "content": "the fox jumps over the lazy dog."},
             {"role": "user", "content": "and then?"}]]
SAMPLING = {"greedy": dict(temperature=0.0),
            "seeded": dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234),
            "min-p": dict(temperature=1.2, min_p=0.1, seed=77),
            "penalties": dict(temperature=0.0, presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3),
            "bias": dict(temperature=0.7, seed=3, logit_bias={t: float(t % 5 - 2) for t in range(5, 110, 2)},
                         repetition_penalty=1.2)}
# Beyond OpenAI's parameters: the client sends them in extra_body.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty")


def _api_settings(s: dict[str, Any]) -> dict[str, Any]:
    """openai-client keyword arguments for GenerationConfig-style settings."""
    out = {k: v for k, v in s.items() if k not in EXTENSIONS}
    extra = {k: v for k, v in s.items() if k in EXTENSIONS}
    if extra:
        out["extra_body"] = extra
    return out


# ---- outputs equal the library's generate --------------------------------------------------------

def test_health_and_models(tiny_server):
    h = health(tiny_server)
    assert h["status"] == "ok" and h["model"] == "tiny" and h["queue"]["capacity"] == 64
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("conversation", [0, 1])
def test_chat_matches_library(tiny_server, tiny_llm, stream, sampling, conversation):
    messages, settings = MESSAGES[conversation], SAMPLING[sampling]
    ref = tiny_llm.generate(messages, max_new_tokens=40, **settings)
    c = client(tiny_server)
    kwargs = dict(model="tiny", messages=messages, max_tokens=40, **_api_settings(settings))
    if stream:
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        usage = chunks[-1].usage
        assert finish == [ref.finish_reason]
    else:
        r = c.chat.completions.create(**kwargs)
        assert r.object == "chat.completion" and r.model == "tiny" and r.choices[0].message.role == "assistant"
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].finish_reason == ref.finish_reason
    assert text == ref.text
    assert usage.prompt_tokens == len(tiny_llm.encode(messages))
    assert usage.completion_tokens == len(ref.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The library's run of the same prompt just before left all of it but the last token cached.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("prompt", ["text", "ids"])
def test_completion_matches_library(tiny_server, tiny_llm, stream, prompt):
    p = "the quick brown fox" if prompt == "text" else [7, 30, 31, 32, 33]
    settings = SAMPLING["seeded"]
    ref = tiny_llm.generate(p, max_new_tokens=25, **settings)
    c = client(tiny_server)
    kwargs = dict(model="tiny", prompt=p, max_tokens=25, **_api_settings(settings))
    if stream:
        chunks = list(c.completions.create(stream=True, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks)
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == [ref.finish_reason]
    else:
        r = c.completions.create(**kwargs)
        assert r.object == "text_completion" and r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.prompt_tokens == len(tiny_llm.encode(p))
        text = r.choices[0].text
    assert text == ref.text


def test_completion_default_max_tokens_and_stop_string(tiny_server, tiny_llm):
    c = client(tiny_server)
    r = c.completions.create(model="tiny", prompt="hello world", temperature=0)
    ref = tiny_llm.generate("hello world", max_new_tokens=16)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids) <= 16
    # A stop string taken from the middle of the unstopped output must cut it there.
    long = tiny_llm.generate("hello world", max_new_tokens=60, ignore_eos=True).text.split()
    assert len(long) > 10
    stop = " ".join(long[5:7])
    ref = tiny_llm.generate("hello world", max_new_tokens=60, stop=[stop], ignore_eos=True)
    for stream in (False, True):
        kwargs = dict(model="tiny", prompt="hello world", max_tokens=60, temperature=0, stop=[stop],
                      extra_body={"ignore_eos": True})
        if stream:
            chunks = list(c.completions.create(stream=True, **kwargs))
            text, finish = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = c.completions.create(**kwargs)
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == ref.text and stop not in text and finish == "stop" == ref.finish_reason


def test_demo_model(demo_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref_chat = demo_llm.generate(messages, max_new_tokens=12)
    ref_completion = demo_llm.generate("The three primary colors are", max_new_tokens=12, temperature=0.8, seed=7)
    with running_server(demo_llm, model_name="smollm2") as base:
        c = client(base)
        chunks = list(c.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref_chat.text
        r = c.completions.create(model="smollm2", prompt="The three primary colors are", max_tokens=12,
                                 temperature=0.8, seed=7)
        assert r.choices[0].text == ref_completion.text
        assert r.usage.completion_tokens == len(ref_completion.token_ids)
    assert ref_chat.text.strip()


# ---- several choices: n and batches of prompts -------------------------------------------------------

def _seeded(seed: int, i: int) -> int:
    return seed if i == 0 else seed + i


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_n_choices_are_the_library_s_seeded_generations(tiny_server, tiny_llm, stream):
    messages, settings = MESSAGES[0], dict(temperature=0.9, top_p=0.95)
    refs = [tiny_llm.generate(messages, max_new_tokens=15, seed=_seeded(7, i), logprobs=1, **settings)
            for i in range(3)]
    assert len({r.text for r in refs}) > 1  # seeded choices differ
    kwargs = dict(model="tiny", messages=messages, max_tokens=15, n=3, seed=7, logprobs=True, **settings)
    c = client(tiny_server)
    if stream:
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        texts, finishes, roles, lps = {}, {}, {}, {}
        for ch in chunks[:-1]:
            (choice,) = ch.choices
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles[choice.index] = roles.get(choice.index) or choice.delta.role
            lps.setdefault(choice.index, []).extend(choice.logprobs.content if choice.logprobs else [])
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        order = [ch.choices[0].index for ch in chunks[:-1]]
        assert order == sorted(order)  # one choice after the other
        usage = chunks[-1].usage
        got = [(texts[i], finishes[i], roles[i], [e.logprob for e in lps[i]]) for i in range(3)]
    else:
        r = c.chat.completions.create(**kwargs)
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        usage = r.usage
        got = [(ch.message.content, ch.finish_reason, ch.message.role, [e.logprob for e in ch.logprobs.content])
               for ch in r.choices]
    # Log-probabilities up to rounding: prefix caching computes the prompt in other chunks.
    assert got == [(r.text, r.finish_reason, "assistant", pytest.approx([e.logprob for e in r.logprobs], abs=1e-5))
                   for r in refs]
    assert usage.prompt_tokens == len(tiny_llm.encode(messages))  # counted once, not n times
    assert usage.completion_tokens == sum(len(r.token_ids) for r in refs)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completion_batch_with_n_and_echo(tiny_server, tiny_llm, stream):
    """Two prompts (token ids, echoed as they decode) x n = 2: choices in prompt order, each echoing
    its own prompt."""
    prompts = [[9, 12, 40], [7, 30, 31, 32, 33]]
    refs = [tiny_llm.generate(p, max_new_tokens=6, seed=_seeded(3, i), temperature=0.8, ignore_eos=True)
            for p in prompts for i in range(2)]
    echoed = [tiny_llm.tokenizer.decode(p) for p in prompts]
    kwargs = dict(model="tiny", prompt=prompts, max_tokens=6, n=2, seed=3, temperature=0.8, echo=True,
                  extra_body={"ignore_eos": True})
    c = client(tiny_server)
    if stream:
        texts: dict[int, str] = {}
        for ch in c.completions.create(stream=True, **kwargs):
            texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + ch.choices[0].text
        got = [texts[i] for i in range(4)]
    else:
        r = c.completions.create(**kwargs)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
        got = [ch.text for ch in r.choices]
        assert r.usage.prompt_tokens == sum(len(tiny_llm.encode(p)) for p in prompts)
        assert r.usage.completion_tokens == 4 * 6
    assert got == [echoed[i // 2] + ref.text for i, ref in enumerate(refs)]


def test_a_request_s_generations_are_admitted_together(tiny_llm):
    """A queue of 3 slots takes a request of 3 generations, refuses one of 4 outright (400: it could
    never fit), and answers 429 while another request holds a slot (it cannot all fit now)."""
    with running_server(tiny_llm, max_queue=3, max_tokens_limit=TINY_CONTEXT) as base:
        c = client(base)
        assert len(c.completions.create(model="tiny", prompt="hello", max_tokens=2, n=3).choices) == 3
        resp = httpx.post(base + "/v1/completions", json={"prompt": "hello", "n": 4}, timeout=WAIT_S)
        assert_openai_error(resp, 400)
        stream = _long_stream(base)
        try:
            wait_until(lambda: health(base)["queue"]["running"], "the long request to start")
            resp = httpx.post(base + "/v1/completions", json={"prompt": "hello", "n": 3}, timeout=WAIT_S)
            assert_openai_error(resp, 429)
        finally:
            stream.close()
        wait_until(lambda: health(base)["queue"]["admitted"] == 0, "the slots to be freed")


# ---- log-probabilities ----------------------------------------------------------------------------

def _chat_entry(llm: LLM, token: int, logprob: float) -> dict[str, Any]:
    text = llm.tokenizer.decode([token], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("top", [None, 0, 3])
def test_chat_logprobs_are_the_library_s(tiny_server, exact_tiny, stream, top):
    tiny_llm = exact_tiny
    messages, settings = MESSAGES[1], SAMPLING["seeded"]
    ref = tiny_llm.generate(messages, max_new_tokens=20, logprobs=top or 0, **settings)
    kwargs = dict(model="tiny", messages=messages, max_tokens=20, logprobs=True, **_api_settings(settings))
    if top is not None:
        kwargs["top_logprobs"] = top
    c = client(tiny_server)
    if stream:
        chunks = [ch for ch in c.chat.completions.create(stream=True, **kwargs) if ch.choices]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        content = [e for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    else:
        choice = c.chat.completions.create(**kwargs).choices[0]
        text, content = choice.message.content, choice.logprobs.content
    assert text == ref.text
    want = [{**_chat_entry(tiny_llm, e.token_id, e.logprob),
             "top_logprobs": [_chat_entry(tiny_llm, t, v) for t, v in e.top]} for e in ref.logprobs]
    assert [e.model_dump() for e in content] == want  # values exact: JSON round-trips Python floats
    assert len(content) == len(ref.token_ids) and all(len(e.top_logprobs) == (top or 0) for e in content)


def test_no_logprobs_unless_asked_for(tiny_server):
    c = client(tiny_server)
    assert c.chat.completions.create(model="tiny", messages=OK_MESSAGES, max_tokens=3).choices[0].logprobs is None
    assert c.completions.create(model="tiny", prompt="hello", max_tokens=3).choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("echo, max_tokens", [(False, 7), (True, 7), (True, 0)])
def test_completion_logprobs_and_echo_on_the_demo_model(demo_server, exact_demo, stream, echo, max_tokens):
    """The legacy format: token strings, their log-probabilities, the alternatives and each token's
    offset into the returned text (slicing the text at the offsets gives the tokens back); echo with
    max_tokens 0 scores the prompt alone."""
    demo_llm = exact_demo
    prompt = "The capital of France is"
    ref = demo_llm.generate(prompt, max_new_tokens=max_tokens, temperature=0, logprobs=2,
                            prompt_logprobs=2 if echo else None)
    kwargs = dict(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2, echo=echo)
    c = client(demo_server)
    if stream:
        chunks = list(c.completions.create(stream=True, **kwargs))
        text = "".join(ch.choices[0].text for ch in chunks)
        parts = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
        lp = {key: [v for part in parts for v in getattr(part, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        r = c.completions.create(**kwargs)
        text, lp = r.choices[0].text, r.choices[0].logprobs.model_dump()
        assert r.usage.completion_tokens == len(ref.token_ids) == max_tokens
    ids = (demo_llm.encode(prompt) if echo else []) + ref.token_ids
    entries = (ref.prompt_logprobs if echo else []) + ref.logprobs
    assert text == (prompt if echo else "") + ref.text
    string = lambda t: demo_llm.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    assert lp["tokens"] == [string(t) for t in ids]
    assert lp["token_logprobs"] == [None if e is None else e.logprob for e in entries]
    assert lp["top_logprobs"] == [None if e is None else {string(t): v for t, v in e.top} for e in entries]
    ends = lp["text_offset"][1:] + [len(text)]
    assert [text[a:b] for a, b in zip(lp["text_offset"], ends)] == lp["tokens"]


def test_echo_scores_a_prompt_that_fills_the_context(tiny_server, tiny_llm):
    ids = [7 + i % 90 for i in range(TINY_CONTEXT)]
    r = client(tiny_server).completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    want = tiny_llm.generate(ids, max_new_tokens=0, prompt_logprobs=0).prompt_logprobs
    assert r.choices[0].logprobs.token_logprobs == [None if e is None else e.logprob for e in want]
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == TINY_CONTEXT
    resp = httpx.post(tiny_server + COMP, json={"prompt": ids, "max_tokens": 1}, timeout=WAIT_S)
    assert assert_openai_error(resp, 400)["code"] == "context_length_exceeded"


# ---- structured output ------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_response_format_json_schema(demo_server, demo_llm, stream):
    pytest.importorskip("llguidance")
    from edgespec.structured import Grammar

    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    ref = demo_llm.generate(messages, max_new_tokens=60, temperature=0, grammar=Grammar.json(PERSON))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    c = client(demo_server)
    kwargs = dict(model="smollm2", messages=messages, max_tokens=60, temperature=0, response_format=fmt)
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kwargs)
                       if ch.choices)
    else:
        r = c.chat.completions.create(**kwargs)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    assert text == ref.text and set(json.loads(text)) == {"name", "age"}


def test_guided_choice_and_regex(demo_server, demo_llm):
    pytest.importorskip("llguidance")
    c = client(demo_server)
    r = c.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=10, temperature=0,
                             extra_body={"guided_choice": [" yes", " no"]})
    assert r.choices[0].text in (" yes", " no") and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="smollm2", prompt="The year the war ended:", max_tokens=10, temperature=0.9, seed=2,
                             extra_body={"guided_regex": " [12][0-9]{3}"})
    assert re.fullmatch(r" [12][0-9]{3}", r.choices[0].text)
    r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Any JSON, please."}],
                                  max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.fixture(scope="module")
def demo_server(demo_llm) -> Iterator[str]:
    with running_server(demo_llm, model_name="smollm2") as base:
        yield base


# ---- errors: OpenAI format, right status, and the server keeps serving ---------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "hello"}]
ERROR_CASES = [
    # (id, path, raw body, status, param, code)
    ("invalid-json", COMP, b'{"prompt": "hi",', 400, None, "invalid_json"),
    ("not-an-object", CHAT, b"[1, 2]", 400, None, "invalid_type"),
    ("missing-messages", CHAT, {"max_tokens": 3}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    ("max-tokens-string", COMP, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("temperature-bool", COMP, {"prompt": "hi", "temperature": True}, 400, "temperature", "invalid_type"),
    ("temperature-high", COMP, {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("top-p-zero", COMP, {"prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("min-p-high", COMP, {"prompt": "hi", "min_p": 1.5}, 400, "min_p", "invalid_value"),
    ("content-int", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "invalid_type"),
    ("prompt-object", COMP, {"prompt": {"text": "hi"}}, 400, "prompt", "invalid_type"),
    ("n-0", CHAT, {"messages": OK_MESSAGES, "n": 0}, 400, "n", "invalid_value"),
    ("n-past-the-queue", CHAT, {"messages": OK_MESSAGES, "n": 65}, 400, "n", None),
    ("batch-past-the-queue", COMP, {"prompt": ["hi"] * 33, "n": 2}, 400, "n", None),
    ("best-of-not-n", COMP, {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("top-logprobs-alone", CHAT, {"messages": OK_MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("top-logprobs-high", CHAT, {"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", "invalid_value"),
    ("logprobs-negative", COMP, {"prompt": "hi", "logprobs": -1}, 400, "logprobs", "invalid_value"),
    ("logprobs-bool", COMP, {"prompt": "hi", "logprobs": True}, 400, "logprobs", "invalid_type"),
    ("prompt-logprobs", COMP, {"prompt": "hi", "prompt_logprobs": 1}, 400, "prompt_logprobs",
     "unsupported_parameter"),
    ("max-tokens-zero", COMP, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("chat-max-tokens-zero", CHAT, {"messages": OK_MESSAGES, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("tools-not-rendered", CHAT, {"messages": OK_MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools", "tools_not_rendered"),
    ("functions", CHAT, {"messages": OK_MESSAGES, "functions": [{"name": "f"}]}, 400, "functions",
     "unsupported_parameter"),
    ("xml-mode", CHAT, {"messages": OK_MESSAGES, "response_format": {"type": "xml"}}, 400,
     "response_format", "unsupported_parameter"),
    ("json-schema-missing", CHAT, {"messages": OK_MESSAGES, "response_format": {"type": "json_schema"}}, 400,
     "response_format", None),
    ("json-schema-bad", CHAT, {"messages": OK_MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format", None),
    ("two-constraints", COMP, {"prompt": "hi", "guided_regex": "[a-z]+", "guided_choice": ["a", "b"]}, 400,
     "guided_choice", None),
    ("guided-grammar", COMP, {"prompt": "hi", "guided_grammar": "root ::= 'a'"}, 400, "guided_grammar",
     "unsupported_parameter"),
    ("guided-regex-bad", COMP, {"prompt": "hi", "guided_regex": "("}, 400, "guided_regex", None),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages.0.content.0", "unsupported_parameter"),
    ("tool-role-without-id", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.tool_call_id",
     None),
    ("unknown-role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role",
     "unsupported_parameter"),
    ("best-of", COMP, {"prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("suffix", COMP, {"prompt": "hi", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ("logit-bias-key", CHAT, {"messages": OK_MESSAGES, "logit_bias": {"the": 5}}, 400, "logit_bias", None),
    ("logit-bias-range", COMP, {"prompt": "hi", "logit_bias": {"5": 100.5}}, 400, "logit_bias", None),
    ("logit-bias-vocab", COMP, {"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    ("presence-penalty-high", COMP, {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty",
     "invalid_value"),
    ("repetition-penalty-zero", COMP, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty",
     "invalid_value"),
    ("batch-with-an-empty-prompt", COMP, {"prompt": ["a", ""]}, 400, "prompt", None),
    ("empty-prompt", COMP, {"prompt": ""}, 400, "prompt", None),
    ("token-out-of-range", COMP, {"prompt": [1, 99999]}, 400, "prompt", None),
    ("five-stops", COMP, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("max-tokens-over-limit", COMP, {"prompt": "hi", "max_tokens": TINY_CONTEXT + 1}, 400, "max_tokens",
     "invalid_value"),
    ("prompt-too-long", COMP, {"prompt": "hello " * TINY_CONTEXT}, 400, "prompt", "context_length_exceeded"),
    ("prompt-plus-max-tokens", COMP, {"prompt": "hello " * 4000, "max_tokens": 200}, 400, "max_tokens",
     "context_length_exceeded"),
    ("stream-options-without-stream", COMP, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_responses(tiny_server, case):
    _, path, body, status, param, code = case
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(tiny_server + path, content=raw, headers={"content-type": "application/json"}, timeout=WAIT_S)
    err = assert_openai_error(resp, status)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code


def test_errors_reach_the_openai_client_and_server_keeps_serving(tiny_server):
    c = client(tiny_server)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="tiny", messages=OK_MESSAGES, tools=[{"type": "function",
                                                                              "function": {"name": "f"}}])
    assert exc.value.code == "tools_not_rendered" and exc.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="tiny", prompt="hello " * TINY_CONTEXT, max_tokens=5, stream=True)
    assert exc.value.code == "context_length_exceeded"
    big = httpx.post(f"{tiny_server}{COMP}", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}', timeout=WAIT_S)
    assert_openai_error(big, 413)
    assert_openai_error(httpx.get(f"{tiny_server}/v1/nothing-here", timeout=WAIT_S), 404)
    assert_openai_error(httpx.get(f"{tiny_server}{COMP}", timeout=WAIT_S), 405)
    assert c.completions.create(model="tiny", prompt="hello", max_tokens=3).choices[0].text
    assert health(tiny_server)["queue"]["failed"] == 0


# ---- auth, and chat without a chat template ------------------------------------------------------

def test_api_key_and_missing_chat_template(tmp_path):
    path = write_tiny_chat_model(tmp_path / "no-template", chat_template=False)
    llm = LLM.load(str(path), device="cpu", dtype=torch.float32)
    with running_server(llm, api_key="s3cret-key") as base:
        assert health(base)["status"] == "ok"  # probes need no key
        for key in (None, "wrong-key", "s3cret-ke", "s3cret-key-and-more"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            err = assert_openai_error(httpx.get(f"{base}/v1/models", headers=headers, timeout=WAIT_S), 401)
            assert err["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong-key").completions.create(model="tiny", prompt="hello", max_tokens=2)
        good = client(base, "s3cret-key")
        assert [m.id for m in good.models.list().data] == ["tiny"]
        ref = llm.generate("hello world", max_new_tokens=5, temperature=0)
        assert good.completions.create(model="tiny", prompt="hello world", max_tokens=5,
                                       temperature=0).choices[0].text == ref.text
        with pytest.raises(openai.BadRequestError) as exc:
            good.chat.completions.create(model="tiny", messages=OK_MESSAGES)
        assert exc.value.code == "chat_template_missing"


# ---- concurrency, disconnects, queue limits ------------------------------------------------------

def _long_stream(base: str, max_tokens: int = 3000):
    return client(base).completions.create(model="tiny", prompt="hello", max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})


def test_stream_disconnect_cancels_and_loop_stays_responsive(tiny_server):
    before = health(tiny_server)["queue"]
    stream = _long_stream(tiny_server)
    it = iter(stream)
    for _ in range(3):
        next(it)
    # /health answers while the worker generates: generation does not block the event loop.
    assert health(tiny_server)["queue"]["running"] is True
    stream.close()
    wait_until(lambda: health(tiny_server)["queue"]["cancelled"] == before["cancelled"] + 1, "the cancellation")
    wait_until(lambda: not health(tiny_server)["queue"]["running"], "the worker to go idle")
    assert health(tiny_server)["queue"]["admitted"] == 0


def test_non_streaming_disconnect_cancels(tiny_server):
    before = health(tiny_server)["queue"]
    body = {"prompt": "hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server}{COMP}", json=body, timeout=httpx.Timeout(WAIT_S, read=0.3))
    wait_until(lambda: health(tiny_server)["queue"]["cancelled"] == before["cancelled"] + 1, "the cancellation")
    wait_until(lambda: not health(tiny_server)["queue"]["running"], "the worker to go idle")


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(tiny_llm):
    with running_server(tiny_llm, max_queue=1) as base:
        stream = _long_stream(base)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as exc:
            client(base).completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert exc.value.code == "queue_full"
        raw = httpx.post(f"{base}{COMP}", json={"prompt": "hello", "max_tokens": 2}, timeout=WAIT_S)
        assert_openai_error(raw, 429)
        assert raw.headers["retry-after"] == "1"
        stream.close()
        wait_until(lambda: health(base)["queue"]["admitted"] == 0, "the slot to be freed")
        assert client(base).completions.create(model="tiny", prompt="hello", max_tokens=2).choices[0].text
        assert health(base)["queue"]["rejected"] == 2


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(f"{base}/metrics", timeout=WAIT_S)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(resp.text) for sample in family.samples}


def test_metrics_count_what_the_responses_report(tiny_llm):
    """Prometheus metrics (no API key needed, as Prometheus scrapes): tokens and generations agree
    with the responses' usage, every completed generation has its latencies, and the queue's state
    and outcome counts are read at the scrape."""
    pytest.importorskip("prometheus_client")
    with running_server(tiny_llm, api_key="secret") as base:
        c = client(base, api_key="secret")
        chat = c.chat.completions.create(model="tiny", messages=MESSAGES[1], max_tokens=6, temperature=0)
        two = c.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=5, n=2, seed=3)
        streamed = list(c.completions.create(model="tiny", prompt="hello world", max_tokens=4, stream=True,
                                             stream_options={"include_usage": True}))
        usage = [chat.usage, two.usage, streamed[-1].usage]
        m = scrape(base)
        prompt = chat.usage.prompt_tokens + 2 * two.usage.prompt_tokens + streamed[-1].usage.prompt_tokens
        assert m[("edgespec_prompt_tokens_total", ())] == prompt  # per generation: n = 2 counts its prompt twice
        assert m[("edgespec_generation_tokens_total", ())] == sum(u.completion_tokens for u in usage)
        # usage counts a prompt's cached tokens once, for its first choice; the metric every generation's:
        # the second choice reuses the prompt.
        cached = sum(u.prompt_tokens_details.cached_tokens for u in usage)
        assert m[("edgespec_prompt_tokens_cached_total", ())] > cached
        assert sum(v for (name, _), v in m.items() if name == "edgespec_generations_finished_total") == 4
        assert m[("edgespec_generations_total", (("outcome", "completed"),))] == 4
        assert m[("edgespec_generations_total", (("outcome", "rejected"),))] == 0
        for name in ("queue_wait", "time_to_first_token", "time_per_output_token", "generation_duration"):
            assert m[(f"edgespec_{name}_seconds_count", ())] == 4, name
            assert m[(f"edgespec_{name}_seconds_sum", ())] > 0 or name == "queue_wait"
        assert m[("edgespec_decode_steps_total", ())] > 0
        assert (m[("edgespec_queue_running", ())], m[("edgespec_queue_waiting", ())]) == (0, 0)
        assert m[("edgespec_queue_capacity", ())] == 64
        assert httpx.get(f"{base}/v1/models", timeout=WAIT_S).status_code == 401  # the key still guards /v1
        # Every response counts, by route and status: the refused ones too.
        key = {"Authorization": "Bearer secret"}
        assert httpx.post(f"{base}{COMP}", json={"prompt": "hi", "max_tokens": -1}, headers=key,
                          timeout=WAIT_S).status_code == 400
        assert httpx.get(f"{base}/v2/nothing", timeout=WAIT_S).status_code == 404
        m = scrape(base)

        def responses(route: str, status: int) -> float:
            return m.get(("edgespec_http_responses_total", (("route", route), ("status", str(status)))), 0)

        assert responses("/v1/chat/completions", 200) == 1 and responses(COMP, 200) == 2
        assert responses(COMP, 400) == 1 and responses("/v1/models", 401) == 1
        assert responses("unmatched", 404) == 1 and responses("/metrics", 200) == 1  # the first scrape


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_jobs() -> int:
    gc.collect()
    return sum(type(o) is Job for o in gc.get_objects())  # type(): no __class__ lookups on lazy modules


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc")
def test_concurrent_clients_with_random_disconnects(tiny_server, tiny_llm):
    """32 clients, mixed chat/completion and streamed/whole, a third of them hanging up early: every
    response that completes equals the library's output for its seed, and nothing leaks."""
    variants = []
    for i in range(8):
        messages = [{"role": "user", "content": f"{WORDS[i]} {WORDS[i + 9]} {WORDS[2 * i + 20]} ?"}]
        settings = dict(temperature=0.0) if i % 3 == 0 else dict(temperature=0.8, top_p=0.95, seed=100 + i)
        chat = i % 2 == 0
        prompt = messages if chat else messages[0]["content"]
        ref = tiny_llm.generate(prompt, max_new_tokens=24, **settings)
        variants.append((chat, prompt, settings, ref))
    rng = random.Random(0)
    plan = [(rng.randrange(len(variants)), rng.random() < 0.5, rng.random() < 0.33) for _ in range(32)]
    results: list[Any] = [None] * len(plan)

    def one(idx: int) -> None:
        v, stream, hang_up = plan[idx]
        chat, prompt, settings, ref = variants[v]
        try:
            c = client(tiny_server)
            kwargs = dict(model="tiny", max_tokens=24, **_api_settings(settings))
            if hang_up and not stream:
                body = {"prompt": prompt, "max_tokens": 24, **settings}
                with contextlib.suppress(httpx.TimeoutException):
                    httpx.post(f"{tiny_server}{COMP}", json=body, timeout=httpx.Timeout(WAIT_S, read=0.05))
                results[idx] = "hung up"
                return
            if chat:
                create, extract = c.chat.completions.create, lambda ch: ch.choices[0].delta.content or ""
                kwargs["messages"] = prompt
            else:
                create, extract = c.completions.create, lambda ch: ch.choices[0].text
                kwargs["prompt"] = prompt
            if stream:
                with create(stream=True, **kwargs) as s:
                    parts = []
                    for n, chunk in enumerate(s):
                        if hang_up and n == 2:
                            results[idx] = "hung up"
                            return
                        parts.append(extract(chunk))
                results[idx] = ("".join(parts), ref.text)
            else:
                r = create(**kwargs)
                text = r.choices[0].message.content if chat else r.choices[0].text
                assert r.usage.completion_tokens == len(ref.token_ids)
                results[idx] = (text, ref.text)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            results[idx] = exc

    def run_all(indices) -> None:
        threads = [threading.Thread(target=one, args=(i,)) for i in indices]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 2)
        assert not any(t.is_alive() for t in threads), "a client hung"

    run_all(range(4))  # warm-up: thread pools and allocator caches settle before RSS is measured
    rss0 = _rss_bytes()
    run_all(range(len(plan)))
    rss1 = _rss_bytes()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    completed = [r for r in results if isinstance(r, tuple)]
    assert len(completed) >= 16
    for got, want in completed:
        assert got == want
    wait_until(lambda: health(tiny_server)["queue"]["admitted"] == 0, "every slot to be freed")
    q = health(tiny_server)["queue"]
    assert q["failed"] == 0 and q["waiting"] == 0 and not q["running"]
    wait_until(lambda: _live_jobs() == 0, "every request's job to be released")
    # A leak of even one KV cache per request (4.7 MB here) would exceed this over 32 requests.
    assert rss1 - rss0 < 64 << 20, f"RSS grew by {(rss1 - rss0) >> 20} MiB"
