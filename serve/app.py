"""The OpenAI-compatible HTTP API over the engine (FastAPI): ``/v1/completions``, ``/v1/chat/completions``
(streamed as server-sent events, one per token, then ``[DONE]``), ``/v1/models``, ``/health``, ``/metrics``.

Each request becomes a ``Group`` of sequences in the engine (one per choice). The response waits for every
choice's first event (its prefill), so a request the budget can never hold is an HTTP error, not a broken
stream. A client that disconnects, or a choice that meets a stop string, aborts its sequences: the engine frees
their blocks before its next step."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from . import metrics
from .bridge import EngineThread, Group
from .engine import ErrorEvent, FinishEvent, TokenEvent
from .protocol import APIError, ModelInfo, Spec, parse_chat, parse_completion, parse_json
from .text import TextStream, token_bytes, token_text


@dataclass
class _Choice:
    """One choice's answer as it is built."""

    text: TextStream
    tokens: int = 0
    finish: str | None = None
    logprobs: list[tuple[tuple[str, list[int]], float, list[tuple[tuple[str, list[int]], float]], int]] = field(
        default_factory=list)  # per token: ((text, bytes), logprob, top alternatives, text offset)


def build_app(engine: EngineThread, tokenizer, model: ModelInfo, manage_engine: bool = True) -> FastAPI:
    """The API; ``manage_engine``: start the engine's thread with the app and stop it at shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            engine.stop()

    app = FastAPI(title="dmc serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        return Response(status_code=503 if _dead() else 200)

    def _dead() -> str | None:
        if engine.engine.dead is not None:
            return engine.engine.dead
        return None if engine.alive() else "the engine is not running"

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                            "owned_by": "dmc", "max_model_len": model.context}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.engine, model.name), media_type=metrics.CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request):
        spec = parse_completion(parse_json(await request.body()), tokenizer, model)
        return await _answer(request, spec)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        spec = parse_chat(parse_json(await request.body()), tokenizer, model)
        return await _answer(request, spec)

    async def _answer(request: Request, spec: Spec):
        if (dead := _dead()) is not None:
            raise APIError(503, f"the server cannot generate: {dead}; restart it")
        group = engine.open(spec.prompt_ids, [spec.choice_params(i) for i in range(spec.n)])
        if (dead := _dead()) is not None:  # it died after the check above: nobody reads the inbox any more
            group.abort()
            raise APIError(503, f"the server cannot generate: {dead}; restart it")
        watcher = asyncio.create_task(_watch_disconnect(request, group))  # a client gone while queued: dropped
        try:
            early = await _first_events(group, spec.n)
        except BaseException:
            watcher.cancel()
            group.abort()
            raise
        rid = f"{'chatcmpl' if spec.chat else 'cmpl'}-{uuid.uuid4().hex}"
        choices = [_Choice(TextStream(tokenizer, spec.stop, spec.prompt_ids)) for _ in range(spec.n)]
        if spec.stream:  # from here the response watches the connection itself
            watcher.cancel()
            return StreamingResponse(_stream(group, early, spec, choices, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            for index, event in early:
                _apply(group, spec, choices, index, event)
            while group.open:
                index, event = await group.next()
                _apply(group, spec, choices, index, event)
        finally:
            watcher.cancel()
            group.abort()
        return _full_response(spec, choices, rid, created_now(), model.name)

    async def _stream(group: Group, early, spec: Spec, choices: list[_Choice], rid: str):
        now = created_now()
        obj = "chat.completion.chunk" if spec.chat else "text_completion"

        def chunk(choice_list, usage=None):
            body = {"id": rid, "object": obj, "created": now, "model": model.name, "choices": choice_list}
            if spec.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if spec.chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(spec.n)])

            async def pending():
                for item in early:
                    yield item
                while group.open:
                    yield await group.next()

            async for index, event in pending():
                choice = choices[index]
                if choice.finish is not None:
                    continue
                if isinstance(event, ErrorEvent):
                    yield f"data: {json.dumps(APIError(event.status, event.message).body())}\n\n"
                    choice.finish = "error"
                    continue
                done_before = len(choice.logprobs)
                delta = _apply(group, spec, choices, index, event)
                if isinstance(event, TokenEvent) or delta:
                    lp = _logprobs_json(spec, choice.logprobs[done_before:]) if spec.logprobs is not None else None
                    yield chunk([_delta(spec, index, delta, lp, None)])
                if choice.finish is not None:
                    yield chunk([_delta(spec, index, "", None, choice.finish)])
            if spec.include_usage:
                yield chunk([], _usage(spec, choices))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or we are done: nothing keeps running
            group.abort()

    return app


def created_now() -> int:
    return int(time.time())


async def _first_events(group: Group, n: int) -> list:
    """Every choice's first event (its prefill's token, or an error); an error of any choice is the answer."""
    early, seen = [], set()
    while len(seen) < n:
        index, event = await group.next()
        early.append((index, event))
        seen.add(index)
        if isinstance(event, ErrorEvent):
            raise APIError(event.status, event.message, code="kv_budget_exceeded" if event.status == 413 else None)
    return early


async def _watch_disconnect(request: Request, group: Group) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            group.abort()
            return


def _apply(group: Group, spec: Spec, choices: list[_Choice], index: int, event) -> str:
    """One event into its choice: the text it adds (a stop string ends the choice and aborts its sequence)."""
    choice = choices[index]
    if choice.finish is not None:
        return ""
    if isinstance(event, ErrorEvent):
        raise APIError(event.status, event.message)
    if isinstance(event, FinishEvent):
        text, stopped = choice.text.flush()
        choice.finish = "stop" if event.reason == "stop" or stopped else "length"
        return text
    choice.tokens += 1
    offset = len(choice.text.text)
    delta, stopped = choice.text.push(event.token)
    if spec.logprobs is not None:
        tok, previous = choice.text.tok, choice.text.previous_id()

        def piece(t: int) -> tuple[str, list[int]]:
            return token_text(tok, t, previous), token_bytes(tok, t)

        top = [(piece(t), lp) for t, lp in (event.top or [])]
        choice.logprobs.append((piece(event.token), event.logprob, top, offset))
    if stopped:
        choice.finish = "stop"
        group.abort(index)
    return delta


def _delta(spec: Spec, index: int, text: str, logprobs, finish: str | None) -> dict:
    if spec.chat:
        return {"index": index, "delta": {"content": text} if text or finish is None else {}, "logprobs": logprobs,
                "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _logprobs_json(spec: Spec, items) -> dict:
    if spec.chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": raw,
                             "top_logprobs": [{"token": a, "logprob": b, "bytes": a_raw} for (a, a_raw), b in top]}
                            for (t, raw), lp, top, _ in items]}
    return {"tokens": [t for (t, _), *_ in items], "token_logprobs": [lp for _, lp, _, _ in items],
            "top_logprobs": [{a: b for (a, _), b in top} for _, _, top, _ in items] if spec.logprobs else None,
            "text_offset": [off for *_, off in items]}


def _usage(spec: Spec, choices: list[_Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    prompt = len(spec.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _full_response(spec: Spec, choices: list[_Choice], rid: str, created: int, name: str) -> dict:
    out = []
    for i, c in enumerate(choices):
        lp = _logprobs_json(spec, c.logprobs) if spec.logprobs is not None else None
        body = {"index": i, "logprobs": lp, "finish_reason": c.finish or "length"}
        if spec.chat:
            body["message"] = {"role": "assistant", "content": c.text.text}
        else:
            body["text"] = c.text.text
        out.append(body)
    return {"id": rid, "object": "chat.completion" if spec.chat else "text_completion", "created": created,
            "model": name, "choices": out, "usage": _usage(spec, choices)}
