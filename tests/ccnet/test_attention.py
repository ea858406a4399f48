"""Attention modules against independent dense oracles."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from ccnet import AxialAttention, CrissCrossAttention, NonLocal2d, RecurrentAttention
from ccnet.attention import build_attention
from ccnet.attention_lean import CrissCrossStep
from ccnet.profiling import saved_tensor_bytes

# The criss-cross module runs its hand-written op (impl lean, what auto picks on the CPU) when training;
# impl autograd differentiates the plain formulation. Both are checked against the same oracles.
CrissCrossAutograd = functools.partial(CrissCrossAttention, impl="autograd")
MODULES = [CrissCrossAttention, CrissCrossAutograd, AxialAttention, NonLocal2d]


def _random_module(cls: type, channels: int = 16, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    module = cls(channels).to(dtype)
    with torch.no_grad():
        module.gamma.fill_(0.7)
    return module


def _grid_masks(height: int, width: int) -> tuple[Tensor, Tensor]:
    """(HW, HW) boolean masks: same row, same column."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return rows[:, None] == rows[None, :], cols[:, None] == cols[None, :]


def _dense(query: Tensor, key: Tensor, value: Tensor, allowed: Tensor) -> Tensor:
    """Dense attention over flattened pixels restricted to ``allowed`` (HW, HW): (B, C, HW)."""
    energy = torch.einsum("bci,bcj->bij", query, key).masked_fill(~allowed, float("-inf"))
    return torch.einsum("bij,bcj->bci", energy.softmax(dim=-1), value)


def _projections(module: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (module.query(x).flatten(2), module.key(x).flatten(2), module.value(x).flatten(2))


def criss_cross_oracle(module: CrissCrossAttention, x: Tensor) -> Tensor:
    same_row, same_col = _grid_masks(*x.shape[2:])
    aggregated = _dense(*_projections(module, x), same_row | same_col)
    return module.gamma * aggregated.view_as(x) + x


def axial_oracle(module: AxialAttention, x: Tensor) -> Tensor:
    same_row, same_col = _grid_masks(*x.shape[2:])
    query, key, value = _projections(module, x)
    along_rows = _dense(query, key, value, same_row)
    along_cols = _dense(query, key, along_rows, same_col)
    return module.gamma * along_cols.view_as(x) + x


def nonlocal_oracle(module: NonLocal2d, x: Tensor) -> Tensor:
    everything = torch.ones(x.shape[2] * x.shape[3], x.shape[2] * x.shape[3], dtype=torch.bool)
    return module.gamma * _dense(*_projections(module, x), everything).view_as(x) + x


ORACLES = {
    CrissCrossAttention: criss_cross_oracle,
    CrissCrossAutograd: criss_cross_oracle,
    AxialAttention: axial_oracle,
    NonLocal2d: nonlocal_oracle,
}


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (3, 16, 9, 4), (2, 16, 1, 6)])
def test_matches_dense_oracle(cls: type, shape: tuple[int, ...]) -> None:
    module = _random_module(cls)
    x = torch.randn(*shape, requires_grad=True)
    out = module(x)
    expected = ORACLES[cls](module, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes another path through the criss-cross module
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *module.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *module.parameters()], grad)
    for name, g, w in zip(["x", *dict(module.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_one_impl_per_module_chosen_at_construction() -> None:
    """``auto`` on the CPU: the lean op for criss-cross, autograd for the others; explicit choices hold, and
    a module refuses one it does not have, naming what it has."""
    x = torch.randn(1, 16, 4, 5)
    assert CrissCrossAttention(16).implementation(x) == "lean"
    assert AxialAttention(16).implementation(x) == NonLocal2d(16).implementation(x) == "autograd"
    assert CrissCrossAttention(16, impl="autograd").implementation(x) == "autograd"
    assert CrissCrossAttention(16).implementation(x.to("meta")) == "autograd"  # FLOP counting
    assert "impl=lean" in repr(CrissCrossAttention(16, impl="lean"))
    with pytest.raises(ValueError, match=r"AxialAttention has no impl='lean'; choose one of \['auto', 't"):
        AxialAttention(16, impl="lean")
    with pytest.raises(ValueError, match=r"NonLocal2d has no impl='triton'; choose one of \['auto', 'autog"):
        build_attention("nonlocal", 16, impl="triton")


def test_memory_efficient_step_saves_only_input_and_attention() -> None:
    x = torch.randn(1, 64, 12, 10, requires_grad=True)
    lean = saved_tensor_bytes(RecurrentAttention(_random_module(CrissCrossAttention, 64), 2), x)
    plain = saved_tensor_bytes(RecurrentAttention(_random_module(CrissCrossAutograd, 64), 2), x)
    attention_bytes = 12 * 10 * (12 + 10) * 4
    # step 1 keeps its attention (x and the parameters are excluded), step 2 its input and its attention
    assert lean == 2 * attention_bytes + x.numel() * 4
    assert plain > 2 * lean


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_memory_efficient_step_chunks_values_exactly(chunk: int) -> None:
    module = _random_module(CrissCrossAttention, channels=16, dtype=torch.float64)
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64, requires_grad=True)

    def step(x: Tensor, *params: Tensor) -> Tensor:
        gamma, wq, bq, wk, bk, wv, bv = params
        return CrissCrossStep.apply(x, gamma, chunk, wq, bq, wk, bk, wv, bv)

    params = [
        module.gamma,
        module.query.weight,
        module.query.bias,
        module.key.weight,
        module.key.bias,
        module.value.weight,
        module.value.bias,
    ]
    torch.testing.assert_close(step(x, *params), criss_cross_oracle(module, x))
    assert torch.autograd.gradcheck(step, (x, *params))


def test_criss_cross_counts_the_centre_once() -> None:
    module = _random_module(CrissCrossAttention)
    attention, _ = module.attention_weights(torch.randn(2, 16, 5, 7))
    assert attention.shape == (2, 5, 7, 5 + 7)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5, 7))
    column_part = attention[..., :5]
    diagonal = column_part[:, torch.arange(5), :, torch.arange(5)]  # (H, B, W): pixel against itself
    assert torch.all(diagonal == 0)
    assert torch.all(attention[..., 5:] > 0)  # the row part, centre included, is never masked


