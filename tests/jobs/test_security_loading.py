"""Never unpickle: a model or checkpoint file carrying a pickle payload (a ``__reduce__`` that
would create a marker file) is refused by every loader, and the payload never runs."""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from jobs.safe_load import UnsafeLoadError, safe_dcp_reader, safe_torch_load
from jobs.train import checkpoint
from moe_model import hf


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(path))).close()  # the payload does work when unpickled
    assert path.exists()
    path.unlink()
    return path


def _tiny_dcp(path: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint like the trainer's: model and AdamW state (steps, betas, lr groups)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_safe_torch_load_reads_tensors(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "names": ["a", "b"]}
    torch.save(state, tmp_path / "state.pt")
    loaded = safe_torch_load(tmp_path / "state.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["names"] == ["a", "b"]


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_safe_torch_load_refuses_a_pickle_payload(tmp_path, marker, fmt):
    bad = tmp_path / "model.pt"
    if fmt == "torch.save":
        torch.save({"weights": Payload(marker)}, bad)
    else:
        bad.write_bytes(pickle.dumps({"weights": Payload(marker)}))
    with pytest.raises(UnsafeLoadError, match="refusing to load") as err:
        safe_torch_load(bad)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_safe_dcp_reader_loads_a_real_checkpoint(tmp_path):
    saved = _tiny_dcp(tmp_path / "dcp")
    target = {"model": {k: torch.zeros_like(v) for k, v in saved.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=safe_dcp_reader(tmp_path / "dcp"))
    assert all(torch.equal(target["model"][k], v) for k, v in saved.items())


def test_safe_dcp_reader_refuses_planted_metadata(tmp_path, marker):
    saved = _tiny_dcp(tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    target = {"model": {k: torch.zeros_like(v) for k, v in saved.items()}}
    with pytest.raises(UnsafeLoadError, match=r"refusing to unpickle _?io\.open"):
        safe_dcp_reader(tmp_path / "dcp").read_metadata()
    with pytest.raises(CheckpointException), warnings.catch_warnings():  # DCP wraps the refusal
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=safe_dcp_reader(tmp_path / "dcp"))
    assert not marker.exists()


def test_load_hf_reads_safetensors_only(tmp_path, marker):
    from moe_model import ModelConfig, MoETransformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug")
    hf.save_hf(MoETransformer(cfg), tmp_path / "ok")
    assert hf.load_hf(tmp_path / "ok") is not None
    # A pickle where the weights should be, and a pickled .bin next to a missing safetensors.
    planted = tmp_path / "planted"
    planted.mkdir()
    config = (tmp_path / "ok" / "config.json").read_text()
    (planted / "config.json").write_text(config)
    (planted / hf.WEIGHTS).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own error type; never a load)
        hf.load_hf(planted)
    (planted / hf.WEIGHTS).unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, planted / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError):
        hf.load_hf(planted)
    assert not marker.exists()


def test_load_checkpoint_model_refuses_a_planted_checkpoint(tmp_path, marker):
    from moe_model import ModelConfig

    ckpt = tmp_path / "checkpoint_00000010"
    _tiny_dcp(ckpt / checkpoint.DCP_DIR)
    (ckpt / checkpoint.DCP_DIR / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (ckpt / checkpoint.MODEL_CONFIG_FILE).write_text(
        json.dumps(ModelConfig.preset("debug").to_dict())
    )
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({"step": 10}))
    with contextlib.suppress(Exception, CheckpointException):  # the marker decides
        checkpoint.load_checkpoint_model(str(ckpt))
    assert not marker.exists(), "the checkpoint loader ran a pickled payload"


@pytest.mark.gpu
def test_cuda_checkpoints_load_through_the_safe_readers(tmp_path):
    """Checkpoints written from GPU tensors (what training writes) pass the allowlists."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).cuda().bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "dcp"))
        target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
        dcp.load(target, storage_reader=safe_dcp_reader(tmp_path / "dcp"))
    for key, value in model.state_dict().items():
        assert target["model"][key].is_cuda and torch.equal(target["model"][key], value), key
    torch.save(model.state_dict(), tmp_path / "state.pt")
    on_cpu = safe_torch_load(tmp_path / "state.pt")
    on_gpu = safe_torch_load(tmp_path / "state.pt", map_location="cuda")
    for key, value in model.state_dict().items():
        assert on_cpu[key].device.type == "cpu" and on_gpu[key].is_cuda
        assert torch.equal(on_gpu[key], value), key
