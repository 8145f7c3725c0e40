"""Next-token cross-entropy fused with the LM head, and the training objective built on it.

Tensor names carry their shapes (the legend: moe_model/config.py).

Two conventions, one kernel family:
- `targets` aligned with the inputs (position t predicts targets[t]; what rows of
  `seq_len + 1` give as `row[:-1]`, `row[1:]`): `head_loss`, the training path. No logits
  leave it: on a GPU only one block of [G, V] logits exists at a time.
- HF `labels` (position t predicts labels[t + 1]): `head_and_loss`, which also returns the
  logits, for callers and HF parity.

Each GEMM covers a block of rows (all of them on CPU); the softmax statistics are then taken
chunk by chunk while a chunk is in cache. No [T, V] log-softmax or one-hot is ever allocated
(the same idea as Liger-Kernel's fused linear cross-entropy, arXiv:2410.10989). `head_loss`
goes one step further, as Liger does: while a block's logits are in memory it also turns them
into d loss / d logits and runs the two gradient GEMMs, so backward only scales the stored
[T, D] and [V, D] gradients by the incoming scalar and no [T, V] buffer outlives the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_model.cpu import scratch

IGNORE_INDEX = -100
# Row blocks for the two GEMMs. CPU: one block of all rows, since MKL re-packs the [V, D]
# weight on every call (256-row blocks ran the logits GEMM ~1.4x slower on the benchmark
# machine). GPU: blocks of ~512 MiB of fp32 logits bound the [rows, V] buffers.
CPU_BLOCK_BYTES: int | None = None
GPU_BLOCK_BYTES = 512 * 2**20
# Softmax passes within a block on CPU: ~8 MiB of fp32 rows stays in L2/L3.
CHUNK_BYTES = 8 * 2**20


def total_loss(
    ce: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, aux_coef: float, z_coef: float
) -> torch.Tensor:
    """The training objective: cross-entropy + aux_coef * Switch load-balancing loss (Fedus et
    al. 2021, eq. 4) + z_coef * ST-MoE router z-loss (Zoph et al. 2022, eq. 5)."""
    return ce + aux_coef * aux + z_coef * z


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """HF convention -> aligned targets: position t predicts labels[t + 1], the last nothing."""
    return F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Reference next-token loss from logits, as HF's ForCausalLMLoss (labels shifted inside)."""
    V = logits_BTV.shape[-1]
    targets_T = shift_labels(labels_BT).reshape(-1)
    return F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_T, ignore_index=IGNORE_INDEX)


