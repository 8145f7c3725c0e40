"""The CPU fast paths of the dense layers against the plain expressions HF Mixtral uses."""

import torch

from moe_model.cpu.functions import SplitRopeCPU
from moe_model.layers import RMSNorm, RotaryEmbedding, apply_rope


def _hf_rms_norm(x, weight, eps):
    """transformers' MixtralRMSNorm.forward."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def test_rms_norm_forward_is_exact_and_gradients_match():
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(3, 7, 48, requires_grad=True)
    g = torch.randn(3, 7, 48)
    y = norm(x)
    y_ref = _hf_rms_norm(x, norm.weight, 1e-5)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    ours = torch.autograd.grad(y, (x, norm.weight), g)
    ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _reference_split(qkv, cos, sin, H):
    Hkv = (qkv.shape[2] - H) // 2
    qk = apply_rope(qkv[:, :, : H + Hkv], cos[:, None], sin[:, None])
    return (
        qk[:, :, :H].transpose(1, 2),
        qk[:, :, H:].transpose(1, 2),
        qkv[:, :, H + Hkv :].transpose(1, 2),
    )


def test_split_rope_matches_apply_rope_exactly_and_in_gradients():
    torch.manual_seed(1)
    H, Hkv, Dh, T = 4, 2, 16, 9
    rope = RotaryEmbedding(Dh, 32, 10000.0)
    cos, sin = rope(3, T, torch.float32)  # an offset start, as when decoding
    qkv = torch.randn(2, T, H + 2 * Hkv, Dh, requires_grad=True)
    ours = SplitRopeCPU.apply(qkv, cos, sin, H)
    ref = _reference_split(qkv, cos, sin, H)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    grads = [torch.randn_like(t) for t in ref]
    (g_ours,) = torch.autograd.grad(ours, qkv, grads)
    (g_ref,) = torch.autograd.grad(ref, qkv, grads)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-6)
