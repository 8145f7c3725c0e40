"""The GPU path under torch.compile: bf16, grouped GEMM experts, the portable ops.

`F.grouped_mm` has a CPU kernel for bf16, so the path CUDA runs can be traced here. Inside a
compiled graph the CPU-only autograd Functions step aside (`moe_model.cpu.functions.eager_cpu`), so what is
traced on CPU is what a GPU compiles. The trainer compiles block by block
(`jobs.train.distributed.apply_compile`), so a block is the unit tested.
"""

import pytest
import torch

from moe_model import ModelConfig, MoETransformer


@pytest.fixture
def bf16_model():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.preset("debug")).bfloat16()
    model.set_experts_backend("grouped_mm")
    yield model
    torch._dynamo.reset()


def _x(model, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, model.config.hidden_size, generator=g).bfloat16()
    return x.requires_grad_(requires_grad)


def test_block_traces_as_one_graph_without_breaks(bf16_model):
    block = bf16_model.layers[0]
    explained = torch._dynamo.explain(block)(_x(bf16_model), bf16_model.rope)
    reasons = [b.reason for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def test_compiled_moe_layer_matches_eager_forward_and_backward(bf16_model):
    """fullgraph=True: any graph break in the MoE layer is an error, forward or backward."""
    moe = bf16_model.layers[0].moe
    params = (moe.w13, moe.w2, moe.router.weight)

    def run(fn):
        x = _x(bf16_model, requires_grad=True)
        y, _, aux, z = fn(x)
        (y.float().square().mean() + aux + z).backward()
        grads = [x.grad, *(p.grad for p in params)]
        for p in params:
            p.grad = None
        return y.detach(), grads

    y_ref, grads_ref = run(moe)
    y, grads = run(torch.compile(moe, backend="aot_eager", fullgraph=True))
    assert torch.equal(y, y_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)
