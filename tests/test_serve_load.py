"""``dmc serve`` under load: 64 concurrent streaming clients (the official async ``openai`` client) with mixed
prompt and output lengths against a KV budget that holds far fewer sequences. Every answer is complete and equal
to its prompt generated alone; the budget is never exceeded (bytes from the allocator); no block is held when the
load ends; clients that disconnect mid-stream free their blocks at once and leave the others unaffected."""

import asyncio
import random

import httpx
import openai
import pytest

from tests.serve_helpers import chat_model, greedy_alone, live_server, metric


def _load(n: int, seed: int):
    """``n`` requests (token-id prompts of 4-40 tokens, 2-20 new tokens), drawn with a fixed seed."""
    rng = random.Random(seed)
    return [([rng.randrange(100, 40000) for _ in range(rng.randint(4, 40))], rng.randint(2, 20)) for _ in range(n)]


async def _stream(client, prompt, max_tokens, drop_after: int | None = None, **sampling):
    """One streaming completion: (text, tokens received, finish reason); ``drop_after``: disconnect after that
    many token events. Greedy unless ``sampling`` says otherwise."""
    sampling = {"temperature": 0, **sampling}
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True,
                                             logprobs=0, **sampling)
    text, tokens, finish = "", [], None
    async for chunk in stream:
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
        finish = choice.finish_reason or finish
        if drop_after is not None and len(tokens) >= drop_after:
            await stream.close()  # the connection goes: the server sees the client leave
            break
    return text, len(tokens), finish


def _budget(model, sequences: int) -> int:
    """Bytes of ``sequences`` whole vanilla sequences of the longest request (60 tokens), blocks of 4 float64."""
    pairs = model.config.num_hidden_layers * model.config.num_key_value_heads
    return sequences * pairs * (60 // 4 + 1) * 2 * 4 * (model.config.hidden_size // model.config.num_attention_heads) * 8


@pytest.mark.parametrize("compressed", [True, False], ids=["dmc", "vanilla"])
def test_64_streaming_clients_within_a_budget_of_fewer(compressed):
    model, tok = chat_model(compressed)
    requests = _load(64, seed=1)
    want = [tok.decode(greedy_alone(model, p, n, (tok.eos_token_id,)), skip_special_tokens=True) for p, n in requests]
    budget = _budget(model, 12)
    with live_server(model, tok, budget_bytes=budget) as (url, engine):
        async def run():
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                          timeout=600) as client:
                return await asyncio.gather(*[_stream(client, p, n) for p, n in requests])

        answers = asyncio.run(run())
        text = httpx.get(f"{url}/metrics").text
        stats = engine.stats
    assert [a[0] for a in answers] == want  # complete and equal to each prompt alone, token for token
    assert all(finish in ("length", "stop") for *_, finish in answers)
    assert 0 < stats.peak_bytes <= budget and metric(text, "dmc_kv_bytes_peak") <= budget
    assert stats.max_in_flight < 64  # the budget, not the clients, bounded the batch
    assert metric(text, "dmc_kv_bytes_in_use") == 0 and metric(text, "dmc_sequences_in_flight") == 0
    assert metric(text, "dmc_requests_finished_total") == 64


def test_clients_that_disconnect_free_their_blocks_and_the_rest_are_unaffected():
    model, tok = chat_model(compressed=True)
    requests = _load(20, seed=2)
    want = [tok.decode(greedy_alone(model, p, n, (tok.eos_token_id,)), skip_special_tokens=True) for p, n in requests]
    leavers = [(p, 200) for p, _ in _load(10, seed=3)]  # long outputs, dropped after 3 tokens
    with live_server(model, tok, budget_bytes=_budget(model, 40)) as (url, engine):
        async def run():
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                          timeout=600) as client:
                staying = [_stream(client, p, n) for p, n in requests]
                leaving = [_stream(client, p, n, drop_after=3) for p, n in leavers]
                return await asyncio.gather(*staying, *leaving)

        answers = asyncio.run(run())

        async def settled():  # the aborts reach the engine through its inbox: wait for its next iterations
            for _ in range(600):
                text = httpx.get(f"{url}/metrics").text
                if metric(text, "dmc_requests_aborted_total") == 10 and metric(text, "dmc_sequences_in_flight") == 0:
                    return text
                await asyncio.sleep(0.05)
            raise AssertionError("the disconnected sequences were never dropped")

        text = asyncio.run(settled())
        stats = engine.stats
    assert [a[0] for a in answers[:20]] == want
    assert metric(text, "dmc_kv_bytes_in_use") == 0
    # A leaver that ran on to its 200 tokens would add about 2000 tokens; they stopped within a few steps of leaving.
    delivered = sum(a[1] for a in answers[:20])
    assert stats.generated_tokens - delivered < 10 * 30


def test_preempted_streams_resume_where_they_were_without_repeating_a_token(monkeypatch):
    # Admission that ignores growth fills the budget with prompts alone, so the steps must preempt: a preempted
    # stream is recomputed and replays what it sent (greedy and seeded sampling alike), so each client still
    # receives every token exactly once, the same tokens as without preemption.
    from dmc.serve.engine import Engine

    model, tok = chat_model(compressed=True)
    requests = _load(24, seed=4)

    def serve_all(budget):
        with live_server(model, tok, budget_bytes=budget) as (url, engine):
            async def run():
                async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                              timeout=600) as client:
                    greedy = [_stream(client, p, n) for p, n in requests]
                    seeded = [_stream(client, p, n, temperature=1.0, seed=i) for i, (p, n) in enumerate(requests)]
                    return await asyncio.gather(*greedy, *seeded)

            return asyncio.run(run()), engine.stats

    roomy, roomy_stats = serve_all(_budget(model, 100))
    monkeypatch.setattr(Engine, "_growth_bytes", lambda self, cache, rows: 0)
    tight, stats = serve_all(_budget(model, 4))
    assert roomy_stats.preempted == 0 and stats.preempted > 0 and stats.discarded_tokens > 0
    want = [tok.decode(greedy_alone(model, p, n, (tok.eos_token_id,)), skip_special_tokens=True) for p, n in requests]
    assert [a[0] for a in tight[:24]] == want
    assert tight == roomy  # texts, token counts and finish reasons, seeded sampling included
    assert stats.peak_bytes <= _budget(model, 4) and stats.generated_tokens == roomy_stats.generated_tokens
