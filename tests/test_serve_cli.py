"""``dmc serve`` as the user starts it: a separate process on 127.0.0.1, driven with the official ``openai`` client.
Every kind of folder the project makes (vanilla, DMC, DMS, an eviction policy on vanilla, a coded cache) and the
real SmolLM2-135M; greedy output equal to ``dmc.generate`` on the same folder; a start that cannot work is one
line and an exit."""

import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import httpx
import openai
import pytest

from dmc.generate import generate, load
from dmc.serve import launch
from dmc.serve.launch import free_port
from tests.helpers import ROOT, SMOLLM2
from tests.serve_helpers import metric


@contextmanager
def dmc_serve(*args):
    """The user's command from the repo root, offline; yields (base URL, process)."""
    with launch.dmc_serve(*args, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, ready_s=300) as served:
        yield served


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


PROMPT = "The capital of France is"


@pytest.mark.parametrize("kind", ["vanilla", "dmc", "dms", "dmc-8bit"])
def test_every_folder_serves_greedy_output_equal_to_generate(folders, kind):
    vanilla, dmc_dir, dms_dir = folders
    folder = {"vanilla": vanilla, "dmc": dmc_dir, "dms": dms_dir, "dmc-8bit": dmc_dir}[kind]
    kv_bits = 8 if kind == "dmc-8bit" else None
    model, tok = load(folder, "float64", kv_bits=kv_bits)
    want = generate(model, tok, [PROMPT], max_new_tokens=12).texts[0]
    extra = ["--kv-bits", "8"] if kv_bits else []
    with dmc_serve(folder, "--dtype", "float64", "--block-size", "4", "--served-model-name", "m", *extra) as (url, _):
        client = _client(url)
        r = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
        assert streamed == want
        cr = metric(httpx.get(f"{url}/metrics").text, "dmc_realised_cr")
        assert cr == 1.0 if kind == "vanilla" else cr > 1.0


def test_an_eviction_policy_on_a_vanilla_folder(folders):
    vanilla, _, _ = folders
    with dmc_serve(vanilla, "--policy", "streaming_llm", "--budget-cr", "2", "--block-size", "4") as (url, _):
        r = _client(url).completions.create(model=str(vanilla), prompt=PROMPT * 6, max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8
        cr = metric(httpx.get(f"{url}/metrics").text, "dmc_realised_cr")
        assert 1.8 < cr <= 2.0  # ceil(seen / 2) slots kept


def _one_line(*args) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "dmc.cli", "serve", *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmc serve: error:"), out.stderr
    return lines[0]


def test_a_start_that_cannot_work_is_one_line(folders):
    vanilla, dmc_dir, _ = folders
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert "cannot listen" in _one_line(vanilla, "--port", taken.getsockname()[1])
    assert "cannot hold one sequence" in _one_line(vanilla, "--kv-budget", "0.000001", "--port", free_port())
    assert "drop --policy" in _one_line(dmc_dir, "--policy", "tova", "--budget-cr", "2", "--port", free_port())
    assert "choose one of" in _one_line(vanilla, "--policy", "nope", "--budget-cr", "2", "--port", free_port())
    assert "needs a DMC or DMS folder" in _one_line(vanilla, "--kv-bits", "4", "--port", free_port())


def test_bench_serve_runs_every_model_behind_a_real_server(folders, tmp_path):
    import json

    vanilla, dmc_dir, _ = folders
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "dmc.cli", "bench-serve", str(vanilla), str(dmc_dir), "--crs", "4",
                          "--budget-seqs", "3", "--requests", "16", "--clients", "8", "--context", "64",
                          "--out-tokens", "4", "10", "--block-size", "4", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "serve_bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny-vanilla", "tiny-dmc", "dmc synthetic 4x"]
    assert all(r["failed"] == 0 and r["requests"] == 16 and r["ttft_p50_ms"] > 0 for r in rows)
    assert rows[0]["realised_cr"] == 1.0 and rows[2]["realised_cr"] > 3
    assert rows[2]["in_flight_max"] > rows[0]["in_flight_max"]  # the same budget holds more compressed sequences
    assert (tmp_path / "serve_bench.png").exists() and "tiny-dmc" in out.stdout


@pytest.mark.slow
def test_smollm2_served_chat_and_completion_equal_generate():
    model, tok = load(SMOLLM2)
    want = generate(model, tok, [PROMPT], max_new_tokens=8).texts[0]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want_chat = generate(model, tok, [chat_text], max_new_tokens=16).texts[0]
    with dmc_serve(SMOLLM2, "--served-model-name", "smollm2", "--threads", "1") as (url, _):
        client = _client(url)
        assert client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8,
                                         temperature=0).choices[0].text == want
        chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        assert chat.choices[0].message.content == want_chat and "Paris" in want_chat
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, temperature=0, stream=True))
        assert streamed == want_chat
