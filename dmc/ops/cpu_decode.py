"""The DMC decode step's two parts for the CPU as C++ loops, built at first use: the attention over paged slots
(``decode_attention_cpu``; over int8/int4 codes plus the exact open slot, ``decode_attention_quant_cpu``) and the
cache update (``dmc_update_cpu``, the twin of the Triton update kernel).

The portable paged path (``decode_attention.decode_attention_paged``) runs one tiny matmul per block plus scatter
reductions; on two cores it takes 2.7-3.7x the time of dense SDPA over the same number of slots
(``bench/decode_compile.py``), and inductor's code for it is slower still. Here one task per (sequence, KV head)
walks its block table row, scores each block's slots for the group's query heads, folds them into a running softmax
and accumulates the values: every key and value is read once, nothing is gathered or scattered. Same contract as
``decode_attention_reference``; float32 (the CPU's fast dtype here). Needs a C++ compiler (as inductor does); the
build is cached in ``TORCH_EXTENSIONS_DIR``. ``cpu_decode_available()`` says whether it built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor table,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_pool.scalar_type() == torch::kFloat32
              && v_pool.scalar_type() == torch::kFloat32, "paged_decode: float32 only");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() && table.is_contiguous()
              && lens.is_contiguous(), "paged_decode: contiguous tensors only");
  TORCH_CHECK(table.dim() == 3 && table.size(0) == q.size(0) && table.size(1) == lens.size(1)
              && q.size(1) % lens.size(1) == 0, "paged_decode: table (B, H_kv, blocks) and H a multiple of H_kv");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), H_kv = lens.size(1), G = H / H_kv;
  const int64_t BS = k_pool.size(1), MAXB = table.size(2), NB = k_pool.size(0);
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(G), l(G), acc(G * D), s(G * BS);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / H_kv, h = pair % H_kv, n = lp[pair];
      if (n <= 0) continue;  // no slots yet (left padding): output 0
      const float* qh = qp + (b * H + h * G) * D;
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j * BS < n; ++j) {
        TORCH_CHECK(j < MAXB, "paged_decode: pair ", pair, " has ", n, " slots but its table ", MAXB, " blocks");
        const int64_t blk = tp[pair * MAXB + j];
        TORCH_CHECK(blk >= 0 && blk < NB, "paged_decode: pair ", pair, " has no block for column ", j);
        const int64_t live = std::min(BS, n - j * BS);
        const float* kb = kp + blk * BS * D;
        const float* vb = vp + blk * BS * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qh + g * D;
          float* sg = s.data() + g * BS;
          for (int64_t t = 0; t < live; ++t) {
            const float* kr = kb + t * D;
            float dot = 0.f;
            #pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
            sg[t] = dot * sc;
          }
          float top = m[g];
          for (int64_t t = 0; t < live; ++t) top = std::max(top, sg[t]);
          float sum = 0.f;
          #pragma omp simd reduction(+:sum)
          for (int64_t t = 0; t < live; ++t) {  // a vector exp (libmvec): the scalar one dominated the loop
            sg[t] = expf(sg[t] - top);
            sum += sg[t];
          }
          const float corr = std::exp(m[g] - top);  // exp(-inf) = 0 on the first block
          float* ag = acc.data() + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          for (int64_t t = 0; t < live; ++t) {
            const float p = sg[t];
            const float* vr = vb + t * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vr[d];
          }
          m[g] = top;
          l[g] = l[g] * corr + sum;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* og = op + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) og[d] = acc[g * D + d] / l[g];
      }
    }
  });
  return out;
}

// Decode attention over a coded pool (ops/kv_quant.py: per-slot groups of uint8 codes, int4 two a byte low nibble
// first, fp16 scale and minimum per group) plus each pair's exact open slot where open_live: the contract of
// quant_attention.decode_attention_quant_reference. Each slot's key and value are decoded once into registers'
// worth of floats and shared by the group's query heads.
torch::Tensor paged_decode_coded(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scale, torch::Tensor k_min,
                                 torch::Tensor v_codes, torch::Tensor v_scale, torch::Tensor v_min, torch::Tensor table,
                                 torch::Tensor lens, torch::Tensor open_k, torch::Tensor open_v,
                                 torch::Tensor open_live, int64_t bits, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_codes.scalar_type() == torch::kUInt8
              && k_scale.scalar_type() == torch::kFloat16 && k_min.scalar_type() == torch::kFloat16,
              "paged_decode_coded: float32 queries, uint8 codes, float16 scales");
  TORCH_CHECK(bits == 8 || bits == 4, "paged_decode_coded: 8 or 4 bits");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), H_kv = lens.size(1), G = H / H_kv;
  const int64_t BS = k_codes.size(1), CW = k_codes.size(2), NG = k_scale.size(2), GS = D / NG;
  const int64_t MAXB = table.size(2), NB = k_codes.size(0);
  TORCH_CHECK(CW == D * bits / 8 && NG * GS == D, "paged_decode_coded: codes or groups do not fit the head dim");
  TORCH_CHECK(q.is_contiguous() && k_codes.is_contiguous() && v_codes.is_contiguous() && table.is_contiguous()
              && lens.is_contiguous(), "paged_decode_coded: contiguous tensors only");
  TORCH_CHECK(table.dim() == 3 && table.size(0) == B && table.size(1) == H_kv && lens.size(0) == B && H % H_kv == 0,
              "paged_decode_coded: table (B, H_kv, blocks), lens (B, H_kv) and H a multiple of H_kv");
  TORCH_CHECK(v_codes.sizes() == k_codes.sizes() && v_scale.sizes() == k_scale.sizes()
              && v_min.sizes() == k_min.sizes() && k_min.sizes() == k_scale.sizes()
              && v_scale.scalar_type() == torch::kFloat16 && v_min.scalar_type() == torch::kFloat16,
              "paged_decode_coded: key and value pools of one shape");
  const bool has_open = open_live.numel() > 0;
  TORCH_CHECK(!has_open || (open_live.numel() == B * H_kv && open_k.numel() == B * H_kv * D
                            && open_v.numel() == B * H_kv * D && open_k.scalar_type() == torch::kFloat32),
              "paged_decode_coded: open slots (B, H_kv, D) float32 with open_live (B, H_kv)");
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const uint8_t *kc = k_codes.data_ptr<uint8_t>(), *vc = v_codes.data_ptr<uint8_t>();
  const at::Half *ksc = k_scale.data_ptr<at::Half>(), *kmn = k_min.data_ptr<at::Half>();
  const at::Half *vsc = v_scale.data_ptr<at::Half>(), *vmn = v_min.data_ptr<at::Half>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float* okp = has_open ? open_k.data_ptr<float>() : nullptr;
  const float* ovp = has_open ? open_v.data_ptr<float>() : nullptr;
  const bool* olp = has_open ? open_live.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto decode = [&](const uint8_t* codes, const at::Half* s, const at::Half* m, float* x) {
    for (int64_t d = 0; d < D; ++d) {
      const float c = bits == 8 ? codes[d] : ((codes[d >> 1] >> ((d & 1) * 4)) & 0xF);
      x[d] = static_cast<float>(m[d / GS]) + c * static_cast<float>(s[d / GS]);
    }
  };
  at::parallel_for(0, B * H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(G), l(G), acc(G * D), s(G * BS), kf(BS * D), vf(D);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / H_kv, h = pair % H_kv, n = lp[pair];
      const bool open = has_open && olp[pair];
      if (n <= 0 && !open) continue;  // nothing to attend to (left padding): output 0
      const float* qh = qp + (b * H + h * G) * D;
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      // Fold `live` slots whose keys are in kf into every query head's running softmax; value t from value(t, vf).
      auto fold = [&](int64_t live, auto value) {
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qh + g * D;
          float* sg = s.data() + g * BS;
          float top = m[g];
          for (int64_t t = 0; t < live; ++t) {
            const float* kr = kf.data() + t * D;
            float dot = 0.f;
            #pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
            sg[t] = dot * sc;
            top = std::max(top, sg[t]);
          }
          float sum = 0.f;
          for (int64_t t = 0; t < live; ++t) {
            sg[t] = expf(sg[t] - top);
            sum += sg[t];
          }
          const float corr = std::exp(m[g] - top);
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          m[g] = top;
          l[g] = l[g] * corr + sum;
        }
        for (int64_t t = 0; t < live; ++t) {
          const float* vr = value(t);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * BS + t];
            float* ag = acc.data() + g * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vr[d];
          }
        }
      };
      for (int64_t j = 0; j * BS < n; ++j) {
        TORCH_CHECK(j < MAXB, "paged_decode_coded: pair ", pair, " has ", n, " slots but its table ", MAXB, " blocks");
        const int64_t blk = tp[pair * MAXB + j];
        TORCH_CHECK(blk >= 0 && blk < NB, "paged_decode_coded: pair ", pair, " has no block for column ", j);
        const int64_t live = std::min(BS, n - j * BS);
        for (int64_t t = 0; t < live; ++t) {
          const int64_t row = blk * BS + t;
          decode(kc + row * CW, ksc + row * NG, kmn + row * NG, kf.data() + t * D);
        }
        fold(live, [&](int64_t t) {
          const int64_t row = blk * BS + t;
          decode(vc + row * CW, vsc + row * NG, vmn + row * NG, vf.data());
          return vf.data();
        });
      }
      if (open) {  // the open slot, exact, after the coded ones
        std::copy(okp + pair * D, okp + (pair + 1) * D, kf.data());
        fold(1, [&](int64_t) { return ovp + pair * D; });
      }
      for (int64_t g = 0; g < G; ++g) {
        float* og = op + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) og[d] = acc[g * D + d] / l[g];
      }
    }
  });
  return out;
}

// The per-pair part of DMCLayer.step (ops/cache_step.py), as triton_decode's update kernel: from the open slots'
// sums (and the merge window's ring) the new ones, into new tensors; each live pair's open slot into the pools.
std::vector<torch::Tensor> dmc_update(torch::Tensor k_pre, torch::Tensor v, torch::Tensor omega, torch::Tensor merge,
                                      torch::Tensor live, torch::Tensor slot, torch::Tensor cos, torch::Tensor sin,
                                      torch::Tensor k_sum, torch::Tensor v_sum, torch::Tensor w_sum,
                                      torch::Tensor ring_k, torch::Tensor ring_v, torch::Tensor ring_w,
                                      torch::Tensor seg_len, torch::Tensor table, torch::Tensor k_pool,
                                      torch::Tensor v_pool, int64_t BS, int64_t W) {
  const int64_t B = k_pre.size(0), H = k_pre.size(1), D = k_pre.size(2), MAXB = table.size(2), NB = k_pool.size(0);
  auto ks = torch::empty_like(k_sum), vs = torch::empty_like(v_sum), ws = torch::empty_like(w_sum);
  auto rk = W ? torch::empty_like(ring_k) : ring_k, rv = W ? torch::empty_like(ring_v) : ring_v;
  auto rw = W ? torch::empty_like(ring_w) : ring_w;
  const float *kp = k_pre.data_ptr<float>(), *vp = v.data_ptr<float>(), *om = omega.data_ptr<float>();
  const bool *mg = merge.data_ptr<bool>(), *lv = live.data_ptr<bool>();
  const int64_t *sl = slot.data_ptr<int64_t>(), *sg = seg_len.data_ptr<int64_t>(), *tb = table.data_ptr<int64_t>();
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  const float *ks0 = k_sum.data_ptr<float>(), *vs0 = v_sum.data_ptr<float>(), *ws0 = w_sum.data_ptr<float>();
  float *ks1 = ks.data_ptr<float>(), *vs1 = vs.data_ptr<float>(), *ws1 = ws.data_ptr<float>();
  float *kpool = k_pool.data_ptr<float>(), *vpool = v_pool.data_ptr<float>();
  const int64_t half = D / 2;
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> key(D);
    for (int64_t p = begin; p < end; ++p) {
      const bool is_live = lv[p], is_merge = mg[p];
      const float* k = kp + p * D;
      const float* x = vp + p * D;
      const float w = om[p];
      float* ksp = ks1 + p * D;
      float* vsp = vs1 + p * D;
      if (W > 0) {  // the ring moved one place left with the new token last (a live pair), or as it was
        const float *rk0 = ring_k.data_ptr<float>() + p * W * D, *rv0 = ring_v.data_ptr<float>() + p * W * D;
        const float* rw0 = ring_w.data_ptr<float>() + p * W;
        float *rk1 = rk.data_ptr<float>() + p * W * D, *rv1 = rv.data_ptr<float>() + p * W * D;
        float* rw1 = rw.data_ptr<float>() + p * W;
        const int64_t shift = is_live ? 1 : 0;
        for (int64_t i = 0; i < W; ++i) {
          const bool last = is_live && i == W - 1;
          const int64_t src = i + shift;
          for (int64_t d = 0; d < D; ++d) {
            rk1[i * D + d] = last ? k[d] : (src < W ? rk0[src * D + d] : 0.f);
            rv1[i * D + d] = last ? x[d] : (src < W ? rv0[src * D + d] : 0.f);
          }
          rw1[i] = last ? w : (src < W ? rw0[src] : 0.f);
        }
        const int64_t first = W - std::min(sg[p], W);  // the open segment's last min(seg, W) tokens
        float wsum = 0.f;
        std::fill(ksp, ksp + D, 0.f);
        std::fill(vsp, vsp + D, 0.f);
        for (int64_t i = first; i < W; ++i) {
          const float wi = rw1[i];
          wsum += wi;
          for (int64_t d = 0; d < D; ++d) {
            ksp[d] += wi * rk1[i * D + d];
            vsp[d] += wi * rv1[i * D + d];
          }
        }
        ws1[p] = wsum;
      } else {
        const float keep = is_merge ? 1.f : 0.f;
        for (int64_t d = 0; d < D; ++d) {
          ksp[d] = is_live ? ks0[p * D + d] * keep + w * k[d] : ks0[p * D + d];
          vsp[d] = is_live ? vs0[p * D + d] * keep + w * x[d] : vs0[p * D + d];
        }
        ws1[p] = is_live ? ws0[p] * keep + w : ws0[p];
      }
      if (!is_live) continue;
      const int64_t s = sl[p];
      // as PagedSlots.locate: a live pair's open slot must have a block (never a write before or past the pool)
      TORCH_CHECK(s >= 0 && s < MAXB * BS, "dmc_update: pair ", p, " has no table column for slot ", s);
      const int64_t blk = tb[p * MAXB + s / BS];
      TORCH_CHECK(blk >= 0 && blk < NB, "dmc_update: pair ", p, " has no block for slot ", s);
      const float* c = cs + (p / H) * D;
      const float* n = sn + (p / H) * D;
      for (int64_t d = 0; d < D; ++d) key[d] = ksp[d] / ws1[p];
      float* kd = kpool + (blk * BS + s % BS) * D;
      float* vd = vpool + (blk * BS + s % BS) * D;
      for (int64_t d = 0; d < D; ++d) {  // RoPE at the current position: x * cos + rotate_half(x) * sin
        const float partner = d < half ? -key[d + half] : key[d - half];
        kd[d] = key[d] * c[d] + partner * n[d];
        vd[d] = vsp[d] / ws1[p];
      }
    }
  });
  return {ks, vs, ws, rk, rv, rw};
}
"""


