"""tools/sample_chat_prompts.py: the openers file it reads and the prompt file it writes."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from edgespec.spec.train import read_prompts

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool():
    spec = importlib.util.spec_from_file_location("sample_chat_prompts", TOOLS / "sample_chat_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_openers_are_distinct_and_comments_are_skipped():
    openers = _tool().read_openers(TOOLS / "instruction-openers.txt")
    assert len(openers) >= 40 and len(set(openers)) == len(openers)
    assert not any(o.startswith("#") for o in openers)


def test_a_file_without_openers_is_an_error(tmp_path):
    empty = tmp_path / "openers.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no openers"):
        _tool().read_openers(empty)


@pytest.mark.slow
def test_writes_a_prompt_file_train_draft_reads(tmp_path, monkeypatch):
    openers = tmp_path / "openers.txt"
    openers.write_text("Why\nDescribe\n")
    exclude = tmp_path / "held-out.jsonl"
    exclude.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    out = tmp_path / "p.jsonl"
    monkeypatch.setattr(sys, "argv", ["sample_chat_prompts.py", "--model", "demo", "--count", "3", "--batch", "4",
                                      "--max-tokens", "48", "--openers", str(openers), "--exclude", str(exclude),
                                      "--seed", "2", "--out", str(out)])
    assert _tool().main() == 0
    got = read_prompts(out)
    assert 1 <= len(got) <= 3 and all(p.chat and p.text.split()[0] in ("Why", "Describe") for p in got)
    assert "why is the sky blue?" not in {p.text.casefold() for p in got}
