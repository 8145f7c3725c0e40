"""Evaluation: the champion gate's metric, and the loss it is computed with."""

import math

import numpy as np
import pytest
import torch

from jobs.errors import JobError
from jobs.service.evaluate import EvalResult, loss_on
from jobs.train.config import TrainConfig
from jobs.train.optim import build_optimizer
from jobs.train.step import Trainee, held_out_loss, perplexity
from moe_model import ModelConfig, MoETransformer


def test_a_gate_metric_nobody_measured_names_the_key_and_the_cause():
    with pytest.raises(JobError, match=r"registry.gate_metric: val/loss .*val split"):
        EvalResult({"eval/moe/dead_experts": 0.0}, [], []).gate_loss("auto")
    with pytest.raises(JobError, match=r"heldout/loss .*evaluate.inputs"):
        EvalResult({"val/loss": 1.0}, [], []).gate_loss("heldout/loss")
    assert EvalResult({"val/loss": 1.0}, [], []).gate_loss("auto") == ("val/loss", 1.0)


def test_evaluation_scores_with_the_trainers_loss_bit_for_bit():
    """`moe-pretrain evaluate` and the trainer's `val/loss` are the model's own fused loss on
    rows of seq_len + 1 (`model(row[:-1], targets=row[1:])`), not a second cross-entropy."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("debug")).eval()
    rows = np.random.default_rng(0).integers(0, 512, (6, 17))
    logits_made = []  # the fused head uses the weight alone: the module runs only for logits
    model.lm_head.register_forward_hook(lambda *_: logits_made.append(1))
    metrics, _ = loss_on(model, rows, batch_size=3)
    assert not logits_made
    batches = [torch.from_numpy(rows[i : i + 3]) for i in (0, 3)]
    with torch.no_grad():
        per_batch = [model(b[:, :-1], targets=b[:, 1:]).ce_loss.double() for b in batches]
    assert metrics["loss"] == float(sum(per_batch) / 2)
    tr = Trainee(model, model, build_optimizer(model, TrainConfig()), torch.device("cpu"), False)
    assert metrics["loss"] == held_out_loss(tr, batches)
    assert not logits_made
    assert metrics["perplexity"] == perplexity(metrics["loss"]) == math.exp(metrics["loss"])
