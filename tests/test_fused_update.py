"""The fused DMC cache updates, Triton's (``triton_decode.dmc_update_triton``; CUDA, the interpreter here) and the
CPU's C++ loop (``cpu_decode.dmc_update_cpu``): equal to the PyTorch step arithmetic (``ops/cache_step.py``) on random
state, never writing what they read, never storing outside the pool; and the Triton kernels built for a CUDA target,
compiled on this machine, load from no argument they store to (issue 37's race)."""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
pytest.importorskip("triton")

from dmc.ops.cache_step import open_slot_state, running_sums, segment_sums, shift_ring  # noqa: E402
from dmc.ops.cpu_decode import cpu_decode_available, dmc_update_cpu  # noqa: E402
from dmc.ops.triton_decode import dmc_update_triton, triton_available  # noqa: E402
from dmc.ops.triton_ir import pointer_access  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [  # (name, update, device)
    pytest.param(dmc_update_triton, DEVICE, id="triton", marks=pytest.mark.skipif(
        not triton_available(), reason="triton needs CUDA or TRITON_INTERPRET=1")),
    pytest.param(dmc_update_cpu, "cpu", id="cpu", marks=pytest.mark.skipif(
        not cpu_decode_available(), reason="no C++ compiler to build the CPU kernel")),
]


def _state(B, H, D, bs, window, seed):
    """Random open-slot state, decisions for one token (some sequences padding, some pairs at a block edge) and a
    pool with shuffled blocks holding every slot the step may write."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 3 * bs, (B, H), generator=g)
    lens[0, 0] = bs  # an append here opens a new block
    live = (torch.arange(B) != 1)[:, None].expand(B, H)  # sequence 1: a pad token, nothing changes
    merge = (torch.rand(B, H, generator=g) < 0.5) & live
    append = live & ~merge
    slot = torch.where(append, lens, lens - 1)
    cols = int((lens // bs).max()) + 1  # room for an append at every pair
    total = B * H * cols + 2
    table = torch.randperm(total, generator=g)[:B * H * cols].view(B, H, cols)
    st = dict(
        k_pre=torch.randn(B, H, D, generator=g), v=torch.randn(B, H, D, generator=g),
        omega=torch.rand(B, H, generator=g) + 0.1, merge=merge, live=live, append=append, slot=slot,
        cos=torch.randn(B, D, generator=g), sin=torch.randn(B, D, generator=g),
        sums=(torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g), torch.rand(B, H, generator=g) + 1),
        table=table, k_pool=torch.randn(total, bs, D, generator=g), v_pool=torch.randn(total, bs, D, generator=g))
    if window:
        st["ring"] = (torch.randn(B, H, window, D, generator=g), torch.randn(B, H, window, D, generator=g),
                      torch.rand(B, H, window, generator=g) + 0.1)
        st["seg_len"] = torch.randint(1, window + 3, (B, H), generator=g)
    else:
        st["ring"], st["seg_len"] = None, lens
    return st


def _reference(st, bs):
    """The eager step's arithmetic on the same state: (sums, ring, seg_len, k_pool, v_pool)."""
    k_pool, v_pool = st["k_pool"].clone(), st["v_pool"].clone()
    args = (st["k_pre"], st["v"], st["omega"], st["live"], st["merge"])
    if st["ring"] is not None:
        *ring, seg = shift_ring(*st["ring"], st["seg_len"], *args, st["append"])
        sums = segment_sums(*ring, seg)
    else:
        ring, seg = None, st["seg_len"]
        sums = running_sums(*st["sums"], *args)
    key, val = open_slot_state(*sums, st["cos"], st["sin"], k_pool.dtype)
    b, h = st["live"].nonzero(as_tuple=True)
    s = st["slot"][b, h]
    blk = st["table"][b, h, s // bs]
    k_pool[blk, s % bs], v_pool[blk, s % bs] = key[b, h], val[b, h].to(v_pool.dtype)
    return sums, ring, seg, k_pool, v_pool


def _fused(update, device, st, bs, seg_len):
    k_pool, v_pool = st["k_pool"].clone().to(device), st["v_pool"].clone().to(device)
    dev = lambda x: None if x is None else (tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device))  # noqa: E731
    sums, ring = update(*(dev(st[k]) for k in ("k_pre", "v", "omega", "merge", "live", "slot", "cos", "sin", "sums",
                                               "ring")),
                        dev(seg_len), dev(st["table"]), k_pool, v_pool, bs)
    return sums, ring, k_pool, v_pool


