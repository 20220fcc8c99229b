"""Request bodies of the OpenAI-compatible API, validated with pydantic, and their translation into
a prompt plus a GenerationConfig.

Field policy:
* Known fields are type-checked strictly: JSON "5" is not an integer and 1 is not a boolean, so a
  client bug comes back as a 400 that names the field instead of being silently coerced.
* Unknown fields are accepted and ignored (extra="allow"). OpenAI keeps adding optional fields that
  clients send by default (store, metadata, service_tier, parallel_tool_calls, ...) and that do not
  change what this server generates; refusing them would break those clients.
* n > 1 and batches of prompts run their generations one after the other (choices in prompt order,
  n per prompt; seeded choice i uses seed + i); the queue admits all of a request's generations or
  none.
* Structured output (edgespec.structured): response_format json_object / json_schema, or vLLM's
  guided_json, guided_regex and guided_choice; at most one per request.
* Tool calling (edgespec.tool_calls): tools with tool_choice auto, required, none or a named
  function, parallel_tool_calls; assistant messages with tool_calls and "tool" messages in the
  conversation. The legacy functions / function_call are refused (send tools). parallel_tool_calls
  false makes a grammar-enforced reply one call; a free "auto" reply keeps every call it writes.
* Thinking models (edgespec.reasoning): chat_template_kwargs (vLLM's) sets further chat-template
  variables, e.g. {"enable_thinking": false} for Qwen3; replies of a template that teaches <think>
  return that section as message.reasoning_content (streamed: delta.reasoning_content), apart from
  the content; an assistant message's reasoning_content reaches the template.
* Known fields that would change the output but are not implemented (best_of != n, suffix,
  guided_grammar, beam search, ...) are accepted only at their neutral value; anything else is a
  400 naming the parameter.
* Log-probabilities (server/logprobs.py) are the model's raw distribution (ops.token_logprobs):
  chat's logprobs + top_logprobs (0-20), completions' logprobs (0-20 alternatives) and echo, which
  also scores the prompt; max_tokens 0 is allowed with echo (score a text, generate nothing).
* Extensions beyond OpenAI, as in vLLM: top_k (0 or -1 = off), min_p (0 = off), repetition_penalty
  (1 = off), ignore_eos, stop_token_ids. presence_penalty and frequency_penalty count generated
  tokens only, as vLLM does (edgespec.ops.apply_penalties).
* `model` may be any string (clients insist on sending one); responses name the served model.
* /v1/completions takes text, a list of token ids, or a batch (list) of either.
* Defaults follow OpenAI: temperature 1, top_p 1; max_tokens 16 for /v1/completions and "up to the
  server limit / remaining context" for chat. Temperatures in (0, 1e-5) are treated as greedy: the
  sampling distribution is one-hot at such temperatures anyway, and fp32 overflows below ~1e-37.
"""
from __future__ import annotations

import json
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import ops
from ..generation import GenerationConfig
from ..loading.tokenizer import check_template_variables
from ..structured import Grammar
from ..tool_calls import Tool, ToolUse
from .errors import bad_request, from_validation_error, unsupported

GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 4        # as OpenAI
MAX_STOP_CHARS = 256        # the engine rescans each stop string every step; keep that bounded
INT64_MIN, UINT64_END = -(2 ** 63), 2 ** 64  # the range torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: str
    json_schema: JsonSchemaFormat | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(_Strict):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None                  # which call a "tool" message answers
    reasoning_content: str | None = None             # an assistant's reasoning, as a reply returned it


