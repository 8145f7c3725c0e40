"""data.sources: each source prepared into its own tagged shards; the manifest lists them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from jobs.settings import ConfigError, load_root_config
from pipeline.config import PrepareConfig
from pipeline.manifest import FORMAT_VERSION
from pipeline.prepare import prepare
from pipeline.reader import DatasetReader
from tests.pipeline.conftest import document, tiny_config, write_jsonl
from tests.pipeline.test_pack_write_read import write_dataset


@pytest.fixture
def two_sources(tmp_path: Path) -> dict[str, Path]:
    rng = random.Random(11)
    roots = {}
    for name, n in (("web", 24), ("code", 8)):
        root = tmp_path / name
        root.mkdir()
        write_jsonl(root / "part.jsonl", [{"text": document(rng, 6)} for _ in range(n)])
        roots[name] = root
    return roots


def mixture_config(roots: dict[str, Path], **overrides):
    sources = [
        {"name": "web", "inputs": [str(roots["web"])], "weight": 3.0},
        {"name": "code", "inputs": [str(roots["code"])], "weight": 1.0, "max_epochs": 2},
    ]
    settings = dict(seq_len=31, vocab_size=300, val_fraction=0.25, shard_rows=8, batch_size=4)
    return PrepareConfig(name="mix", sources=sources, **{**settings, **overrides})


def test_each_source_has_its_own_tagged_shards(two_sources, tmp_path):
    result = prepare(mixture_config(two_sources), str(tmp_path / "out"), False, "local")
    m = result.manifest
    assert m["format_version"] == FORMAT_VERSION == 2
    assert [(s["name"], s["weight"], s["max_epochs"]) for s in m["mixture"]] == [
        ("web", 3.0, None),
        ("code", 1.0, 2.0),
    ]
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert shards, split
        for shard in shards:
            assert shard["path"].startswith(f"{split}/{shard['source']}/part-"), shard
        for source in m["mixture"]:
            mine = [s for s in shards if s["source"] == source["name"]]
            assert sum(s["rows"] for s in mine) == source["rows"][split]
    assert sum(s["tokens"] for s in m["mixture"]) == sum(
        m["splits"][s]["tokens"] for s in ("train", "val")
    )
    assert m["mixture"][0]["documents"]["train"] > m["mixture"][1]["documents"]["train"]
    ds = DatasetReader(result.uri)
    by_source = ds.source_shards("train")
    assert list(by_source) == ["web", "code"]
    assert sorted(i for ids in by_source.values() for i in ids) == list(
        range(len(ds.shards("train")))
    )
    assert all(ds.read_shard("train", i).shape[1] == 32 for i in by_source["code"])


def test_one_source_keeps_its_layout_and_has_no_mixture(two_sources, tmp_path):
    cfg = tiny_config([str(two_sources["web"])])
    m = prepare(cfg, str(tmp_path / "out"), False, "local").manifest
    assert "mixture" not in m
    assert m["splits"]["train"]["shards"][0]["path"] == "train/part-00000.parquet"


def test_a_version_1_manifest_is_still_read(tmp_path):
    write_dataset(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = DatasetReader(str(tmp_path))
    assert ds.mixture is None and ds.num_rows("train") == 10
    assert ds.read_shard("train", 0).shape == (4, 9)


def test_a_mixture_config_round_trips_and_lists_every_input(two_sources):
    """The Ray Train driver ships the config as a dump and validates it again on the workers."""
    from jobs.config import RootConfig

    cfg = load_root_config(
        None,
        [
            f"data.sources={json.dumps(mixture_config(two_sources).model_dump(mode='json')['sources'])}"
        ],
    )
    assert cfg.data.inputs == [str(two_sources["web"]), str(two_sources["code"])]
    assert cfg.data.name == "web-and-1-more"
    again = RootConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.data == cfg.data


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.inputs=[a.txt]", "data.sources=[{name: a, inputs: [b.txt]}]"], "data.inputs"),
        (["data.sources=[{name: a, inputs: [x]}, {name: a, inputs: [y]}]"], "names repeat"),
        (["data.sources=[{name: a, inputs: [x], weight: 0}]"], "data.sources.0.weight"),
        (["data.sources=[{name: 'a/b', inputs: [x]}]"], "data.sources.0.name"),
    ],
)
def test_bad_sources_are_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_root_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_prepares_a_mixture_and_names_each_source(ray_local, two_sources, tmp_path):
    import typer
    from typer.testing import CliRunner

    from jobs.commands import prepare as prepare_cmd

    app = typer.Typer()
    prepare_cmd.register(app)
    app.command("noop")(lambda: None)
    config = tmp_path / "mix.yaml"
    config.write_text(
        "data:\n  name: mix\n  shard_rows: 8\n  seq_len: 31\n  vocab_size: 300\n"
        "  near_dup: {threshold: 0.8}\n  sources:\n"
        f"    - {{name: web, inputs: ['{two_sources['web']}'], weight: 3}}\n"
        f"    - {{name: code, inputs: ['{two_sources['code']}'], max_epochs: 2}}\n"
    )
    result = CliRunner().invoke(
        app, ["prepare", "-c", str(config), "-o", str(tmp_path / "o"), "-q"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("  source web: weight 3, epochs unbounded") for line in lines)
    assert any(line.startswith("  source code: weight 1, epochs at most 2") for line in lines)
    ds = DatasetReader(lines[-1])
    assert [m["name"] for m in ds.mixture] == ["web", "code"]
    assert ds.manifest["near_duplicates"]["removed"] == 0


@pytest.mark.slow
def test_a_mixture_is_the_same_on_ray_at_two_workers_as_in_process(
    ray_local, two_sources, tmp_path
):
    on_ray = prepare(mixture_config(two_sources, num_workers=2), str(tmp_path / "r"), False)
    local = prepare(mixture_config(two_sources), str(tmp_path / "l"), False, "local")
    assert on_ray.manifest["mixture"] == local.manifest["mixture"]
    for split in ("train", "val"):
        assert on_ray.manifest["splits"][split] == local.manifest["splits"][split]
