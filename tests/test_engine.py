"""The engine's one generate/stream loop: determinism, seeded sampling, stop strings and stop
tokens, length limits, context errors, prompt validation, cancellation and chat prompts.

Most tests use a tiny random Llama with a character-level tokenizer (`write_char_tokenizer`):
every printable character is one token, so a two-character stop string always spans two tokens,
and generation costs about a millisecond per token. One test runs the demo model for a real
chat template and real text.
"""
from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_hf_model
from oracle import ops as ref
from edgespec import LLM, ContextLengthError
from edgespec.loading import load_model

CONTEXT = 64
VOCAB = 211  # the tiny model's vocabulary (conftest.write_tiny_hf_model)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_char_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A character-level tokenizer (tokenizer.json + config with a chat template) for the tiny
    models: ids 0-2 are <unk>, <s>, </s>; then the 95 printable ASCII characters and newline;
    the remaining ids are two-letter pieces ("aa", "ab", ...) that only generation produces."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[:95] + "\n":
        vocab.setdefault(c, len(vocab))
    letters = string.ascii_lowercase
    for i in range(vocab_size - len(vocab)):
        vocab[letters[i // 26] + letters[i % 26]] = len(vocab)
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()  # pieces are concatenated, not joined with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)


def write_tiny_chat_model(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama directory with the character tokenizer."""
    write_tiny_hf_model(directory, "llama", seed=seed)
    write_char_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    d = write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    return LLM(load_model(d, device="cpu", dtype=torch.float32, max_context=CONTEXT))


PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def greedy(llm: LLM):
    """The unconstrained greedy continuation of PROMPT: (token ids, their text pieces, full text)."""
    result = llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    pieces = [llm.tokenizer.decode([t]) for t in result.token_ids]
    assert "".join(pieces) == result.text  # the character tokenizer decodes piece by piece
    return result.token_ids, pieces, result.text


def streamed(llm: LLM, prompt, **settings) -> tuple[str, object]:
    """(concatenated streamed text, final result)."""
    text, result = "", None
    for event in llm.stream(prompt, **settings):
        text += event.text
        result = event.result or result
    return text, result


def test_greedy_is_deterministic(llm: LLM, greedy) -> None:
    tokens, _, text = greedy
    again = llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    assert again.token_ids == tokens and again.text == text
    assert again.finish_reason == "length"
    assert again.stats.new_tokens == 30 and again.stats.prompt_tokens == len(PROMPT)
    assert len(set(tokens)) > 3, "degenerate continuation: the engine tests would prove little"


def test_each_generation_plans_its_attention_span(llm: LLM, monkeypatch) -> None:
    """The GPU's row-invariant attention chunks its keys by the generation's span (KVCache.plan_span):
    one value per generation, from the prompt and the budget, handed to every attention call."""
    from edgespec import ops
    from edgespec.kv_cache import MIN_ATTENTION_SPAN, KVCache

    spans = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, span=None, **kw: spans.append(span) or real(*a, span=span, **kw))
    llm.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    assert spans and set(spans) == {min(MIN_ATTENTION_SPAN, llm.cache.max_len)}
    cache = KVCache(1, 5000, 1, 8, torch.float32, "cpu")
    assert cache.attention_span == 5000
    for end, span in ((1, 1024), (1024, 1024), (1025, 2048), (4097, 5000)):
        cache.plan_span(end)
        assert cache.attention_span == span, end


BIAS = {t: float(t % 7 - 3) for t in range(0, VOCAB, 3)}


@pytest.mark.parametrize("settings", [dict(repetition_penalty=1.4), dict(presence_penalty=1.5, frequency_penalty=0.7),
                                      dict(repetition_penalty=0.8, frequency_penalty=-0.6), dict(logit_bias=BIAS),
                                      dict(logit_bias=BIAS, repetition_penalty=1.6)])
def test_penalties_follow_the_sequence_history(llm: LLM, greedy, settings: dict) -> None:
    """Greedy decoding with a logit bias and penalties against a reference that reruns the whole
    sequence each step, adds the bias and penalises the last logits with the oracle (prompt and
    output as plain lists): the bias comes first, as in vLLM."""
    n = 24
    result = llm.generate(PROMPT, max_new_tokens=n, ignore_eos=True, **settings)
    model, prompt, out = llm.model, llm.encode(PROMPT), []
    penalties = dict(repetition=settings.get("repetition_penalty", 1.0),
                     presence=settings.get("presence_penalty", 0.0), frequency=settings.get("frequency_penalty", 0.0))
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.tensor(prompt + out)
            hidden = model.forward(ids, torch.arange(ids.numel()), model.new_cache(CONTEXT), 0).hidden
            logits = model.logits(hidden[-1:])[0]
            for t, bias in settings.get("logit_bias", {}).items():
                logits[t] += bias
            out.append(int(ref.penalised_logits(logits, prompt, out, **penalties).argmax()))
    assert result.token_ids == out
    assert result.token_ids != greedy[0][:n], "the penalties changed nothing: the comparison would prove little"


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm: LLM) -> None:
    settings = dict(max_new_tokens=24, temperature=1.5, top_k=100, ignore_eos=True)
    a = llm.generate(PROMPT, seed=7, **settings).token_ids
    b = llm.generate(PROMPT, seed=7, **settings).token_ids
    c = llm.generate(PROMPT, seed=8, **settings).token_ids
    assert a == b
    assert a != c


def test_streamed_text_concatenates_to_the_result(llm: LLM, greedy) -> None:
    text, result = streamed(llm, PROMPT, max_new_tokens=30, ignore_eos=True)
    assert text == result.text == greedy[2]


def _split_stop_string(greedy) -> tuple[str, int]:
    """A two-character stop string made of the last character of token j and the first of token
    j + 1 that does not occur earlier in the text. Returns (stop, j)."""
    tokens, pieces, text = greedy
    for j in range(2, len(pieces) - 1):
        if not pieces[j] or not pieces[j + 1]:
            continue
        stop = pieces[j][-1] + pieces[j + 1][0]
        boundary = len("".join(pieces[: j + 1]))
        if text.find(stop) == boundary - 1:
            return stop, j
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_split_across_tokens(llm: LLM, greedy) -> None:
    tokens, pieces, text = greedy
    stop, j = _split_stop_string(greedy)
    streamed_text, result = streamed(llm, PROMPT, max_new_tokens=30, stop=[stop], ignore_eos=True)
    expected = text[: text.find(stop)]
    assert result.finish_reason == "stop"
    assert result.text == expected and streamed_text == expected  # the stop string is never streamed
    assert result.token_ids == tokens[: j + 2]  # generation ends at the token completing the stop string


def test_stop_string_never_produced_runs_to_length(llm: LLM, greedy) -> None:
    text, result = streamed(llm, PROMPT, max_new_tokens=30, stop=["\x7f never"], ignore_eos=True)
    assert result.finish_reason == "length" and text == result.text == greedy[2]


def test_stop_token_ids(llm: LLM, greedy) -> None:
    tokens = greedy[0]
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    result = llm.generate(PROMPT, max_new_tokens=30, stop_token_ids=[tokens[k]], ignore_eos=True)
    assert result.finish_reason == "stop"
    assert result.token_ids == tokens[:k]  # the stop token itself is not part of the output


def test_eos_stops_unless_ignored(llm: LLM, greedy, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = greedy[0]
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    monkeypatch.setattr(llm.model.config, "eos_token_ids", [tokens[k]])
    stopped = llm.generate(PROMPT, max_new_tokens=30)
    assert stopped.finish_reason == "stop" and stopped.token_ids == tokens[:k]
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids == tokens


@pytest.mark.parametrize("n", [0, 1, 7])
def test_max_new_tokens_gives_length(llm: LLM, greedy, n: int) -> None:
    result = llm.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    assert result.finish_reason == "length"
    assert result.token_ids == greedy[0][:n]


def test_context_budget_clamps_new_tokens(llm: LLM) -> None:
    prompt = list(range(3, 3 + CONTEXT - 4))
    result = llm.generate(prompt, max_new_tokens=100, ignore_eos=True)
    assert result.finish_reason == "length" and len(result.token_ids) == 4
    last = llm.generate(list(range(3, 3 + CONTEXT - 1)), max_new_tokens=100, ignore_eos=True)
    assert len(last.token_ids) == 1


def test_prompt_longer_than_context(llm: LLM) -> None:
    with pytest.raises(ContextLengthError, match=rf"prompt has 70 tokens but the context holds {CONTEXT}"):
        llm.generate(list(range(3, 73)), max_new_tokens=1)
    with pytest.raises(ContextLengthError, match=rf"{CONTEXT} tokens but the context holds {CONTEXT}"):
        llm.generate(list(range(3, 3 + CONTEXT)), max_new_tokens=1)


def test_logit_bias_forces_and_bans_tokens(llm: LLM, greedy) -> None:
    first = greedy[0][0]
    assert llm.generate(PROMPT, max_new_tokens=4, ignore_eos=True, logit_bias={77: 100}).token_ids == [77] * 4
    banned = llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True, logit_bias={first: -100}).token_ids
    assert first not in banned and banned != greedy[0][:8]
    with pytest.raises(ValueError, match=rf"keys must be token ids \(integers in \[0, {VOCAB}\)\), got {VOCAB}"):
        llm.generate(PROMPT, logit_bias={VOCAB: 1.0})


@pytest.mark.parametrize("bad", [VOCAB, -1, 10**9])
def test_out_of_range_prompt_ids(llm: LLM, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad} is out of range for a vocabulary of {VOCAB}"):
        llm.generate([5, bad, 6], max_new_tokens=1)


@pytest.mark.parametrize("prompt", [[], ""])
def test_empty_prompt(llm: LLM, prompt) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(prompt, max_new_tokens=1)


def test_prompt_of_the_wrong_type(llm: LLM) -> None:
    with pytest.raises(TypeError, match="prompt must be"):
        llm.generate([1.5, 2.0], max_new_tokens=1)


@pytest.mark.parametrize("settings,field", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                            ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
                                            ({"presence_penalty": 3.0}, "presence_penalty"),
                                            ({"max_new_tokens": -1}, "max_new_tokens"),
                                            ({"prefill_chunk": 0}, "prefill_chunk"), ({"stop": [""]}, "stop")])
def test_bad_generation_settings(llm: LLM, settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate(PROMPT, **settings)


def test_closing_a_stream_early_releases_the_engine(llm: LLM, greedy) -> None:
    stream = llm.stream(PROMPT, max_new_tokens=30, ignore_eos=True)
    first = next(stream)
    assert first.token_ids == greedy[0][:1] and first.result is None
    stream.close()
    assert not llm._lock.locked()
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids == greedy[0]


class CancelAfter:
    """A cancel callback that says stop from its n-th poll on, counting its polls."""

    def __init__(self, n: int) -> None:
        self.n, self.polls = n, 0

    def __call__(self) -> bool:
        self.polls += 1
        return self.polls >= self.n


def test_cancel_stops_a_long_prefill_between_chunks(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 50-token prompt in 5-token chunks: the callback is polled before chunk 2, 3, ... and
    stops the prefill after three chunks; the stream ends with finish_reason "cancelled"."""
    forwards = []
    real = llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda *a, **kw: forwards.append(a[0].numel()) or real(*a, **kw))
    prompt = [5 + i % 50 for i in range(50)]
    cancel = CancelAfter(3)
    events = list(llm.stream(prompt, max_new_tokens=5, ignore_eos=True, prefill_chunk=5, cancel=cancel))
    assert forwards == [5, 5, 5] and cancel.polls == 3
    assert len(events) == 1 and events[0].result.finish_reason == "cancelled" and events[0].result.token_ids == []
    assert not llm._lock.locked()
    forwards.clear()
    assert llm.generate(prompt, max_new_tokens=2, ignore_eos=True, prefill_chunk=5).finish_reason == "length"
    assert forwards[:10] == [5] * 10  # the next request runs normally


def test_cancel_stops_decoding_between_steps(llm: LLM, greedy) -> None:
    result = llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, cancel=CancelAfter(4))
    # Polled before steps 2, 3, 4 (the first token comes from the prefill): four tokens, then stop.
    assert result.finish_reason == "cancelled" and result.token_ids == greedy[0][:4]
    never = llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, cancel=lambda: False)
    assert never.finish_reason == "length" and never.token_ids == greedy[0]


