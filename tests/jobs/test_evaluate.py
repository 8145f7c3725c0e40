"""The champion gate's metric: a metric that was never measured is a one-line error."""

import pytest

from jobs.errors import JobError
from jobs.service.evaluate import EvalResult


def test_a_gate_metric_nobody_measured_names_the_key_and_the_cause():
    with pytest.raises(JobError, match=r"registry.gate_metric: val/loss .*val split"):
        EvalResult({"eval/moe/dead_experts": 0.0}, [], []).gate_loss("auto")
    with pytest.raises(JobError, match=r"heldout/loss .*evaluate.inputs"):
        EvalResult({"val/loss": 1.0}, [], []).gate_loss("heldout/loss")
    assert EvalResult({"val/loss": 1.0}, [], []).gate_loss("auto") == ("val/loss", 1.0)
