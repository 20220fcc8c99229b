"""Tokenizers and chat templates, through Hugging Face `transformers`/`tokenizers` (never hand-written)."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..errors import ModelFormatError

# Names apply_chat_template gives meaning itself: never taken from a request's template variables.
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "chat_template", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def check_template_variables(variables: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of extra chat-template variables (ValueError for a name that is not an identifier or
    that apply_chat_template gives meaning itself)."""
    variables = dict(variables or {})
    bad = sorted(k for k in variables if not isinstance(k, str) or not k.isidentifier())
    taken = sorted(set(variables) & RESERVED_TEMPLATE_VARIABLES)
    if bad or taken:
        raise ValueError(f"chat template variables must be identifiers other than the template's own "
                         f"({', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))}), got {bad + taken}")
    return variables


class Tokenizer:
    """Text <-> ids, the chat template and the stop tokens of one model."""

    def __init__(self, hf: Any, stop_token_ids: Sequence[int], source: str) -> None:
        self.hf = hf
        self.source = source
        ids = set(int(i) for i in stop_token_ids)
        if hf.eos_token_id is not None:
            ids.add(int(hf.eos_token_id))
        self.stop_token_ids = frozenset(ids)
        # llguidance's view of this tokenizer, built by the first structured output (edgespec.structured).
        self.grammar_tokenizer: Any = None

    @classmethod
    def from_pretrained(cls, directory: str | Path, gguf_file: str | None = None,
                        extra_stop_ids: Sequence[int] = ()) -> "Tokenizer":
        """Tokenizer of a model directory (tokenizer.json etc.) or of a GGUF file's metadata."""
        from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import, only when loading

        source = str(Path(directory) / gguf_file) if gguf_file else str(directory)
        # transformers logs a warning per GGUF field it ignores; they are not actionable here.
        logging.getLogger("transformers").setLevel(logging.ERROR)
        cached = _converted_cache(Path(source)) if gguf_file else None
        try:
            if cached is not None and (cached / "tokenizer_config.json").exists():
                hf = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            else:
                hf = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file, local_files_only=True)
                if cached is not None:
                    _save_quietly(hf, cached)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
            raise ModelFormatError(f"{source}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from None
        return cls(hf, extra_stop_ids, source)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of `messages` ([{"role": ..., "content": ...}], plus whatever else the template
        reads: an assistant's "tool_calls" or "reasoning_content", a tool reply's "tool_call_id")
        rendered with the model's template; `tools` (OpenAI's function definitions) are passed to
        the template, which must render them; `template_kwargs` are further variables the template
        reads (Qwen3's enable_thinking, as vLLM's chat_template_kwargs)."""
        text = self.render_chat(messages, add_generation_prompt, tools, template_kwargs)
        # The template already contains the special tokens it needs.
        return self.encode(text, add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        """The text apply_chat_template tokenises."""
        if not self.has_chat_template:
            raise ModelFormatError(f"{self.source}: the tokenizer has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be an object with string 'role' and 'content', got {m!r}")
        if tools is not None and not self.renders_tools:
            raise ValueError("this model's chat template does not render tools, so the model would never see them "
                             "(give the server a template that does: --chat-template)")
        extra = check_template_variables(template_kwargs)
        if tools is not None:
            extra["tools"] = tools
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                           **extra)

    def generation_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                          template_kwargs: dict[str, Any] | None = None) -> str:
        """The text the template appends to open the assistant's reply (what add_generation_prompt
        adds), apart from anything the conversation itself says; the whole rendering where the one
        without it is not a prefix of the one with it."""
        full = self.render_chat(messages, True, tools, template_kwargs)
        return _opening(full, self.render_chat(messages, False, tools, template_kwargs))

    def chat_ids_and_opening(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                             template_kwargs: dict[str, Any] | None = None) -> tuple[list[int], str]:
        """(apply_chat_template's ids, generation_prompt's text) from two renderings, not three."""
        full = self.render_chat(messages, True, tools, template_kwargs)
        opening = _opening(full, self.render_chat(messages, False, tools, template_kwargs))
        return self.encode(full, add_special_tokens=False), opening

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template reads the `tools` variable (offered tools reach the prompt)."""
        from ..tool_calls import template_renders_tools  # noqa: PLC0415

        return template_renders_tools(self.hf.chat_template if self.has_chat_template else None)

    def set_chat_template(self, template: str) -> None:
        """Replace the model's chat template (Jinja text, as in tokenizer_config.json). It must
        render a one-message conversation; if not, the ValueError says why and the old one stays."""
        import jinja2  # noqa: PLC0415

        old = getattr(self.hf, "chat_template", None)
        self.hf.chat_template = template
        try:
            self.hf.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        tokenize=False)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
            self.hf.chat_template = old
            raise ValueError(f"the chat template cannot render a user message ({type(exc).__name__}: {exc})") from None


def _converted_cache(gguf_path: Path) -> Path | None:
    """Where the tokenizer converted from a GGUF file is kept: converting takes seconds, loading the
    saved tokenizer.json a fraction of that. Keyed by the file's path, size and mtime."""
    from .demo import cache_dir  # noqa: PLC0415

    try:
        st = gguf_path.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_dir() / "tokenizers" / key


def _save_quietly(hf: Any, directory: Path) -> None:
    # The cache is an optimisation: a read-only or full disk must not stop the model from loading.
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    try:
        hf.save_pretrained(str(tmp))
        tmp.replace(directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, correct across multi-byte characters and
    tokenizers whose pieces depend on their neighbours, in O(new tokens) per call."""

    # Tokens held back while the text ends in an incomplete character: a UTF-8 character spans at
    # most 4 byte tokens, so past twice that the bytes will not form one and are released as U+FFFD.
    MAX_HELD = 8

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded for context
        self._read = 0    # ids before this are already emitted as text

    def add(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        # A trailing U+FFFD usually means a multi-byte character is still incomplete: wait for the
        # next token. Bytes that never form a character (random output) are released after
        # MAX_HELD tokens so the re-decoded window, and the cost per call, stays bounded.
        complete = not after.endswith("\ufffd") or len(self.ids) - self._read >= self.MAX_HELD
        if len(after) > len(before) and complete:
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""


def _opening(full: str, bare: str) -> str:
    """What a rendering with the generation prompt adds to the one without it (all of it where the
    one without is not its prefix)."""
    return full[len(bare):] if full.startswith(bare) else full
