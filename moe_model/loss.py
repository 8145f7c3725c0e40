"""Next-token cross-entropy fused with the LM head, computed over row blocks and chunks.

Legend: N tokens (B*T), D hidden, V vocab, R rows per GEMM block, C rows per softmax chunk.

The logits are still returned (callers and HF parity need them). Each GEMM covers a block
of rows (all of them on CPU); the softmax statistics are then taken chunk by chunk while a
chunk is in cache, and the backward rebuilds softmax - onehot from the stored logits into
one block-sized gradient buffer that feeds the two GEMMs. No [N, V] log-softmax or one-hot
is ever allocated, and on a GPU the gradient buffer is one block, not [N, V]: this saves
[N, V] passes through memory and buffers versus log_softmax + nll_loss (the same idea as
Liger-Kernel's fused linear cross-entropy, arXiv:2410.10989).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_model import scratch

IGNORE_INDEX = -100
# Row blocks for the two GEMMs. CPU: one block of all rows, since MKL re-packs the [V, D]
# weight on every call (256-row blocks ran the logits GEMM ~1.4x slower on the benchmark
# machine). GPU: blocks of ~512 MiB of fp32 logits bound the backward's [rows, V] buffer.
CPU_BLOCK_BYTES: int | None = None
GPU_BLOCK_BYTES = 512 * 2**20
# Softmax passes within a block on CPU: ~8 MiB of fp32 rows stays in L2/L3.
CHUNK_BYTES = 8 * 2**20


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


def _rows_per(budget: int | None, n: int, vocab: int) -> int:
    return n if budget is None else min(n, max(16, budget // (4 * vocab)))


def _blocks(n: int, vocab: int, device: torch.device):
    """Row blocks for the GEMMs, and within each the row chunks for the softmax passes."""
    on_cpu = device.type == "cpu"
    block = _rows_per(CPU_BLOCK_BYTES if on_cpu else GPU_BLOCK_BYTES, n, vocab)
    chunk = _rows_per(CHUNK_BYTES, block, vocab) if on_cpu else block
    for start in range(0, n, block):
        stop = min(start + block, n)
        yield (
            slice(start, stop),
            [slice(s, min(s + chunk, stop)) for s in range(start, stop, chunk)],
        )


def _workspace(n: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """One fp32 [C, V] buffer reused by every chunk: a fresh one per chunk would be mapped
    and page-faulted anew each time (8 MiB, past the allocator's reuse, on CPU)."""
    rows = max(c.stop - c.start for _, chunks in _blocks(n, vocab, like.device) for c in chunks)
    return scratch.empty((rows, vocab), like, dtype=torch.float32)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_VD, targets_N):
        N, V = x_ND.shape[0], weight_VD.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        safe_targets_N = torch.where(valid_N, targets_N, 0)
        logits_NV = scratch.empty((N, V), x_ND)
        target_logprob_N = torch.empty(N, dtype=torch.float32, device=x_ND.device)
        work_CV = _workspace(N, V, x_ND)
        for block, chunks in _blocks(N, V, x_ND.device):
            torch.mm(x_ND[block], weight_VD.t(), out=logits_NV[block])
            for rows in chunks:
                logprobs_CV = work_CV[: rows.stop - rows.start]
                torch._log_softmax(logits_NV[rows].float(), -1, False, out=logprobs_CV)
                target_C1 = safe_targets_N[rows, None]
                target_logprob_N[rows] = logprobs_CV.gather(1, target_C1).squeeze(1)
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
        fp32 = x_ND.dtype == torch.float32
        scale_N = None if grad_loss is None else valid_N.float() * (grad_loss / count)
        grad_x_ND = torch.empty_like(x_ND)
        grad_w_VD = scratch.empty(weight_VD.shape, x_ND, dtype=torch.float32)
        blocks = list(_blocks(N, V, x_ND.device))
        # d loss / d logits for one block, in the GEMMs' dtype.
        g_BV = scratch.empty((blocks[0][0].stop, V), x_ND)
        work_CV = None if fp32 else _workspace(N, V, x_ND)
        for i, (block, chunks) in enumerate(blocks):
            for rows in chunks:
                local = slice(rows.start - block.start, rows.stop - block.start)
                g_CV = g_BV[local] if fp32 else work_CV[: rows.stop - rows.start]
                if scale_N is None:
                    g_CV.zero_()
                else:
                    _softmax_minus_onehot(logits_NV[rows], targets_N[rows], out=g_CV)
                    g_CV.mul_(scale_N[rows].unsqueeze(1))
                if grad_logits_NV is not None:
                    g_CV.add_(grad_logits_NV[rows])
                if not fp32:
                    g_BV[local] = g_CV
            g_RV = g_BV[: block.stop - block.start]
            torch.mm(g_RV, weight_VD, out=grad_x_ND[block])
            if fp32:
                grad_w_VD.addmm_(g_RV.t(), x_ND[block], beta=float(i > 0))
            else:
                # bf16 GEMM per block, the blocks summed in fp32.
                partial_VD = torch.mm(g_RV.t(), x_ND[block])
                if i:
                    grad_w_VD.add_(partial_VD)
                else:
                    grad_w_VD.copy_(partial_VD)
        return grad_x_ND, grad_w_VD.to(weight_VD.dtype), None


def _softmax_minus_onehot(logits_CV, targets_C, out: torch.Tensor) -> None:
    """d(-log_softmax(z)_y)/dz = softmax(z) - onehot(y), in fp32, written to `out`."""
    torch._softmax(logits_CV.float(), -1, False, out=out)
    out.scatter_add_(1, targets_C.unsqueeze(1), out.new_full((out.shape[0], 1), -1.0))
