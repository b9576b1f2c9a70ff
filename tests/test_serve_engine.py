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


def _tokens_alone(model, prompt_len: int, max_tokens: int) -> list[int]:
    """The tokens a request generates with no stop token, alone in an engine of its own."""
    engine = Engine(model, 10**8, block_size=4)
    events = {}
    _submit(engine, "x", prompt_len, max_tokens, events)
    engine.run_until_done()
    return [e.token for e in events["x"] if isinstance(e, TokenEvent)]


def test_a_stop_token_ends_the_sequence_and_counts():
    model = mixed_dmc("gqa", window=12)
    tokens = _tokens_alone(model, 9, 12)
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


def test_a_failing_prefill_fails_that_request_only(monkeypatch):
    engine = Engine(mixed_dmc("gqa", window=12), 10**8, block_size=4)
    real = Engine._prefill

    def prefill(self, seq):
        if seq.request.request_id == "bad":
            raise RuntimeError("no such seed")
        return real(self, seq)

    monkeypatch.setattr(Engine, "_prefill", prefill)
    events = {}
    _submit(engine, "good", 9, 3, events)
    _submit(engine, "bad", 8, 3, events)
    engine.run_until_done()
    assert isinstance(events["bad"][-1], ErrorEvent) and events["bad"][-1].status == 500
    assert [type(e) for e in events["good"]] == [TokenEvent] * 3 + [FinishEvent]


def test_a_stop_token_as_the_first_token_ends_at_once():
    model = mixed_dmc("gqa", window=12)
    first = _tokens_alone(model, 9, 3)[0]
    engine = Engine(model, 10**8, block_size=4)
    events = {}
    _submit(engine, "x", 9, 8, events, stop=(first,))
    engine.run_until_done()
    assert [type(e) for e in events["x"]] == [TokenEvent, FinishEvent]
    assert events["x"][-1].reason == "stop" and events["x"][-1].completion_tokens == 1


def test_lengths_and_rows_follow_the_live_sequences_not_the_servers_history():
    engine = Engine(mixed_dmc("gqa", window=12), 10**8, block_size=4)
    events = {}
    for wave in range(3):  # bursts of 12, each served to its end
        for i in range(12):
            _submit(engine, f"{wave}-{i}", 10 + i, 6, events)
        engine.run_until_done()
    assert engine.rows == [] and engine.cache.allocated_bytes() == 0  # compacted away once idle
    _submit(engine, "last", 9, 20, events)
    engine.iterate()
    for _ in range(5):
        engine.iterate()
    assert len(engine.rows) == 1  # one sequence decodes at batch 1, not at the bursts' 12
    fed = 9 + len(engine.rows[0].tokens) - 1
    assert all(layer.seen_tokens == fed for layer in engine.cache.layers)  # its own length, not the history's
    engine.run_until_done()
    assert [type(e) for e in events["last"]] == [TokenEvent] * 20 + [FinishEvent]


def test_alone_a_sequence_runs_as_far_as_the_budget_lets_it():
    model = mixed_dmc("gqa", window=12)
    block = 2 * 4 * model.config.dmc_head_dim * 8
    engine = Engine(model, 16 * block, block_size=4)  # 4 pairs: 4 blocks each, about 16-30 tokens
    events = {}
    _submit(engine, "x", 6, 200, events)
    engine.run_until_done()
    finish = events["x"][-1]
    assert isinstance(finish, FinishEvent) and finish.reason == "length" and 0 < finish.completion_tokens < 200
    assert engine.stats.peak_bytes <= 16 * block and engine.cache.allocated_bytes() == 0


def test_dropping_idle_rows_moves_no_block():
    engine = Engine(mixed_dmc("gqa", window=12), 10**8, block_size=4)
    events = {}
    for i in range(10):
        _submit(engine, f"short-{i}", 8 + i, 2, events)
    _submit(engine, "long", 9, 30, events)
    for _ in range(4):  # the short ones finish and leave; the long one goes on
        engine.iterate()
    layer = engine.cache.layers[0]
    assert len(engine.rows) == 1 and layer.block_table.shape[0] == 1
    before = [(layer.k_pool.data_ptr(), layer.block_table.clone()) for layer in engine.cache.layers]
    engine.run_until_done()
    assert [type(e) for e in events["long"]] == [TokenEvent] * 30 + [FinishEvent]
    assert all(layer.k_pool.data_ptr() == ptr for layer, (ptr, _) in zip(engine.cache.layers, before))


def test_a_lost_device_kills_the_engine_and_tells_every_request(monkeypatch):
    model = mixed_dmc("gqa", window=12)
    engine = Engine(model, 10**8, block_size=4)
    events = {}
    monkeypatch.setattr(Engine, "_decode_step", lambda self: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    monkeypatch.setattr(Engine, "_probe_device", lambda self: (_ for _ in ()).throw(RuntimeError("device lost")))
    stop = threading.Event()
    thread = threading.Thread(target=engine.run_forever, args=(stop,))
    thread.start()
    _submit(engine, "a", 9, 4, events)
    thread.join(timeout=60)
    assert not thread.is_alive() and "CUDA error" in engine.dead
    assert isinstance(events["a"][-1], ErrorEvent)
    stop.set()
