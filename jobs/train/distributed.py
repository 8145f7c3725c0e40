"""Parallelism and memory options, applied to a single-device model from outside.

As in torchtitan's ``parallelize.py``: the model stays plain PyTorch; here we
add activation checkpointing and ``torch.compile`` per transformer block, then
wrap in DDP (default) or shard with FSDP2 ``fully_shard``. Parameter names
(FQNs) are unchanged by the first two, so checkpoints do not depend on them.
"""

from __future__ import annotations

import contextlib
import functools
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


def apply_fsdp(model: MoETransformer, bf16: bool) -> nn.Module:
    """FSDP2: each block is one all-gather unit, the root holds embeddings and head.

    With bf16 the sharded master weights stay fp32, compute runs in bf16 and
    gradients are reduced in fp32 (torchtitan's default mixed-precision policy).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if bf16 else {}
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward.
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def parallelize(
    model: MoETransformer,
    strategy: str,
    device: torch.device,
    bf16: bool,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """The module to train: ``model`` itself on one worker, else DDP or FSDP around it."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if world_size() == 1:
        return model
    if strategy == "fsdp":
        return apply_fsdp(model, bf16)
    # Router bias buffers are kept equal by update_router_biases(all_reduce) and the
    # RoPE tables are constants, so syncing buffers before every forward is pure overhead.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


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


def autocast(device: torch.device, bf16: bool, fsdp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast with fp32 master weights; FSDP's policy does the casting itself."""
    if not bf16 or fsdp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
