"""The Triton kernels (``ccnet.attention_triton``, the ``triton`` impl) against dense attention with a
criss-cross (or row / column) mask, forward and backward. On the CPU they run under Triton's interpreter at
tiny sizes, so CI checks them without a GPU; the CUDA tests repeat the comparison at the paper's feature size
on a device."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

import ccnet
from ccnet.attention import AxialAttention, CrissCrossAttention


def _triton_modules() -> dict[str, ModuleType]:
    """Triton's Python modules (its native extension stays: it cannot be loaded twice) and ours."""
    return {
        name: module
        for name, module in sys.modules.items()
        if (name == "triton" or name.startswith("triton."))
        and not name.startswith("triton._C")
        or name in ("ccnet.attention_triton", "ccnet.attention_triton_kernels")
    }


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    """The module with its kernels decorated under the interpreter. Triton decides at decoration time, its own
    standard library included, so Triton is imported afresh with TRITON_INTERPRET=1 and put back after."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    saved_env, saved_modules = os.environ.get("TRITON_INTERPRET"), _triton_modules()
    for name in saved_modules:
        del sys.modules[name]
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield importlib.import_module("ccnet.attention_triton")
    finally:
        for name in _triton_modules():
            del sys.modules[name]
        sys.modules.update(saved_modules)
        # the package keeps its submodules as attributes
        for name in ("attention_triton", "attention_triton_kernels"):
            if f"ccnet.{name}" in saved_modules:
                setattr(ccnet, name, saved_modules[f"ccnet.{name}"])
            elif hasattr(ccnet, name):
                delattr(ccnet, name)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention over all H*W pixels, keys restricted by ``allowed`` (HW, HW): the oracle."""
    batch, _, height, width = q.shape
    energies = torch.einsum("bcp,bcj->bpj", q.flatten(2), k.flatten(2)).masked_fill(~allowed, float("-inf"))
    attention = torch.softmax(energies, dim=-1).nan_to_num(0.0)  # a pixel with no key: zeros
    out = torch.einsum("bpj,bcj->bcp", attention, v.flatten(2))  # (B, C, HW)
    return out.view(batch, -1, height, width)


def _masks(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    same_row = rows[:, None] == rows[None, :]
    same_col = cols[:, None] == cols[None, :]
    return same_row, same_col


def criss_cross_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    same_row, same_col = _masks(*q.shape[2:])
    return _dense(q, k, v, same_row | same_col)  # the pixel itself once


def axial_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    same_row, same_col = _masks(*q.shape[2:])
    return _dense(q, k, _dense(q, k, v, same_row), same_col)


def _compare(function, oracle, shape: tuple[int, ...], dtype: torch.dtype, tolerance: float) -> None:  # noqa: ANN001
    batch, key_channels, channels, height, width = shape
    torch.manual_seed(sum(shape))
    inputs = [torch.randn(batch, c, height, width) for c in (key_channels, key_channels, channels)]
    fused_inputs = [t.to(dtype).requires_grad_() for t in inputs]
    out = function(*fused_inputs)
    assert out.dtype == dtype and out.shape == (batch, channels, height, width)
    grad = torch.randn_like(out, dtype=torch.float32)
    fused_grads = torch.autograd.grad(out, fused_inputs, grad.to(dtype))
    exact_inputs = [t.to(dtype).double().requires_grad_() for t in inputs]  # the same rounded values
    expected = oracle(*exact_inputs)
    expected_grads = torch.autograd.grad(expected, exact_inputs, grad.double())
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), (out, *fused_grads), (expected, *expected_grads), strict=True
    ):
        scale = want.abs().max().item() + 1e-12
        error = (got.double() - want).abs().max().item() / scale
        assert error < tolerance, f"{function.__name__} {shape} {dtype} {name}: relative error {error:.2e}"


SHAPES = [
    (2, 3, 5, 5, 7),  # B, C', C, H, W
    (1, 2, 20, 18, 3),  # tall: several key blocks in no pass, value channels in two tiles
    (1, 4, 6, 1, 4),  # one row: the column pass has no key but the centre
    (1, 2, 3, 4, 1),  # one column
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ["criss_cross", "axial"])
def test_float32_matches_dense_oracle(kernels: ModuleType, name: str, shape: tuple[int, ...]) -> None:
    function = getattr(kernels, f"{name}_aggregate")
    oracle = criss_cross_oracle if name == "criss_cross" else axial_oracle
    _compare(function, oracle, shape, torch.float32, 1e-5)


