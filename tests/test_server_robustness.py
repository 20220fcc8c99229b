"""The server under hostile conditions: a fuzz of malformed requests, shutdown with requests in flight
(in-process and as a real `edgespec serve` process receiving SIGTERM/SIGINT), CLI defaults."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import (TINY_CONTEXT, WAIT_S, assert_openai_error, client, free_port, health,  # noqa: F401
                         one_torch_thread, openai, running_server, tiny_llm, tiny_server, wait_until,
                         write_tiny_chat_model)

from edgespec.server.responses import ResponsesRequest
from edgespec.server.schemas import ChatCompletionRequest, CompletionRequest

REPO = Path(__file__).resolve().parents[1]
VOCAB = 5 + 5 + 120  # upper bound of the tiny tokenizer's vocabulary; ids at or above it are out of range

# ---- strategies: every body drawn here is wrong in at least one way ------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_json = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), c, max_size=3)),
                     max_leaves=8)


def _not(*types: type) -> st.SearchStrategy:
    """Any JSON value (never null) whose Python type is none of `types`."""
    return _json.filter(lambda v: v is not None and type(v) not in types)


_bad_count = st.one_of(_not(int), st.integers(max_value=0), st.integers(min_value=TINY_CONTEXT))
_bad_message = st.one_of(
    _not(dict),
    st.fixed_dictionaries({"role": st.text(max_size=10).filter(
        lambda r: r not in ("system", "developer", "user", "assistant")), "content": st.text(max_size=10)}),
    st.fixed_dictionaries({"role": st.just("user")}),                       # no content
    st.fixed_dictionaries({"role": st.just("user"), "content": _not(str, list)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(
        st.fixed_dictionaries({"type": st.text(max_size=8).filter(lambda t: t != "text")}), min_size=1, max_size=2)}),
)
COMMON_BAD: dict[str, st.SearchStrategy] = {
    "max_tokens": _bad_count,
    "temperature": st.one_of(_not(int, float), st.floats(max_value=-1e-6), st.floats(min_value=2.001),
                             st.sampled_from([float("nan"), float("inf")])),
    "top_p": st.one_of(_not(int, float), st.floats(max_value=0.0), st.floats(min_value=1.001)),
    "top_k": st.one_of(_not(int), st.integers(max_value=-2)),
    "seed": st.one_of(_not(int), st.integers(min_value=2 ** 64), st.integers(max_value=-(2 ** 63) - 1)),
    "stop": st.one_of(st.just(""), _not(str, list), st.lists(st.text(min_size=1, max_size=4), min_size=5, max_size=7),
                      st.text(min_size=257, max_size=300), st.lists(_not(str), min_size=1, max_size=3)),
    "n": st.one_of(st.integers(min_value=65), st.integers(max_value=0), _not(int)),  # the queue holds 64
    "stream": _not(bool),
    "ignore_eos": _not(bool),
    "presence_penalty": st.one_of(st.floats(min_value=2.001), st.floats(max_value=-2.001), _not(int, float)),
    "frequency_penalty": st.one_of(st.floats(min_value=2.001), st.floats(max_value=-2.001), _not(int, float)),
    "repetition_penalty": st.one_of(st.floats(max_value=0.0), st.sampled_from([float("nan"), float("inf")]),
                                    _not(int, float)),
    "min_p": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.001), _not(int, float)),
    "logit_bias": st.one_of(  # keys that are not decimal ids, ids past the vocabulary, biases past +-100
        st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda k: not (k.isascii() and k.isdigit())),
                        st.floats(-100, 100), min_size=1, max_size=2),
        st.dictionaries(st.integers(min_value=VOCAB).map(str), st.floats(-100, 100), min_size=1, max_size=2),
        st.dictionaries(st.integers(0, VOCAB - 1).map(str),
                        st.one_of(st.floats(min_value=100.001), st.floats(max_value=-100.001)), min_size=1, max_size=2),
        _not(dict)),
    "best_of": st.integers(min_value=2),
    "stop_token_ids": st.lists(st.one_of(st.integers(min_value=VOCAB), st.integers(max_value=-1)), min_size=1,
                               max_size=3),
    "stream_options": st.one_of(_not(dict), st.fixed_dictionaries({"include_usage": st.booleans()})),  # stream is false
}
CHAT_BAD = {**COMMON_BAD,
            "messages": st.one_of(_not(list), st.just([]), st.lists(_bad_message, min_size=1, max_size=3)),
            "max_completion_tokens": _bad_count,
            "logprobs": _not(bool),
            "top_logprobs": st.one_of(st.integers(), _not(int)),  # bad without logprobs, and out of [0, 20]
            "tools": st.lists(_json, min_size=1, max_size=2),
            "tool_choice": st.one_of(st.text(max_size=8).filter(lambda t: t not in ("none", "auto")),
                                     st.dictionaries(st.text(max_size=4), _json, max_size=2)),
            "response_format": st.one_of(_not(dict), st.fixed_dictionaries(
                {"type": st.text(max_size=12).filter(lambda t: t not in ("text", "json_object"))}))}  # json_schema
                # without its schema is bad too
COMP_BAD = {**COMMON_BAD,
            "prompt": st.one_of(st.just(""), st.just([]), _not(str, list),
                                st.lists(st.integers(min_value=VOCAB), min_size=1, max_size=3),
                                st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                                st.lists(st.text(max_size=5), max_size=3).map(lambda b: [*b, ""]),  # a batch
                                # with an empty prompt
                                st.lists(st.one_of(st.booleans(), st.floats(), st.dictionaries(st.text(), st.none())),
                                         min_size=1, max_size=3)),
            "echo": _not(bool),
            "suffix": st.text(min_size=1, max_size=8),
            "logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=21), _not(int))}
_bad_item = st.one_of(
    _not(dict),
    st.fixed_dictionaries({"role": st.text(max_size=10).filter(
        lambda r: r not in ("system", "developer", "user", "assistant")), "content": st.text(max_size=10)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": _not(str, list)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.fixed_dictionaries({"type": st.text(
        max_size=12).filter(lambda t: t not in ("input_text", "output_text", "text"))}), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"type": st.text(max_size=12).filter(
        lambda t: t not in ("message", "function_call", "function_call_output", "reasoning"))}),
    st.fixed_dictionaries({"type": st.just("function_call"), "name": _not(str)}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.text(max_size=4)}),  # no output
)
RESP_BAD = {key: COMMON_BAD[key] for key in ("temperature", "top_p", "stream")}
RESP_BAD.update({
    "input": st.one_of(_not(str, list), st.just([]), st.lists(_bad_item, min_size=1, max_size=3)),
    "max_output_tokens": _bad_count,
    "instructions": _not(str),
    "tools": CHAT_BAD["tools"],
    "tool_choice": CHAT_BAD["tool_choice"],
    "parallel_tool_calls": _not(bool),
    "text": st.one_of(_not(dict), st.fixed_dictionaries({"format": st.one_of(_not(dict), st.fixed_dictionaries(
        {"type": st.text(max_size=12).filter(lambda t: t not in ("text", "json_object"))}))})),
    "previous_response_id": st.text(max_size=8),
    "background": st.one_of(st.just(True), _not(bool)),
    "truncation": st.text(max_size=8).filter(lambda t: t != "disabled"),
    "reasoning": st.one_of(_not(dict), st.fixed_dictionaries({"effort": st.sampled_from(["low", "medium", "high"])})),
    "metadata": st.one_of(_not(dict), st.dictionaries(st.text(max_size=4), _not(str), min_size=1, max_size=2)),
    "include": _not(list),
})
KNOWN_FIELDS = (set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
                | set(ResponsesRequest.model_fields))
BASES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3,
                                  "stream": False},
         "/v1/completions": {"prompt": "hello world", "max_tokens": 3, "stream": False},
         "/v1/responses": {"input": "hello world", "max_output_tokens": 3, "stream": False}}
BAD = {"/v1/chat/completions": CHAT_BAD, "/v1/completions": COMP_BAD, "/v1/responses": RESP_BAD}


RAW_KINDS = ("not-json", "not-object", "no-prompt")


@st.composite
def malformed_request(draw, path: str, kind: str) -> bytes:
    """A body for `path` that is wrong in one way. kind: a field name (a valid request with that
    field made wrong, plus harmless unknown fields), or one of RAW_KINDS (not JSON, not an object,
    an object without prompt/messages)."""
    if kind == "not-json":
        raw = draw(st.binary(max_size=40))
        try:
            parsed = json.loads(raw)
        except ValueError:
            return raw
        return json.dumps([parsed]).encode()  # valid JSON after all: make it a non-object
    if kind == "not-object":
        return json.dumps(draw(_json.filter(lambda v: not isinstance(v, dict)))).encode()
    extras = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in KNOWN_FIELDS), _json, max_size=3))
    if kind == "no-prompt":
        return json.dumps(extras).encode()
    body = {**extras, **BASES[path], kind: draw(BAD[path][kind])}
    return json.dumps(body).encode()  # NaN/Infinity become non-standard JSON tokens: also invalid


FUZZ_CASES = [(path, kind) for path in sorted(BASES) for kind in RAW_KINDS + tuple(sorted(BAD[path]))]


def test_fuzz_malformed_requests_get_4xx_and_server_stays_healthy(tiny_server, tiny_llm):
    """Every field of the three endpoints (and bodies that are not requests at all) gets its own share of
    examples, so rarely drawn fields are not left untested."""
    http = httpx.Client(base_url=tiny_server, timeout=WAIT_S)
    statuses: dict[int, int] = {}

    def fuzz(path: str, kind: str) -> None:
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(malformed_request(path, kind))
        def check(raw: bytes) -> None:
            resp = http.post(path, content=raw, headers={"content-type": "application/json"})
            assert_openai_error(resp)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

        check()

    with http:
        for path, kind in FUZZ_CASES:
            fuzz(path, kind)
    assert set(statuses) == {400} and sum(statuses.values()) >= 10 * len(FUZZ_CASES), statuses
    q = health(tiny_server)
    assert q["status"] == "ok" and q["queue"]["failed"] == 0 and q["queue"]["admitted"] == 0
    ref = tiny_llm.generate("hello world", max_new_tokens=4, temperature=0)
    r = client(tiny_server).completions.create(model="tiny", prompt="hello world", max_tokens=4, temperature=0)
    assert r.choices[0].text == ref.text


# ---- shutdown with requests in flight ------------------------------------------------------------

def _in_flight_at_shutdown(llm, grace_s: float, stream_tokens: int,
                           whole_tokens: int) -> tuple[list[Any] | Exception, httpx.Response]:
    """Stop a server while a stream runs and a non-streamed request waits behind it; returns what the
    stream's client read (its chunks, or the exception it raised) and the waiting request's response.
    The stream must be long enough to still run when the second request arrives."""
    outcome: dict[str, httpx.Response] = {}
    body = {"prompt": "hello world", "max_tokens": whole_tokens, "temperature": 0, "ignore_eos": True}

    def whole(base: str) -> None:
        outcome["whole"] = httpx.post(f"{base}/v1/completions", json=body, timeout=WAIT_S)

    with running_server(llm, shutdown_timeout=grace_s) as base:
        stream = client(base).completions.create(model="tiny", prompt="hello", max_tokens=stream_tokens,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        chunks: list[Any] | Exception = [next(it)]
        waiter = threading.Thread(target=whole, args=(base,))
        waiter.start()
        wait_until(lambda: health(base)["queue"]["waiting"] == 1, "the second request to queue")
        # Leaving the block stops the server while both requests are in flight.
    try:
        chunks += list(it)
    except openai.APIError as exc:
        chunks = exc
    waiter.join(WAIT_S)
    return chunks, outcome["whole"]


def test_shutdown_lets_in_flight_requests_finish_within_the_grace_period(tiny_llm):
    chunks, whole = _in_flight_at_shutdown(tiny_llm, grace_s=WAIT_S, stream_tokens=2000, whole_tokens=20)
    assert not isinstance(chunks, Exception), chunks
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == tiny_llm.generate(
        "hello", max_new_tokens=2000, temperature=0, ignore_eos=True).text
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["text"] == tiny_llm.generate(
        "hello world", max_new_tokens=20, temperature=0, ignore_eos=True).text


def test_shutdown_cancels_cleanly_after_the_grace_period(tiny_llm):
    """With no grace left, a waiting non-streamed request gets a 503 and a stream ends with an
    OpenAI error event (which the openai client raises), not a broken connection."""
    chunks, whole = _in_flight_at_shutdown(tiny_llm, grace_s=0.0, stream_tokens=4000, whole_tokens=4000)
    assert isinstance(chunks, openai.APIError) and "shutting down" in str(chunks)
    assert whole.status_code == 503
    err = whole.json()["error"]
    assert err["code"] == "cancelled" and "shutting down" in err["message"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_process_shuts_down_gracefully_on_signal(tmp_path, sig):
    """`edgespec serve` as a real process: serves with an API key from the environment; on the signal
    a stream in flight ends cleanly (finished, or an OpenAI error event) and the process exits 0."""
    model = write_tiny_chat_model(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "EDGESPEC_API_KEY": "process-key"}
    cmd = [sys.executable, "-m", "edgespec", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
           "--dtype", "fp32", "--shutdown-timeout", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, f"the server exited early: {proc.stdout.read()}"
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "the server process to start")
        c = client(base, "process-key")
        assert c.completions.create(model="m", prompt="hello world", max_tokens=3).usage.completion_tokens <= 3
        stream = c.completions.create(model="m", prompt="hello", max_tokens=4000, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        proc.send_signal(sig)
        try:
            chunks = list(it)
            assert chunks[-1].choices[0].finish_reason == "length"  # it finished within the grace period
        except openai.APIError as exc:  # cancelled after the grace period: an error event, not a broken stream
            assert "shutting down" in str(exc)
        rc = proc.wait(timeout=WAIT_S)
        output = proc.stdout.read()
        assert rc == 0, output
        assert "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_defaults_to_loopback():
    from edgespec.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.max_queue) == ("127.0.0.1", 8000, 64)
    assert args.func.__module__ == "edgespec.cli.serve"


def test_server_settings_are_validated(tiny_llm):
    from edgespec.server import ServerSettings, create_app

    cases = [(dict(max_queue=0), "max_queue"), (dict(max_request_bytes=0), "max_request_bytes"),
             (dict(shutdown_timeout=-1), "shutdown_timeout"), (dict(api_key=""), "API key")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            create_app(tiny_llm, ServerSettings(model_name="x", **bad))


def test_cancelling_a_job_stops_its_prefill_between_chunks(tiny_llm, monkeypatch):
    """A client that goes away during a long prefill frees the engine within one prefill chunk:
    the worker passes its cancel flag to the engine, which polls it between chunks (before, the
    whole prompt ran first)."""
    import asyncio

    from edgespec import GenerationConfig
    from edgespec.server.worker import GenerationWorker, Job

    worker = GenerationWorker(tiny_llm, capacity=2)
    loop = asyncio.new_event_loop()
    job = Job([7 + i % 100 for i in range(600)], GenerationConfig(max_new_tokens=4, prefill_chunk=16), loop)
    forwards = []
    real = tiny_llm.model.forward

    def forward(*args, **kwargs):
        forwards.append(args[0].numel())
        if len(forwards) == 3:  # the client disconnects while chunk 3 runs
            worker.cancel(job, "the client went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_llm.model, "forward", forward)
    try:
        worker.start()
        worker.submit(job)
        wait_until(lambda: worker.snapshot()["running"] is False and not worker.snapshot()["admitted"],
                   "the cancelled job to leave the worker")
        assert forwards == [16, 16, 16], "the prefill went on after the cancel"
        assert worker.counters == {"completed": 0, "cancelled": 1, "failed": 0, "rejected": 0}
        assert not tiny_llm._lock.locked()
    finally:
        worker.stop(WAIT_S)
        loop.close()