def _cpu_signature() -> str:
    """A short hash of this CPU's instruction sets: the build uses -march=native, so a cache folder shared between
    machines (a cluster's home) must not hand one CPU's build to another."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _clear_stale_lock(name: str, older_than_s: float = 600) -> None:
    """A build killed part-way (Ctrl-C) leaves ``lock`` in its folder, and the next load waits on it forever: remove
    one older than any build takes."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > older_than_s:
            os.remove(lock)
    except (ImportError, OSError):  # a private helper of torch's: without it, the wait stays torch's
        pass


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load_inline

    name = f"dmc_cpu_decode_{_cpu_signature()}"
    _clear_stale_lock(name)
    began = time.perf_counter()
    module = load_inline(name=name, cpp_sources=_SOURCE, functions=["paged_decode", "paged_decode_coded", "dmc_update"],
                         extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"])
    took = time.perf_counter() - began
    if took > 2:  # a build, not a load of the cached one: say where the pause came from, once
        print(f"dmc: built the CPU decode kernel in {took:.0f} s (once; cached under TORCH_EXTENSIONS_DIR)",
              file=sys.stderr)
    return module


@functools.cache
def cpu_decode_available() -> bool:
    """Whether the C++ loop builds (or is already built) here; False without a working compiler."""
    try:
        _extension()
    except Exception:  # no compiler, no headers, no ninja: the portable paged path serves instead
        return False
    return True


def dmc_update_cpu(k_pre, v, omega, merge, live, slot, cos, sin, sums, ring, seg_len, table, k_pool, v_pool,
                   block_size: int):
    """Same contract as ``triton_decode.dmc_update_triton`` for float32 CPU tensors: -> (sums, ring), new tensors;
    each live pair's open slot written into ``k_pool``/``v_pool``."""
    B, H, D = k_pre.shape
    win = ring[2].shape[-1] if ring is not None else 0
    c = lambda t: t.contiguous()  # noqa: E731
    rk, rv, rw = (c(t) for t in ring) if ring is not None else (sums[2],) * 3  # unused without a window
    out = _extension().dmc_update(c(k_pre), c(v), c(omega), c(merge), c(live), c(slot), c(cos.expand(B, D)),
                                  c(sin.expand(B, D)), *(c(t) for t in sums), rk, rv, rw, c(seg_len), c(table),
                                  k_pool, v_pool, block_size, win)
    return tuple(out[:3]), (tuple(out[3:]) if win else None)


def decode_attention_cpu(q, k_pool, v_pool, block_table, lens, scale=None):
    """Same contract as ``decode_attention_reference`` for float32 CPU tensors."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _extension().paged_decode(q.contiguous(), k_pool.contiguous(), v_pool.contiguous(),
                                     block_table.contiguous(), lens.contiguous(), float(scale))


def decode_attention_quant_cpu(q, k, v, block_table, lens, open_k=None, open_v=None, open_live=None, scale=None):
    """Same contract as ``quant_attention.decode_attention_quant_reference`` for float32 CPU queries over a coded
    pool (``CodedPool`` keys and values)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = lambda t: t.contiguous()  # noqa: E731
    if open_live is None:
        open_k = open_v = q.new_empty(0)
        open_live = torch.zeros(0, dtype=torch.bool)
    return _extension().paged_decode_coded(c(q), c(k.codes), c(k.scale), c(k.minimum), c(v.codes), c(v.scale),
                                           c(v.minimum), c(block_table), c(lens), c(open_k.float()),
                                           c(open_v.float()), c(open_live), k.bits, float(scale))
