"""Sample generations from fixed prompts: a quick look at what the model has learnt.

Every rank generates (under FSDP the forward pass is collective); greedy
decoding, so all ranks produce the same text and rank 0's copy is logged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from jobs.tracking.artifacts import SAMPLES, append_samples
from jobs.train.config import TrainConfig
from jobs.train.step import Trainee


@torch.no_grad()
def generate_samples(
    tr: Trainee, reader, cfg: TrainConfig, out_dir: Path, step: int
) -> Path | None:
    if not cfg.sample_prompts or cfg.sample_max_new_tokens == 0:
        return None
    tokenizer = reader.load_tokenizer()
    budget = tr.raw.config.max_seq_len - cfg.sample_max_new_tokens
    pairs = []
    tr.module.eval()
    try:
        for prompt in cfg.sample_prompts:
            ids = tokenizer.encode(prompt).ids[-max(1, budget) :]
            if not ids:
                continue
            input_ids = torch.tensor([ids], device=tr.device)
            out = tr.raw.generate(
                input_ids, cfg.sample_max_new_tokens, eos_token_id=reader.eos_token_id
            )
            pairs.append((prompt, tokenizer.decode(out[0, len(ids) :].tolist())))
    finally:
        tr.module.train()
    return append_samples(out_dir / SAMPLES, step, pairs)