@pytest.mark.slow
def test_sequences_longer_than_one_block(kernels: ModuleType) -> None:
    _compare(kernels.criss_cross_aggregate, criss_cross_oracle, (1, 2, 70, 70, 2), torch.float32, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["criss_cross", "axial"])
def test_half_precisions(kernels: ModuleType, name: str, dtype: torch.dtype) -> None:
    function = getattr(kernels, f"{name}_aggregate")
    oracle = criss_cross_oracle if name == "criss_cross" else axial_oracle
    _compare(function, oracle, (1, 2, 8, 6, 5), dtype, 3e-2 if dtype == torch.bfloat16 else 4e-3)


def test_strided_inputs_are_read_in_place(kernels: ModuleType) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, c, 5, 6) for c in (2, 2, 7))
    expected = kernels.criss_cross_aggregate(q, k, v)
    channels_last = [t.contiguous(memory_format=torch.channels_last) for t in (q, k, v)]
    assert not channels_last[2].is_contiguous()
    torch.testing.assert_close(kernels.criss_cross_aggregate(*channels_last), expected)


@pytest.mark.parametrize("module_type", [CrissCrossAttention, AxialAttention])
def test_modules_give_the_reference_results(kernels: ModuleType, module_type: type) -> None:
    """The same module on the Triton kernels and on autograd: same output and same gradients for every
    parameter and the input."""
    torch.manual_seed(0)
    reference = module_type(16, impl="autograd").double()
    with torch.no_grad():
        reference.gamma.fill_(0.7)  # 0 at initialisation would hide the attention
    fused = module_type(16, impl="triton").double()
    fused.load_state_dict(reference.state_dict())
    fused.float()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    results = []
    for module, inputs in ((reference, x.clone()), (fused, x.float())):
        inputs.requires_grad_()
        out = module(inputs)
        out.square().sum().backward()
        results.append((out, inputs.grad, {n: p.grad for n, p in module.named_parameters()}))
    (ref_out, ref_dx, ref_grads), (out, dx, grads) = results
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), grad, rtol=1e-4, atol=1e-4, msg=name)


def test_impl_triton_without_a_device_is_a_clear_error(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(
        RuntimeError,
        match="impl='triton': the Triton kernels need a CUDA device or TRITON_INTERPRET=1, got cpu",
    ):
        CrissCrossAttention(16, impl="triton")(torch.randn(1, 16, 3, 3))


def test_bad_inputs_are_refused(kernels: ModuleType) -> None:
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="expected q, k"):
        kernels.criss_cross_aggregate(q, q, torch.randn(1, 5, 3, 5))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        kernels.criss_cross_aggregate(q, q, torch.randn(1, 5, 3, 4, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["criss_cross", "axial"])
def test_cuda_at_the_papers_size(name: str, dtype: torch.dtype) -> None:
    """97x97 features (769 / 8), 512 value and 64 key channels, against the dense oracle in float64."""
    from ccnet import attention_triton

    function = getattr(attention_triton, f"{name}_aggregate")
    oracle = criss_cross_oracle if name == "criss_cross" else axial_oracle
    torch.manual_seed(0)
    q, k = (torch.randn(1, 64, 97, 97, device="cuda") * 0.2 for _ in range(2))
    v = torch.randn(1, 512, 97, 97, device="cuda")
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = function(*inputs)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    want = oracle(*exact)
    want_grads = torch.autograd.grad(want, exact, grad.double())
    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        error = (got.double() - expected).abs().max() / expected.abs().max()
        assert error < tolerance


def test_the_model_switch_reaches_every_attention_module(kernels: ModuleType) -> None:
    """``impl`` in the model's config (``model.impl`` in a run's) selects the kernels everywhere, stem
    placement included, with the reference's results."""
    from ccnet import build_ccnet

    torch.manual_seed(0)
    reference = build_ccnet("ccnet_tiny", 4, placement="both", impl="autograd").eval()
    fused = build_ccnet("ccnet_tiny", 4, placement="both", impl="triton").eval()
    fused.load_state_dict(reference.state_dict())
    for module in (reference, fused):
        for attention in module.modules():
            if isinstance(attention, CrissCrossAttention):
                torch.nn.init.constant_(attention.gamma, 0.5)
    modules = [m for m in fused.modules() if isinstance(m, CrissCrossAttention)]
    assert {m.impl for m in modules} == {"triton"} and len(modules) == 2
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)["out"], reference(x)["out"], rtol=1e-4, atol=1e-4)