def test_chat_messages_are_templated(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = llm.encode(messages)
    assert ids == llm.tokenizer.encode("<system>Be brief.\n<user>Hi\n<assistant>", add_special_tokens=False)
    assert llm.encode("Hi", chat=True) == llm.tokenizer.encode("<user>Hi\n<assistant>", add_special_tokens=False)
    assert llm.generate(messages, max_new_tokens=5, ignore_eos=True).token_ids == \
        llm.generate(ids, max_new_tokens=5, ignore_eos=True).token_ids
    with pytest.raises(ValueError, match="message 1"):
        llm.encode([{"role": "user", "content": "Hi"}, {"role": "user", "content": 3}])


def test_token_id_prompts_work_without_a_tokenizer(tmp_path: Path) -> None:
    d = write_tiny_hf_model(tmp_path / "bare", "llama", seed=0)
    bare = LLM(load_model(d, device="cpu", dtype=torch.float32, max_context=CONTEXT, with_tokenizer=False))
    result = bare.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True)
    assert len(result.token_ids) == 4 and result.text == ""
    with pytest.raises(ValueError, match="without a tokenizer"):
        bare.generate("text", max_new_tokens=1)


def test_demo_chat_with_a_stop_string(demo_llm: LLM) -> None:
    """The real model and chat template: stop at the second word of the greedy answer."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = demo_llm.generate(messages, max_new_tokens=8)
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = " " + words[1]
    text, result = streamed(demo_llm, messages, max_new_tokens=8, stop=[stop])
    assert result.finish_reason == "stop"
    assert text == result.text == full.text[: full.text.find(stop)]


@pytest.mark.parametrize("mode", ["greedy", "sampling", "speculative greedy", "speculative sampling"])
def test_nan_logits_raise_a_numerical_error(tmp_path: Path, mode: str) -> None:
    """A model whose logits turn NaN (fp16 overflow, corrupt weights) stops with NumericalError
    instead of returning the token argmax or sampling would pick from garbage."""
    from edgespec import NumericalError
    from edgespec.spec import enable_speculation
    from edgespec.spec.train_head import random_head

    directory = write_tiny_hf_model(tmp_path / "m", "llama", seed=1, vocab_size=50)
    llm = LLM(load_model(str(directory), device="cpu", dtype=torch.float32, with_tokenizer=False, max_context=128))
    settings = {"max_new_tokens": 8, "ignore_eos": True}
    if "sampling" in mode:
        settings.update(temperature=0.8, seed=1)
    if "speculative" in mode:
        enable_speculation(llm, draft=str(random_head(llm.model.config, tmp_path / "head", seed=0)), tree_size=6)
    assert len(llm.generate([1, 5, 9], **settings).token_ids) == 8
    # NaN in one hidden unit of the final norm: every logit of every position becomes NaN.
    llm.model.final_norm[3] = float("nan")
    with pytest.raises(NumericalError, match="non-finite logits"):
        llm.generate([1, 5, 9], **settings)
