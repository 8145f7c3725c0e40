"""``train.init_from: upcycle:PATH`` in the trainer: a dense run's weights become the MoE's start.

A dense one-expert run trains through the worker loop, is written as a Llama folder inside
the storage root, and the MoE built by the same loop from ``upcycle:`` scores exactly the
dense model's held-out loss before its first step. Misfits and escapes are refused by name.
"""

from __future__ import annotations

import random

import pytest
import torch

from jobs.config import RootConfig
from jobs.errors import JobError
from jobs.paths import PathEscapeError
from jobs.settings import load_config
from jobs.train import loop
from jobs.train.checkpoint import load_checkpoint_model
from jobs.train.data import val_batches
from jobs.train.env import LocalEnv
from jobs.train.step import held_out_loss
from moe_model.upcycle import save_dense_hf

MOE = ["model.preset=debug", "model.vocab_size=320", "model.max_seq_len=64"]
DENSE = [*MOE, "model.num_experts=1", "model.top_k=1"]
TRAIN = ["train.max_steps=3", "train.micro_batch_size=4", "train.sample_prompts=[]"]
TRAIN += ["train.eval_batches=2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    rng = random.Random(1)
    words = ["a", "big", "red", "fox", "ran", "past", "the", "old", "mill", "to", "sea"]
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        text = ". ".join(" ".join(rng.choices(words, k=9)) for _ in range(40))
        (corpus / f"d{i}.txt").write_text(text)
    cfg = PrepareConfig(
        name="upcycle", inputs=[str(corpus)], seq_len=32, vocab_size=320, val_fraction=0.1
    )
    return prepare(cfg, str(tmp_path_factory.mktemp("data")), progress=False, executor="local").uri


@pytest.fixture(scope="module")
def storage(dataset, tmp_path_factory):
    """A storage root holding ``dense/``: a trained one-expert model as a Llama folder."""
    root = tmp_path_factory.mktemp("storage")
    torch.set_num_threads(1)
    cfg = load_config(RootConfig, None, [*DENSE, *TRAIN, f"storage.root={root}"])
    result = loop.run(cfg, dataset, LocalEnv(root / "dense-run"))
    model, _, _ = load_checkpoint_model(result["checkpoint"])
    save_dense_hf(model, root / "dense")
    return root, model


def _setup(storage_root, dataset, *extra: str):
    cfg = load_config(RootConfig, None, [*MOE, *TRAIN, f"storage.root={storage_root}", *extra])
    return loop.build(cfg, dataset, LocalEnv(None), init_from="upcycle:dense"), cfg


def test_upcycled_moe_starts_at_the_dense_models_held_out_loss(storage, dataset):
    root, dense = storage
    s, cfg = _setup(root, dataset)
    assert s.model_cfg.num_experts == 4 and s.model_cfg.top_k == 2
    val = val_batches(s.reader, 0, 1, cfg.train.micro_batch_size, cfg.train.eval_batches)
    moe_loss = held_out_loss(s.trainee, val)
    dense_setup = loop.build(
        load_config(RootConfig, None, [*DENSE, *TRAIN, f"storage.root={root}"]),
        dataset,
        LocalEnv(None),
    )
    dense_setup.trainee.raw.load_state_dict(dense.state_dict())
    assert moe_loss == pytest.approx(held_out_loss(dense_setup.trainee, val), abs=1e-5)
    # ... and it is not what a fresh MoE scores.
    fresh = loop.build(cfg, dataset, LocalEnv(None))
    assert abs(held_out_loss(fresh.trainee, val) - moe_loss) > 0.1
    w13 = s.trainee.raw.layers[0].moe.w13
    assert all(torch.equal(w13[0], w13[j]) for j in range(1, 4))


def test_upcycled_run_trains(storage, dataset, tmp_path):
    root, _ = storage
    cfg = load_config(RootConfig, None, [*MOE, *TRAIN, f"storage.root={root}"])
    result = loop.run(cfg, dataset, LocalEnv(None), init_from="upcycle:dense")
    assert result["steps"] == 3 and result["metrics"]["val/loss"] < 6.0


def test_a_misfitting_model_config_is_refused_naming_the_fields(storage, dataset):
    root, _ = storage
    with pytest.raises(JobError, match=r"model\.hidden_size is 32, the dense model has 64") as e:
        _setup(root, dataset, "model.hidden_size=32")
    assert "set model.hidden_size=64" in str(e.value)
    with pytest.raises(JobError, match=r"model\.vocab_size is 512, the dense model has 320"):
        _setup(root, dataset, "model.vocab_size=512")


def test_a_folder_outside_the_storage_root_is_refused(storage, dataset, tmp_path):
    root, _ = storage
    cfg = load_config(RootConfig, None, [*MOE, *TRAIN, f"storage.root={root}"])
    with pytest.raises(PathEscapeError, match="outside the storage root"):
        loop.build(cfg, dataset, LocalEnv(None), init_from=f"upcycle:{tmp_path}")
    with pytest.raises(PathEscapeError, match="outside the storage root"):
        loop.build(cfg, dataset, LocalEnv(None), init_from="upcycle:../elsewhere")


def test_a_folder_that_is_not_a_dense_model_is_refused(storage, dataset):
    root, _ = storage
    with pytest.raises(JobError, match=r"upcycle:.*dense-run: upcycle: no config.json"):
        loop.build(
            load_config(RootConfig, None, [*MOE, *TRAIN, f"storage.root={root}"]),
            dataset,
            LocalEnv(None),
            init_from="upcycle:dense-run",
        )


def test_the_pipeline_resolves_upcycle_inside_the_root_and_hashes_the_source(storage):
    """What ``moe-pretrain run`` hands the trainer and hashes into the train step's key."""
    import json

    from jobs.service.steps.base import Context
    from jobs.service.steps.data import resolve_init

    root, _ = storage
    cfg = load_config(
        RootConfig, None, [*MOE, f"storage.root={root}", "train.init_from=upcycle:dense"]
    )
    path, identity = resolve_init(Context(cfg, runs=None, cache=None), manifest={})
    assert path == f"upcycle:{root / 'dense'}"
    assert identity.startswith(f"upcycle:{root / 'dense'}@")
    config = json.loads((root / "dense" / "config.json").read_text())
    (root / "dense" / "config.json").write_text(json.dumps({**config, "note": "changed"}))
    try:
        assert resolve_init(Context(cfg, runs=None, cache=None), manifest={})[1] != identity
    finally:
        (root / "dense" / "config.json").write_text(json.dumps(config))
    bad = load_config(
        RootConfig,
        None,
        [*MOE, f"storage.root={root}", "model.num_layers=3", "train.init_from=upcycle:dense"],
    )
    with pytest.raises(JobError, match=r"model\.num_layers is 3, the dense model has 2"):
        resolve_init(Context(bad, runs=None, cache=None), manifest={})


def test_the_driver_confines_upcycle_under_the_root_and_keeps_the_prefix(tmp_path, monkeypatch):
    """What ``train`` does with the path ``resolve_init`` hands it (or the user's own)."""
    from jobs.train.init_from import confine_init_from

    root = tmp_path / "root"
    (root / "dense").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the working directory is outside the root
    assert confine_init_from(str(root), f"upcycle:{root / 'dense'}") == f"upcycle:{root / 'dense'}"
    assert confine_init_from(str(root), "upcycle:dense") == f"upcycle:{root / 'dense'}"
    with pytest.raises(PathEscapeError, match="train.init_from.*outside the storage root"):
        confine_init_from(str(root), "upcycle:../elsewhere")
    with pytest.raises(PathEscapeError, match="train.init_from.*outside the storage root"):
        confine_init_from(str(root), "dense")  # a checkpoint path is read from cwd


def test_tied_embeddings_stay_tied_through_the_trainers_loader(tmp_path):
    from jobs.train.upcycling import load_upcycled_weights
    from moe_model import ModelConfig, MoETransformer

    dense_cfg = ModelConfig.preset("debug", tie_embeddings=True, num_experts=1, top_k=1)
    torch.manual_seed(0)
    dense = MoETransformer(dense_cfg).eval()
    moe = MoETransformer(dense_cfg.replace(num_experts=4, top_k=2)).eval()
    load_upcycled_weights(str(save_dense_hf(dense, tmp_path / "d")), moe, moe.config, seed=0)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5
    assert moe.lm_head.weight is moe.embed.weight
