"""Next-token cross-entropy fused with the LM head, computed over row chunks.

Legend: N tokens (B*T), D hidden, V vocab, C rows per chunk.

The logits are still returned (callers and HF parity need them), but each chunk's softmax
statistics are taken while the chunk is in cache, and the backward rebuilds
softmax - onehot from the stored logits chunk by chunk and feeds it straight into the two
GEMMs. No [N, V] log-softmax, one-hot or gradient buffer is ever allocated: this saves
[N, V] passes through memory and two [N, V] buffers per step versus log_softmax + nll_loss
(the same idea as Liger-Kernel's fused linear cross-entropy, arXiv:2410.10989).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_model import hugepages

IGNORE_INDEX = -100
# fp32 logits per chunk: ~8 MiB stays in a CPU's L2/L3; a GPU wants few, large GEMMs.
CHUNK_BYTES = 8 * 2**20
GPU_CHUNK_BYTES = 512 * 2**20


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """HF convention: position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Reference next-token loss from logits, as HF's ForCausalLMLoss (labels shifted inside)."""
    V = logits_BTV.shape[-1]
    targets_N = shift_labels(labels_BT).reshape(-1)
    return F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_N, ignore_index=IGNORE_INDEX)


def head_and_loss(
    h_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], mean next-token cross-entropy) with -100 labels ignored."""
    B, T, D = h_BTD.shape
    targets_N = shift_labels(labels_BT).reshape(-1)
    loss, logits_NV = _HeadCrossEntropy.apply(h_BTD.reshape(-1, D), weight_VD, targets_N)
    return logits_NV.view(B, T, -1), loss


def _workspace(n: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """One fp32 [C, V] buffer reused by every chunk: a fresh one per chunk would be mapped
    and page-faulted anew each time (8 MiB, past the allocator's reuse, on CPU)."""
    budget = CHUNK_BYTES if like.device.type == "cpu" else GPU_CHUNK_BYTES
    rows = min(n, max(16, budget // (4 * vocab)))
    return hugepages.empty((rows, vocab), like, dtype=torch.float32)


def _chunks(n: int, vocab: int, device: torch.device):
    budget = CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    rows = max(16, budget // (4 * vocab))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_VD, targets_N):
        N, V = x_ND.shape[0], weight_VD.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        safe_targets_N = torch.where(valid_N, targets_N, 0)
        logits_NV = hugepages.empty((N, V), x_ND)
        target_logprob_N = torch.empty(N, dtype=torch.float32, device=x_ND.device)
        work_CV = _workspace(N, V, x_ND)
        for rows in _chunks(N, V, x_ND.device):
            torch.mm(x_ND[rows], weight_VD.t(), out=logits_NV[rows])
            logprobs_CV = work_CV[: rows.stop - rows.start]
            torch._log_softmax(logits_NV[rows].float(), -1, False, out=logprobs_CV)
            target_logprob_N[rows] = logprobs_CV.gather(1, safe_targets_N[rows, None]).squeeze(1)
        count = valid_N.sum()
        loss = -torch.where(valid_N, target_logprob_N, 0.0).sum() / count
        ctx.save_for_backward(x_ND, weight_VD, safe_targets_N, valid_N, logits_NV, count)
        ctx.set_materialize_grads(False)
        return loss, logits_NV

    @staticmethod
    def backward(ctx, grad_loss, grad_logits_NV):
        x_ND, weight_VD, targets_N, valid_N, logits_NV, count = ctx.saved_tensors
        if grad_loss is None and grad_logits_NV is None:
            return None, None, None
        N, V = logits_NV.shape
        scale_N = None if grad_loss is None else valid_N.float() * (grad_loss / count)
        grad_x_ND = torch.empty_like(x_ND)
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=x_ND.device)
        work_CV = _workspace(N, V, x_ND)
        for rows in _chunks(N, V, x_ND.device):
            g_CV = None
            if scale_N is not None:
                g_CV = work_CV[: rows.stop - rows.start]
                _softmax_minus_onehot(logits_NV[rows], targets_N[rows], out=g_CV)
                g_CV.mul_(scale_N[rows].unsqueeze(1))
            if grad_logits_NV is not None:
                extra_CV = grad_logits_NV[rows].float()
                g_CV = extra_CV if g_CV is None else g_CV.add_(extra_CV)
            g_CV = g_CV.to(x_ND.dtype)
            torch.mm(g_CV, weight_VD, out=grad_x_ND[rows])
            if g_CV.dtype == torch.float32:
                grad_w_VD.addmm_(g_CV.t(), x_ND[rows])
            else:
                grad_w_VD.add_(torch.mm(g_CV.t(), x_ND[rows]))
        return grad_x_ND, grad_w_VD.to(weight_VD.dtype), None


def _softmax_minus_onehot(logits_CV, targets_C, out: torch.Tensor) -> None:
    """d(-log_softmax(z)_y)/dz = softmax(z) - onehot(y), in fp32, written to `out`."""
    torch._softmax(logits_CV.float(), -1, False, out=out)
    out.scatter_add_(1, targets_C.unsqueeze(1), out.new_full((out.shape[0], 1), -1.0))
