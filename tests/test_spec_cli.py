"""The speculative-decoding command line: generate/chat options, --stats, build-vocab, train-draft."""
from __future__ import annotations

import json

import pytest
import torch

from edgespec.cli import main
from edgespec.spec import load_eagle_head, load_vocab
from edgespec.spec.self_prompts import cached_user_prompts
from edgespec.spec.train import load_sequences
from test_spec_helpers import one_thread  # noqa: F401 (autouse fixture)



def stats_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_generate_with_draft_options_and_stats(demo_gguf, tmp_path, capsys):
    from edgespec.spec.train_head import random_head
    from edgespec.loading import GGUFSource

    head = random_head(GGUFSource(demo_gguf).config, tmp_path / "head", seed=0)
    common = ["generate", "--model", str(demo_gguf), "--dtype", "fp32", "--max-context", "256",
              "--max-new-tokens", "6", "--stats", "The capital of France is"]
    assert main(common + ["--draft", str(head), "--tree-size", "6", "--depth", "3", "--topk", "2",
                          "--frspec-vocab", "none"]) == 0
    spec = stats_line(capsys.readouterr().out)
    assert spec["draft"] == "eagle:head" and (spec["tree_size"], spec["depth"], spec["topk"]) == (6, 3, 2)
    assert spec["mean_accepted_length"] >= 1.0 and sum(spec["acceptance_histogram"].values()) == spec["steps"]
    assert main(common + ["--no-draft"]) == 0
    plain = stats_line(capsys.readouterr().out)
    assert "mean_accepted_length" not in plain and plain["new_tokens"] == spec["new_tokens"] == 6


def test_generate_with_prompt_lookup(demo_gguf, capsys):
    common = ["generate", "--model", str(demo_gguf), "--max-context", "256", "--max-new-tokens", "12", "--stats",
              "--chat", "Repeat exactly: red green blue red green blue red green blue"]
    assert main(common + ["--draft", "ngram", "--tree-size", "5"]) == 0
    out = capsys.readouterr().out
    spec = stats_line(out)
    assert spec["draft"] == "ngram:1-4" and spec["tree_size"] == 5 and spec["mean_accepted_length"] > 1.0
    assert main(common + ["--no-draft"]) == 0
    plain = capsys.readouterr().out
    assert plain.splitlines()[:-1] == out.splitlines()[:-1]  # the same text


def test_generate_with_a_lookup_chain(demo_gguf, capsys):
    from edgespec.spec import DEMO_HEAD

    common = ["generate", "--model", str(demo_gguf), "--max-context", "256", "--max-new-tokens", "12", "--stats",
              "--chat", "Repeat exactly: red green blue red green blue red green blue"]
    assert main(common + ["--draft", str(DEMO_HEAD), "--lookup", "4"]) == 0
    out = capsys.readouterr().out
    spec = stats_line(out)
    assert spec["draft"].startswith("eagle") and spec["lookup"] == 4 and spec["lookup_accepted_tokens"] >= 0
    assert main(common + ["--no-draft"]) == 0
    assert capsys.readouterr().out.splitlines()[:-1] == out.splitlines()[:-1]  # the same text


