"""CPU-only machinery behind the model's math, kept out of the model's own files.

- `functions.py`: fp32 RMSNorm and RoPE autograd Functions with hand-written backwards;
  `layers.py` takes them only in eager mode on CPU (`functions.eager_cpu`).
- `scratch.py`: a pool of reused buffers for a training step's largest activations, open for
  the length of a `scratch.scope()` (the trainer opens one per run); `hugepages.py` backs it.

Nothing here changes a result; on other devices and under torch.compile the model runs the
portable ops and `scratch.empty` is `torch.empty`.
"""
