"""`python -m edgespec generate|chat` in a subprocess: streamed text equal to the Python API's
output for the same settings, the --stats JSON line, stdin-driven chat, and one-line errors with
exit code 1 (never a traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edgespec
from edgespec import LLM
from edgespec.loading import load_model
from test_engine import write_tiny_chat_model

REPO_PYTHON = Path(__file__).resolve().parents[1] / "python"
STATS_KEYS = {"prefill_tokens_per_s", "decode_tokens_per_s", "new_tokens", "prompt_tokens"}


def cli_env() -> dict[str, str]:
    """The environment for the subprocess: when edgespec is imported from this checkout rather
    than installed, put the checkout's python/ directory on PYTHONPATH."""
    env = dict(os.environ)
    if Path(edgespec.__file__).resolve().is_relative_to(REPO_PYTHON):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_PYTHON), env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec", *args], input=stdin, capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def split_replies(stdout: str) -> list[tuple[str, dict]]:
    """stdout of --stats runs -> [(reply text, stats dict)]: each reply is its streamed text, a
    newline, then one JSON line."""
    replies, text = [], []
    for line in stdout.split("\n"):
        if line.startswith("{") and line.endswith("}"):
            replies.append(("\n".join(text), json.loads(line)))
            text = []
        else:
            text.append(line)
    assert text == [""], f"output after the last stats line: {text!r}"
    return replies


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("cli-tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir: Path) -> LLM:
    # The CLI's defaults: the model's own context, no ignore_eos.
    return LLM(load_model(tiny_dir, device="cpu", dtype=torch.float32))


def test_generate_streams_the_api_text_and_stats(tiny_dir: Path, tiny_llm: LLM) -> None:
    proc = run_cli("generate", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32",
                   "--max-new-tokens", "12", "--stats", "The quick brown fox")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    [(text, stats)] = split_replies(proc.stdout)
    expected = tiny_llm.generate("The quick brown fox", max_new_tokens=12)
    assert text == expected.text
    assert STATS_KEYS <= stats.keys()
    assert stats["new_tokens"] == len(expected.token_ids) and stats["prompt_tokens"] == len("The quick brown fox")
    assert stats["decode_tokens_per_s"] > 0 and stats["prefill_tokens_per_s"] > 0
    assert f"{stats['new_tokens']} new tokens, {expected.finish_reason}]" in proc.stderr


def test_generate_reads_the_prompt_from_stdin(tiny_dir: Path, tiny_llm: LLM) -> None:
    proc = run_cli("generate", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32",
                   "--max-new-tokens", "5", "--temperature", "0.9", "--seed", "3", stdin="Hello there")
    assert proc.returncode == 0, proc.stderr
    expected = tiny_llm.generate("Hello there", max_new_tokens=5, temperature=0.9, seed=3)
    assert proc.stdout == expected.text + "\n"


def test_chat_reads_turns_from_stdin(tiny_dir: Path, tiny_llm: LLM) -> None:
    proc = run_cli("chat", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "6",
                   "--system", "Be brief.", "--stats", stdin="hi\nhow are you\n\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    replies = split_replies(proc.stdout)
    assert len(replies) == 2  # the empty line ends the conversation
    messages = [{"role": "system", "content": "Be brief."}]
    for (text, stats), user in zip(replies, ["hi", "how are you"]):
        messages.append({"role": "user", "content": user})
        expected = tiny_llm.generate(messages, max_new_tokens=6)
        assert text == expected.text
        assert stats["new_tokens"] == len(expected.token_ids)
        messages.append({"role": "assistant", "content": expected.text})
    # The second turn's prompt contains the whole conversation so far.
    assert replies[1][1]["prompt_tokens"] == len(tiny_llm.encode(messages[:-1]))


@pytest.mark.slow
def test_generate_demo_gguf_chat(demo_gguf: Path, demo_llm: LLM) -> None:
    prompt = "What is the capital of France?"
    proc = run_cli("generate", "--model", str(demo_gguf), "--device", "cpu", "--dtype", "fp32", "--max-context",
                   "2048", "--max-new-tokens", "8", "--chat", "--stats", prompt)
    assert proc.returncode == 0, proc.stderr
    [(text, stats)] = split_replies(proc.stdout)
    assert text == demo_llm.generate(prompt, chat=True, max_new_tokens=8).text
    assert STATS_KEYS <= stats.keys()


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgespec: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_model_path_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = run_cli("generate", "--model", str(missing), "--device", "cpu", "hi")
    _assert_one_line_error(proc, str(missing), "not found")
    assert proc.stdout == ""


@pytest.mark.parametrize("command,option,message", [
    ("generate", "--top-p=0", "top_p must be in (0, 1], got 0.0"), ("chat", "--top-p=0", "top_p must be in"),
    ("generate", "--min-p=2", "min_p must be in [0, 1]"),
    ("generate", "--repetition-penalty=0", "repetition_penalty must be a positive number"),
    ("chat", "--frequency-penalty=-3", "frequency_penalty must be in [-2, 2]"),
    ("generate", "--logit-bias=5", "--logit-bias takes TOKEN=BIAS (a token id and a number), got '5'"),
    ("generate", "--logit-bias=5=x", "--logit-bias takes TOKEN=BIAS"),
    ("chat", "--logit-bias=7=150", "the bias of token 7 must be a number in [-100, 100], got 150.0")])
def test_bad_sampling_settings_fail_before_the_model_loads(tmp_path: Path, command: str, option: str,
                                                           message: str) -> None:
    # The model path does not exist either: the error names the setting, so no load was tried.
    proc = run_cli(command, "--model", str(tmp_path / "no-such-model"), "--device", "cpu", option,
                   *(["hi"] if command == "generate" else []), stdin="hi\n")
    _assert_one_line_error(proc, message)


def test_unsupported_model_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    proc = run_cli("chat", "--model", str(tmp_path), "--device", "cpu", stdin="hi\n")
    _assert_one_line_error(proc, "model_type 'gpt2'", "not supported")


def test_chat_template_option(tmp_path: Path, tiny_dir: Path, tiny_llm: LLM) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<|im_start|> system : be brief <|im_end|> <|im_start|> "
                        "{{ m['role'] }} : {{ m['content'] }} <|im_end|> {% endfor %}<|im_start|> assistant :")
    proc = run_cli("generate", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "6",
                   "--chat", "--chat-template", str(template), "--stats", "hello world")
    assert proc.returncode == 0, proc.stderr
    [(text, stats)] = split_replies(proc.stdout)
    own = tiny_llm.tokenizer.hf.chat_template
    try:
        tiny_llm.tokenizer.set_chat_template(template.read_text())
        expected = tiny_llm.generate("hello world", chat=True, max_new_tokens=6)
        assert stats["prompt_tokens"] == len(tiny_llm.encode("hello world", chat=True))
    finally:
        tiny_llm.tokenizer.hf.chat_template = own
    assert text == expected.text and stats["prompt_tokens"] != len(tiny_llm.encode("hello world", chat=True))
    # A missing file fails before the model loads; a template that cannot render fails after.
    proc = run_cli("generate", "--model", str(tmp_path / "no-such-model"), "--chat-template", str(tmp_path / "nope"), "hi")
    _assert_one_line_error(proc, "--chat-template: cannot read")
    template.write_text("{% for m in messages %}")
    proc = run_cli("generate", "--model", str(tiny_dir), "--device", "cpu", "--chat-template", str(template), "hi")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # after the loading progress bar:
    assert proc.stderr.strip().splitlines()[-1].split("\r")[-1].lstrip().startswith(
        "edgespec: error: the chat template cannot render a user message"), proc.stderr


def test_chat_template_kwargs_option(tmp_path: Path, tiny_dir: Path, tiny_llm: LLM) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                        "{% if brief %}be brief {% endif %}assistant:")
    command = ("generate", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "2",
               "--chat", "--chat-template", str(template), "--stats", "hello world")
    counts = []
    for extra in ([], ["--chat-template-kwargs", '{"brief": true}']):
        proc = run_cli(*command, *extra)
        assert proc.returncode == 0, proc.stderr
        [(_, stats)] = split_replies(proc.stdout)
        counts.append(stats["prompt_tokens"])
    own = tiny_llm.tokenizer.hf.chat_template
    try:
        tiny_llm.tokenizer.set_chat_template(template.read_text())
        assert counts == [len(tiny_llm.encode("hello world", chat=True)),
                          len(tiny_llm.encode("hello world", chat=True, template_kwargs={"brief": True}))]
    finally:
        tiny_llm.tokenizer.hf.chat_template = own
    assert counts[0] < counts[1]
    # Refused before the model loads (the path does not exist).
    missing = str(tmp_path / "no-such-model")
    proc = run_cli("generate", "--model", missing, "--chat", "--chat-template-kwargs", '{"tools": []}', "hi")
    assert proc.returncode == 2 and "chat template variables must be identifiers" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("generate", "--model", missing, "--chat-template-kwargs", '{"brief": true}', "hi")
    _assert_one_line_error(proc, "--chat-template-kwargs needs --chat")


@pytest.mark.slow
@pytest.mark.parametrize("option,layer", [("4bit", "QuantLinear"), ("dense", "DenseLinear"), ("auto", "QuantLinear")])
def test_gguf_weights_option_chooses_the_layers(demo_gguf: Path, option: str, layer: str) -> None:
    """--gguf-weights reaches the loader: the demo's Q4_1 projections stay 4-bit or become dense
    (auto, in bf16 on the CPU: 4-bit, torch's int4 kernel runs them)."""
    from edgespec.cli import build_parser
    from edgespec.cli.common import load_llm
    from edgespec.ops import w4a16_cpu

    if option == "auto" and not w4a16_cpu.available():
        pytest.skip("this torch has no CPU int4 kernel")
    args = build_parser().parse_args(["generate", "--model", str(demo_gguf), "--device", "cpu", "--dtype", "bf16",
                                      "--max-context", "256", "--no-draft", "--gguf-weights", option, "hi"])
    assert type(load_llm(args).model.layers[0].qkv).__name__ == layer
