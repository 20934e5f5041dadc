"""The `mixkit` torch.library namespace.

Ops are declared with `Library.define` and implemented per dispatch key, not
with `torch.library.custom_op`: the dispatcher path has less per-call host
overhead (bench/host_overhead.py measures both), and decode calls these ops
thousands of times per second.
"""
import torch

lib = torch.library.Library("mixkit", "DEF")


def define(schema: str, impl) -> None:
    """Declare an op and register one Python implementation for CPU and GPU.

    The implementation receives real tensors and calls `_core`; ROCm builds of
    torch route their GPUs through the CUDA key as well.
    """
    lib.define(schema)
    name = schema.split("(", 1)[0]
    for key in ("CPU", "CUDA"):
        lib.impl(name, impl, key)
