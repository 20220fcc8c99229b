"""The FastAPI application: OpenAI-compatible routes in front of one GenerationWorker.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (OpenAI's Responses
API, generated as a chat: server/responses.py; all three streamed as server-sent events or not),
GET /v1/models, GET /health and GET /metrics (never behind the API key, for load balancers,
probes and Prometheus).

Everything slow happens off the event loop: tokenisation and chat templates in the thread pool,
generation on the worker thread. Requests are validated completely (types, unsupported parameters,
context length, limits) before they are admitted, so a bad request never waits in the queue.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import LLM, GenerationResult, StreamEvent
from ..structured import Grammar
from ..reasoning import REASONING_FORMATS, Reasoning, prompt_opens_thinking, template_thinks
from ..tool_call_stream import ToolCallStream
from ..tool_calls import FORMATS, ToolCallFormat, ToolUse, detect_format
from .errors import APIError, bad_request
from .logprobs import LogprobFormatter
from .metrics import ResponseCounter
from .responses import (ResponseEvents, ResponseObject, function_call_item, message_item, parse_responses_request,
                        reasoning_item, responses_param, status_of)
from .responses import usage as responses_usage
from .schemas import UINT64_END, ChatCompletionRequest, CompletionRequest, parse
from .worker import Cancelled, Failed, Finished, GenerationWorker, Job

logger = logging.getLogger("edgespec.server")


@dataclass
class ServerSettings:
    """Limits and identity of one server. Sizes in bytes, times in seconds."""

    model_name: str
    api_key: str | None = None
    max_queue: int = 64                   # admitted requests at once (running + waiting); more get 429
    max_request_bytes: int = 4 << 20      # larger bodies get 413 before they are parsed
    max_tokens_limit: int = 4096          # the largest max_tokens a request may ask for
    completion_default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    shutdown_timeout: float = 30.0        # grace for in-flight requests on SIGINT/SIGTERM
    tool_call_format: str = "auto"        # how the model writes tool calls (edgespec.tool_calls.FORMATS)
    reasoning_format: str = "auto"        # replies' <think> sections as reasoning_content: "think", "none", "auto"

    def validate(self) -> "ServerSettings":
        for name in ("max_queue", "max_request_bytes", "max_tokens_limit", "completion_default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"server setting {name} must be at least 1, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty (omit it to disable authentication)")
        if self.tool_call_format != "auto" and self.tool_call_format not in FORMATS:
            raise ValueError(f"tool_call_format must be 'auto' or one of {', '.join(FORMATS)}, "
                             f"got {self.tool_call_format!r}")
        if self.reasoning_format not in REASONING_FORMATS:
            raise ValueError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, "
                             f"got {self.reasoning_format!r}")
        return self


def create_app(llm: LLM, settings: ServerSettings) -> FastAPI:
    """The ASGI app serving `llm`. Its worker thread starts and stops with the app's lifespan and is
    available as `app.state.worker` (the uvicorn runner drains it on shutdown)."""
    settings.validate()
    worker = GenerationWorker(llm, settings.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    # No /docs or /openapi.json: they would be unauthenticated and describe nothing a client needs.
    app = FastAPI(title="edgespec", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker
    app.state.settings = settings
    api = _API(llm, settings, worker)

    app.add_exception_handler(APIError, _api_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.add_exception_handler(Exception, _internal_error_response)
    app.add_middleware(ResponseCounter, metrics=worker.metrics)

    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/responses", api.responses, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id:path}", api.stored_response, methods=["GET", "DELETE", "POST"])
    return app


def _tool_finish(finish: str) -> str:
    """finish_reason of a reply that holds tool calls: "tool_calls" when the model ended it."""
    return "tool_calls" if finish == "stop" else finish


async def _api_error_response(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error_response(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
    return await _api_error_response(_, err)


async def _validation_error_response(_: Request, exc: Exception) -> Response:
    return await _api_error_response(_, bad_request(f"invalid request: {exc}"))


async def _internal_error_response(_: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    err = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error")
    return await _api_error_response(_, err)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so the next ASGI
    message can only be the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class _Piece:
    """What one step of a streamed reply adds (_API._pieces): reasoning text, content text and chat
    tool-call deltas; `event` the engine's event it came from; the last piece of a reply carries
    its result and finish reason, or the error that ended it."""

    reasoning: str
    text: str
    calls: list[dict[str, Any]]
    event: StreamEvent | None = None
    result: GenerationResult | None = None
    finish: str | None = None
    error: APIError | Exception | None = None


@dataclass
class _Choice:
    """One generation of a request: its index among the response's choices, the prompt it continues
    (and the text echoed for it), its job and the formatter of its log-probabilities."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    job: Job
    logprobs: LogprobFormatter
    tools: ToolCallStream | None = None  # a chat reply that may hold tool calls
    reasoning: Reasoning | None = None   # a chat reply that may start with a reasoning section


