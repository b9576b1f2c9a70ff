"""Decode attention over paged slots for the CPU as one C++ loop (``decode_attention_cpu``), built at first use.

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
import platform
import sys
import time

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
"""


def _cpu_signature() -> str:
    """A short hash of this CPU's instruction sets: the build uses -march=native, so a cache folder shared between
    machines (a cluster's home) must not hand one CPU's build to another."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load_inline

    began = time.perf_counter()
    module = load_inline(name=f"dmc_cpu_decode_{_cpu_signature()}", cpp_sources=_SOURCE, functions=["paged_decode"],
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


def decode_attention_cpu(q, k_pool, v_pool, block_table, lens, scale=None):
    """Same contract as ``decode_attention_reference`` for float32 CPU tensors."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _extension().paged_decode(q.contiguous(), k_pool.contiguous(), v_pool.contiguous(),
                                     block_table.contiguous(), lens.contiguous(), float(scale))
