"""Log-probabilities: ops.token_logprobs against a float64 oracle; the engine's generated and prompt
log-probabilities against transformers' forward pass over the whole sequence (teacher forcing),
for plain decoding in several chunkings and sampling settings, and for speculative decoding on the
demo model with its trained head (a step commits several tokens, each from its own tree row)."""
from __future__ import annotations

import math

import pytest
import torch

from edgespec import LLM, ops
from edgespec.generation import GenerationConfig, TokenLogprob
from edgespec.loading import load_model
from edgespec.spec import DEMO_HEAD, enable_speculation
from test_engine import write_tiny_chat_model
from test_spec_helpers import one_thread  # noqa: F401 (autouse fixture)

TOL = 2e-4  # fp32: decode steps and one whole-sequence forward differ by rounding only


def reference_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,top", [(1, 7, 0), (5, 211, 3), (3, 49152, 20), (4, 5, 5)])
def test_token_logprobs_match_the_oracle(dtype, rows, vocab, top) -> None:
    g = torch.Generator().manual_seed(rows * vocab + top)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    chosen, values, ids = ops.token_logprobs(logits, tokens, top)
    want = reference_logprobs(logits.float())
    assert chosen.dtype == values.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(chosen.double(), want.gather(1, tokens[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert values.shape == ids.shape == (rows, top)
    torch.testing.assert_close(values.double(), want.gather(1, ids), atol=1e-5, rtol=0)  # each id's own value
    torch.testing.assert_close(values.double(), want.topk(top, dim=-1).values, atol=1e-5, rtol=0)  # the top ones
    assert (values[:, 1:] <= values[:, :-1]).all()  # most likely first


def test_token_logprobs_refuse_bad_arguments() -> None:
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"tokens \[N\]"):
        ops.token_logprobs(logits, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"top must be in \[0, 10\]"):
        ops.token_logprobs(logits, torch.zeros(3, dtype=torch.int64), 11)
    with pytest.raises(ValueError, match=r"top must be in \[0, 20\]"):
        ops.token_logprobs(torch.randn(3, 100), torch.zeros(3, dtype=torch.int64), 21)


@pytest.mark.parametrize("settings", [{"logprobs": 21}, {"logprobs": -1}, {"prompt_logprobs": True},
                                      {"prompt_logprobs": 1.5}])
def test_bad_logprob_settings(settings) -> None:
    field = next(iter(settings))
    with pytest.raises(ValueError, match=f"{field} must be None or an integer in \\[0, 20\\]"):
        GenerationConfig(**settings).validate()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(edgespec LLM, the same weights in transformers), fp32 on the CPU."""
    import transformers

    d = write_tiny_chat_model(tmp_path_factory.mktemp("tiny-logprobs"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    llm = LLM(load_model(d, device="cpu", dtype=torch.float32, max_context=64))
    llm.prefix_caching = False  # the tests compare runs of one prompt bit for bit (conftest.full_prefills)
    return llm, hf


def check_against(ref: torch.Tensor, entries: list[TokenLogprob | None], top: int) -> None:
    """entries[i] scores the token at sequence position p_i = offset + i with ref row p_i - 1."""
    for row, entry in zip(ref, entries):
        assert entry is not None and len(entry.top) == top
        assert math.isclose(entry.logprob, row[entry.token_id].item(), abs_tol=TOL)
        for token, value in entry.top:
            assert math.isclose(value, row[token].item(), abs_tol=TOL)
        want = row.topk(top).values.tolist()
        assert all(math.isclose(a, b, abs_tol=TOL) for a, b in zip((v for _, v in entry.top), want))


@pytest.mark.parametrize("settings", [
    {"prefill_chunk": 512},
    {"prefill_chunk": 3},                              # several chunks, a short last one
    {"prefill_chunk": 7, "temperature": 0.9, "top_k": 20, "repetition_penalty": 1.5, "seed": 3},  # raw logprobs
])
def test_logprobs_equal_transformers_over_the_whole_sequence(tiny, settings) -> None:
    llm, hf = tiny
    prompt = llm.encode("The quick brown fox jumps")
    result = llm.generate(prompt, max_new_tokens=12, ignore_eos=True, logprobs=4, prompt_logprobs=2, **settings)
    seq = prompt + result.token_ids
    with torch.no_grad():
        ref = reference_logprobs(hf(torch.tensor([seq])).logits[0])
    P = len(prompt)
    assert len(result.logprobs) == len(result.token_ids) == 12
    assert [e.token_id for e in result.logprobs] == result.token_ids
    check_against(ref[P - 1:-1], result.logprobs, 4)
    assert len(result.prompt_logprobs) == P and result.prompt_logprobs[0] is None
    assert [e.token_id for e in result.prompt_logprobs[1:]] == prompt[1:]
    check_against(ref[:P - 1], result.prompt_logprobs[1:], 2)


def test_no_logprobs_unless_asked(tiny) -> None:
    result = tiny[0].generate("abc", max_new_tokens=3)
    assert result.logprobs is None and result.prompt_logprobs is None


def test_prompt_scored_without_new_tokens(tiny) -> None:
    llm, hf = tiny
    prompt = llm.encode("hello world")
    result = llm.generate(prompt, max_new_tokens=0, prompt_logprobs=0, logprobs=1)
    assert result.token_ids == [] and result.logprobs == [] and result.finish_reason == "length"
    with torch.no_grad():
        ref = reference_logprobs(hf(torch.tensor([prompt])).logits[0])
    check_against(ref[:-1], result.prompt_logprobs[1:], 0)


@pytest.mark.parametrize("stop", [{"stop": ["o"]}, {"stop_token_ids": "third"}, {"max_new_tokens": 5}])
def test_logprobs_follow_the_tokens_that_are_kept(tiny, stop) -> None:
    llm, _ = tiny
    free = llm.generate("The quick", max_new_tokens=20, ignore_eos=True, logprobs=1)
    if stop.get("stop_token_ids") == "third":
        stop = {"stop_token_ids": [free.token_ids[2]]}
    settings = {"max_new_tokens": 20, "ignore_eos": True, "logprobs": 1, **stop}
    events = list(llm.stream("The quick", **settings))
    result = events[-1].result
    assert len(result.token_ids) < 20
    assert [e.token_id for e in result.logprobs] == result.token_ids == free.token_ids[:len(result.token_ids)]
    assert result.logprobs == free.logprobs[:len(result.token_ids)]
    streamed = [e for ev in events[:-1] for e in ev.logprobs]
    assert streamed == result.logprobs
    assert all(len(ev.logprobs) == len(ev.token_ids) for ev in events[:-1])


def teacher_forced(llm: LLM, seq: list[int]) -> torch.Tensor:
    """log-softmax of edgespec's own whole-sequence forward (one prefill chunk)."""
    model = llm.model
    with torch.inference_mode():
        out = model.forward(torch.tensor(seq), torch.arange(len(seq)), model.new_cache(len(seq)), 0)
        return reference_logprobs(model.logits(out.hidden))


@pytest.mark.slow
def test_speculative_logprobs_are_the_target_rows_of_the_accepted_path(demo_llm) -> None:
    """Each committed token of a speculative step is scored by its own tree row: greedy equals plain
    decoding's logprobs, and sampled ones equal the teacher-forced model's."""
    prompts = [demo_llm.encode(p, chat=True) for p in ("What is two plus two?", "Name three colors.")]
    settings = {"max_new_tokens": 23, "ignore_eos": True, "logprobs": 3, "prompt_logprobs": 1}
    enable_speculation(demo_llm, None)
    plain = [demo_llm.generate(p, **settings) for p in prompts]
    enable_speculation(demo_llm, draft=str(DEMO_HEAD))
    try:
        spec = [demo_llm.generate(p, **settings) for p in prompts]
        sampled = [demo_llm.generate(p, temperature=0.8, top_p=0.9, seed=5, **settings) for p in prompts]
    finally:
        enable_speculation(demo_llm, None)
    for want, got in zip(plain, spec):
        assert got.token_ids == want.token_ids
        assert got.stats.extra["mean_accepted_length"] > 1.5  # steps commit several tokens
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.token_id == b.token_id and math.isclose(a.logprob, b.logprob, abs_tol=TOL)
            assert [t for t, _ in a.top][:1] == [t for t, _ in b.top][:1]
        assert got.prompt_logprobs == want.prompt_logprobs  # the same prefill
    for prompt, result in zip(prompts, sampled):
        assert len(result.logprobs) == len(result.token_ids) == 23
        ref = teacher_forced(demo_llm, prompt + result.token_ids)
        check_against(ref[len(prompt) - 1:-1], result.logprobs, 3)
        check_against(ref[:len(prompt) - 1], result.prompt_logprobs[1:], 1)


def test_a_stream_brings_the_prompt_scores_right_after_the_prefill(tiny) -> None:
    llm, _ = tiny
    events = list(llm.stream("hello world", max_new_tokens=4, ignore_eos=True, prompt_logprobs=1))
    first, result = events[0], events[-1].result
    assert first.prompt_logprobs is not None and first.token_ids == [] and first.text == ""
    assert first.prompt_logprobs == result.prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[1:])
    assert result.logprobs is None and all(e.logprobs is None for e in events)  # logprobs not asked for


def test_speculation_drafts_nothing_when_no_step_follows(demo_llm, monkeypatch) -> None:
    """Scoring a prompt (max_new_tokens 0) or answering one token runs no target step, so the draft
    model is not prefilled either; the outputs are plain decoding's."""
    prompt = demo_llm.encode("Hello there", chat=True)
    enable_speculation(demo_llm, None)
    plain = demo_llm.generate(prompt, max_new_tokens=1, prompt_logprobs=1, logprobs=0)
    enable_speculation(demo_llm, draft=str(DEMO_HEAD))
    try:
        drafter = demo_llm._strategy_factory.drafter
        monkeypatch.setattr(drafter, "prefill", lambda *a: pytest.fail("the draft was prefilled for no step"))
        for n in (0, 1):
            result = demo_llm.generate(prompt, max_new_tokens=n, prompt_logprobs=1, logprobs=0)
            assert result.token_ids == plain.token_ids[:n] and result.logprobs == plain.logprobs[:n]
            assert result.prompt_logprobs == plain.prompt_logprobs
    finally:
        enable_speculation(demo_llm, None)