class _API:
    """Route handlers sharing the engine, the settings and the worker."""

    def __init__(self, llm: LLM, settings: ServerSettings, worker: GenerationWorker) -> None:
        self.llm = llm
        self.settings = settings
        self.worker = worker
        self.created = int(time.time())
        self._key = settings.api_key.encode() if settings.api_key else None

    # ---- helpers -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        too_large = APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise bad_request(f"invalid Content-Length header {declared[:40]!r}")
            if int(declared) > limit:
                raise too_large
        body = bytearray()
        async for chunk in request.stream():  # also bounds chunked bodies, which declare no length
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _encode(self, prompt: Any, param: str, tools: list[dict[str, Any]] | None = None,
                      template_kwargs: dict[str, Any] | None = None, opening: bool = False) -> Any:
        """Token ids of text, chat messages (with the tools and variables the template reads) or
        ids, tokenised in the thread pool; opening (chat messages): (ids, the text the template
        opens the reply with), Tokenizer.chat_ids_and_opening."""
        import jinja2  # noqa: PLC0415 - only needed to recognise chat-template errors

        try:
            if opening:
                return await run_in_threadpool(self.llm.tokenizer.chat_ids_and_opening, prompt, tools, template_kwargs)
            return await run_in_threadpool(self.llm.encode, prompt, tools=tools, template_kwargs=template_kwargs)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise bad_request(f"'{param}': {exc}", param=param) from None

    def _max_new_tokens(self, requested: int | None, prompt_len: int, default: int, param: str) -> int:
        context = self.llm.max_context
        room = context - prompt_len
        if room < 1 and not (requested == 0 and room == 0):  # scoring a prompt (echo) may fill the context
            raise bad_request(f"the prompt has {prompt_len} tokens but this model's context holds {context} "
                              f"(at least one position must remain for a new token)", param=param,
                              code="context_length_exceeded")
        limit = self.settings.max_tokens_limit
        if requested is None:
            return min(default, room)
        if requested > limit:
            raise bad_request(f"'max_tokens' is {requested} but this server allows at most {limit}",
                              param="max_tokens", code="invalid_value")
        if requested > room:
            raise bad_request(f"this model's context holds {context} tokens; the prompt has {prompt_len} and "
                              f"max_tokens asks for {requested} more (at most {room} fit)", param="max_tokens",
                              code="context_length_exceeded")
        return requested

    def _thinks(self) -> bool:
        """Whether chat replies may open with a reasoning section to be returned apart."""
        setting = self.settings.reasoning_format
        return setting == "think" or (setting == "auto" and template_thinks(self.llm.tokenizer.hf.chat_template))

    def _tool_format(self) -> ToolCallFormat:
        """How the served model writes tool calls: the configured format, or the one its chat
        template shows."""
        name = self.settings.tool_call_format
        if name != "auto":
            return FORMATS[name]
        tok = self.llm.tokenizer
        fmt = detect_format(tok.hf.chat_template if tok is not None and tok.has_chat_template else None)
        if fmt is None:
            raise bad_request("this model's chat template shows no tool-call format edgespec knows; start the server "
                              f"with --tool-call-format ({', '.join(FORMATS)})", param="tools",
                              code="tool_format_unknown")
        return fmt

    def _admit(self, prompts: list[tuple[list[int], str]], max_new_tokens: list[int],
               req: ChatCompletionRequest | CompletionRequest, tool_grammar: Grammar | None = None,
               tools: tuple[ToolUse, ToolCallFormat] | None = None,
               reasoning: Reasoning | None = None) -> list[_Choice]:
        """Admit the n generations of each prompt (ids, echoed text) at once, or none of them. With
        `reasoning`, a grammar constrains the answer after the reasoning section."""
        n = req.n or 1
        total = n * len(prompts)
        if total > self.worker.capacity:
            raise bad_request(f"the request asks for {total} generations ({len(prompts)} prompt(s), n = {n}) but "
                              f"this server queues at most {self.worker.capacity}", param="n")
        vocab = self.llm.model.config.vocab_size
        try:
            configs = [req.generation_config(m, vocab, tool_grammar) for m in max_new_tokens]
            if reasoning is not None:  # a grammar constrains the answer after the reasoning section
                configs = [c if c.grammar is None else
                           replace(c, grammar=c.grammar.after_reasoning(reasoning.inside).validate()) for c in configs]
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        loop = asyncio.get_running_loop()
        choices = []
        for p, ((ids, text), config) in enumerate(zip(prompts, configs)):
            for i in range(n):
                # Seeded choices differ from each other, and the first is what n = 1 gives.
                seed = config.seed if config.seed is None or i == 0 else (config.seed + i) % UINT64_END
                job = Job(ids, replace(config, seed=seed), loop)
                stream = ToolCallStream(*tools) if tools is not None else None
                choices.append(_Choice(p * n + i, ids, text, job, LogprobFormatter(self.llm.tokenizer), stream,
                                       reasoning))
        self.worker.submit(*[c.job for c in choices])
        return choices

    def _cancel(self, choices: list[_Choice], reason: str) -> None:
        for c in choices:
            self.worker.cancel(c.job, reason)  # a no-op for a finished job

    async def _final(self, job: Job) -> GenerationResult:
        while True:
            event = await job.events.get()
            if isinstance(event, Finished):
                return event.result
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Cancelled):
                raise APIError(503, f"the request was cancelled: {event.reason}", type="server_error",
                               code="cancelled")

    async def _complete(self, request: Request, choices: list[_Choice]) -> list[GenerationResult]:
        """Wait for a non-streamed request's jobs; a client that disconnects meanwhile, or a job that
        fails, cancels the rest."""
        results = asyncio.ensure_future(asyncio.gather(*(self._final(c.job) for c in choices)))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
            if results.done():
                return results.result()
            raise APIError(499, "the client closed the connection", code="client_closed_request")
        finally:
            for task in (results, gone):
                task.cancel()
            # A gather cancelled mid-way ends with a CancelledError that asyncio would log as never
            # retrieved (with a traceback holding the jobs): retrieve it.
            results.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._cancel(choices, "the client went away")

    async def _pieces(self, c: _Choice) -> AsyncIterator[_Piece]:
        """One choice's reply as it streams: its reasoning section first (edgespec.reasoning), then
        its content, which may hold tool calls (edgespec.tool_call_stream says what is sent when);
        the last piece has the result, or the error that ended the job."""
        thinking = c.reasoning.stream() if c.reasoning is not None else None
        while True:
            event = await c.job.events.get()
            if isinstance(event, StreamEvent):
                thought, text = thinking.feed(event.text) if thinking is not None else ("", event.text)
                text, calls = (text, []) if c.tools is None else c.tools.feed(text)
                yield _Piece(thought, text, calls, event=event)
                continue
            if isinstance(event, Finished):
                finish = event.result.finish_reason
                thought, held = thinking.finish() if thinking is not None else ("", "")
                calls = []
                if c.tools is not None:
                    held, calls = c.tools.feed(held)
                    rest, more = c.tools.finish()
                    held, calls = held + rest, calls + more
                    if c.tools.calls:
                        finish = _tool_finish(finish)
                yield _Piece(thought, held, calls, result=event.result, finish=finish)
                return
            yield _Piece("", "", [], error=event.error if isinstance(event, Failed) else APIError(
                503, f"the request was cancelled: {event.reason}", type="server_error", code="cancelled"))
            return

    async def _stream(self, choices: list[_Choice], chunk: Callable[..., dict[str, Any]],
                      opening: Callable[[_Choice], dict[str, Any] | None],
                      usage: Callable[[list[GenerationResult]], dict[str, int]], include_usage: bool,
                      ) -> AsyncIterator[bytes]:
        """Server-sent events of a request's jobs, one choice after the other (the order the worker
        runs them): chunk(choice, text, finish_reason, event=None) builds each event's JSON (an event
        whose text is held back still has a chunk when it carries log-probabilities)."""
        def calls_chunk(c: _Choice, calls: list[dict[str, Any]]) -> dict[str, Any]:
            out = chunk(c, None, None)
            out["choices"][0]["delta"] = {"tool_calls": calls}
            return out

        results = []
        try:
            for c in choices:
                first = opening(c)
                if first is not None:
                    yield _sse(first)
                async for piece in self._pieces(c):
                    if piece.error is not None:
                        yield _sse(piece.error.body())
                        yield _sse("[DONE]")
                        return
                    event = piece.event
                    if piece.reasoning or piece.text or (event is not None and (
                            event.logprobs or event.prompt_logprobs is not None)):
                        yield _sse(chunk(c, piece.text, None, event, reasoning=piece.reasoning))
                    if piece.calls:
                        yield _sse(calls_chunk(c, piece.calls))
                    if piece.result is not None:
                        results.append(piece.result)
                        yield _sse(chunk(c, None, piece.finish))
            if include_usage:
                last = chunk(choices[0], None, None)
                last["choices"] = []
                last["usage"] = usage(results)
                yield _sse(last)
            yield _sse("[DONE]")
        finally:
            # Reached on normal completion and also when Starlette cancels the response because the
            # client disconnected: free the slots and stop the generations.
            self._cancel(choices, "the client went away")

    async def _respond(self, request: Request, req: ChatCompletionRequest | CompletionRequest,
                       choices: list[_Choice], chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.settings.model_name, "system_fingerprint": f"edgespec-{__version__}"}
        prompt_tokens = sum(len(c.prompt_ids) for c in choices if c.index % (req.n or 1) == 0)  # once per prompt
        echo = not chat and req.echo

        def usage(results: list[GenerationResult]) -> dict[str, Any]:
            n = sum(len(r.token_ids) for r in results)
            # Prompt tokens the prefix cache supplied, counted once per prompt as prompt_tokens are.
            cached = sum(r.stats.cached_tokens for c, r in zip(choices, results) if c.index % (req.n or 1) == 0)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
                    "prompt_tokens_details": {"cached_tokens": cached}}

        def formatted(c: _Choice, token_ids: list[int], entries: list | None,
                      prompt: list | None = None) -> dict[str, Any] | None:
            if entries is None:
                return None
            if chat:
                return c.logprobs.chat(entries)
            if prompt is not None:  # echo: the prompt's tokens come first
                return c.logprobs.completion(c.prompt_ids + token_ids, prompt + entries)
            return c.logprobs.completion(token_ids, entries)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(c: _Choice, text: str | None, finish: str | None,
                      event: StreamEvent | None = None, reasoning: str = "") -> dict[str, Any]:
                lp = None
                if event is not None and event.prompt_logprobs is not None:  # echo: the prompt, once prefilled
                    text, lp = c.prompt_text, c.logprobs.completion(c.prompt_ids, event.prompt_logprobs)
                elif event is not None:
                    lp = formatted(c, event.token_ids, event.logprobs)
                if chat:
                    delta = {"reasoning_content": reasoning} if reasoning else {}
                    if text is not None and (text or not reasoning):
                        delta["content"] = text
                    choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                else:
                    choice = {"index": c.index, "text": text or "", "logprobs": lp, "finish_reason": finish}
                out = {**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
                if include_usage:
                    out["usage"] = None
                return out

            def opening(c: _Choice) -> dict[str, Any] | None:
                if chat:
                    first = chunk(c, "", None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    return first
                if echo and req.logprobs is None:  # else the prefill's event brings the prompt and its scores
                    return chunk(c, c.prompt_text, None)
                return None

            # The background task runs however the response ends, even when the client left before
            # the event generator started (its `finally` would then never run).
            return StreamingResponse(self._stream(choices, chunk, opening, usage, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self._cancel, choices, "the client went away"))
        results = await self._complete(request, choices)
        out = []
        for c, result in zip(choices, results):
            if chat:
                thought, text = c.reasoning.split(result.text) if c.reasoning is not None else (None, result.text)
                # A reply that is all reasoning (cut short, or its answer empty) has no content.
                message: dict[str, Any] = {"role": "assistant", "content": text if thought is None or text else None}
                if c.reasoning is not None:
                    message["reasoning_content"] = thought
                finish = result.finish_reason
                if c.tools is not None:
                    content, calls = c.tools.use.parse(c.tools.fmt, text)
                    if calls:
                        message.update(content=content, tool_calls=[call.openai() for call in calls])
                        finish = _tool_finish(finish)
                out.append({"index": c.index, "message": message,
                            "logprobs": formatted(c, result.token_ids, result.logprobs), "finish_reason": finish})
            else:
                lp = formatted(c, result.token_ids, result.logprobs, result.prompt_logprobs if echo else None)
                out.append({"index": c.index, "text": c.prompt_text + result.text if echo else result.text,
                            "logprobs": lp, "finish_reason": result.finish_reason})
        return JSONResponse({**base, "choices": out, "usage": usage(results)})

    # ---- routes --------------------------------------------------------------------------------

    async def health(self) -> Response:
        state = self.worker.snapshot()
        status = "ok" if state["accepting"] else "shutting_down"
        return JSONResponse({"status": status, "model": self.settings.model_name, "queue": state},
                            status_code=200 if state["accepting"] else 503)

    async def metrics(self) -> Response:
        """Prometheus metrics (edgespec.server.metrics); like /health, without the API key, as
        Prometheus scrapes it."""
        body, content_type = self.worker.metrics.exposition()
        return Response(body, media_type=content_type)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "edgespec",
             "max_model_len": self.llm.max_context}]})

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await self._read_body(request))
        req.check_supported()
        choices = await self._chat_choices(req)
        return await self._respond(request, req, choices, chat=True)

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, generated as a chat completion (server/responses.py)."""
        self._authorize(request)
        req = parse_responses_request(await self._read_body(request))
        req.check_supported()
        try:
            choices = await self._chat_choices(req.to_chat())
        except APIError as exc:  # the chat request's field names, as a Responses client knows them
            exc.param = responses_param(exc.param)
            raise
        response = ResponseObject(req, self.settings.model_name)
        prompt_tokens = len(choices[0].prompt_ids)
        if req.stream:
            return StreamingResponse(self._response_events(choices[0], response, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self._cancel, choices, "the client went away"))
        c, (result,) = choices[0], await self._complete(request, choices)
        thought, text = c.reasoning.split(result.text) if c.reasoning is not None else (None, result.text)
        output, finish, calls = [], result.finish_reason, []
        if c.tools is not None:
            text, calls = c.tools.use.parse(c.tools.fmt, text)
            finish = _tool_finish(finish) if calls else finish
        status, incomplete = status_of(finish)
        cut = "incomplete" if status == "incomplete" else "completed"  # the last item was cut short
        if thought:
            output.append(reasoning_item(thought, status=cut if not (text or calls) else "completed"))
        if text or not calls:
            output.append(message_item(text, status=cut))
        output += [function_call_item(call.id, call.name, call.openai()["function"]["arguments"]) for call in calls]
        used = responses_usage(prompt_tokens, result, self._token_count(thought))
        return JSONResponse(response.build(status, output, incomplete, used))

    async def _response_events(self, c: _Choice, response: ResponseObject, prompt_tokens: int) -> AsyncIterator[bytes]:
        """The Responses stream of one reply (ResponseEvents), each event as `event:` and `data:` lines."""
        def sse(events: list[dict[str, Any]]) -> bytes:
            return b"".join(f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n".encode()
                            for e in events)

        events = ResponseEvents(response)
        try:
            yield sse(events.start())
            thought = []
            async for piece in self._pieces(c):
                if piece.error is not None:
                    err = piece.error.body()["error"]
                    yield sse(events.error(err["message"], err["code"]))
                    return
                thought.append(piece.reasoning)
                out = events.feed(piece.reasoning, piece.text, piece.calls)
                if piece.result is not None:
                    used = responses_usage(prompt_tokens, piece.result, self._token_count("".join(thought)))
                    out += events.finish(piece.finish, used)
                if out:
                    yield sse(out)
        finally:
            self._cancel([c], "the client went away")

    async def stored_response(self, request: Request, response_id: str) -> Response:
        """Retrieving, deleting or cancelling a stored response: none is ever stored."""
        self._authorize(request)
        raise APIError(404, f"no response {response_id.split('/')[0]!r}: this server stores no responses (they "
                            f"are returned once, with store false)", code="response_not_found")

    def _token_count(self, text: str | None) -> int:
        """Tokens of a reply's reasoning text, as the tokenizer encodes it (usage's reasoning_tokens)."""
        return len(self.llm.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    async def _chat_choices(self, req: ChatCompletionRequest) -> list[_Choice]:
        """Encode a chat request's conversation (with its tools and template variables) and admit
        its generations."""
        messages = req.chat_messages()
        tok = self.llm.tokenizer
        if tok is None or not tok.has_chat_template:
            raise bad_request("this model has no chat template: use /v1/completions with a plain prompt",
                              param="messages", code="chat_template_missing")
        use = req.tool_use()
        tools, grammar = None, None
        if use is not None:
            if not tok.renders_tools:
                raise bad_request("this model's chat template does not render tools, so the model would never see "
                                  "them; start the server with a --chat-template that does", param="tools",
                                  code="tools_not_rendered")
            fmt = self._tool_format()
            try:
                grammar = use.grammar(fmt)
            except ValueError as exc:
                raise bad_request(f"tools: {exc}", param="tools") from None
            tools = (use, fmt)
        offered = [t.openai() for t in use.tools] if use else None
        variables = req.template_variables()
        reasoning = None
        if self._thinks():  # whether the template's opening of the reply opens the section (not what messages say)
            prompt_ids, opening = await self._encode(messages, "messages", offered, variables, opening=True)
            reasoning = Reasoning(prompt_opens_thinking(opening))
        else:
            prompt_ids = await self._encode(messages, "messages", offered, variables)
        n = self._max_new_tokens(req.requested_max_tokens(), len(prompt_ids), self.settings.max_tokens_limit,
                                 "messages")
        return self._admit([(prompt_ids, "")], [n], req, grammar, tools, reasoning)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req: CompletionRequest = parse(CompletionRequest, await self._read_body(request))
        req.check_supported()
        prompts, max_new = [], []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str) and self.llm.tokenizer is None:
                raise bad_request("this model was loaded without a tokenizer: send the prompt as token ids",
                                  param="prompt")
            ids = await self._encode(prompt, "prompt")
            max_new.append(self._max_new_tokens(req.requested_max_tokens(), len(ids),
                                                self.settings.completion_default_max_tokens, "prompt"))
            text = ""
            if req.echo:  # a text prompt is echoed as sent, token ids as they decode
                tok = self.llm.tokenizer
                text = prompt if isinstance(prompt, str) else (
                    await run_in_threadpool(tok.decode, ids) if tok is not None else "")
            prompts.append((ids, text))
        return await self._respond(request, req, self._admit(prompts, max_new, req), chat=False)
