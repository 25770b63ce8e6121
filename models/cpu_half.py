"""Half-precision matrix products on a CPU that has no half-precision GEMM kernels.

On a CPU without AVX512-BF16/AMX (this project's AVX2 machines), torch sends a bfloat16 or
float16 matmul to a generic loop instead of oneDNN. Measured here on one core, [64, 4096] x
[4096, 2048]: float32 55 GFLOP/s; bfloat16 x @ W^T (a Linear's forward) 9.6, grad @ W (its
input gradient) 0.3, so a training step of a bf16 model spends minutes in backward. Upcasting
the weight to float32 in blocks of rows and multiplying there runs at ~34 GFLOP/s and gives
what a native half GEMM gives: products accumulated in float32, the result rounded once to
the half dtype. Only a block of the weight is float32 at a time (BLOCK_ROWS rows), so a
152064 x 8192 head costs 128 MiB of transient memory, not a float32 copy of itself.

Upcasting reads and writes the whole weight, so it pays only with enough rows to multiply:
x @ W^T of [M, 8192] x [8192, 8192] took 0.011 s native / 0.18 s upcast at M=1 (a decoding
step), 0.31 / 0.39 s at M=32 and 0.66 / 0.51 s at M=64, so the forward product is upcast from
FORWARD_MIN_ROWS rows. grad @ W is slower native at every M (M=1: 0.54 s / 0.24 s): always.

Where the CPU has the kernels (torch.ops.mkldnn reports bf16/fp16 support) nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

HALF_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_ROWS = 4096  # weight rows upcast at once: 4096 x 8192 x 4 B = 128 MiB at the 72B width
FORWARD_MIN_ROWS = 48  # below, x @ W^T runs faster in torch's own bf16 loop (measured above)


def has_native_kernels(dtype: torch.dtype) -> bool:
    """Whether torch multiplies `dtype` on this CPU with oneDNN rather than a generic loop."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def needs_upcast(weight: torch.Tensor) -> bool:
    """A half-precision weight on a CPU whose half GEMM is the slow generic loop."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in HALF_DTYPES
        and not has_native_kernels(weight.dtype)
    )


def times_weight_t(x: torch.Tensor, weight: torch.Tensor, block: int = BLOCK_ROWS) -> torch.Tensor:
    """y = x @ weight^T, float32 accumulation: x [..., K], weight [N, K] -> y [..., N] float32.

    Computed a block of weight rows (output columns) at a time."""
    x32 = x.float()  # [..., K]
    out = x32.new_empty(*x.shape[:-1], weight.shape[0])  # [..., N]
    for start in range(0, weight.shape[0], block):
        rows = weight[start : start + block].float()  # [b, K]
        out[..., start : start + rows.shape[0]] = x32 @ rows.T  # [..., b]
    return out


def times_weight(g: torch.Tensor, weight: torch.Tensor, block: int = BLOCK_ROWS) -> torch.Tensor:
    """y = g @ weight, float32 accumulation: g [..., N], weight [N, K] -> y [..., K] float32.

    Summed over blocks of weight rows (the contracted dimension)."""
    g32 = g.float()  # [..., N]
    out = g32.new_zeros(*g.shape[:-1], weight.shape[1])  # [..., K]
    for start in range(0, weight.shape[0], block):
        rows = weight[start : start + block].float()  # [b, K]
        out += g32[..., start : start + rows.shape[0]] @ rows  # [..., K]
    return out


def upcast_forward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T (x [..., K]) is faster upcast: needs_upcast and enough rows."""
    return needs_upcast(weight) and x.numel() >= FORWARD_MIN_ROWS * weight.shape[1]


def matmul_weight_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in x's dtype (x [..., K], weight [N, K]), upcast where upcast_forward."""
    if upcast_forward(x, weight):
        return times_weight_t(x, weight).to(torch.promote_types(x.dtype, weight.dtype))
    return x @ weight.T


def matmul_weight(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g @ weight (g [..., N], weight [N, K]), upcast where needs_upcast."""
    if needs_upcast(weight):
        return times_weight(g, weight).to(torch.promote_types(g.dtype, weight.dtype))
    return g @ weight


class UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with float32 products (times_weight_t, from FORWARD_MIN_ROWS rows), in
    the weight's dtype.

    Backward, with G = d loss / d y [..., N]:
        d x = G W (times_weight),   d W = G^T x,   d b = sum of G over the leading dims
    the last two only when W / b are trained (full fine-tuning in half precision)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if not upcast_forward(x, weight):  # a few rows: torch's own loop is faster
            return torch.nn.functional.linear(x, weight, bias)
        out = times_weight_t(x, weight)  # [..., N] float32
        if bias is not None:
            out += bias.float()
        return out.to(weight.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = times_weight(grad, weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            flat_g = grad.reshape(-1, grad.shape[-1]).float()  # [M, N]
            flat_x = x.reshape(-1, x.shape[-1]).float()  # [M, K]
            grad_w = (flat_g.T @ flat_x).to(weight.dtype)  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(weight.dtype)  # [N]
        return grad_x, grad_w, grad_b


def _upcast_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != module.weight.dtype:  # as nn.Linear: inputs of another dtype are an error
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return UpcastLinear.apply(x, module.weight, module.bias)


def upcast_half_linears(model: torch.nn.Module) -> int:
    """Give every half-precision nn.Linear of `model` that needs_upcast the UpcastLinear
    forward; returns how many. A no-op on GPUs and on CPUs with half GEMM kernels."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and needs_upcast(module.weight):
            module.forward = _upcast_linear_forward.__get__(module)  # bound to this instance
            count += 1
    return count