def head_loss(
    h_BTD: torch.Tensor, weight_VD: torch.Tensor, targets_BT: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight.T against aligned targets, -100 ignored."""
    D = h_BTD.shape[-1]
    x_TD, targets_T = h_BTD.reshape(-1, D), targets_BT.reshape(-1).long()
    if torch.is_grad_enabled() and (h_BTD.requires_grad or weight_VD.requires_grad):
        return _HeadLossAndGrads.apply(x_TD, weight_VD, targets_T)
    return _loss_and_grads(x_TD, weight_VD, targets_T, with_grads=False)[0]


def head_and_loss(
    h_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], mean next-token cross-entropy) with HF-convention labels, -100 ignored."""
    B, T, D = h_BTD.shape
    targets_T = shift_labels(labels_BT).reshape(-1).long()
    loss, logits_TV = _HeadCrossEntropy.apply(h_BTD.reshape(-1, D), weight_VD, targets_T)
    return logits_TV.view(B, T, -1), loss


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


def _loss_and_grads(x_TD, weight_VD, targets_T, with_grads: bool):
    """(mean loss, d loss/d x [T, D], d loss/d weight [V, D] in fp32), the gradients None
    without `with_grads`. Per chunk of logits z with lse = logsumexp(z) and s = 1/count on
    valid rows, 0 on ignored ones:
      loss_n = lse_n - z_n[y_n]
      d loss / d z_n = s_n * (softmax(z_n) - onehot(y_n)) = exp(z_n - lse_n + log s_n) - s_n onehot
    written over the logits in place (log 0 = -inf zeroes ignored rows)."""
    T, V = x_TD.shape[0], weight_VD.shape[0]
    fp32 = x_TD.dtype == torch.float32
    valid_T = targets_T != IGNORE_INDEX
    safe_targets_T = torch.where(valid_T, targets_T, 0)
    count = valid_T.sum()
    scale_T = valid_T.float() / count
    log_scale_T = scale_T.log()
    loss_T = torch.empty(T, dtype=torch.float32, device=x_TD.device)
    blocks = list(_blocks(T, V, x_TD.device))
    z_GV = scratch.empty((blocks[0][0].stop, V), x_TD)
    work_CV = None if fp32 else _workspace(T, V, x_TD)
    grad_x_TD = torch.empty_like(x_TD) if with_grads else None
    grad_w_VD = scratch.empty(weight_VD.shape, x_TD, dtype=torch.float32) if with_grads else None
    for i, (block, chunks) in enumerate(blocks):
        z_RV = z_GV[: block.stop - block.start]
        torch.mm(x_TD[block], weight_VD.t(), out=z_RV)
        for rows in chunks:
            local = slice(rows.start - block.start, rows.stop - block.start)
            z_CV = z_RV[local] if fp32 else work_CV[: rows.stop - rows.start].copy_(z_RV[local])
            lse_C = torch.logsumexp(z_CV, -1)
            target_C1 = safe_targets_T[rows, None]
            loss_T[rows] = lse_C - z_CV.gather(1, target_C1).squeeze(1)
            if with_grads:
                z_CV.sub_((lse_C - log_scale_T[rows]).unsqueeze(1)).exp_()
                z_CV.scatter_add_(1, target_C1, -scale_T[rows, None])
                if not fp32:
                    z_RV[local] = z_CV
        if with_grads:
            torch.mm(z_RV, weight_VD, out=grad_x_TD[block])
            if fp32:
                grad_w_VD.addmm_(z_RV.t(), x_TD[block], beta=float(i > 0))
            elif i:  # bf16 GEMM per block, the blocks summed in fp32
                grad_w_VD.add_(torch.mm(z_RV.t(), x_TD[block]))
            else:
                grad_w_VD.copy_(torch.mm(z_RV.t(), x_TD[block]))
    loss = torch.where(valid_T, loss_T, 0.0).sum() / count
    return loss, grad_x_TD, grad_w_VD


class _HeadLossAndGrads(torch.autograd.Function):
    """Loss forward; the gradients are computed there too (`_loss_and_grads`), so backward is
    two scalings by d total / d loss (exact when that is 1)."""

    @staticmethod
    def forward(ctx, x_TD, weight_VD, targets_T):
        loss, grad_x_TD, grad_w_VD = _loss_and_grads(x_TD, weight_VD, targets_T, with_grads=True)
        ctx.save_for_backward(grad_x_TD, grad_w_VD)
        ctx.weight_dtype = weight_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x_TD, grad_w_VD = ctx.saved_tensors
        # New buffers, not in place: a retained graph may run backward again.
        out_x_TD = torch.mul(
            grad_x_TD, grad_loss.to(grad_x_TD.dtype), out=scratch.empty(grad_x_TD.shape, grad_x_TD)
        )
        out_w_VD = torch.mul(grad_w_VD, grad_loss, out=scratch.empty(grad_w_VD.shape, grad_w_VD))
        return out_x_TD, out_w_VD.to(ctx.weight_dtype), None


class _HeadCrossEntropy(torch.autograd.Function):
    """The HF-convention path, which returns logits: they are kept for backward, which rebuilds
    softmax - onehot from them (and adds any gradient that reached the returned logits)."""

    @staticmethod
    def forward(ctx, x_TD, weight_VD, targets_T):
        T, V = x_TD.shape[0], weight_VD.shape[0]
        valid_T = targets_T != IGNORE_INDEX
        safe_targets_T = torch.where(valid_T, targets_T, 0)
        logits_TV = scratch.empty((T, V), x_TD)
        target_logprob_T = torch.empty(T, dtype=torch.float32, device=x_TD.device)
        work_CV = _workspace(T, V, x_TD)
        for block, chunks in _blocks(T, V, x_TD.device):
            torch.mm(x_TD[block], weight_VD.t(), out=logits_TV[block])
            for rows in chunks:
                logprobs_CV = work_CV[: rows.stop - rows.start]
                torch._log_softmax(logits_TV[rows].float(), -1, False, out=logprobs_CV)
                target_C1 = safe_targets_T[rows, None]
                target_logprob_T[rows] = logprobs_CV.gather(1, target_C1).squeeze(1)
        count = valid_T.sum()
        loss = -torch.where(valid_T, target_logprob_T, 0.0).sum() / count
        ctx.save_for_backward(x_TD, weight_VD, safe_targets_T, valid_T, logits_TV, count)
        ctx.set_materialize_grads(False)
        return loss, logits_TV

    @staticmethod
    def backward(ctx, grad_loss, grad_logits_TV):
        x_TD, weight_VD, targets_T, valid_T, logits_TV, count = ctx.saved_tensors
        if grad_loss is None and grad_logits_TV is None:
            return None, None, None
        T, V = logits_TV.shape
        fp32 = x_TD.dtype == torch.float32
        scale_T = None if grad_loss is None else valid_T.float() * (grad_loss / count)
        grad_x_TD = torch.empty_like(x_TD)
        grad_w_VD = scratch.empty(weight_VD.shape, x_TD, dtype=torch.float32)
        blocks = list(_blocks(T, V, x_TD.device))
        # d loss / d logits for one block, in the GEMMs' dtype.
        g_GV = scratch.empty((blocks[0][0].stop, V), x_TD)
        work_CV = None if fp32 else _workspace(T, V, x_TD)
        for i, (block, chunks) in enumerate(blocks):
            for rows in chunks:
                local = slice(rows.start - block.start, rows.stop - block.start)
                g_CV = g_GV[local] if fp32 else work_CV[: rows.stop - rows.start]
                if scale_T is None:
                    g_CV.zero_()
                else:
                    _softmax_minus_onehot(logits_TV[rows], targets_T[rows], out=g_CV)
                    g_CV.mul_(scale_T[rows].unsqueeze(1))
                if grad_logits_TV is not None:
                    g_CV.add_(grad_logits_TV[rows])
                if not fp32:
                    g_GV[local] = g_CV
            g_RV = g_GV[: block.stop - block.start]
            torch.mm(g_RV, weight_VD, out=grad_x_TD[block])
            if fp32:
                grad_w_VD.addmm_(g_RV.t(), x_TD[block], beta=float(i > 0))
            else:
                # bf16 GEMM per block, the blocks summed in fp32.
                partial_VD = torch.mm(g_RV.t(), x_TD[block])
                if i:
                    grad_w_VD.add_(partial_VD)
                else:
                    grad_w_VD.copy_(partial_VD)
        return grad_x_TD, grad_w_VD.to(weight_VD.dtype), None


def _softmax_minus_onehot(logits_CV, targets_C, out: torch.Tensor) -> None:
    """d(-log_softmax(z)_y)/dz = softmax(z) - onehot(y), in fp32, written to `out`."""
    torch._softmax(logits_CV.float(), -1, False, out=out)
    out.scatter_add_(1, targets_C.unsqueeze(1), out.new_full((out.shape[0], 1), -1.0))
