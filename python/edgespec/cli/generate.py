"""`edgespec generate` (one prompt) and `edgespec chat` (an interactive conversation)."""
from __future__ import annotations

import argparse
import json
import sys

from ..engine import LLM, GenerationResult
from ..loading.tokenizer import check_template_variables
from .common import add_model_options, add_sampling_options, generation_config, load_llm


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate a completion for one prompt, streamed to stdout")
    add_model_options(g)
    add_sampling_options(g)
    g.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stats", action="store_true", help="print a final JSON line with speed and token counts")
    _add_template_variables(g)
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="an interactive chat in the terminal (empty line or Ctrl-D ends it)")
    add_model_options(c)
    add_sampling_options(c)
    c.add_argument("--system", default=None, help="a system message")
    c.add_argument("--stats", action="store_true", help="print a JSON line with speed after each reply")
    _add_template_variables(c)
    c.set_defaults(func=run_chat)


def _template_variables(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    try:
        return check_template_variables(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_template_variables(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template-kwargs", metavar="JSON", type=_template_variables, default=None,
                   help='more variables for the chat template, e.g. \'{"enable_thinking": false}\' for Qwen3')


def _stream(llm: LLM, prompt, args: argparse.Namespace, chat: bool) -> GenerationResult:
    if chat or not isinstance(prompt, str):  # chat messages, rendered with the template's variables
        prompt, chat = llm.encode(prompt, chat=True, template_kwargs=args.chat_template_kwargs), False
    result = None
    for event in llm.stream(prompt, generation_config(args), chat=chat):
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event.result or result
    sys.stdout.write("\n")
    s = result.stats
    print(f"[prefill {s.prefill_tokens_per_s:.1f} tok/s, decode {s.decode_tokens_per_s:.1f} tok/s, "
          f"{s.new_tokens} new tokens, {result.finish_reason}]", file=sys.stderr)
    if args.stats:
        print(json.dumps(s.as_dict()))
    sys.stdout.flush()
    return result


def run_generate(args: argparse.Namespace) -> int:
    generation_config(args)  # bad settings fail before the model loads, not seconds after
    if args.chat_template_kwargs and not args.chat:
        raise ValueError("--chat-template-kwargs needs --chat")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = load_llm(args)
    _stream(llm, prompt, args, chat=args.chat)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    generation_config(args)  # bad settings fail before the model loads
    llm = load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        result = _stream(llm, messages, args, chat=True)
        messages.append({"role": "assistant", "content": result.text})
