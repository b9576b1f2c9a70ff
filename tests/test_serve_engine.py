"""The serving engine driven directly (no HTTP): an abort frees its blocks before the next step, a request the
budget can never hold gets an error and no token, stop tokens end a sequence, and an unexpected error fails what
is in flight without stopping the engine."""

import threading
import time

from dmc.serve.engine import Engine, ErrorEvent, FinishEvent, Request, TokenEvent
from dmc.serve.sampling import SamplingParams
from tests.helpers import mixed_dmc, random_ids


def _submit(engine, rid, prompt_len, max_tokens, events, stop=()):
    sink = events.setdefault(rid, []).append
    engine.submit(Request(rid, random_ids(1, prompt_len, seed=prompt_len)[0], SamplingParams(max_tokens,
                                                                                             stop_token_ids=stop), sink))


def _blocks(engine, row) -> int:
    return sum(int((layer.block_table[row] >= 0).sum()) for layer in engine.cache.layers)


def test_an_abort_frees_its_blocks_before_the_next_step():
    engine = Engine(mixed_dmc("gqa", window=12), 10**8, block_size=4)
    events = {}
    for rid in "abc":
        _submit(engine, rid, 20, 50, events)
    engine.iterate()  # admitted, one step
    row_b = [s.request.request_id for s in engine.rows].index("b")
    assert _blocks(engine, row_b) > 0
    engine.abort("b")
    sent = len(events["b"])
    engine.iterate()  # takes the abort first, then steps a and c
    assert len(events["b"]) == sent + 1 and events["b"][-1].reason == "abort"  # no token after the abort
    assert engine.rows[row_b] is None and _blocks(engine, row_b) == 0
    live = sum(_blocks(engine, b) for b, s in enumerate(engine.rows) if s is not None)
    assert engine.cache.allocated_bytes() == live * engine.cache.layers[0].block_bytes()  # b's went back


def test_a_request_the_budget_cannot_hold_gets_an_error_and_no_token():
    model = mixed_dmc("gqa", window=12)
    engine = Engine(model, 20 * 2 * 4 * model.config.dmc_head_dim * 8, block_size=4)  # 20 blocks
    events = {}
    _submit(engine, "long", 60, 5, events)
    _submit(engine, "short", 3, 2, events)
    engine.run_until_done()
    assert len(events["long"]) == 1 and isinstance(events["long"][0], ErrorEvent) and events["long"][0].status == 413
    assert [type(e) for e in events["short"]] == [TokenEvent, TokenEvent, FinishEvent]
    assert engine.stats.generated_tokens == 2 and engine.cache.allocated_bytes() == 0


def test_a_stop_token_ends_the_sequence_and_counts():
    model = mixed_dmc("gqa", window=12)
    free = Engine(model, 10**8, block_size=4)
    events = {}
    _submit(free, "x", 9, 12, events)
    free.run_until_done()
    tokens = [e.token for e in events["x"] if isinstance(e, TokenEvent)]
    stop = tokens[4]
    first = tokens.index(stop)
    stopped = Engine(model, 10**8, block_size=4)
    events = {}
    _submit(stopped, "x", 9, 12, events, stop=(stop,))
    stopped.run_until_done()
    assert [e.token for e in events["x"] if isinstance(e, TokenEvent)] == tokens[: first + 1]
    assert events["x"][-1].reason == "stop" and events["x"][-1].completion_tokens == first + 1


def test_an_unexpected_error_fails_what_is_held_and_the_engine_goes_on(monkeypatch):
    model = mixed_dmc("gqa", window=12)
    engine = Engine(model, 10**8, block_size=4)
    events = {}
    _submit(engine, "a", 9, 4, events)
    real_step = Engine._decode_step
    monkeypatch.setattr(Engine, "_decode_step", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    stop = threading.Event()
    thread = threading.Thread(target=engine.run_forever, args=(stop,))
    thread.start()
    try:
        for _ in range(2000):
            if events["a"] and isinstance(events["a"][-1], ErrorEvent):
                break
            time.sleep(0.01)
        assert isinstance(events["a"][-1], ErrorEvent) and events["a"][-1].status == 500
        assert "boom" in events["a"][-1].message
        monkeypatch.setattr(Engine, "_decode_step", real_step)
        _submit(engine, "b", 9, 4, events)
        for _ in range(2000):
            if events["b"] and isinstance(events["b"][-1], FinishEvent):
                break
            time.sleep(0.01)
        assert [type(e) for e in events["b"]] == [TokenEvent] * 4 + [FinishEvent]
        assert engine.cache.allocated_bytes() == 0
    finally:
        stop.set()
        thread.join()