@pytest.mark.parametrize("cls", MODULES)
def test_identity_at_init(cls: type) -> None:
    module = cls(16)
    x = torch.randn(2, 16, 6, 5)
    assert module.gamma.item() == 0.0
    torch.testing.assert_close(module(x), x, atol=0, rtol=0)


@pytest.mark.parametrize("cls", MODULES)
def test_gradcheck_float64(cls: type) -> None:
    module = _random_module(cls, channels=16, dtype=torch.float64)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
    params = tuple(module.parameters())
    assert torch.autograd.gradcheck(
        lambda *p: torch.func.functional_call(
            module, dict(zip(dict(module.named_parameters()), p, strict=True)), (x.detach(),)
        ),
        params,
    )


def _dependency(
    recurrence: int,
    height: int = 6,
    width: int = 5,
    pixel: tuple[int, int] = (2, 3),
    cls: type = CrissCrossAttention,
) -> Tensor:
    """Which input pixels output ``pixel`` depends on after ``recurrence`` steps of ``cls``: (H, W) bool."""
    block = RecurrentAttention(_random_module(cls, dtype=torch.float64), recurrence)
    x = torch.randn(1, 16, height, width, dtype=torch.float64, requires_grad=True)
    block(x)[0, :, pixel[0], pixel[1]].sum().backward()
    return x.grad[0].abs().sum(0) > 0


def test_recurrence_one_sees_row_and_column() -> None:
    expected = torch.zeros(6, 5, dtype=torch.bool)
    expected[2, :] = True
    expected[:, 3] = True
    assert torch.equal(_dependency(1), expected)


def test_recurrence_two_sees_every_pixel() -> None:
    assert torch.all(_dependency(2))


def test_axial_recurrence_one_sees_every_pixel() -> None:
    # One rows-then-columns step must reach what RCCA needs R=2 for. The contrast shows the probe can tell
    # them apart: on the same 5x7 map one criss-cross step sees only the pixel's row and column.
    row_and_column = torch.zeros(5, 7, dtype=torch.bool)
    row_and_column[2, :] = True
    row_and_column[:, 3] = True
    assert torch.equal(_dependency(1, height=5, width=7, cls=CrissCrossAttention), row_and_column)
    assert torch.all(_dependency(1, height=5, width=7, cls=AxialAttention))


def test_recurrence_zero_is_identity() -> None:
    dependency = _dependency(0)
    assert dependency.sum() == 1 and dependency[2, 3]


def test_recurrence_shares_weights() -> None:
    attention = CrissCrossAttention(16)
    assert sum(p.numel() for p in RecurrentAttention(attention, 3).parameters()) == sum(
        p.numel() for p in attention.parameters()
    )
    with pytest.raises(ValueError, match="recurrence"):
        RecurrentAttention(attention, -1)


@pytest.mark.parametrize("cls", MODULES)
def test_bf16_autocast_is_finite_with_fp32_softmax(cls: type) -> None:
    module = _random_module(cls)
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    torch.testing.assert_close(out.float(), ORACLES[cls](module, x).detach(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("cls", MODULES)
def test_device_agnostic_meta(cls: type) -> None:
    module = cls(16).to("meta")
    assert module(torch.empty(2, 16, 7, 3, device="meta")).shape == (2, 16, 7, 3)


@pytest.mark.parametrize("cls", MODULES)
def test_rejects_wrong_channels(cls: type) -> None:
    with pytest.raises(ValueError, match=r"expects \(B, 16, H, W\)"):
        cls(16)(torch.randn(1, 8, 4, 4))


def test_build_attention_names() -> None:
    assert isinstance(build_attention("axial", 16), AxialAttention)
    with pytest.raises(ValueError, match="unknown attention 'dense'"):
        build_attention("dense", 16)
    with pytest.raises(ValueError, match="reduction"):
        CrissCrossAttention(4, reduction=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_cpu(cls: type, dtype: torch.dtype) -> None:
    module = _random_module(cls, channels=64)
    x = torch.randn(2, 64, 13, 11)
    expected = module(x)
    module_cuda, x_cuda = module.cuda(), x.cuda().requires_grad_()
    torch.testing.assert_close(module_cuda(x_cuda).cpu(), expected, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        out = module_cuda(x_cuda)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x_cuda.grad).all()
    torch.testing.assert_close(out.float().cpu(), expected.detach(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("cls", MODULES)
def test_runs_in_bfloat16_weights(cls: type) -> None:
    module = _random_module(cls, dtype=torch.bfloat16)
    x = torch.randn(2, 16, 6, 5, dtype=torch.bfloat16, requires_grad=True)
    out = module(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in module.parameters())
    reference = _random_module(cls)
    torch.testing.assert_close(out.float(), ORACLES[cls](reference, x.detach().float()), atol=0.15, rtol=0.05)
