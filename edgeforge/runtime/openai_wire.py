"""The OpenAI wire format for `serve`: requests checked into plain parameters, answers and errors as
the JSON OpenAI's API sends (what its clients parse).

Nothing here touches an engine or a network: request bodies go in, dicts come out. Every way a
request can be wrong raises ApiError with the HTTP status and an OpenAI error object.

Copied into bundles: standard library only.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_MESSAGES = 256      # a conversation longer than this is a client bug or an attack
MAX_STOP_STRINGS = 4    # OpenAI's own limit
MAX_STOP_CHARS = 256
ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's newer name for system


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked completion request. prompt: text (completions) or messages (chat)."""

    prompt: str | list[dict]
    model: str
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; NaN and Infinity are refused (json accepts them by default)."""
    def no_constant(name):
        raise ApiError(400, f"request body: {name} is not a number JSON allows")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except ApiError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ApiError(400, f"request body is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def chat_request(body: dict) -> Request:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' has {len(messages)} entries; this server takes at most {MAX_MESSAGES}",
                       "messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _request(body, checked, max_tokens, name)


def completion_request(body: dict) -> Request:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt a request)", "prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty", "prompt")
    return _request(body, prompt, body.get("max_tokens"), "max_tokens")


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"'{where}.role' must be one of {sorted(ROLES)}, got {str(role)[:40]!r}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text parts exist for a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"'{where}.content' parts must all be {{\"type\": \"text\", \"text\": ...}} "
                                "(this model reads text only)", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"'{where}.content' must be a string", f"{where}.content")
    _check_text(content, f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (\ud800 escapes) are not text a tokenizer can encode
        raise ApiError(400, f"'{param}' is not valid Unicode text", param) from None


def _request(body: dict, prompt, max_tokens, max_name: str) -> Request:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a string (GET /v1/models lists it)", "model")
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise ApiError(400, "'n' must be 1: this server makes one answer a request", "n")
    for unsupported in ("tools", "functions", "logprobs", "echo", "suffix"):
        if body.get(unsupported):
            raise ApiError(400, f"'{unsupported}' is not supported by this server", unsupported)
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, max_name, 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    seed = body.get("seed")
    return Request(
        prompt=prompt, model=model, max_tokens=max_tokens,
        temperature=_number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
        seed=None if seed is None else _integer(seed, "seed", -(1 << 63), (1 << 63) - 1) % (1 << 63),
        stop=_stop(body.get("stop")), stream=stream, include_usage=options.get("include_usage") is True)


def _number(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    if value is None:
        return high if name == "top_p" else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"'{name}' must be in {interval}, got {value:g}", name)
    return float(value)


def _integer(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be >= {low}" + (f" and <= {high}" if high is not None else "")
                       + f", got {value}", name)
    return value


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop': at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                       "stop")
    for s in stops:
        _check_text(s, "stop")
    return [s for s in stops if s]


# ---- answers -------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose work an earlier prompt had done."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def chat_answer(rid: str, model: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def completion_answer(rid: str, model: str, text: str, reason: str, prompt_tokens: int,
                      completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": None if reason is None else finish_reason(reason)}]}


def completion_chunk(rid: str, model: str, text: str, reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": None if reason is None else finish_reason(reason)}]}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def sse(data) -> bytes:
    """One server-sent event: `data: <json>` and a blank line ([DONE] is sent as text)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")
