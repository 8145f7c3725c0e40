"""Autoregressive decoding with a KV cache: greedy (temperature 0) or nucleus sampling.

Tensor names carry their shapes (the legend: moe_model/config.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_model.model import MoETransformer


@torch.no_grad()
def generate(
    model: MoETransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the prompt followed by the new tokens, as HF `generate` does.

    Sequences that emitted EOS are padded with EOS (HF's default when no pad token is set);
    decoding stops early once every sequence has finished.
    """
    _check_args(input_ids, max_new_tokens, temperature, top_p)
    B, T = input_ids.shape
    total = T + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"max_new_tokens: prompt ({T}) + {max_new_tokens} new tokens exceeds "
            f"max_seq_len ({model.config.max_seq_len})"
        )
    eos_ids = _eos_tensor(eos_token_id, input_ids.device)
    was_training = model.training
    model.eval()
    try:
        caches = model.new_kv_caches(B, total)
        logits_BV = model(input_ids, kv_caches=caches).logits[:, -1]
        tokens = [input_ids]
        finished_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_B = _pick(logits_BV, temperature, top_p, generator)
            if eos_ids is not None:
                next_B = torch.where(finished_B, eos_ids[0], next_B)
                finished_B |= torch.isin(next_B, eos_ids)
            tokens.append(next_B.unsqueeze(1))
            if eos_ids is not None and bool(finished_B.all()):
                break
            if step + 1 < max_new_tokens:
                logits_BV = model(next_B.unsqueeze(1), kv_caches=caches).logits[:, -1]
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)


def _check_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected shape [batch, seq>0], got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device):
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _pick(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1:
        probs_BV = _nucleus(probs_BV, top_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


def _nucleus(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2020)."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)
    kept_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return kept_BV / kept_BV.sum(dim=-1, keepdim=True)
