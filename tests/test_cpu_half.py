"""models/cpu_half.py: float32 products for half-precision weights on a CPU without half GEMM
kernels, against loops over the bf16 values in float64, and against torch's own kernels."""

from __future__ import annotations

import pytest
import torch

from models import cpu_half
from models.cpu_half import UpcastLinear, times_weight, times_weight_t, upcast_half_linears
from models.loading import load_base_model
from models.logprobs import token_logprobs

BF16_REL = 2.0**-8  # a bf16 rounding: half a unit in the 8th significant bit, with slack


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).bfloat16()


def _loop_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] in float64, one dot product at a time."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(float(a[i, k]) * float(b[k, j]) for k in range(a.shape[1]))
    return out


def _assert_rounded_from(got: torch.Tensor, exact: torch.Tensor) -> None:
    """got (bf16) is exact rounded once to bf16: within a bf16 rounding of each entry."""
    assert got.dtype == torch.bfloat16
    gap = (got.double() - exact).abs()
    assert (gap <= BF16_REL * exact.abs() + 1e-30).all(), float((gap / exact.abs()).max())


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocked_products_equal_loops(block: int) -> None:
    """Both products in every blocking (1 row, a block not dividing N=7, one block)."""
    x, weight, g = _bf16(2, 3, 5, seed=0), _bf16(7, 5, seed=1), _bf16(2, 3, 7, seed=2)
    forward = times_weight_t(x, weight, block)  # [2, 3, 7]
    backward = times_weight(g, weight, block)  # [2, 3, 5]
    assert forward.dtype == backward.dtype == torch.float32
    want_forward = _loop_matmul(x.reshape(6, 5), weight.T).reshape(2, 3, 7)
    want_backward = _loop_matmul(g.reshape(6, 7), weight).reshape(2, 3, 5)
    torch.testing.assert_close(forward.double(), want_forward, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(backward.double(), want_backward, rtol=1e-6, atol=1e-6)


@pytest.fixture(params=[1, 10**9], ids=["forward upcast", "forward native"])
def forward_min_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Both forward paths of UpcastLinear: upcast from 1 row, or never (torch's own loop)."""
    monkeypatch.setattr(cpu_half, "FORWARD_MIN_ROWS", request.param)
    return request.param


def test_forward_is_upcast_from_enough_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_half, "has_native_kernels", lambda dtype: False)
    weight, rows = _bf16(7, 5, seed=0), cpu_half.FORWARD_MIN_ROWS
    assert not cpu_half.upcast_forward(_bf16(rows - 1, 5, seed=1), weight)
    assert cpu_half.upcast_forward(_bf16(2, rows // 2, 5, seed=1), weight)  # rows over all dims
    assert not cpu_half.upcast_forward(torch.randn(rows, 5), weight.float())  # float32


def test_upcast_linear_values_and_gradients_equal_loops(forward_min_rows: int) -> None:
    """y = x W^T + b; d x = G W, d W = G^T x, d b = sum G, each one bf16 rounding from the
    float64 loop over the same bf16 numbers."""
    x = _bf16(4, 5, seed=3).requires_grad_()
    weight, bias = _bf16(6, 5, seed=4).requires_grad_(), _bf16(6, seed=5).requires_grad_()
    grad = _bf16(4, 6, seed=6)
    y = UpcastLinear.apply(x, weight, bias)  # [4, 6]
    y.backward(grad)
    bias_row = bias.detach().double()[None, :]  # [1, 6]
    _assert_rounded_from(y.detach(), _loop_matmul(x.detach(), weight.detach().T) + bias_row)
    _assert_rounded_from(x.grad, _loop_matmul(grad, weight.detach()))
    _assert_rounded_from(weight.grad, _loop_matmul(grad.T, x.detach()))
    _assert_rounded_from(bias.grad, grad.double().sum(0))


def test_upcast_linear_matches_torch_bf16_kernels(forward_min_rows: int) -> None:
    """The same function as torch's own bf16 Linear (slow here, exact in float32 sums)."""
    x, weight, grad = _bf16(8, 64, seed=7), _bf16(96, 64, seed=8), _bf16(8, 96, seed=9)
    results = []
    for linear in (UpcastLinear.apply, torch.nn.functional.linear):
        leaf = x.clone().requires_grad_()
        y = linear(leaf, weight, None)
        y.backward(grad)
        results.append((y.detach().float(), leaf.grad.float()))
    (y_up, dx_up), (y_torch, dx_torch) = results
    torch.testing.assert_close(y_up, y_torch, rtol=2 * BF16_REL, atol=1e-3)
    torch.testing.assert_close(dx_up, dx_torch, rtol=2 * BF16_REL, atol=1e-3)


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(
        dtype
    )


def test_only_half_linears_without_kernels_are_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_half, "has_native_kernels", lambda dtype: False)
    assert upcast_half_linears(_model(torch.float32)) == 0  # float32 runs as it is
    model = _model(torch.bfloat16)
    assert upcast_half_linears(model) == 2
    x = _bf16(3, 8, seed=10)
    patched = model(x)
    for module in model.modules():
        module.__dict__.pop("forward", None)  # back to nn.Linear.forward
    torch.testing.assert_close(patched.float(), model(x).float(), rtol=2 * BF16_REL, atol=1e-2)
    monkeypatch.setattr(cpu_half, "has_native_kernels", lambda dtype: True)
    assert upcast_half_linears(_model(torch.bfloat16)) == 0  # oneDNN does it natively


def test_bf16_tiny_model_loads_upcast_and_trains_like_torch_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny Qwen2.5-VL in bf16 on this CPU: its Linears are upcast exactly when the CPU
    lacks bf16 kernels, and the lean head's log-probs and gradients equal torch's kernels'."""
    monkeypatch.setattr(cpu_half, "FORWARD_MIN_ROWS", 1)  # the head's forward upcast too
    model = load_base_model("tiny", torch.device("cpu"), torch.bfloat16)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    upcast = [m for m in linears if "forward" in m.__dict__]
    assert len(upcast) == (0 if cpu_half.has_native_kernels(torch.bfloat16) else len(linears))
    hidden = _bf16(6, model.config.text_config.hidden_size, seed=11)
    weight = model.lm_head.weight.detach()  # [V, H] bf16
    targets = torch.arange(6) * 7
    mask = torch.ones(6)
    results = []
    for upcast_here in (True, False):
        leaf = hidden.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_half, "needs_upcast", lambda w, on=upcast_here: on)
            logp = token_logprobs(leaf[None], weight, targets[None], mask[None]).logp
            logp.sum().backward()
        results.append((logp.detach(), leaf.grad.float()))
    (logp_up, grad_up), (logp_torch, grad_torch) = results
    torch.testing.assert_close(logp_up, logp_torch, rtol=0, atol=0.05)
    torch.testing.assert_close(grad_up, grad_torch, rtol=2 * BF16_REL, atol=1e-3)
