"""CPU-only autograd Functions behind `layers.py`: fp32 RMSNorm and RoPE with hand-written backwards.

Same math as the portable ops `layers.py` runs everywhere else (tests/moe_model/test_layers.py
checks both ways); they exist because eager CPU autograd decomposes those ops into many small
kernels. Under torch.compile and on other devices `eager_cpu` is false and they step aside.
"""

from __future__ import annotations

import torch

_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)
HAS_FUSED_RMS_NORM = _FUSED_RMS_NORM is not None


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether the CPU-only autograd Functions of this module run: on CPU, outside torch.compile. A
    compiled graph takes the portable ops, the path GPUs run, which the compiler fuses."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class RMSNormCPU(torch.autograd.Function):
    """fp32 RMSNorm on CPU: torch's one-pass forward kernel, which also returns 1/rms, and a
    hand-written backward. Under autograd, `F.rms_norm` decomposes into ~6 ops forward and
    ~12 backward on CPU (its fused backward is CUDA-only); this is 1 and 6, ~1.4x faster for
    a [8, 256, 256] input on the benchmark machine.

    y = w * x * r with r = rsqrt(mean(x^2) + eps), xhat = x * r:
      dL/dw = sum over tokens of g * xhat
      dL/dx = r * (g*w - xhat * mean(g*w * xhat))
    """

    @staticmethod
    def forward(ctx, x_BTD, weight_D, eps):
        y_BTD, rstd_BT1 = _FUSED_RMS_NORM(x_BTD, [x_BTD.shape[-1]], weight_D, eps)
        ctx.save_for_backward(x_BTD, weight_D, rstd_BT1)
        return y_BTD

    @staticmethod
    def backward(ctx, grad_BTD):
        x_BTD, weight_D, rstd_BT1 = ctx.saved_tensors
        D = x_BTD.shape[-1]
        xhat_BTD = x_BTD * rstd_BT1
        grad_w_D = (grad_BTD * xhat_BTD).reshape(-1, D).sum(0)
        gw_BTD = grad_BTD * weight_D
        dot_BT1 = (gw_BTD * xhat_BTD).sum(-1, keepdim=True).div_(D)
        grad_x_BTD = gw_BTD.sub_(xhat_BTD.mul_(dot_BT1)).mul_(rstd_BT1)
        return grad_x_BTD, grad_w_D, None


class SplitRopeCPU(torch.autograd.Function):
    """[q | k | v] heads from the fused projection -> RoPE'd q [B, H, T, Dh], k and v [B, Hkv, T, Dh].

    Same arithmetic as `layers.apply_rope` (x1*c - x2*s, x2*c + x1*s per half), but written into one
    buffer, and the backward writes the whole [q | k | v] gradient in place of autograd's
    chunk/cat/neg/slice graph, which zero-fills and copies the [B, T, Hqkv, Dh] buffer once
    per slice. The rotation is orthogonal: its backward is the rotation by -angle.
    """

    @staticmethod
    def forward(ctx, qkv_BTHqkvDh, cos_TDh, sin_TDh, num_heads: int):
        Hqkv, Dh = qkv_BTHqkvDh.shape[2:]
        Hkv = (Hqkv - num_heads) // 2
        Hqk = num_heads + Hkv  # rotated heads: q and k
        out_BTHqkvDh = torch.empty_like(qkv_BTHqkvDh)
        _rotate(qkv_BTHqkvDh[:, :, :Hqk], cos_TDh, sin_TDh, out_BTHqkvDh[:, :, :Hqk], sign=1.0)
        out_BTHqkvDh[:, :, Hqk:] = qkv_BTHqkvDh[:, :, Hqk:]
        ctx.save_for_backward(cos_TDh, sin_TDh)
        ctx.num_heads = num_heads
        out_BHqkvTDh = out_BTHqkvDh.transpose(1, 2)
        return out_BHqkvTDh[:, :num_heads], out_BHqkvTDh[:, num_heads:Hqk], out_BHqkvTDh[:, Hqk:]

    @staticmethod
    def backward(ctx, grad_q_BHTDh, grad_k_BHkvTDh, grad_v_BHkvTDh):
        cos_TDh, sin_TDh = ctx.saved_tensors
        H = ctx.num_heads
        B, _, T, Dh = grad_q_BHTDh.shape
        Hkv = grad_k_BHkvTDh.shape[1]
        grad_BTHqkvDh = grad_q_BHTDh.new_empty(B, T, H + 2 * Hkv, Dh)
        Hqk = H + Hkv
        g_BTHDh, g_BTHkvDh = grad_q_BHTDh.transpose(1, 2), grad_k_BHkvTDh.transpose(1, 2)
        _rotate(g_BTHDh, cos_TDh, sin_TDh, grad_BTHqkvDh[:, :, :H], sign=-1.0)
        _rotate(g_BTHkvDh, cos_TDh, sin_TDh, grad_BTHqkvDh[:, :, H:Hqk], sign=-1.0)
        grad_BTHqkvDh[:, :, Hqk:] = grad_v_BHkvTDh.transpose(1, 2)
        return grad_BTHqkvDh, None, None, None


def _rotate(x, cos_TDh, sin_TDh, out, sign: float) -> None:
    """out = x * cos + sign * rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; x and out are
    [B, T, heads, Dh] with any number of heads (Hqk, H or Hkv)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c1, c2 = cos_TDh[:, None, :h], cos_TDh[:, None, h:]
    s1, s2 = sin_TDh[:, None, :h], sin_TDh[:, None, h:]
    o1, o2 = out[..., :h], out[..., h:]
    if sign > 0:
        torch.mul(x1, c1, out=o1).sub_(x2 * s1)
        torch.mul(x2, c2, out=o2).add_(x1 * s2)
    else:
        torch.mul(x1, c1, out=o1).add_(x2 * s1)
        torch.mul(x2, c2, out=o2).sub_(x1 * s2)
