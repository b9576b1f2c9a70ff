"""DMC's training attention (``train_attention.train_attention_reference``) as flash-style Triton kernels, forward
and backward, for CUDA; on CPU they run (slowly, for tests) under ``TRITON_INTERPRET=1``.

Per query head h (KV head h // g), query i, state j <= i: score s_ij = q_i . k_j * scale + (j == i ? 0 : keep_log_j).
The forward streams key blocks through an online softmax and keeps each row's log-sum-exp; the backward recomputes
the probabilities from it (no T x T tensor is ever stored) and returns the gradients of q, k, v and keep_log (the
decisions learn through it: d keep_log_j = sum over queries i > j of dS_ij). merge_log only serves the SDPA form's
sentinel and gets no gradient here. One program per (sequence, query head, block of queries) forward and for dq; one
per (sequence, KV head, block of keys) for dk, dv and d keep_log, looping over the group's query heads, so nothing
is summed across programs.
"""

from __future__ import annotations

import torch

from .triton_decode import triton_available, triton_interpreting

_TRAIN_KERNELS: dict = {}


def _train_kernels() -> dict:
    """Defined on first use, like the decode kernels: importing triton costs seconds. ``triton``, ``tl`` and the
    helper become module globals here, where the kernels look their names up (not defined at the top: the export
    bundles this module with ``triton_decode``, which binds the same two names)."""
    global triton, tl, _dmc_scores, _dmc_key_block, _dmc_query_block
    if _TRAIN_KERNELS:
        return _TRAIN_KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _dmc_scores(q, k, keep, rows, cols, T, scale, PREC: tl.constexpr):
        # (BM, BN) scores with DMC's bias: keep_log of the key, 0 on the diagonal; -inf after the query or past T.
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s += tl.where(rows[:, None] == cols[None, :], 0.0, keep[None, :])
        seen = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T)
        return tl.where(seen, s, float("-inf"))

    @triton.jit
    def _dmc_key_block(K, V, KEEP, kv, cols, d, T, D: tl.constexpr):
        # keys and values (BN, D_P) of KV head ``kv`` at positions ``cols`` and their keep_log, zeros past T
        col_ok = cols < T
        kd = col_ok[:, None] & (d[None, :] < D)
        k = tl.load(K + (kv * T + cols[:, None]) * D + d[None, :], mask=kd, other=0.0)
        v = tl.load(V + (kv * T + cols[:, None]) * D + d[None, :], mask=kd, other=0.0)
        keep = tl.load(KEEP + kv * T + cols, mask=col_ok, other=0.0).to(tl.float32)
        return k, v, tl.maximum(keep, -1.0e4)  # -inf (a hidden state) as MASKED: a running max never starts at -inf

    @triton.jit
    def _dmc_query_block(Q, DO, LSE, DELTA, bh, rows, d, T, D: tl.constexpr):
        # the backward's per-query inputs of head ``bh`` at positions ``rows``: q, dO (BM, D_P), lse, delta (BM,)
        row_ok = rows < T
        qd = row_ok[:, None] & (d[None, :] < D)
        q = tl.load(Q + (bh * T + rows[:, None]) * D + d[None, :], mask=qd, other=0.0)
        do = tl.load(DO + (bh * T + rows[:, None]) * D + d[None, :], mask=qd, other=0.0)
        return (q, do, tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0),
                tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0))

    @triton.jit
    def _forward(Q, K, V, KEEP, OUT, LSE, T, scale, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                 D_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(1)  # b * H + h
        b, h = bh // H, bh % H
        kv = b * (H // G) + h // G  # the KV head's flat index
        start = tl.program_id(0) * BM
        rows = start + tl.arange(0, BM)
        d = tl.arange(0, D_P)
        row_ok = rows < T
        q = tl.load(Q + (bh * T + rows[:, None]) * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        m = tl.full([BM], float("-inf"), tl.float32)
        l_sum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D_P], tl.float32)
        for n0 in range(0, tl.minimum(start + BM, T), BN):
            cols = n0 + tl.arange(0, BN)
            k, v, keep = _dmc_key_block(K, V, KEEP, kv, cols, d, T, D)
            s = _dmc_scores(q, k, keep, rows, cols, T, scale, PREC)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            corr = tl.exp(m - m_new)
            l_sum = l_sum * corr + tl.sum(p, axis=1)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        # every real row sees its own state (bias 0), so l_sum > 0 there; padding rows are masked on store
        l_safe = tl.where(row_ok, l_sum, 1.0)
        out = acc / l_safe[:, None]
        tl.store(OUT + (bh * T + rows[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (d[None, :] < D))
        tl.store(LSE + bh * T + rows, m + tl.log(l_safe), mask=row_ok)

    @triton.jit
    def _backward_kv(Q, K, V, KEEP, DO, LSE, DELTA, DK, DV, DKEEP, T, scale, H: tl.constexpr, G: tl.constexpr,
                     D: tl.constexpr, D_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        kv = tl.program_id(1)  # b * H_kv + h_kv
        b = kv // (H // G)
        start = tl.program_id(0) * BN
        cols = start + tl.arange(0, BN)
        d = tl.arange(0, D_P)
        k, v, keep = _dmc_key_block(K, V, KEEP, kv, cols, d, T, D)
        col_ok = cols < T
        kd = col_ok[:, None] & (d[None, :] < D)
        dk = tl.zeros([BN, D_P], tl.float32)
        dv = tl.zeros([BN, D_P], tl.float32)
        dkeep = tl.zeros([BN], tl.float32)
        for g in range(G):
            bh = b * H + (kv % (H // G)) * G + g
            for m0 in range(start // BM * BM, T, BM):  # queries at or after this block's first key
                rows = m0 + tl.arange(0, BM)
                row_ok = rows < T
                q, do, lse, delta = _dmc_query_block(Q, DO, LSE, DELTA, bh, rows, d, T, D)
                s = _dmc_scores(q, k, keep, rows, cols, T, scale, PREC)
                p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)  # (BM, BN)
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC) * scale
                # the diagonal's bias is the constant 0: its score does not reach keep_log
                dkeep += tl.sum(tl.where(rows[:, None] == cols[None, :], 0.0, ds), axis=0)
        tl.store(DK + (kv * T + cols[:, None]) * D + d[None, :], dk.to(DK.dtype.element_ty), mask=kd)
        tl.store(DV + (kv * T + cols[:, None]) * D + d[None, :], dv.to(DV.dtype.element_ty), mask=kd)
        tl.store(DKEEP + kv * T + cols, dkeep, mask=col_ok)

    @triton.jit
    def _backward_q(Q, K, V, KEEP, DO, LSE, DELTA, DQ, T, scale, H: tl.constexpr, G: tl.constexpr,
                    D: tl.constexpr, D_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        kv = b * (H // G) + h // G
        start = tl.program_id(0) * BM
        rows = start + tl.arange(0, BM)
        d = tl.arange(0, D_P)
        row_ok = rows < T
        qd = row_ok[:, None] & (d[None, :] < D)
        q, do, lse, delta = _dmc_query_block(Q, DO, LSE, DELTA, bh, rows, d, T, D)
        dq = tl.zeros([BM, D_P], tl.float32)
        for n0 in range(0, tl.minimum(start + BM, T), BN):
            cols = n0 + tl.arange(0, BN)
            k, v, keep = _dmc_key_block(K, V, KEEP, kv, cols, d, T, D)
            s = _dmc_scores(q, k, keep, rows, cols, T, scale, PREC)
            p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
        tl.store(DQ + (bh * T + rows[:, None]) * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=qd)

    _TRAIN_KERNELS.update(forward=_forward, backward_kv=_backward_kv, backward_q=_backward_q)
    return _TRAIN_KERNELS


def _blocks(T: int) -> int:
    """Block of queries and of keys: 64 on a GPU; 16 (tl.dot's least) in the interpreter, where a block costs time."""
    return 16 if triton_interpreting() else 64


def _head_width(D: int) -> int:
    return max(16, 1 << max(0, (D - 1).bit_length()))  # tl.dot needs at least 16


def _precision(q) -> str:
    """fp32 inputs multiply in full precision (a GPU's default, TF32, keeps 10 mantissa bits); 16-bit ones as they are."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


class _TrainAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep_log, scale):
        B, H, T, D = q.shape
        H_kv = k.shape[1]
        q, k, v, keep = q.contiguous(), k.contiguous(), v.contiguous(), keep_log.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        bm = _blocks(T)
        _train_kernels()["forward"][(triton.cdiv(T, bm), B * H)](
            q, k, v, keep, out, lse, T, scale, H=H, G=H // H_kv, D=D, D_P=_head_width(D), BM=bm, BN=bm,
            PREC=_precision(q))
        ctx.save_for_backward(q, k, v, keep, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, keep, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        H_kv = k.shape[1]
        d_out = d_out.contiguous()
        delta = (d_out.float() * out.float()).sum(-1)  # (B, H, T): sum_j P_ij dP_ij, per row
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_keep = torch.empty(B, H_kv, T, dtype=torch.float32, device=q.device)
        bm = _blocks(T)
        shape = dict(H=H, G=H // H_kv, D=D, D_P=_head_width(D), BM=bm, BN=bm, PREC=_precision(q))
        _train_kernels()["backward_kv"][(triton.cdiv(T, bm), B * H_kv)](
            q, k, v, keep, d_out, lse, delta, dk, dv, d_keep, T, ctx.scale, **shape)
        _train_kernels()["backward_q"][(triton.cdiv(T, bm), B * H)](
            q, k, v, keep, d_out, lse, delta, dq, T, ctx.scale, **shape)
        return dq, dk, dv, d_keep.to(keep.dtype), None


def fused_train_attention(q, k, v, keep_log, merge_log=None, scale: float | None = None):
    """Same contract as ``train_attention_reference`` (``merge_log`` unused); CUDA tensors, or any under
    ``TRITON_INTERPRET=1``."""
    if not triton_available() or (q.device.type != "cuda" and not triton_interpreting()):
        raise RuntimeError("dmc_train_attention='triton' needs CUDA and the triton package; on this machine use "
                           "'auto' (the fused SDPA form)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _TrainAttention.apply(q, k, v, keep_log, float(scale))
