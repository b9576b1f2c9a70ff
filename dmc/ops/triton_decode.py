"""Triton kernels for one DMC decoding step: the append/merge cache update and the attention over each
(sequence, KV head)'s live slots in the paged pool. Used on CUDA; on CPU they run (slowly, for tests)
under ``TRITON_INTERPRET=1``. Both mirror PyTorch references, ``cache_step`` (the update's arithmetic, driven by ``DMCLayer.step``) and
``decode_attention.decode_attention_reference``, and are tested against them.
"""

from __future__ import annotations

import os

import torch

_KERNELS: dict = {}
triton = tl = None  # bound by _kernels()


def triton_interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (then its kernels take CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    import importlib.util

    has = importlib.util.find_spec("triton") is not None
    return has and (torch.cuda.is_available() or triton_interpreting())


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _kernels() -> dict:
    """Compile-on-first-use: importing triton costs seconds and ``import dmc`` must stay light; the
    interpreter mode (TRITON_INTERPRET) is also read when the kernels are defined, so define them late."""
    global triton, tl  # the kernels look their names up in this module's globals
    if _KERNELS:
        return _KERNELS
    try:  # optional dependency; a try block also keeps transformers' remote-code import check quiet
        import triton
        import triton.language as tl
    except ImportError as err:
        raise ImportError("dmc_decode_backend='triton' needs triton: pip install 'dmc[triton]'") from err

    @triton.jit
    def _attend_kernel(Q, K, KS, KM, V, VS, VM, TABLE, LENS, OPEN_K, OPEN_V, OPEN_LIVE, OUT, scale,
                       s_qb, s_qh, s_tb, s_th, s_lb, s_ob, s_oh,
                       H_KV: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                       D_P: tl.constexpr, BS: tl.constexpr, BS_P: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, HAS_OPEN: tl.constexpr):
        # One (sequence, KV head) pair, block by block into a running softmax. BITS 16: the pools hold the
        # slots; 8/4: group-wise codes (KS/KM their scales and minima), each block decoded in registers as
        # code * scale + minimum, the 4-bit channel 2i in the low nibble of byte i. HAS_OPEN: DMC's open slot,
        # exact, folded in last.
        pid = tl.program_id(0)
        b = pid // H_KV
        h = pid % H_KV
        n = tl.load(LENS + b * s_lb + h)
        g = tl.arange(0, G_P)
        d = tl.arange(0, D_P)
        s = tl.arange(0, BS_P)
        gd = (g[:, None] < G) & (d[None, :] < D)
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=gd, other=0.0).to(tl.float32)
        m = tl.full([G_P], float("-inf"), tl.float32)
        l_sum = tl.zeros([G_P], tl.float32)
        acc = tl.zeros([G_P, D_P], tl.float32)
        CW: tl.constexpr = D * BITS // 8  # code bytes per slot (BITS < 16)
        NG: tl.constexpr = D // GROUP
        byte = d * BITS // 8
        shift = (d % 2) * 4  # 4-bit only
        for j in range(0, tl.cdiv(n, BS)):
            blk = tl.load(TABLE + b * s_tb + h * s_th + j)
            # a missing block (-1) reads nothing, never before the pool (a bound, not a scalar mask: see the update)
            live = (s < BS) & (j * BS + s < tl.where(blk >= 0, n, 0))
            sd = live[:, None] & (d[None, :] < D)
            row = blk * BS + s[:, None]
            if BITS == 16:
                k = tl.load(K + row * D + d[None, :], mask=sd, other=0.0).to(tl.float32)
                v = tl.load(V + row * D + d[None, :], mask=sd, other=0.0).to(tl.float32)
            else:
                at_code = row * CW + byte[None, :]
                at_group = row * NG + d[None, :] // GROUP
                kc = tl.load(K + at_code, mask=sd, other=0).to(tl.int32)
                vc = tl.load(V + at_code, mask=sd, other=0).to(tl.int32)
                if BITS == 4:
                    kc = (kc >> shift[None, :]) & 15
                    vc = (vc >> shift[None, :]) & 15
                k = kc.to(tl.float32) * tl.load(KS + at_group, mask=sd, other=0.0).to(tl.float32) + tl.load(
                    KM + at_group, mask=sd, other=0.0).to(tl.float32)
                v = vc.to(tl.float32) * tl.load(VS + at_group, mask=sd, other=0.0).to(tl.float32) + tl.load(
                    VM + at_group, mask=sd, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G_P, BS_P)
            scores = tl.where(live[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            corr = tl.exp(m - m_new)
            l_sum = l_sum * corr + tl.sum(p, axis=1)
            acc = acc * corr[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        if HAS_OPEN:
            if tl.load(OPEN_LIVE + pid) != 0:
                k = tl.load(OPEN_K + pid * D + d, mask=d < D, other=0.0).to(tl.float32)
                v = tl.load(OPEN_V + pid * D + d, mask=d < D, other=0.0).to(tl.float32)
                score = tl.sum(q * k[None, :], axis=1) * scale  # (G_P,)
                m_new = tl.maximum(m, score)
                p = tl.exp(score - m_new)
                corr = tl.exp(m - m_new)
                l_sum = l_sum * corr + p
                acc = acc * corr[:, None] + p[:, None] * v[None, :]
        out = tl.where(l_sum[:, None] > 0, acc / tl.maximum(l_sum, 1e-30)[:, None], 0.0)
        tl.store(OUT + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :], out.to(OUT.dtype.element_ty), mask=gd)

    @triton.jit
    def _update_kernel(KP, VP, W, MERGE, LIVE, SLOT, SEG, COS, SIN, KSUM, VSUM, WSUM, RK, RV, RW, TABLE,
                       KSUM_OUT, VSUM_OUT, WSUM_OUT, RK_OUT, RV_OUT, RW_OUT, KPOOL, VPOOL,
                       H_KV: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, WIN: tl.constexpr, WIN_P: tl.constexpr,
                       BS: tl.constexpr, MAX_BLOCKS, N_BLOCKS):
        # One (sequence, KV head) pair; every tensor contiguous. No argument is both read and written: the threads
        # of a program share no barrier between a load and a store, so a state updated in place could be read by
        # one warp after another warp wrote it. The launcher computes the slot and the segment length (it has the
        # decisions) and passes them read-only; the new sums and ring go to separate outputs, for every pair (a
        # pair that is not live keeps its state).
        pid = tl.program_id(0)
        b = pid // H_KV
        live = tl.load(LIVE + pid) != 0
        merge = tl.load(MERGE + pid) != 0
        d = tl.arange(0, D_P)
        dm = d < D
        k = tl.load(KP + pid * D + d, mask=dm, other=0.0).to(tl.float32)
        v = tl.load(VP + pid * D + d, mask=dm, other=0.0).to(tl.float32)
        w = tl.load(W + pid).to(tl.float32)
        if WIN > 0:
            # The ring moved one place left with the new token put last (a live pair), or as it was; the open
            # segment's last min(seg, WIN) tokens summed.
            i = tl.arange(0, WIN_P)
            src = i + tl.where(live, 1, 0)
            from_ring = (src < WIN)[:, None] & dm[None, :]
            rk = tl.load(RK + pid * WIN * D + src[:, None] * D + d[None, :], mask=from_ring, other=0.0)
            rv = tl.load(RV + pid * WIN * D + src[:, None] * D + d[None, :], mask=from_ring, other=0.0)
            rw = tl.load(RW + pid * WIN + src, mask=src < WIN, other=0.0)
            last = i == tl.where(live, WIN - 1, WIN_P)  # no index when not live (a scalar & a vector: see below)
            rk = tl.where(last[:, None], k[None, :], rk)
            rv = tl.where(last[:, None], v[None, :], rv)
            rw = tl.where(last, w, rw)
            row = (i < WIN)[:, None] & dm[None, :]
            tl.store(RK_OUT + pid * WIN * D + i[:, None] * D + d[None, :], rk, mask=row)
            tl.store(RV_OUT + pid * WIN * D + i[:, None] * D + d[None, :], rv, mask=row)
            tl.store(RW_OUT + pid * WIN + i, rw, mask=i < WIN)
            seg = tl.load(SEG + pid)
            weights = tl.where((i < WIN) & (i >= WIN - tl.minimum(seg, WIN)), rw, 0.0)
            k_sum = tl.sum(weights[:, None] * rk, axis=0)
            v_sum = tl.sum(weights[:, None] * rv, axis=0)
            w_sum = tl.sum(weights, axis=0)
        else:
            keep = tl.where(merge, 1.0, 0.0)
            k_old = tl.load(KSUM + pid * D + d, mask=dm, other=0.0)
            v_old = tl.load(VSUM + pid * D + d, mask=dm, other=0.0)
            w_old = tl.load(WSUM + pid)
            k_sum = tl.where(live, k_old * keep + w * k, k_old)
            v_sum = tl.where(live, v_old * keep + w * v, v_old)
            w_sum = tl.where(live, w_old * keep + w, w_old)
        tl.store(KSUM_OUT + pid * D + d, k_sum, mask=dm)
        tl.store(VSUM_OUT + pid * D + d, v_sum, mask=dm)
        tl.store(WSUM_OUT + pid, w_sum)
        # A live pair's open slot: RoPE of the pooled key at the current position, x * cos + rotate_half(x) * sin.
        slot = tl.load(SLOT + pid)
        has_slot = live & (slot >= 0) & (slot < MAX_BLOCKS * BS)
        col = tl.where(has_slot, slot // BS, 0)  # always inside the table (the launcher gives it a column)
        blk = tl.where(has_slot, tl.load(TABLE + pid * MAX_BLOCKS + col), -1)
        half = D // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        w_div = tl.where(has_slot, w_sum, 1.0)  # a pair that writes no slot may have no weight yet
        key = k_sum / w_div
        key_partner = tl.sum(tl.where(partner[:, None] == d[None, :], key[None, :], 0.0), axis=1)
        cos = tl.load(COS + b * D + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(SIN + b * D + d, mask=dm, other=0.0).to(tl.float32)
        key_rot = key * cos + sign * key_partner * sin
        dst = blk * BS * D + (slot % BS) * D + d
        # never before or past the pool; the condition as a bound on d, since Triton's interpreter refuses a
        # vector mask combined with a scalar one
        stored = d < tl.where(has_slot & (blk >= 0) & (blk < N_BLOCKS), D, 0)
        tl.store(KPOOL + dst, key_rot.to(KPOOL.dtype.element_ty), mask=stored)
        tl.store(VPOOL + dst, (v_sum / w_div).to(VPOOL.dtype.element_ty), mask=stored)

    _KERNELS.update(attend=_attend_kernel, update=_update_kernel)
    return _KERNELS


def decode_attention_triton(q, k_pool, v_pool, block_table, lens, scale=None):
    """Same contract as ``decode_attention_reference``; one program per (sequence, KV head)."""
    return _launch(q, (k_pool, q, q), (v_pool, q, q), block_table, lens, None, scale, bits=16, group=q.shape[-1])


def decode_attention_quant_triton(q, k, v, block_table, lens, open_k=None, open_v=None, open_live=None, scale=None):
    """Same contract as ``quant_attention.decode_attention_quant_reference`` (``k``, ``v``: ``CodedPool``); one
    program per (sequence, KV head), decoding each block in place."""
    open_slot = (open_k, open_v, open_live.to(torch.int8)) if open_k is not None else None
    group = q.shape[-1] // k.scale.shape[-1]
    return _launch(q, k[:3], v[:3], block_table, lens, open_slot, scale, bits=k.bits, group=group)


def _launch(q, k_parts, v_parts, block_table, lens, open_slot, scale, bits, group):
    """One program per (sequence, KV head) over pools (blocks, block_size, ...); unused pointers (scales at 16
    bits, no open slot) get ``q``."""
    B, H, D = q.shape
    H_kv = lens.shape[1]
    G, BS = H // H_kv, k_parts[0].shape[1]
    scale = D**-0.5 if scale is None else scale
    q, table, lens = q.contiguous(), block_table.contiguous(), lens.contiguous()
    open_k, open_v, open_live = (t.contiguous() for t in open_slot) if open_slot is not None else (q, q, q)
    out = torch.empty_like(q)
    parts = [t.contiguous() for t in (*k_parts, *v_parts)]
    _kernels()["attend"][(B * H_kv,)](
        q, *parts, table, lens, open_k, open_v, open_live, out, scale,
        q.stride(0), q.stride(1), table.stride(0), table.stride(1), lens.stride(0), out.stride(0), out.stride(1),
        H_KV=H_kv, G=G, G_P=_pow2(G), D=D, D_P=_pow2(D), BS=BS, BS_P=_pow2(BS), BITS=bits, GROUP=group,
        HAS_OPEN=open_slot is not None,
    )
    return out


def check_update_launch(live, slot, sums, ring, seg_len, table, pool_blocks: int, block_size: int, cos) -> None:
    """Debugging aid (``DMC_CHECK_TRITON=1``): every address the fused update will touch, checked against
    its tensor before the launch, so that a fault on the GPU says whether the kernel's inputs were already
    wrong (a slot outside its blocks, a block outside the pool, state of the wrong shape) or the kernel
    itself is. It reads the device's tensors back, so it costs a sync per layer and step."""
    B, H = live.shape
    D = sums[0].shape[-1]
    got = {"slot": slot, "k_sum": sums[0], "v_sum": sums[1], "w_sum": sums[2]}
    want = {"slot": (B, H), "k_sum": (B, H, D), "v_sum": (B, H, D), "w_sum": (B, H)}
    if ring is not None:
        W = ring[2].shape[-1]
        got.update(ring_k=ring[0], ring_w=ring[2], seg_len=seg_len)
        want.update(ring_k=(B, H, W, D), ring_w=(B, H, W), seg_len=(B, H))
    for name, shape in want.items():
        if tuple(got[name].shape) != shape:
            raise RuntimeError(f"triton update check: {name} is {tuple(got[name].shape)}, not {shape}")
    if cos.numel() not in (D, B * D):
        raise RuntimeError(f"triton update check: cos has {cos.numel()} values for {B} rows of {D}")
    col = slot[live] // block_size
    if bool((slot[live] < 0).any()) or bool((col >= table.shape[-1]).any()):
        raise RuntimeError("triton update check: a live pair's slot lies outside its block table")
    b, h = live.nonzero(as_tuple=True)
    blk = table[b, h, col]
    bad = (blk < 0) | (blk >= pool_blocks)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"triton update check: pair ({int(b[i])}, {int(h[i])}) writes slot {int(slot[b[i], h[i]])} "
                           f"into block {int(blk[i])} of a pool of {pool_blocks}")


def dmc_update_triton(k_pre, v, omega, merge, live, slot, cos, sin, sums, ring, seg_len, table, k_pool, v_pool,
                      block_size: int):
    """The per-pair part of ``DMCLayer.step`` in one kernel: from the open slots' ``sums`` (k_sum, v_sum, w_sum) and,
    with a merge window, ``ring`` (ring_k, ring_v, ring_w; else None), the new sums and ring, returned as new
    tensors -> (sums, ring), and each live pair's open slot written into ``k_pool``/``v_pool``. ``merge`` already
    masked (a pair's first token appends); ``slot`` (B, H_kv) each pair's open slot after this token and ``seg_len``
    its open segment's length after it (``cache_step.segment_length``; unused without a window); blocks allocated.
    Nothing the kernel reads is written by it."""
    B, H, D = k_pre.shape
    win = ring[2].shape[-1] if ring is not None else 0
    if os.environ.get("DMC_CHECK_TRITON") == "1":
        check_update_launch(live, slot, sums, ring, seg_len, table, k_pool.shape[0], block_size, cos)
    sums = tuple(t.contiguous() for t in sums)
    new_sums = tuple(torch.empty_like(t) for t in sums)
    if ring is not None:
        ring = tuple(t.contiguous() for t in ring)
        new_ring = tuple(torch.empty_like(t) for t in ring)
    else:  # without a window the kernel compiles no ring code: its six pointers are placeholders
        ring = new_ring = (sums[2],) * 3
    table = table.contiguous() if table.shape[-1] else torch.full((B, H, 1), -1, dtype=table.dtype, device=table.device)
    _kernels()["update"][(B * H,)](
        k_pre.contiguous(), v.contiguous(), omega.contiguous(), merge.contiguous(), live.contiguous(),
        slot.contiguous(), seg_len.contiguous(), cos.expand(B, D).contiguous(), sin.expand(B, D).contiguous(),
        *sums, *ring, table, *new_sums, *new_ring, k_pool, v_pool,
        H_KV=H, D=D, D_P=_pow2(D), WIN=win, WIN_P=_pow2(max(win, 1)), BS=block_size, MAX_BLOCKS=table.shape[-1],
        N_BLOCKS=k_pool.shape[0],
    )
    return new_sums, (new_ring if win else None)
