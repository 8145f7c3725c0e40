"""DCP save and load without unpickling: tensors through DCP, everything else as JSON.

DCP stores any non-tensor value (an optimizer's ``param_groups``: lr, betas, ...)
as a BYTE_IO entry, and its default load planner reads those entries back with
``torch.load(weights_only=False)``: a ``.metadata`` that repoints any entry to a
pickle payload runs it. So the non-tensor leaves of a state dict are split off
and kept as JSON beside the tensors, and loading goes through ``SafeLoadPlanner``:
a byte entry whose destination is a tensor is refused, and any other byte entry
(checkpoints of format 1, which kept ``param_groups`` in DCP) is decoded with
``torch.load(weights_only=True)``, which builds plain containers and numbers only.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from jobs.errors import JobError
from jobs.safe_load import UnsafeLoadError, safe_dcp_reader

_ABSENT = object()


def split_tensors(tree: Any) -> tuple[Any, Any]:
    """``(tensors, rest)``: nested dicts holding only the tensor leaves, and only the others.

    Lists and scalars (``param_groups``) go to ``rest`` whole; a side with nothing is
    ``_ABSENT`` inside, ``{}`` at the top.
    """

    def walk(node: Any) -> tuple[Any, Any]:
        if isinstance(node, torch.Tensor):
            return node, _ABSENT
        if not isinstance(node, dict):
            return _ABSENT, node
        tensors, rest = {}, {}
        for key, value in node.items():
            t, r = walk(value)
            if t is not _ABSENT:
                tensors[key] = t
            if r is not _ABSENT:
                rest[key] = r
        return (tensors or _ABSENT), (rest or _ABSENT)

    tensors, rest = walk(tree)
    return ({} if tensors is _ABSENT else tensors), ({} if rest is _ABSENT else rest)


def merge(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``split_tensors``."""
    out = dict(tensors)
    for key, value in rest.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """DCP warns when used without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, minus its ``torch.load(weights_only=False)`` of byte entries."""

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO and self._is_tensor(item):
                raise UnsafeLoadError(
                    f"refusing checkpoint entry {item.dest_index.fqn!r}: stored as bytes, "
                    "but it is a tensor"
                )
        return plan

    def _is_tensor(self, item: ReadItem) -> bool:
        return isinstance(self.state_dict.get(item.dest_index.fqn), torch.Tensor)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            decoded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeLoadError(
                f"refusing checkpoint entry {read_item.dest_index.fqn!r}: it holds objects "
                f"other than numbers and containers ({first})"
            ) from None
        if isinstance(decoded, torch.Tensor):
            raise UnsafeLoadError(
                f"refusing checkpoint entry {read_item.dest_index.fqn!r}: a tensor stored as bytes"
            )
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], decoded)
        else:
            self.state_dict[fqn] = decoded


def dcp_load(state_dict: dict[str, Any], dcp_dir: Path, where: str | Path) -> None:
    """``dcp.load`` in place through the allowlisting reader and ``SafeLoadPlanner``."""
    from torch.distributed.checkpoint.api import CheckpointException

    with single_process_ok():
        try:
            dcp.load(state_dict, storage_reader=safe_dcp_reader(dcp_dir), planner=SafeLoadPlanner())
        except CheckpointException as e:  # a BaseException: `except Exception` misses it
            raise JobError(f"checkpoint {where} could not be loaded: {_first_cause(e)}") from None
        except UnsafeLoadError as e:  # raised directly without a process group
            raise JobError(f"checkpoint {where} could not be loaded: {e}") from None


def _first_cause(e: BaseException) -> str:
    """DCP wraps each rank's failure; the innermost message is the one that names the entry."""
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException) and str(inner).strip():
            return str(inner).strip().splitlines()[0]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_json(path: Path, rest: dict[str, Any]) -> None:
    path.write_text(json.dumps(rest, indent=1, sort_keys=True))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise JobError(f"checkpoint file {path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise JobError(f"checkpoint file {path}: expected a JSON object")
    return data
