"""The README's first command, ``make demo`` (= ``moe-pretrain demo``), in a fresh folder
as its own process: what it prints is what the README says it prints, and a second run is
all cache hits. Fewer documents and steps than the real demo, same corpus and steps."""

from __future__ import annotations

import re

import pytest

from tests.acceptance.conftest import REPO

pytestmark = pytest.mark.slow
SMALLER = ["data.max_documents=120", "train.max_steps=12", "train.warmup_steps=2",
           "train.log_every=2", "train.eval_every=12", "train.checkpoint_every=12",
           "evaluate.max_batches=2", "evaluate.max_new_tokens=4"]  # fmt: skip


def test_make_demo_is_moe_pretrain_demo_and_prints_what_the_readme_promises(user, tmp_path):
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: .*\n\t\$\(BIN\)/moe-pretrain demo$", makefile, re.M)
    sets = [a for s in SMALLER for a in ("--set", s)]
    first = user.run("demo", *sets, timeout=600).stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in first
    assert re.search(r"^model: models:/moe-pretrain-demo/1$", first, re.M), first
    assert re.search(r"^sample: '.*'$", first, re.M)
    fell = re.search(r"^train/loss: step \d+ [\d.]+ -> step \d+ [\d.]+ \(fell by ([\d.]+)\)$",
                     first, re.M)  # fmt: skip
    assert fell and float(fell.group(1)) > 0, first
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "outputs" / "datasets").is_dir()

    again = user.run("demo", *sets, timeout=600).stdout
    assert "(cached: prepare, train, evaluate, register)" in again
    assert re.search(r"^model: models:/moe-pretrain-demo/1$", again, re.M)
