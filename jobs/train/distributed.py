"""Parallelism and memory options, applied to a single-device model from outside.

As in torchtitan's ``parallelize.py``: the model stays plain PyTorch; here we
add activation checkpointing and ``torch.compile`` per transformer block, then
wrap in DDP (fp32, the default) or apply FSDP2 ``fully_shard`` (strategy
``fsdp``, and every bf16 run: its mixed-precision policy is how bf16 compute
with fp32 master weights is done). Parameter names (FQNs) stay the same, so
checkpoints do not depend on the strategy.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from moe_model import MoETransformer


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def apply_activation_checkpointing(model: MoETransformer) -> None:
    """Recompute each block in backward: activations of one block instead of L.

    ``forward`` is replaced on the instance (not wrapped in a new module) so
    parameter names stay the same. Non-reentrant checkpointing, as PyTorch
    recommends (it supports non-tensor outputs like the routing statistics).
    """
    for block in model.layers:
        original = block.forward
        block.forward = functools.partial(checkpoint, original, use_reentrant=False)


def apply_compile(model: MoETransformer) -> None:
    """Compile block by block (torchtitan): identical blocks share one compiled graph."""
    for block in model.layers:
        block.compile()


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one device: a private single-rank one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def apply_fsdp(
    model: MoETransformer,
    device: torch.device,
    shard: bool,
    bf16: bool,
    ignored: set[nn.Parameter] | None = None,
) -> nn.Module:
    """FSDP2 ``fully_shard`` per block, then the root (embeddings, final norm, head).

    ``shard=False`` keeps full replicas (a replicate x shard mesh with shard size
    1: DDP's semantics) and is how bf16 runs under strategy ``ddp``: FSDP2's
    mixed-precision policy computes in bf16 from fp32 master weights and reduces
    gradients in fp32 (torchtitan's default), and unlike autocast it makes the
    activations bf16, which the MoE's grouped GEMM needs. ``ignored`` parameters (expert
    parallelism's expert shards, reduced over their own mesh) are left alone.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    n = dist.get_world_size()
    if shard:
        mesh = init_device_mesh(device.type, (n,), mesh_dim_names=("shard",))
    else:
        mesh = init_device_mesh(device.type, (n, 1), mesh_dim_names=("replicate", "shard"))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "ignored_params": ignored, **({"mp_policy": mp} if bf16 else {})}
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward.
        fully_shard(block, reshard_after_forward=shard and i < len(model.layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=shard, **kwargs)
    return model


def parallelize(
    model: MoETransformer,
    strategy: str,
    device: torch.device,
    bf16: bool,
    activation_checkpointing: bool = False,
    compile: bool = False,
    expert_params: dict[str, nn.Parameter] | None = None,
) -> nn.Module:
    """The module to train: the model itself, DDP around it, or FSDP2 applied to it.

    ``expert_params`` (FQN -> parameter, from ``expert_parallel.apply_expert_parallel``) hold
    different experts on different ranks: neither DDP nor FSDP may average them over all ranks.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    expert_params = expert_params or {}
    if strategy == "fsdp" or bf16:
        ignored = set(expert_params.values()) or None
        return apply_fsdp(model, device, shard=strategy == "fsdp", bf16=bf16, ignored=ignored)
    if world_size() == 1:
        return model
    if expert_params:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, list(expert_params)
        )
    # Router bias buffers are kept equal by update_router_biases(all_reduce) and the
    # RoPE tables are constants, so syncing buffers before every forward is pure overhead.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **_no_buffer_sync())


def _no_buffer_sync() -> dict[str, bool]:
    """``forward_sync_buffers`` replaced ``broadcast_buffers`` in torch 2.13."""
    params = inspect.signature(DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro step of an accumulation."""
    if enabled:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def uses_fsdp(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")
