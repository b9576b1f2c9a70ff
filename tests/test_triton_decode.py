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
from tests.helpers import mixed_dmc, random_ids  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_paged(B, H_kv, D, bs, lens, seed=0):
    """A pool with shuffled block order and garbage in dead slots, plus its block table."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens).view(B, H_kv)
    n_blocks = -(-lens // bs)
    total = int(n_blocks.sum()) + 3
    k_pool = torch.randn(total, bs, D, generator=g)
    v_pool = torch.randn(total, bs, D, generator=g)
    order = torch.randperm(total, generator=g)
    table = torch.full((B, H_kv, int(n_blocks.max())), -1, dtype=torch.long)
    used = 0
    for b in range(B):
        for h in range(H_kv):
            n = int(n_blocks[b, h])
            table[b, h, :n] = order[used:used + n]
            used += n
    return k_pool, v_pool, table, lens


@pytest.mark.parametrize("B,H,H_kv,D,bs,lens", [
    (2, 9, 3, 64, 16, [1, 17, 40, 16, 3, 33]),  # SmolLM2 heads, ragged, one slot, block edges
    (1, 4, 4, 40, 5, [7, 1, 12, 5]),  # MHA, head dim not a power of two, odd block size
    (3, 6, 2, 24, 3, [2, 9, 1, 1, 10, 4]),
])
def test_attention_kernel_equals_reference(B, H, H_kv, D, bs, lens):
    k_pool, v_pool, table, lens = _random_paged(B, H_kv, D, bs, lens)
    q = torch.randn(B, H, D, generator=torch.Generator().manual_seed(1))
    want = decode_attention_reference(q, k_pool, v_pool, table, lens, scale=0.3)
    dev = [t.to(DEVICE) for t in (q, k_pool, v_pool, table, lens)]
    got = decode_attention_triton(*dev, scale=0.3)
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind,window", [("gqa", 12), ("mha", 0), ("gqa", 3)])
def test_decoding_with_triton_equals_the_reference_backend(kind, window):
    """Forced mixed decisions, a ragged left-padded batch, a 1-token prompt: same logits and slot counts."""
    torch.manual_seed(0)
    ref = mixed_dmc(kind, window=window, dtype=torch.float32, block_size=4).eval()
    ids = random_ids(2, 9, seed=3)
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
