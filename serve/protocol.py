"""The OpenAI API's request bodies, checked: ``/v1/completions`` and ``/v1/chat/completions`` to a ``Spec`` (token
ids, sampling parameters, stop strings, streaming), every mistake an ``APIError`` with the HTTP status and the
OpenAI error body a client expects. Parameters we do not implement are refused by name, not ignored, unless
they are given at their no-op value (``presence_penalty: 0``, ``echo: false``, ...)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {404: "not_found_error", 413: "invalid_request_error", 500: "internal_error"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Spec:
    """One request, checked: what the engine runs and how the answer is shaped."""

    chat: bool
    prompt_ids: list[int]
    params: SamplingParams  # for choice 0; choice i gets seed + i
    n: int
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage counts
    stop: list[str]
    logprobs: int | None  # completions: k alternatives; chat: top_logprobs (None: no logprobs)

    def choice_params(self, i: int) -> SamplingParams:
        p = self.params
        if p.seed is None or i == 0:
            return p
        return SamplingParams(p.max_tokens, p.temperature, p.top_p, p.seed + i, p.stop_token_ids, p.logprobs)


@dataclass
class ModelInfo:
    """What the server knows of the model it serves, for checking requests."""

    name: str
    context: int  # most tokens a sequence may reach (prompt + output)
    vocab: int
    stop_token_ids: tuple[int, ...]


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


# Accepted only at these values (what the OpenAI API does when they are left out).
_NOOP = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "echo": (False,), "suffix": (None, ""),
         "logit_bias": (None,), "best_of": (None, 1), "tools": (None,), "tool_choice": (None, "none"),
         "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,), "service_tier": (None, "auto"),
         "store": (None, False)}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "ignore_eos", *_NOOP}
_COMPLETION = _COMMON | {"prompt", "logprobs"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "metadata"}


def parse_completion(body: dict, tokenizer, model: ModelInfo) -> Spec:
    _check_fields(body, _COMPLETION)
    prompt_ids = _prompt_ids(body.get("prompt"), tokenizer, model)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    return _spec(body, False, prompt_ids, model, logprobs, default_max=16)


def parse_chat(body: dict, tokenizer, model: ModelInfo) -> Spec:
    _check_fields(body, _CHAT)
    text = _chat_text(body.get("messages"), tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not _bool(body, "logprobs", False):
        if body.get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = None
    else:
        logprobs = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return _spec(body, True, prompt_ids, model, logprobs, default_max=None)


def _spec(body: dict, chat: bool, prompt_ids: list[int], model: ModelInfo, logprobs: int | None,
          default_max: int | None) -> Spec:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "model is required: the name /v1/models lists", "model")
    if name != model.name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{model.name}`", "model",
                       "model_not_found")
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
    room = model.context - len(prompt_ids)
    max_tokens = _int(body, "max_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = min(default_max, room) if default_max is not None else room
    if len(prompt_ids) + max_tokens > model.context or room < 1:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens. However, you requested "
                       f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                       f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). Please reduce the "
                       "length of the prompt or the completion.", "max_tokens", "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "top_p must be in (0, 1]", "top_p")
    n = _int(body, "n", 1, 1, MAX_N)
    seed = _int(body, "seed", None, 0, 2**63 - MAX_N)  # choice i samples with seed + i: a torch generator's seed
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "stream_options is {\"include_usage\": bool}, with stream: true", "stream_options")
    stop_ids = () if _bool(body, "ignore_eos", False) else model.stop_token_ids
    params = SamplingParams(max_tokens, temperature, top_p, seed, stop_ids, logprobs)
    return Spec(chat, prompt_ids, params, n, stream,
                bool((options or {}).get("include_usage", False)), _stop(body.get("stop")), logprobs)


def _check_fields(body: dict, known: set[str]) -> None:
    for key in body:
        if key not in known:
            raise APIError(400, f"unsupported parameter: {key!r}; this server implements "
                           f"{', '.join(sorted(known - set(_NOOP)))}", key, "unsupported_parameter")
    for key, allowed in _NOOP.items():
        if key in body and body[key] not in allowed:
            raise APIError(400, f"{key}={body[key]!r} is not supported; leave {key} out", key, "unsupported_value")


def _prompt_ids(prompt, tokenizer, model: ModelInfo) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < model.vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{model.vocab - 1})", "prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request; use n for "
                   "several completions)", "prompt")


def _chat_text(messages, tokenizer) -> str:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        plain.append({"role": m["role"], "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 - a template's own check (e.g. roles must alternate) is the client's error
        raise APIError(400, f"the chat template refused the messages: {err}", "messages") from None


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP:
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP} strings", "stop")
    return [s for s in stops if s]


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false", key)
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise APIError(400, f"{key} must be a number in [{lo:g}, {hi:g}], got {value!r}", key)
    return float(value)


def _int(body: dict, key: str, default, lo: int | None, hi: int | None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise APIError(400, f"{key} must be an integer{bounds}, got {value!r}", key)
    return value
