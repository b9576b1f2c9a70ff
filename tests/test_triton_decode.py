"""The Triton decode kernels (attention over paged slots, fused append/merge update) against the PyTorch
reference: on CUDA natively, on CPU under TRITON_INTERPRET=1 (correctness only)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
pytest.importorskip("triton")

from dmc.cache import DMCCache  # noqa: E402
from dmc.ops.decode_attention import decode_attention_reference  # noqa: E402
from dmc.ops.triton_decode import decode_attention_triton, triton_available  # noqa: E402
from tests.helpers import CODED_SHAPES, coded_attention_cases, mixed_dmc, random_ids, random_paged_pool  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,H,H_kv,D,bs,lens", [
    (2, 9, 3, 64, 16, [1, 17, 40, 16, 3, 33]),  # SmolLM2 heads, ragged, one slot, block edges
    (1, 4, 4, 40, 5, [7, 1, 12, 5]),  # MHA, head dim not a power of two, odd block size
    (3, 6, 2, 24, 3, [2, 9, 1, 1, 10, 4]),
])
def test_attention_kernel_equals_reference(B, H, H_kv, D, bs, lens):
    k_pool, v_pool, table, lens = random_paged_pool(B, H_kv, D, bs, lens)
    q = torch.randn(B, H, D, generator=torch.Generator().manual_seed(1))
    want = decode_attention_reference(q, k_pool, v_pool, table, lens, scale=0.3)
    dev = [t.to(DEVICE) for t in (q, k_pool, v_pool, table, lens)]
    got = decode_attention_triton(*dev, scale=0.3)
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind,window", [("gqa", 12), ("mha", 0), ("gqa", 3)])
def test_decoding_with_triton_equals_the_reference_backend(kind, window):
    """Forced mixed decisions, a ragged left-padded batch, a 1-token prompt: same logits and slot counts."""
    torch.manual_seed(0)
    ref = mixed_dmc(kind, window=window, dtype=torch.float32, block_size=4).eval().to(DEVICE)
    ids = random_ids(2, 9, seed=3).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding

    def run(backend):
        ref.config.dmc_decode_backend = backend
        cache = DMCCache(ref.config)
        logits = []
        with torch.no_grad():
            prompt = ref(ids[:, :1], attention_mask=mask[:, :1], past_key_values=cache, use_cache=True)
            logits.append(prompt.logits)
            for t in range(1, ids.shape[1]):
                out = ref(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
        slots = torch.stack([cache.num_slots(i) for i in range(ref.config.num_hidden_layers)])
        return torch.cat(logits, 1), slots

    want, want_slots = run("reference")
    got, got_slots = run("triton")
    assert torch.equal(got_slots, want_slots) and (want_slots < mask.sum(1)[None, :, None]).any()  # merges happened
    real = mask.bool()  # padding positions have no defined output
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("B,H,H_kv,D,bs,group,lens", CODED_SHAPES)
def test_attention_kernel_over_codes_equals_decoding_everything(bits, B, H, H_kv, D, bs, group, lens):
    """The kernel decodes each block in place; the reference decodes the whole pool. With and without open slots
    (DMC's, full precision; some pairs have none), garbage codes in dead slots."""
    from dmc.ops.kv_quant import CodedPool
    from dmc.ops.triton_decode import decode_attention_quant_triton

    to = lambda pool: CodedPool(*(t.to(DEVICE) for t in pool[:3]), bits)  # noqa: E731
    for q, k, v, table, lens_t, extra, want in coded_attention_cases(bits, B, H, H_kv, D, bs, group, lens):
        dev_extra = [t.to(DEVICE) for t in extra]
        got = decode_attention_quant_triton(q.to(DEVICE), to(k), to(v), table.to(DEVICE), lens_t.to(DEVICE),
                                            *dev_extra, scale=0.3)
        torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
def test_decoding_on_codes_with_triton_equals_the_reference_backend(bits):
    torch.manual_seed(0)
    model = mixed_dmc("gqa", window=12, dtype=torch.float32, block_size=4, kv_bits=bits, kv_group=8).eval().to(DEVICE)
    ids = random_ids(2, 12, seed=3).to(DEVICE)

    def run(backend):
        model.config.dmc_decode_backend = backend
        cache = DMCCache(model.config)
        with torch.no_grad():
            logits = [model(ids[:, :5], past_key_values=cache).logits]
            logits += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(5, ids.shape[1])]
        return torch.cat(logits, 1)

    torch.testing.assert_close(run("triton"), run("reference"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget_blocks", [60, 400])  # tight: rows released, blocks freed and reused; roomy: all in
def test_serving_on_the_triton_backend_equals_the_reference_backend(budget_blocks):
    """The continuous-batching loop (rows inserted, released and refilled, blocks reused) drives the fused
    update and attention kernels as no single generate() does: same tokens and logits as the reference."""
    from dmc.eval.serving import Request, serve
    from tests.test_serving import LENGTHS

    model = mixed_dmc("gqa", window=12, dtype=torch.float32, block_size=4).eval().to(DEVICE)
    requests = [Request(random_ids(1, n, seed=i)[0].to(DEVICE), new) for i, (n, new) in enumerate(LENGTHS)]
    block = 2 * 4 * model.config.dmc_head_dim * 4  # one block of 4 float32 slots, keys and values

    def run(backend):
        model.config.dmc_decode_backend = backend
        return serve(model, requests, budget_blocks * block, block_size=4, record_logits=True)

    want, got = run("reference"), run("triton")
    assert got.outputs == want.outputs
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert got.stats.final_bytes == 0
    if budget_blocks == 60:
        assert want.stats.max_in_flight < len(requests)  # the budget limited the batch: rows were refilled


def test_the_launch_check_passes_a_sound_cache_and_names_a_block_outside_the_pool(monkeypatch):
    """DMC_CHECK_TRITON=1, the aid for finding a GPU fault: silent on real decoding, one line on a table
    entry that points past the pool (what would make the fused update write out of bounds)."""
    monkeypatch.setenv("DMC_CHECK_TRITON", "1")
    model = mixed_dmc("gqa", window=12, dtype=torch.float32, block_size=4).eval().to(DEVICE)
    model.config.dmc_decode_backend = "triton"
    ids = random_ids(2, 10, seed=3).to(DEVICE)
    cache = DMCCache(model.config)
    with torch.no_grad():
        model(ids[:, :6], past_key_values=cache)
        for t in range(6, 9):
            model(ids[:, t:t + 1], past_key_values=cache)  # checked launches of a sound cache: no error
        for layer in cache.layers:  # every pair's current block now points past the pool
            cols = ((layer.lens - 1) // layer.block_size)[..., None]
            layer.block_table.scatter_(2, cols, layer.k_pool.shape[0] + 5)
        with pytest.raises(RuntimeError, match=r"triton update check: pair \(0, 0\) writes slot \d+ into block"):
            model(ids[:, 9:10], past_key_values=cache)
