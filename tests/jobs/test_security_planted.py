"""Planted files and paths, through the CLI and the Python API: a checkpoint whose DCP
metadata repoints an entry to a pickle payload never runs it, a checkpoint without its
commit marker is never resumed or loaded, and paths from configs, manifests, registry
tags and checkpoint metadata stay inside the storage root (or the dataset's folder)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import pytest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from jobs.config import RootConfig
from jobs.errors import JobError
from jobs.paths import PathEscapeError
from jobs.safe_load import safe_dcp_reader
from jobs.settings import load_config
from jobs.train import loop
from jobs.train.commit import COMMIT_FILE, write_commit
from jobs.train.env import LocalEnv
from jobs.train.runs import latest_checkpoint
from pipeline.errors import UnsafePathError
from pipeline.reader import DatasetReader

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dog",
    "ran",
    "to",
    "big",
    "red",
    "house",
    "and",
    "small",
    "green",
    "tree",
]
RUN = ["model.preset=debug", "train.micro_batch_size=2", "train.eval_batches=1",
       "train.checkpoint_every=2", "train.max_steps=2", "train.log_every=1",
       "train.sample_prompts=[]", "train.num_workers=1"]  # fmt: skip


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def config(root: Path, *extra: str) -> RootConfig:
    return load_config(RootConfig, None, [*RUN, f"storage.root={root}", *extra])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A storage root with a prepared dataset and one committed 2-step checkpoint."""
    import torch

    from pipeline.config import PrepareConfig
    from pipeline.prepare import prepare

    base = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    (base / "corpus").mkdir()
    for i in range(8):
        text = ". ".join(" ".join(rng.choice(WORDS) for _ in range(9)) for _ in range(40))
        (base / "corpus" / f"d{i}.txt").write_text(text)
    root = base / "root"
    cfg = PrepareConfig(name="p", inputs=[str(base / "corpus")], seq_len=32, vocab_size=300)
    dataset = prepare(cfg, str(root), progress=False, executor="local").uri
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = loop.run(config(root), dataset, LocalEnv(root / "runs" / "r1"))
    finally:
        torch.set_num_threads(threads)
    return root, dataset, Path(out["checkpoint"])


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``moe-pretrain ARGS`` through its console entry point; (exit code, stderr)."""
    from jobs.cli import main

    monkeypatch.setattr(sys, "argv", ["moe-pretrain", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def plant(ckpt: Path, marker: Path, key: str = "model.embed.weight", name: str = "__9_0.distcp"):
    """Repoint ``key`` in the DCP metadata to a pickle payload (as bytes), then re-commit the
    folder: whoever can write a checkpoint can write its marker too."""
    md = safe_dcp_reader(ckpt / "dcp").read_metadata()
    payload = pickle.dumps(Payload(marker))
    (ckpt / "dcp" / name).parent.mkdir(parents=True, exist_ok=True)
    (ckpt / "dcp" / name).write_bytes(payload)
    md.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in md.storage_data if i.fqn == key]:
        del md.storage_data[index]
    md.storage_data[MetadataIndex(key)] = _StorageInfo(name, 0, len(payload))
    with open(ckpt / "dcp" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    write_commit(str(ckpt), 2)
    assert pickle.loads(payload) and marker.exists()  # the payload works when unpickled
    marker.unlink()


@pytest.mark.parametrize("command", ["evaluate", "register"])
def test_a_planted_checkpoint_does_not_run_through_the_cli(
    world, marker, mlflow_uri, monkeypatch, capsys, command
):
    root, _, ckpt = world
    planted = copy_checkpoint(ckpt, root / "runs" / f"planted-{command}" / ckpt.name)
    plant(planted, marker)
    code, err = cli(monkeypatch, capsys, command, "--checkpoint", str(planted),
                    "--set", f"storage.root={root}")  # fmt: skip
    assert not marker.exists(), "loading the checkpoint ran a pickled payload"
    assert code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and "model.embed.weight" in err and "refusing" in err, err


def test_a_planted_checkpoint_does_not_run_on_resume_or_init_from(world, marker, tmp_path):
    root, dataset, ckpt = world
    planted = copy_checkpoint(ckpt, root / "runs" / "planted-resume" / ckpt.name)
    plant(planted, marker)
    cfg = config(root, "train.max_steps=3")
    with pytest.raises(JobError, match="refusing checkpoint entry 'model.embed.weight'"):
        loop.run(cfg, dataset, LocalEnv(planted.parent))  # resume: the run's newest checkpoint
    with pytest.raises(JobError, match="refusing checkpoint entry 'model.embed.weight'"):
        loop.run(cfg, dataset, LocalEnv(root / "runs" / "fresh"), init_from=str(planted))
    assert not marker.exists()


def test_dcp_data_files_must_be_bare_names(world, marker, mlflow_uri, monkeypatch, capsys):
    root, _, ckpt = world
    planted = copy_checkpoint(ckpt, root / "runs" / "planted-path" / ckpt.name)
    plant(planted, marker, name="../escape.distcp")
    code, err = cli(monkeypatch, capsys, "evaluate", "--checkpoint", str(planted),
                    "--set", f"storage.root={root}")  # fmt: skip
    assert code == 2 and "'../escape.distcp'" in err and "not a bare file name" in err, err
    assert not marker.exists()


def test_only_committed_checkpoints_are_resumed_reported_or_loaded(
    world, mlflow_uri, monkeypatch, capsys
):
    """Rank 0 writes trainer_state.json beside its own shard before the other ranks finish:
    a folder without commit.json (or missing a file the marker lists) does not count."""
    root, dataset, ckpt = world
    run = root / "runs" / "half-saved"
    copy_checkpoint(ckpt, run / ckpt.name)
    unfinished = copy_checkpoint(ckpt, run / "checkpoint_00000004")
    (unfinished / COMMIT_FILE).unlink()
    assert latest_checkpoint(str(run)).uri == str(run / ckpt.name)
    code, err = cli(monkeypatch, capsys, "evaluate", "--checkpoint", str(unfinished),
                    "--set", f"storage.root={root}")  # fmt: skip
    assert code == 2 and "not complete" in err and COMMIT_FILE in err, err

    shard_lost = copy_checkpoint(ckpt, run / "checkpoint_00000006")
    (shard_lost / "dcp" / "__0_0.distcp").unlink()
    code, err = cli(monkeypatch, capsys, "evaluate", "--checkpoint", str(shard_lost),
                    "--set", f"storage.root={root}")  # fmt: skip
    assert code == 2 and "dcp/__0_0.distcp is missing" in err, err
    assert latest_checkpoint(str(run)).uri == str(run / ckpt.name)
    # The worker resumes from step 2, not from a folder that never finished.
    out = loop.run(config(root, "train.max_steps=3", "train.checkpoint_every=3"), dataset,
                   LocalEnv(run))  # fmt: skip
    assert out["steps"] == 3


def test_resume_refuses_a_changed_seed(world, monkeypatch, capsys):
    root, dataset, ckpt = world
    args = ["train", "--dataset", dataset, "--run-name", "r1", "--storage", str(root),
            "--seed", "7", "--max-steps", "4", "--quiet",
            *(x for item in RUN for x in ("--set", item))]  # fmt: skip
    code, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "train.seed changed (checkpoint 0, now 7)" in err, err


def test_init_from_and_checkpoint_dataset_stay_inside_the_storage_root(
    world, tmp_path, mlflow_uri, monkeypatch, capsys
):
    root, dataset, ckpt = world
    outside = copy_checkpoint(ckpt, tmp_path / "elsewhere" / ckpt.name)
    args = ["train", "--dataset", dataset, "--run-name", "init-outside", "--storage", str(root),
            "--quiet", "--set", f"train.init_from={outside}",
            *(x for item in RUN for x in ("--set", item))]  # fmt: skip
    code, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "train.init_from" in err and "outside the storage root" in err, err
    with pytest.raises(PathEscapeError, match="train.init_from.*outside the storage root"):
        loop.run(config(root), dataset, LocalEnv(root / "runs" / "x"), init_from=str(outside))

    # The dataset a checkpoint names (trainer_state.json) is read only inside the root.
    inside = copy_checkpoint(ckpt, root / "runs" / "elsewhere-data" / ckpt.name)
    state = json.loads((inside / "trainer_state.json").read_text())
    state["dataset_uri"] = str(tmp_path / "elsewhere-data")
    shutil.copytree(dataset, tmp_path / "elsewhere-data")  # a real dataset, outside the root
    (inside / "trainer_state.json").write_text(json.dumps(state))
    write_commit(str(inside), 2)
    code, err = cli(monkeypatch, capsys, "evaluate", "--checkpoint", str(inside),
                    "--set", f"storage.root={root}")  # fmt: skip
    assert code == 2 and "dataset_uri" in err and "outside the storage root" in err, err


def test_champion_tag_cannot_point_outside_the_storage_root(world, tmp_path, mlflow_uri):
    """``train.init_from: champion`` reads the champion's ``lineage.checkpoint_uri`` tag,
    which any EDIT user of the registry can change."""
    import uuid

    from jobs.service.registry import CHAMPION, ensure_registered_model
    from jobs.service.steps.base import Context
    from jobs.service.steps.cache import StepCache
    from jobs.service.steps.data import resolve_init
    from jobs.service.tracking import Runs

    root, dataset, ckpt = world
    outside = copy_checkpoint(ckpt, tmp_path / "elsewhere" / ckpt.name)
    name = f"planted-{uuid.uuid4().hex[:8]}"
    cfg = config(root, "train.init_from=champion", f"registry.model_name={name}")
    runs = Runs(cfg)
    ensure_registered_model(runs.client, name)
    run_id = runs.client.create_run(runs.experiment_id).info.run_id
    mv = runs.client.create_model_version(
        name, source=f"runs:/{run_id}/model", run_id=run_id,
        tags={"lineage.checkpoint_uri": str(outside)},
    )  # fmt: skip
    runs.client.set_registered_model_alias(name, CHAMPION, mv.version)
    ctx = Context(cfg, runs, StepCache(str(root)))
    with pytest.raises(PathEscapeError, match="lineage.checkpoint_uri.*outside the storage root"):
        resolve_init(ctx, DatasetReader(dataset).manifest)


def _rewrite_manifest(dataset: str, dst: Path, edit) -> str:
    shutil.copytree(dataset, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return str(dst)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "other-bucket"])
def test_manifest_paths_stay_in_the_datasets_folder(world, tmp_path, how):
    """A manifest that names a file outside ``datasets/{name}/`` (with the right sha256) is
    refused for shards, the tokenizer and doc hashes; ``../{base}/...`` inside still reads."""
    from pipeline.doc_hashes import read_doc_hashes

    root, dataset, _ = world
    victim = tmp_path / "victim"
    shutil.copytree(dataset, victim)  # same bytes, same sha256: only the path is wrong
    paths = {
        "absolute": lambda rel: str(victim / rel),
        "dotdot": lambda rel: os.path.relpath(victim / rel, dataset),
        "other-bucket": lambda rel: f"s3://other-bucket/{rel}",
    }[how]

    def edit(m):
        shard = m["splits"]["train"]["shards"][0]
        shard["path"] = paths(shard["path"])
        m["tokenizer"]["file"] = paths(m["tokenizer"]["file"])
        for entry in m.get("doc_hashes", []):
            entry["path"] = paths(entry["path"])

    folder = Path(dataset).parent / f"planted-{how}"
    planted = DatasetReader(_rewrite_manifest(dataset, folder, edit))
    with pytest.raises(UnsafePathError, match="manifest path .*(outside|must be relative)"):
        planted.read_shard("train", 0)
    with pytest.raises(UnsafePathError):
        planted.load_tokenizer()
    with pytest.raises(UnsafePathError):
        read_doc_hashes(planted.uri, planted.manifest, None)

    # A path into a sibling build of the same name is how incremental datasets reuse shards.
    def sibling(m):
        shard = m["splits"]["train"]["shards"][0]
        shard["path"] = f"../{Path(dataset).name}/{shard['path']}"

    ok = DatasetReader(_rewrite_manifest(dataset, Path(dataset).parent / f"ok-{how}", sibling))
    assert len(ok.read_shard("train", 0)) == ok.shards("train")[0]["rows"]


def test_hf_index_names_files_of_its_own_folder_only(tmp_path, monkeypatch, capsys):
    import torch

    from moe_model import ModelConfig, MoETransformer
    from moe_model.hf import INDEX, WEIGHTS, save_hf

    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("debug"))
    save_hf(model, tmp_path / "victim")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tmp_path / "victim" / "config.json", folder / "config.json")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"the": 3, "[UNK]": 0}, unk_token="[UNK]")).save(
        str(folder / "tokenizer.json")
    )
    weight_map = {"model.embed_tokens.weight": f"../victim/{WEIGHTS}"}
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    code, err = cli(monkeypatch, capsys, "generate", "--model", str(folder), "--prompt", "the")
    assert code == 2 and f"'../victim/{WEIGHTS}'" in err and "not a file name" in err, err
