"""Which of a Triton kernel's pointer arguments its compiled code loads from and stores to, read from the Triton IR
of a build for a CUDA target: checkable on a machine without a GPU (``triton.compile`` with a ``GPUTarget`` needs no
driver). A kernel that loads and stores through the same argument lets one thread read what another thread of its
program wrote, with no barrier between them (the fault of issue 37); the fused DMC update must have none.

``python -m dmc.ops.triton_ir`` builds the fused update and the fused training attention and prints, per build, the
arguments read and written as JSON. It must run
without ``TRITON_INTERPRET=1`` (the interpreter's kernels do not compile).
"""

from __future__ import annotations

import json
import re

# IR op results that carry a pointer derive it from these operands (addptr, splat, broadcast, bitcast, ...)
_SSA = re.compile(r"%[\w.$-]+")
_ARG = re.compile(r"%(\w+): !tt\.ptr")
_ITER_ARG = re.compile(r"(%[\w.$-]+) = (%[\w.$-]+)[,)]")


def pointer_access(ttir: str) -> dict[str, list[str]]:
    """{"loaded": [...], "stored": [...]}: the pointer arguments whose addresses reach a ``tt.load`` / ``tt.store``.
    A pointer-typed result derives from every SSA operand of its op, and a loop's carried value from its initial one;
    a pointer returned through ``scf.yield`` from an ``scf.if`` is not followed (the kernels here return none), so a
    caller should also check that the loads and stores it expects are found."""
    roots: dict[str, set[str]] = {}
    access = {"loaded": set(), "stored": set()}
    for line in ttir.splitlines():
        if line.strip().startswith("tt.func"):  # its arguments each carry a loc(...) of their own
            roots.update({f"%{name}": {name} for name in _ARG.findall(line)})
            continue
        line = line.split(" loc(")[0].strip()
        if line.startswith("tt.store"):
            access["stored"] |= roots.get(_SSA.findall(line)[0], set())
            continue
        if "=" not in line:
            continue
        for carried, initial in _ITER_ARG.findall(line):  # a loop's carried value starts as its initial one
            roots[carried] = roots.get(initial, set())
        result, op = (part.strip() for part in line.split("=", 1))
        operands = _SSA.findall(op)
        if op.startswith("tt.load"):
            access["loaded"] |= roots.get(operands[0], set())
        elif "!tt.ptr" in op:
            for name in _SSA.findall(result):
                roots[name] = set().union(*(roots.get(o, set()) for o in operands))
    return {key: sorted(names) for key, names in access.items()}


def compile_ttir(kernel, signature: dict[str, str], constexprs: dict, arch: int = 90) -> str:
    """The Triton IR of ``kernel`` (a ``triton.jit`` function) built for CUDA sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32))
    return compiled.asm["ttir"]


def update_kernel_builds() -> dict[str, dict[str, list[str]]]:
    """The fused DMC update as the launcher builds it, with and without a merge window, in fp32 and bf16 pools."""
    from .triton_decode import _kernels

    kernel = _kernels()["update"]
    builds = {}
    for window in (0, 4):
        for pool in ("fp32", "bf16"):
            sig = {name: "*fp32" for name in kernel.arg_names}
            sig.update(MERGE="*i1", LIVE="*i1", SLOT="*i64", SEG="*i64", TABLE="*i64", KPOOL=f"*{pool}",
                       VPOOL=f"*{pool}", KP=f"*{pool}", VP=f"*{pool}", W=f"*{pool}", MAX_BLOCKS="i32", N_BLOCKS="i32")
            const = dict(H_KV=3, D=64, D_P=64, WIN=window, WIN_P=max(window, 1), BS=16)
            builds[f"update window={window} {pool}"] = pointer_access(compile_ttir(kernel, sig, const))
    return builds


def train_attention_builds() -> dict[str, dict[str, list[str]]]:
    """The fused training attention's three kernels at Llama's head width, in fp32 and bf16."""
    from .triton_train_attention import _train_kernels

    builds = {}
    for dtype in ("fp32", "bf16"):
        for name, kernel in _train_kernels().items():
            sig = {arg: f"*{dtype}" for arg in kernel.arg_names}
            sig.update(KEEP="*fp32", LSE="*fp32", DELTA="*fp32", DKEEP="*fp32", T="i32", scale="fp32")
            const = dict(H=32, G=4, D=128, D_P=128, BM=64, BN=64, PREC="ieee" if dtype == "fp32" else "tf32")
            builds[f"train attention {name} {dtype}"] = pointer_access(compile_ttir(kernel, sig, const))
    return builds


if __name__ == "__main__":
    print(json.dumps(update_kernel_builds() | train_attention_builds(), indent=1))
