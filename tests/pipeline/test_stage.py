"""The declared stage contract, checked on the first batch by both executors."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import ray_adapter
from pipeline.stage import Stage, StageContractError, run_sequential

ITEMS = [{"text": "a", "n": 1}, {"text": "b", "n": 2}]


class Upper(Stage):
    """Upper-cases ``text``; the test cases below break its declaration one way each."""

    name = "upper"
    input_columns = ("text",)
    output_columns = ("text",)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.set_column(0, "text", pc.utf8_upper(batch.column("text")))


class RewritesUndeclared(Upper):
    name = "rewrites_undeclared"
    output_columns = ()


class AddsUndeclared(Upper):
    name = "adds_undeclared"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return super().__call__(batch).append_column("extra", pa.array([0] * batch.num_rows))


class NeedsMissing(Upper):
    name = "needs_missing"
    input_columns = ("text", "ids")


class DropsDeclared(Upper):
    name = "drops_declared"
    output_columns = ("text", "hash")


VIOLATIONS = [
    (RewritesUndeclared, "changes column 'text'"),
    (AddsUndeclared, "adds column 'extra'"),
    (NeedsMissing, "input column 'ids' is missing"),
    (DropsDeclared, "declared output column 'hash' is missing"),
]


def test_a_stage_that_keeps_its_contract_runs():
    (out,) = list(run_sequential([{"text": "a\u00e9", "n": 1}], [Upper()]))
    assert out.to_pylist() == [{"text": "A\u00c9", "n": 1}]


@pytest.mark.parametrize(("stage_type", "message"), VIOLATIONS)
def test_local_executor_names_the_stage_and_column(stage_type, message):
    with pytest.raises(StageContractError, match=f"{stage_type.name}.*{message}"):
        list(run_sequential(ITEMS, [stage_type()]))


@pytest.fixture
def stages_by_value(ray_local):
    """Ray workers cannot import this test module by name: ship its stages by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_ray_adapter_names_the_stage_and_column(stages_by_value, compute):
    stage = RewritesUndeclared()
    stage.compute = compute
    with pytest.raises(StageContractError, match="rewrites_undeclared.*changes column 'text'"):
        list(ray_adapter.stream(ITEMS, [stage], num_workers=1))
