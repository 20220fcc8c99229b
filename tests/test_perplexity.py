"""Perplexity (edgespec.perplexity, `edgespec perplexity`): the window plan's coverage, the value against
transformers scoring the same windows the way Hugging Face's perplexity guide does, bad settings,
and the command line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from edgespec import LLM
from edgespec.cli import main
from edgespec.loading import load_model
from edgespec.perplexity import perplexity, window_plan
from test_engine import write_tiny_chat_model

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


@pytest.mark.parametrize("n, window, stride", [(2, 2, 1), (50, 16, 8), (50, 16, 16), (50, 10, 3), (17, 64, 32),
                                              (100, 7, 1)])
def test_window_plan_scores_each_token_once_with_its_context(n, window, stride) -> None:
    plan = window_plan(n, window, stride)
    scored = [pos for _, end, first in plan for pos in range(first, end)]
    assert len(scored) == len(set(scored)) and scored == sorted(scored)
    skipped = set(range(1, n)) - set(scored)
    assert all(any(pos == begin for begin, _, _ in plan) for pos in skipped)  # only window starts go unscored
    assert skipped == set() if stride < window else True
    for begin, end, first in plan:
        assert 0 < end - begin <= window and begin < first <= end
        if stride < window:  # every scored token sees window - stride tokens before it (or all there are)
            assert first - begin >= min(first, window - stride)
    assert plan[-1][1] == n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    d = write_tiny_chat_model(tmp_path_factory.mktemp("tiny-ppl"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    return LLM(load_model(d, device="cpu", dtype=torch.float32, max_context=64)), hf, d


def hf_perplexity(hf, ids: list[int], window: int, stride: int) -> float:
    """The sliding-window loop of Hugging Face's perplexity guide: each window's labels mask all but
    the tokens no earlier window scored (and the model never predicts a window's first token)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        window_ids = torch.tensor([ids[begin:end]])
        labels = window_ids.clone()
        labels[:, :-(end - prev_end)] = -100
        labels[:, 0] = -100
        with torch.no_grad():
            logits = hf(window_ids).logits[0, :-1].double()
        mask = labels[0, 1:] != -100
        nll += torch.nn.functional.cross_entropy(logits[mask], labels[0, 1:][mask], reduction="sum").item()
        count += int(mask.sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("window, stride", [(64, 64), (64, 20), (16, 8), (16, 16), (10, 3)])
def test_perplexity_equals_transformers_sliding_windows(tiny, window, stride) -> None:
    llm, hf, _ = tiny
    ids = llm.encode(TEXT)
    assert len(ids) > window  # several windows
    result = perplexity(llm, TEXT, window=window, stride=stride)
    assert result.text_tokens == len(ids) and result.windows > 1
    assert math.isclose(result.perplexity, hf_perplexity(hf, ids, window, stride), rel_tol=1e-4)


def test_one_window_is_the_cross_entropy_of_the_text(tiny) -> None:
    llm, hf, _ = tiny
    ids = llm.encode(TEXT)[:40]
    result = perplexity(llm, ids, window=64)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    assert math.isclose(result.nll, torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item(),
                        rel_tol=1e-5)
    assert result.tokens == len(ids) - 1 and result.windows == 1


def test_a_window_may_fill_the_context(tiny) -> None:
    llm, hf, _ = tiny
    ids = (llm.encode(TEXT) * 2)[:64]
    assert len(ids) == llm.max_context
    assert math.isclose(perplexity(llm, ids, window=64).perplexity, hf_perplexity(hf, ids, 64, 64), rel_tol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 65}, r"the window must hold 2 to 64 tokens"), ({"window": 1}, r"the window must hold 2 to 64"),
    ({"window": 8, "stride": 9}, r"the stride must be 1 to 8 tokens"), ({"stride": 0}, r"the stride must be 1"),
    ({"max_tokens": 1}, r"max_tokens must be at least 2"),
])
def test_bad_settings(tiny, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        perplexity(tiny[0], TEXT, **kwargs)


def test_a_one_token_text_is_refused(tiny) -> None:
    with pytest.raises(ValueError, match=r"the text has 1 token\(s\)"):
        perplexity(tiny[0], [5])


def test_command_line(tiny, tmp_path, capsys) -> None:
    llm, _, model_dir = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ["perplexity", "--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--max-context", "64"]
    assert main(args + [str(text), "--window", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = perplexity(llm, TEXT, window=16)
    assert out["perplexity"] == round(want.perplexity, 4) and out["tokens"] == want.tokens and out["stride"] == 8
    assert main(args + [str(text), "--window", "16", "--stride", "4", "--max-tokens", "30"]) == 0
    want = perplexity(llm, TEXT, window=16, stride=4, max_tokens=30)
    assert capsys.readouterr().out.startswith(f"perplexity {want.perplexity:.4f} over {want.tokens} tokens")
    assert main(args + [str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: cannot read UTF-8 text" in capsys.readouterr().err
    assert main(["perplexity", "--model", "does-not-matter", str(text), "--window", "0"]) == 1
    assert "--window must be positive, got 0" in capsys.readouterr().err  # refused before any load
    assert main(args + [str(text), "--window", "65"]) == 1
    assert "the window must hold 2 to 64 tokens" in capsys.readouterr().err
