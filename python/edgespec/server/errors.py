"""Errors in the OpenAI format: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure a client can cause maps to a 4xx here, so clients (the `openai` package included) raise
the matching exception class (BadRequestError, AuthenticationError, RateLimitError, ...).
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    """A request that the server answers with an OpenAI-format error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, detail: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server: {detail}", param=param,
                    code="unsupported_parameter")


def queue_full(capacity: int) -> APIError:
    # 429 rather than 503: the server is healthy, it just has `capacity` requests admitted already;
    # OpenAI clients retry 429 with back-off, which is the right reaction.
    return APIError(429, f"the request queue is full ({capacity} requests admitted); retry later",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down and accepts no new requests",
                    type="server_error", code="server_shutting_down")


_UNION_MEMBER_NAMES = {"str": "a string", "list[int]": "a list of token ids (integers)",
                       "list[str]": "a list of strings", "list[list[int]]": "a list of token-id lists",
                       "list[ContentPart]": "a list of content parts", "dict[str,any]": "an object"}


def _is_union_tag(part: object) -> bool:
    # pydantic names the member of a union an error came from inside the location
    # (prompt.str, prompt.list[int], ...); request field names are lower-case identifiers.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def _describe(value: object) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return text if len(text) <= 80 else text[:77] + "..."


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 that names the field (dotted path) and what was expected."""
    errors = exc.errors(include_url=False)
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    if err["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})",
                           code="invalid_json")
    loc = list(err["loc"])
    if not loc and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return bad_request("the request body must be a JSON object", code="invalid_type")
    tag_at = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    if tag_at is not None:
        # A value that matched no member of a union: list the accepted forms instead of one
        # member's complaint.
        field = loc[:tag_at]
        tags = list(dict.fromkeys(str(e["loc"][tag_at]) for e in errors
                                  if list(e["loc"][:tag_at]) == field and len(e["loc"]) > tag_at))
        param = ".".join(str(p) for p in field)
        forms = ", ".join(_UNION_MEMBER_NAMES.get(t, t) for t in tags)
        return bad_request(f"'{param}' must be one of: {forms} (got {_describe(err['input'])})", param=param,
                           code="invalid_type")
    param = ".".join(str(p) for p in loc) or None
    if err["type"] == "missing":
        return bad_request(f"'{param}' is required", param=param, code="missing_required_parameter")
    where = f"'{param}': " if param else ""
    code = "invalid_type" if err["type"].endswith("_type") else "invalid_value"
    return bad_request(f"{where}{err['msg']} (got {_describe(err.get('input'))})", param=param, code=code)