def test_contradicting_or_incomplete_options(demo_gguf, capsys):
    base = ["generate", "--model", str(demo_gguf), "--max-context", "64", "--max-new-tokens", "1", "x"]
    with pytest.raises(SystemExit) as exc:  # rejected by the parser, before any model is loaded
        main(base + ["--draft", "somewhere", "--no-draft"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(base + ["--tree-size", "4"]) == 1
    assert "need a draft" in capsys.readouterr().err
    assert main(base + ["--no-draft", "--lookup", "4"]) == 1
    assert "--no-draft turns speculation off" in capsys.readouterr().err
    assert main(base + ["--draft", "ngram", "--lookup", "4"]) == 1
    assert "prompt lookup's already" in capsys.readouterr().err


def test_train_draft_rejects_prompt_files_that_would_share_a_cache_tag(tmp_path, capsys):
    # Checked before any model is loaded: the file names tag the labelled cache.
    files = {n: tmp_path / n for n in ("a/val.txt", "b/val.txt", "self-prompts.txt", "text.txt")}
    for f in files.values():
        f.parent.mkdir(exist_ok=True)
        f.write_text("Name a fruit.\n")
    base = ["train-draft", "--model", "no-such-model", "--data", str(files["text.txt"]), "--out", str(tmp_path / "o")]
    assert main(base + ["--val-prompts", str(files["a/val.txt"]), str(files["b/val.txt"])]) == 1
    assert "--val-prompts files need distinct names" in capsys.readouterr().err
    assert main(base + ["--val-prompts", str(files["self-prompts.txt"])]) == 1
    assert "other than 'self-prompts'" in capsys.readouterr().err
    assert main(base + ["--prompts", str(files["self-prompts.txt"])]) == 1
    assert "prompt files need distinct names" in capsys.readouterr().err
    assert main(base + ["--fuse-layers", "2", "2"]) == 1
    assert "--fuse-layers names a layer twice: [2, 2]" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_uses_the_shipped_head_by_default(demo_gguf, capsys):
    args = ["generate", "--model", "demo", "--max-context", "256", "--max-new-tokens", "8", "--stats", "--chat",
            "Name a fruit."]
    assert main(args) == 0
    s = stats_line(capsys.readouterr().out)
    assert s["draft"].startswith("eagle:smollm2-135m-instruct-eagle") and "+frspec" in s["draft"]


def test_build_vocab(demo_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat.\n\nthe dog sat on the log. the end.\n\n" * 20)
    out = tmp_path / "v.json"
    assert main(["build-vocab", "--model", str(demo_gguf), "--data", str(text), "--size", "12",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    ids = load_vocab(out, 49152).tolist()
    assert len(ids) == 12 and ids[:len(doc["forced_special_ids"])] == doc["forced_special_ids"]
    assert 2 in doc["forced_special_ids"]  # <|im_end|>, SmolLM2's end of turn
    assert doc["coverage"] > 0.5 and doc["source_files"] == ["t.txt"]
    assert main(["build-vocab", "--model", str(demo_gguf), "--data", str(tmp_path / "missing.txt"),
                 "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_train_draft_cli(demo_gguf, demo_llm, tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(("Once upon a time there was a small robot who liked to paint the sea. " * 8 + "\n\n") * 6)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hello."}) + "\n")
    more = tmp_path / "more.txt"
    more.write_text("Name a fruit.\nName a color.\n")
    val = tmp_path / "val.txt"
    val.write_text("Name an animal.\n")
    val2 = tmp_path / "val2.txt"
    val2.write_text("Name a river.\nName a city.\n")
    vocab = tmp_path / "v.json"
    assert main(["build-vocab", "--model", str(demo_gguf), "--data", str(text), "--size", "64",
                 "--out", str(vocab)]) == 0
    out = tmp_path / "head"

    def train(self_prompts: str, steps: str, *extra: str) -> int:
        return main(["train-draft", *extra, "--model", str(demo_gguf), "--dtype", "fp32",
                     "--data", str(text), "--prompts", str(prompts), str(more), "--val-prompts", str(val), str(val2),
                     "--self-prompts", self_prompts, "--val-self-prompts", "1", "--response-tokens", "8",
                     "--text-tokens", "400", "--seq-len", "64", "--steps", steps, "--batch-size", "2",
                     "--checkpoint-every", "2", "--frspec-vocab", str(vocab), "--cache", str(tmp_path / "cache.pt"),
                     "--out", str(out)])

    assert train("2", "3") == 0
    result = stats_line(capsys.readouterr().out)
    assert result["step"] == 3
    cfg = json.loads((out / "config.json").read_text())
    meta = cfg["edgespec_draft"]
    assert meta["frspec_vocab"] == "frspec.json" and meta["data"]["prompts"] == {"p": 1, "more": 2}
    assert meta["data"]["self_prompts"] == 2 and meta["data"]["val_sequences"] == 4
    assert [h["step"] for h in meta["validation"]] == [2, 3] and 0.0 <= result["val_acc1"] <= 1.0
    # the three held-out sets (two files, the self-written one), and pooled
    per_set = [result["val_acc1_val"], result["val_acc1_val2"], result["val_acc1_self-prompts"]]
    assert min(per_set) <= result["val_acc1"] <= max(per_set) and "val_acc1_val" in meta["validation"][-1]
    kinds = sorted({s["kind"] for s in torch.load(tmp_path / "cache.pt", weights_only=True)})
    assert kinds == ["chat:more:0", "chat:p:0", "chat:self-prompts:0", "text", "val:self-prompts", "val:val",
                     "val:val2"]
    assert meta["target"]["hidden_size"] == 576 and (out / "model.safetensors").stat().st_size < 10 << 20
    assert (tmp_path / "cache.pt").exists()
    # A later run asking for more self-written prompts tops the cache up; nothing else is redone,
    # and the held-out prompt already in the cache is excluded from the new training ones.
    capsys.readouterr()
    import edgespec.cli.train_draft as train_draft_cli
    sample = train_draft_cli._sample_prompts
    excluded = []
    monkeypatch.setattr(train_draft_cli, "_sample_prompts",
                        lambda llm, count, args, seed, exclude=(): excluded.append(list(exclude)) or
                        sample(llm, count, args, seed, exclude))
    val_prompt = cached_user_prompts(demo_llm.tokenizer, load_sequences(tmp_path / "cache.pt"),
                                     "val:self-prompts")
    assert train("3", "1") == 0
    assert len(excluded) == 1 and len(val_prompt) == 1 and val_prompt[0] in excluded[0]
    kinds = [s["kind"] for s in torch.load(tmp_path / "cache.pt", weights_only=True)]
    assert kinds.count("chat:self-prompts:0") == 3 and kinds.count("val:self-prompts") == 1
    assert kinds.count("chat:p:0") == 1 and kinds.count("chat:more:0") == 2
    meta = json.loads((out / "config.json").read_text())["edgespec_draft"]
    assert meta["data"]["self_prompts"] == 3 and meta["data"]["val_sequences"] == 4
    # --fuse-layers on the same cache: the cached sequences get the streams of those layers (nothing
    # is generated again) and the plain head above starts the fused one.
    capsys.readouterr()
    import edgespec.spec.train as train_module

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache already holds every answer")

    monkeypatch.setattr(train_module, "generate_responses", no_generation)
    assert train("3", "2", "--fuse-layers", "2", "15", "--init", str(out)) == 0
    cached = load_sequences(tmp_path / "cache.pt")
    assert {s.stream_layers for s in cached} == {(2, 15)} and cached[0].streams.shape[1] == 2 * 576
    meta = json.loads((out / "config.json").read_text())["edgespec_draft"]
    assert meta["fuse_layers"] == [2, 15] and (out / "model.safetensors").stat().st_size < 10 << 20
    assert load_eagle_head(out, demo_llm.model).capture == (30, 2, 15)