class _SamplingRequest(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=INT64_MIN, lt=UINT64_END)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = Field(None, ge=1)  # generations per prompt (run one after the other)
    # Known but only accepted at their neutral value.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None  # {token id as a string: bias in [-100, 100]}
    response_format: ResponseFormat | None = None  # text, json_object or json_schema (edgespec.structured)
    best_of: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    min_tokens: int | None = None
    use_beam_search: bool | None = None

    def _check_neutral(self) -> None:
        neutral: list[tuple[str, Any, Any]] = [
            ("best_of", self.best_of, (None, self.n or 1)), ("min_tokens", self.min_tokens, (None, 0)),
            ("use_beam_search", self.use_beam_search, (None, False)),
        ]
        for name, value, ok in neutral:
            if value not in ok:
                raise unsupported(name, f"only {ok[1]!r} is implemented, got {value!r}")
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if getattr(self, "guided_grammar", None) is not None:
            raise unsupported("guided_grammar", "grammars are taken as response_format, guided_json, guided_regex "
                                                "or guided_choice")
        if getattr(self, "prompt_logprobs", None) is not None:
            raise unsupported("prompt_logprobs", "send echo with logprobs to /v1/completions for the prompt's")

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
        for s in stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise bad_request(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}",
                                  param="stop")
        return tuple(stop)

    def logprob_settings(self) -> tuple[int | None, int | None]:
        """(GenerationConfig.logprobs, GenerationConfig.prompt_logprobs) this request asks for."""
        raise NotImplementedError

    def grammar(self) -> Grammar | None:
        """The structured-output grammar this request asks for: response_format (json_object,
        json_schema) or vLLM's guided_json / guided_regex / guided_choice, at most one of them."""
        asked = []
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                asked.append(("response_format", Grammar.json()))
            elif fmt.type == "json_schema":
                if fmt.json_schema is None:
                    raise bad_request("response_format of type 'json_schema' needs 'json_schema'",
                                      param="response_format")
                asked.append(("response_format", Grammar.json(fmt.json_schema.schema_)))
            else:
                raise unsupported("response_format", f"types are text, json_object and json_schema, got {fmt.type!r}")
        extra = self.model_extra or {}
        if extra.get("guided_json") is not None:
            asked.append(("guided_json", Grammar.json(extra["guided_json"])))
        if extra.get("guided_regex") is not None:
            asked.append(("guided_regex", Grammar.regex(extra["guided_regex"])))
        if extra.get("guided_choice") is not None:
            choices = extra["guided_choice"]
            asked.append(("guided_choice", Grammar.choice(choices if isinstance(choices, list) else [choices])))
        if len(asked) > 1:
            raise bad_request(f"send one structured-output constraint, got {', '.join(n for n, _ in asked)}",
                              param=asked[1][0])
        if not asked:
            return None
        param, grammar = asked[0]
        try:
            return grammar.validate()
        except ValueError as exc:
            raise bad_request(f"{param}: {exc}", param=param) from None

    def token_biases(self, vocab_size: int) -> dict[int, float]:
        """logit_bias with OpenAI's string keys read as token ids; a bad key or value is a 400."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit():
                raise bad_request(f"logit_bias: keys are token ids written as decimal strings, got {key!r}",
                                  param="logit_bias")
            bias[int(key)] = value
        try:
            ops.validate_logit_bias(bias, vocab_size)
        except ValueError as exc:
            raise bad_request(str(exc), param="logit_bias") from None
        return bias

    def generation_config(self, max_new_tokens: int, vocab_size: int,
                          tool_grammar: Grammar | None = None) -> GenerationConfig:
        """The GenerationConfig this request asks for (max_new_tokens already resolved by the caller;
        tool_grammar: the grammar its tool_choice imposes, which excludes any other constraint)."""
        grammar = self.grammar()
        if tool_grammar is not None and grammar is not None:
            raise bad_request("a structured-output constraint cannot be combined with tool_choice 'required', a named "
                              "function or strict tools", param="tool_choice")
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature < GREEDY_BELOW_TEMPERATURE:
            temperature = 0.0
        stop_ids = list(self.stop_token_ids or [])
        logprobs, prompt_logprobs = self.logprob_settings()
        bias = self.token_biases(vocab_size)
        bad = [i for i in stop_ids if not 0 <= i < vocab_size]
        if bad:
            raise bad_request(f"stop_token_ids: token id {bad[0]} is out of range for a vocabulary of {vocab_size}",
                              param="stop_token_ids")
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=max(0, self.top_k or 0), top_p=1.0 if self.top_p is None else self.top_p,
                                min_p=self.min_p or 0.0,
                                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                                presence_penalty=self.presence_penalty or 0.0,
                                frequency_penalty=self.frequency_penalty or 0.0, logit_bias=bias,
                                seed=self.seed, stop=self.stop_strings(), stop_token_ids=tuple(stop_ids),
                                ignore_eos=self.ignore_eos, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs, grammar=tool_grammar or grammar).validate()


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=ops.MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    function_call: Union[str, dict[str, Any], None] = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template

    def check_supported(self) -> None:
        self._check_neutral()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise unsupported(name, "the legacy function calling is not implemented: send 'tools' (and "
                                        "'tool_choice')")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send one of them",
                              param="max_completion_tokens")

    def tool_use(self) -> ToolUse | None:
        """The tools this request lets the model call and how (None: no tools, or tool_choice "none")."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none", "auto"):
                raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
            return None
        if choice == "none":
            return None
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request("'tool_choice' names a function as {'type': 'function', 'function': {'name': ...}}",
                                  param="tool_choice")
            choice = fn["name"]
        elif choice not in (None, "auto", "required"):
            raise bad_request(f"'tool_choice' is 'none', 'auto', 'required' or a named function, got {choice!r}",
                              param="tool_choice")
        try:
            tools = tuple(Tool.from_openai(t, f"tools.{i}") for i, t in enumerate(self.tools))
            return ToolUse(tools, choice or "auto", self.parallel_tool_calls is not False)
        except ValueError as exc:
            raise bad_request(str(exc), param="tools") from None

    def template_variables(self) -> dict[str, Any] | None:
        """chat_template_kwargs, checked (e.g. {"enable_thinking": false} for Qwen3)."""
        try:
            return check_template_variables(self.chat_template_kwargs) or None
        except ValueError as exc:
            raise bad_request(str(exc), param="chat_template_kwargs") from None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_settings(self) -> tuple[int | None, int | None]:
        return ((self.top_logprobs or 0) if self.logprobs else None), None

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat templates read it: text parts joined, developer mapped to
        system, an assistant's tool_calls with their arguments as objects (what templates expect),
        a tool reply with its tool_call_id and the name of the function it answers."""
        out: list[dict[str, Any]] = []
        called: dict[str, str] = {}  # tool call id -> function name
        for i, m in enumerate(self.messages):
            param = f"messages.{i}"
            if m.role not in ("system", "developer", "user", "assistant", "tool"):
                raise unsupported(f"{param}.role",
                                  f"roles are system, developer, user, assistant and tool, got {m.role!r}")
            if m.tool_calls and m.role != "assistant":
                raise bad_request(f"'{param}.tool_calls' is only allowed in assistant messages",
                                  param=f"{param}.tool_calls")
            if m.content is None and not m.tool_calls:
                raise bad_request(f"'{param}.content' is required", param=f"{param}.content")
            # Many chat templates only know "system"; OpenAI's newer "developer" role means the same.
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                       "content": self._text(m.content, param)}
            if m.reasoning_content is not None:
                if m.role != "assistant":
                    raise bad_request(f"'{param}.reasoning_content' is only allowed in assistant messages",
                                      param=f"{param}.reasoning_content")
                message["reasoning_content"] = m.reasoning_content  # templates that show it read it
            if m.tool_calls:
                message["tool_calls"] = [self._template_call(call, f"{param}.tool_calls.{j}")
                                         for j, call in enumerate(m.tool_calls)]
                called.update((call.id, call.function.name) for call in m.tool_calls)
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise bad_request(f"'{param}.tool_call_id' is required in a tool message",
                                      param=f"{param}.tool_call_id")
                message["tool_call_id"] = m.tool_call_id
                if m.tool_call_id in called:
                    message["name"] = called[m.tool_call_id]
            out.append(message)
        return out

    @staticmethod
    def _text(content: Union[str, list[ContentPart], None], param: str) -> str:
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise unsupported(f"{param}.content.{j}",
                                  f"only text content parts are implemented, got type {part.type!r}")
            texts.append(part.text)
        return "\n".join(texts)

    @staticmethod
    def _template_call(call: ToolCallMessage, param: str) -> dict[str, Any]:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError as exc:
            raise bad_request(f"'{param}.function.arguments' is not JSON text ({exc})",
                              param=f"{param}.function.arguments") from None
        return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=ops.MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        self._check_neutral()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("'max_tokens' must be at least 1 unless 'echo' is true", param="max_tokens")
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix) is not implemented")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_settings(self) -> tuple[int | None, int | None]:
        return self.logprobs, (self.logprobs if self.echo else None)

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request (text or token ids each): one, or a batch, whose choices come
        in prompt order, n per prompt."""
        p = self.prompt
        batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        for one in batch:
            if not one:
                raise bad_request("'prompt' is empty: at least one token is needed", param="prompt")
        return batch


def parse(cls: type[_SamplingRequest], raw: bytes) -> Any:
    """Validate a raw JSON body into `cls`; every failure is a 400 APIError."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "parse"]
