"""The fused LM-head + cross-entropy against F.linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from moe_model import loss as loss_mod
from moe_model.cpu import hugepages, scratch
from moe_model.loss import causal_lm_loss, head_and_loss, head_loss, shift_labels


@pytest.fixture(params=[(None, 10**9), (None, 40 * 4 * 37), (80 * 4 * 37, 40 * 4 * 37)])
def chunk_bytes(request, monkeypatch):
    """One GEMM block and one softmax chunk; one block of 40-row chunks (the last partial);
    80-row blocks (the last partial) of 40-row chunks. The inputs have 87 rows of V=37."""
    block_bytes, chunk_bytes = request.param
    monkeypatch.setattr(loss_mod, "CPU_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", chunk_bytes)
    return request.param


def _inputs(seed=0, B=3, T=29, D=16, V=37):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100
    return h, w, labels


def test_loss_logits_and_gradients_match_reference(chunk_bytes):
    h, w, labels = _inputs()
    logits, loss = head_and_loss(h, w, labels)
    ref_logits = F.linear(h, w)
    ref_loss = causal_lm_loss(ref_logits, labels)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    grads = torch.autograd.grad(loss, (h, w))
    for a, b in zip(grads, torch.autograd.grad(ref_loss, (h, w)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_through_returned_logits_is_kept(chunk_bytes):
    h, w, labels = _inputs(1)
    logits, loss = head_and_loss(h, w, labels)
    total = loss + logits.square().mean()
    ref_logits = F.linear(h, w)
    ref_total = causal_lm_loss(ref_logits, labels) + ref_logits.square().mean()
    for a, b in zip(
        torch.autograd.grad(total, (h, w)), torch.autograd.grad(ref_total, (h, w)), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    logits, _ = head_and_loss(h, w, labels)
    only_logits = torch.autograd.grad(logits.sum(), (h, w))
    ref_only = torch.autograd.grad(F.linear(h, w).sum(), (h, w))
    for a, b in zip(only_logits, ref_only, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_last_position_and_ignored_labels_do_not_count():
    h, w, _ = _inputs(2, B=1, T=5)
    labels = torch.tensor([[5, 1, 2, -100, 4]])
    _, loss = head_and_loss(h, w, labels)
    logits = F.linear(h, w)[0]
    by_hand = [torch.logsumexp(logits[t], 0) - logits[t, labels[0, t + 1]] for t in (0, 1, 3)]
    torch.testing.assert_close(loss, torch.stack(by_hand).mean())


def test_huge_page_logits_buffer_matches_reference(monkeypatch):
    """The CPU logits live in a pooled, mmap'd buffer above a size threshold; force that path."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)
    monkeypatch.setattr(scratch, "MIN_BYTES", 1)
    with scratch.scope() as pool:
        h, w, labels = _inputs(3)
        logits, loss = head_and_loss(h, w, labels)
        assert pool.misses > 0  # the logits came from the pool
    ref_logits = F.linear(h, w)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, causal_lm_loss(ref_logits, labels))
    grads = torch.autograd.grad(loss + logits.square().mean(), (h, w))
    ref_total = causal_lm_loss(ref_logits, labels) + ref_logits.square().mean()
    for a, b in zip(grads, torch.autograd.grad(ref_total, (h, w)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_matches_fp32_reference_within_bf16_precision(chunk_bytes):
    """bf16 runs the GEMMs in bf16 and the softmax and weight-gradient sums in fp32."""
    h, w, labels = _inputs(4)
    h16 = h.detach().bfloat16().requires_grad_()
    w16 = w.detach().bfloat16().requires_grad_()
    logits, loss = head_and_loss(h16, w16, labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (h16, w16))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    h32, w32 = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    ref_loss = causal_lm_loss(F.linear(h32, w32), labels)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=1e-2)
    for a, b in zip(grads, torch.autograd.grad(ref_loss, (h32, w32)), strict=True):
        torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=2e-2)


def _aligned_reference(h, w, targets):
    logits = F.linear(h, w)
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=-100)


def test_aligned_targets_loss_and_gradients_match_cross_entropy(chunk_bytes):
    """`head_loss` takes targets aligned with the inputs (no shift), -100 masked."""
    h, w, targets = _inputs(5)
    targets[1, 20:] = -100  # padding at the end of a row
    loss = head_loss(h, w, targets)
    ref = _aligned_reference(h, w, targets)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(3.0 * loss, (h, w))
    for a, b in zip(grads, torch.autograd.grad(3.0 * ref, (h, w)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_aligned_targets_equal_shifted_labels():
    """The two conventions are one loss: targets = labels shifted left, last position ignored."""
    h, w, labels = _inputs(6)
    _, from_labels = head_and_loss(h, w, labels)
    torch.testing.assert_close(head_loss(h, w, shift_labels(labels)), from_labels)


def test_aligned_loss_without_grad_is_the_same_number_and_backward_can_repeat():
    h, w, targets = _inputs(7)
    with torch.no_grad():
        no_grad = head_loss(h, w, targets)
    loss = head_loss(h, w, targets)
    assert torch.equal(no_grad, loss.detach())
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    again = torch.autograd.grad(loss, (h, w))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_aligned_loss_bf16_within_bf16_precision(chunk_bytes):
    h, w, targets = _inputs(8)
    h16 = h.detach().bfloat16().requires_grad_()
    w16 = w.detach().bfloat16().requires_grad_()
    loss = head_loss(h16, w16, targets)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (h16, w16))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    h32, w32 = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    ref = _aligned_reference(h32, w32, targets)
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    for a, b in zip(grads, torch.autograd.grad(ref, (h32, w32)), strict=True):
        torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=2e-2)