@pytest.mark.parametrize("update,device", KERNELS)
@pytest.mark.parametrize("window", [0, 3, 5])
@pytest.mark.parametrize("B,H,D,bs", [(3, 2, 40, 3), (4, 3, 64, 16)])  # odd head dim and block size; SmolLM2's
def test_fused_update_equals_the_step_arithmetic_and_leaves_its_inputs_alone(update, device, window, B, H, D, bs):
    st = _state(B, H, D, bs, window, seed=B + window)
    before = {k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone())
              for k, v in st.items() if v is not None}
    want_sums, want_ring, want_seg, want_k, want_v = _reference(st, bs)
    sums, ring, k_pool, v_pool = _fused(update, device, st, bs, want_seg)
    assert (ring is None) == (want_ring is None) and len(sums) == len(want_sums) == 3
    for got, want in zip(sums + (ring or ()), want_sums + tuple(want_ring or ())):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_pool.cpu(), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_pool.cpu(), want_v, atol=1e-5, rtol=1e-5)
    assert not torch.equal(k_pool.cpu(), st["k_pool"])  # slots were written
    for name, was in before.items():  # the kernel wrote only new tensors and the pool
        now = st[name]
        for a, b in zip(now if isinstance(now, tuple) else (now,), was if isinstance(was, tuple) else (was,)):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("update,device", KERNELS)
def test_a_live_pair_whose_block_is_missing_writes_nothing_outside_its_blocks(update, device):
    """A live pair whose open slot has no block (-1 in its table): not before the pool, not wrapped onto the last
    block. The Triton kernel cannot raise, so it skips the pair and the other pairs' slots are written as usual (the
    launch check, DMC_CHECK_TRITON=1, names it); the C++ loop raises, as the eager path's ``locate`` does."""
    bs = 4
    st = _state(2, 2, 16, bs, window=0, seed=7)
    st["live"] = torch.ones(2, 2, dtype=torch.bool)
    st["merge"] = torch.zeros(2, 2, dtype=torch.bool)
    st["append"] = st["live"].clone()
    st["slot"] = st["seg_len"].clone()
    lost = (0, 1)
    st["table"][lost][st["slot"][lost] // bs] = -1
    if update is dmc_update_cpu:
        with pytest.raises(RuntimeError, match=r"dmc_update: pair 1 has no block for slot"):
            _fused(update, device, st, bs, st["seg_len"])
        return
    _, _, k_pool, v_pool = _fused(update, device, st, bs, st["seg_len"])
    want = sorted([int(st["table"][b, h, st["slot"][b, h] // bs]), int(st["slot"][b, h] % bs)]
                  for b in range(2) for h in range(2) if (b, h) != lost)
    for got, before in ((k_pool, st["k_pool"]), (v_pool, st["v_pool"])):
        assert sorted((got.cpu() != before).any(-1).nonzero().tolist()) == want


def test_pointer_access_follows_a_pointer_through_its_derivations():
    """A hand-written IR in which a store reaches argument A through addptr, splat and a bitcast: A is stored, B
    loaded, and the scalar offset loaded from B does not make B stored; C is loaded through a loop's carried pointer."""
    ttir = """
  tt.func public @k(%A: !tt.ptr<f32> loc("A"(#loc)), %B: !tt.ptr<i32> loc("B"(#loc))) {
    %n = tt.load %B : !tt.ptr<i32> loc(#loc1)
    %p = tt.addptr %A, %n : !tt.ptr<f32>, i32 loc(#loc2)
    %q = tt.splat %p : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>> loc(#loc3)
    %r = tt.bitcast %q : tensor<4x!tt.ptr<f32>> -> tensor<4x!tt.ptr<i32>> loc(#loc4)
    tt.store %r, %x, %m : tensor<4x!tt.ptr<i32>> loc(#loc5)
    %y = tt.load %q : tensor<4x!tt.ptr<f32>> loc(#loc6)
    %z:2 = scf.for %i = %c0 to %c4 step %c1 iter_args(%acc = %y, %ptr = %C0) -> (tensor<4xf32>, !tt.ptr<f32>) {
      %w = tt.load %ptr : !tt.ptr<f32> loc(#loc7)
    }
  }"""
    ttir = ttir.replace("%B: !tt.ptr<i32>", "%B: !tt.ptr<i32> loc(\"B\"(#loc)), %C: !tt.ptr<f32>").replace(
        "%C0", "%C")
    assert pointer_access(ttir) == {"loaded": ["A", "B", "C"], "stored": ["A"]}


@pytest.mark.slow
def test_the_kernels_built_for_a_gpu_load_from_no_argument_they_store_to():
    """Compiled for sm_90 here (no GPU needed): without a barrier between a load and a store of the same memory,
    a warp can read what another warp of its program just wrote; so no argument may be both. The fused training
    attention's kernels are built too (the interpreter accepts code a GPU build refuses)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "dmc.ops.triton_ir"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    builds = json.loads(out.stdout)
    assert len(builds) == 4 + 6
    for name, access in builds.items():
        assert not set(access["loaded"]) & set(access["stored"]), name
        # the analysis sees the loads and the stores (a pointer it lost would make the first check pass trivially)
        if name.startswith("update"):
            ring = {"RK", "RV", "RW", "SEG"} if "window=4" in name else {"KSUM", "VSUM", "WSUM"}
            assert {"SLOT", "TABLE", "LIVE", "KP"} | ring <= set(access["loaded"]), name
            assert {"KPOOL", "VPOOL", "KSUM_OUT", "WSUM_OUT"} <= set(access["stored"]), name
        else:
            assert {"Q", "K", "V", "KEEP"} <= set(access["loaded"]), name
            assert access["stored"], name
