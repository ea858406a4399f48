"""The fused kernels compile for an H100 (sm_90) on this machine, GPU or not: Triton's frontend, its
optimisation passes and ptxas (shipped with Triton) run ahead of time. The interpreter tests check what the
kernels compute; this checks that the GPU compiler accepts them (shapes of dots, layouts, shared memory)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_FLOAT32_POINTERS = {"lse_ptr", "d_ptr", "out_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
H100_SHARED_MEMORY = 227 * 1024  # bytes a block may use on sm_90


def _ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.skipif(not _ptxas_available(), reason="Triton with its NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel_name", ["lse_kernel", "out_kernel", "dq_kernel", "dk_kernel", "dv_kernel"])
def test_kernel_compiles_for_sm90(kernel_name: str, dtype: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ccnet import attention_triton_kernels

    kernel = getattr(attention_triton_kernels, kernel_name)
    values = {
        "SKIP_CENTRE": True,
        "PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "UPCAST": False,
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_C": 64,
        "BLOCK_CK": 64,
    }
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {
        name: "constexpr"
        if name in values
        else ("*fp32" if name in _FLOAT32_POINTERS else f"*{dtype}")
        if name.endswith("_ptr")
        else "i32"
        for name in names
    }
    constexprs = {(names.index(name),): value for name, value in values.items() if name in names}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)
    )
    assert compiled.asm["cubin"]  # ptxas produced machine code
    assert 0 < compiled.metadata.shared <= H100_SHARED_MEMORY
