"""``dmc serve``'s OpenAI API with the official ``openai`` client against a live server on 127.0.0.1 (tiny models
in float64): completions, chat, streaming, greedy output equal to ``generate()``, seeds, stop strings,
max_tokens, logprobs, n, and every bad request answered with an OpenAI error while the server keeps serving."""

import time

import httpx
import openai
import pytest
import torch

from dmc.generate import generate
from tests.serve_helpers import chat_model, greedy_alone, live_server, metric

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module", params=["dmc", "vanilla"])
def served(request):
    model, tok = chat_model(compressed=request.param == "dmc")
    with live_server(model, tok) as (url, engine):
        yield model, tok, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), url, engine


def test_greedy_completion_equals_generate(served):
    model, tok, client, _, _ = served
    for prompt in PROMPTS:
        want = generate(model, tok, [prompt], max_new_tokens=12).texts[0]
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok(prompt)["input_ids"]), 12)


def test_chat_runs_the_chat_template_and_equals_generating_alone(served):
    model, tok, client, _, _ = served
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    want = greedy_alone(model, ids, 10, (tok.eos_token_id,))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)


def test_streaming_sends_one_event_per_token_then_done(served):
    model, tok, client, _, _ = served
    want = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=9, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=9, temperature=0,
                                            stream=True, logprobs=0, stream_options={"include_usage": True}))
    tokens = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert len(tokens) == 9 and all(len(c.choices[0].logprobs.tokens) == 1 for c in tokens)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 9  # the usage chunk closes the stream

    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0)
    assert text == full.choices[0].message.content and chat[-1].choices[0].finish_reason == "length"


def test_a_fixed_seed_reproduces_a_sampled_output(served):
    _, _, client, _, _ = served

    def sampled(seed):
        return client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    first = sampled(7)
    assert sampled(7) == first
    greedy = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0).choices[0].text
    tiny = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1e-40).choices[0].text
    assert tiny == greedy  # a temperature that would overflow is greedy
    assert sampled(8) != first  # 16 draws over a 49k vocabulary: equal only by a bug
    n = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.9,
                                  seed=7, n=3)
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert n.choices[0].text == first and n.choices[1].text == sampled(8)  # choice i: seed + i
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0,
                                            top_p=0.9, seed=7, n=3, stream=True))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert streamed == [c.text for c in n.choices]  # the choices' events interleave, each keeps its index


def test_stop_strings_and_max_tokens_are_honoured(served):
    model, tok, client, _, _ = served
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want = full[: full.find(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"
    short = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and full.startswith(short.choices[0].text)


def test_logprobs_are_the_models(served):
    model, tok, client, _, _ = served
    ids = tok(PROMPTS[0])["input_ids"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=3)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    top = logp.topk(3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([int(top.indices[0])])]
    assert lp.token_logprobs[0] == pytest.approx(float(top.values[0]), abs=1e-5)  # reported in float32
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-5)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 2 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_models_health_and_metrics(served):
    _, _, client, url, engine = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/health").status_code == 200
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "dmc_kv_bytes_in_use") == 0  # nothing in flight
    assert metric(text, "dmc_kv_budget_bytes") == engine.budget
    assert 0 < metric(text, "dmc_kv_bytes_peak") <= engine.budget
    assert metric(text, "dmc_generation_tokens_total") >= 4
    cr = metric(text, "dmc_realised_cr")
    assert (cr > 1.2) if engine.cache.__class__.__name__ == "DMCCache" else cr == 1.0
    assert 'dmc_layer_realised_cr{model_name="tiny",layer="1"}' in text


BAD = [  # (body, status, the param the error names)
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "elsewhere", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "top_k": 5}, 400, "top_k"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "tiny", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    _, _, client, url, engine = served
    for body, status, param in BAD:
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == status, body
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type":
                                                                                              "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    ok = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3
    assert metric(httpx.get(f"{url}/metrics").text, "dmc_kv_bytes_in_use") == 0


def test_a_prompt_the_budget_can_never_hold_is_413_and_nothing_leaks():
    model, tok = chat_model(compressed=True)
    block = 2 * 4 * model.config.dmc_head_dim * 8  # one block of 4 float64 slots, keys and values
    with live_server(model, tok, budget_bytes=40 * block) as (url, engine):  # 40 blocks: 4 pairs x ~10 blocks
        long = list(range(100, 300))
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": long, "max_tokens": 4})
        assert r.status_code == 413 and "--kv-budget" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": long, "max_tokens": 4,
                                                        "stream": True})
        assert r.status_code == 413  # before the stream starts: an HTTP error, not a broken stream
        ok = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3,
                                                        "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dmc_kv_bytes_in_use") == 0 and metric(text, "dmc_requests_failed_total") == 2
        assert metric(text, "dmc_sequences_queued") == 0 and metric(text, "dmc_sequences_in_flight") == 0


def test_a_client_gone_while_queued_is_dropped_before_its_turn(monkeypatch):
    from dmc.serve.engine import Engine

    real_step = Engine._decode_step

    def slow_step(self):  # the running request outlasts the queued client's patience on any machine
        time.sleep(0.05)
        real_step(self)

    monkeypatch.setattr(Engine, "_decode_step", slow_step)
    model, tok = chat_model(compressed=True)
    with live_server(model, tok, max_seqs=1) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        running = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        next(iter(running))  # in flight: the only row --max-seqs allows
        with pytest.raises(httpx.TimeoutException):  # queued behind it; the client gives up and closes
            httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}, timeout=1.0)
        for _ in range(400):
            text = httpx.get(f"{url}/metrics").text
            if metric(text, "dmc_requests_aborted_total") == 1 and metric(text, "dmc_sequences_queued") == 0:
                break  # (the gauges follow the counters at the end of the engine's iteration)
            time.sleep(0.05)
        assert metric(text, "dmc_requests_aborted_total") == 1 and metric(text, "dmc_sequences_queued") == 0
        assert metric(text, "dmc_sequences_in_flight") == 1  # dropped while the other still runs
        running.close()


def test_a_dead_engine_answers_503(monkeypatch):
    from dmc.serve.engine import Engine

    def broken(self, *args, **kwargs):
        raise RuntimeError("device lost")

    model, tok = chat_model(compressed=True)
    with live_server(model, tok) as (url, engine):
        monkeypatch.setattr(Engine, "iterate", broken)
        monkeypatch.setattr(Engine, "_fail_all", broken)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as held:  # the request in hand when the engine died
            client.completions.create(model="tiny", prompt="x", max_tokens=3)
        assert held.value.status_code == 503
        for _ in range(200):
            if engine.dead is not None:
                break
            time.sleep(0.05)
        assert "device lost" in engine.dead
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
