"""Past one device on torch.distributed: tensor parallelism for inference
(`tensor_parallel`) and expert parallelism for Mixtral's MoE layers
(`expert_parallel`, differentiable, composes with FSDP2 on a data x expert
mesh). Both run under torchrun on NCCL (NVIDIA), RCCL (ROCm) or gloo (CPU).
`mixkit.models.load(path, mesh=...)` loads only each rank's shard."""
from .expert import ExpertParallelMoE, expert_parallel, fully_shard_ep
from .layout import Split, ep_splits, tp_splits
from .tensor import tensor_parallel

__all__ = ["ExpertParallelMoE", "Split", "ep_splits", "exit_rank", "expert_parallel", "fully_shard_ep", "shard_plan",
           "tp_splits", "tensor_parallel"]


def shard_plan(args, mesh, parallel: str = "tp"):
    """(splits, finish) for loading a checkpoint straight into shards:
    `splits` says which part of each parameter this rank holds, `finish(model)`
    turns the filled model into its parallel form. Validates the mesh and the
    counts (ValueError) before anything is read."""
    from . import expert, tensor

    if parallel == "tp":
        rank, world = tensor.mesh_rank_world(mesh, "load")
        splits = tp_splits(args, rank, world)

        def finish(model):
            model.requires_grad_(False)
            tensor.convert_modules(model, mesh)
            return model
        return splits, finish
    if parallel == "ep":
        ep_mesh = expert._ep_mesh(mesh, "load")
        return ep_splits(args, ep_mesh.get_local_rank(), ep_mesh.size()), lambda m: expert.convert_modules(m, ep_mesh)
    raise ValueError(f"load: parallel must be 'tp' or 'ep', got {parallel!r}")


def exit_rank(code: int):
    """End a torchrun rank: destroy its process group (after a barrier when
    `code` is 0: no rank closes its connections while another still waits on
    it), flush stdout and stderr, and os._exit(code). A normal interpreter
    exit can abort the process: gloo's worker threads may still be releasing
    the last collective's tensors, which takes the GIL, while the interpreter
    finalizes; the thread is then cancelled inside a destructor and the
    process dies with SIGABRT ("terminate called without an active
    exception"; one `--tp 2` generate in about 40 on 2 cores). So the caller
    must have closed every file it writes; nothing registered with atexit
    runs."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


def tp_mesh_from_env(size: int, device: str):
    """For `torchrun --nproc_per_node N -m mixkit generate --tp N`: join the
    process group torchrun describes (NCCL on GPUs, which RCCL serves on
    ROCm; gloo on the CPU) unless one is already up, and return (1-D mesh of
    `size` ranks, this rank's device). Ranks other than 0 stop printing.
    ValueError when the rank count is not `size`."""
    import atexit
    import os
    import sys

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise ValueError(f"--tp {size} needs {size} ranks, got {world}: launch with "
                         f"torchrun --nproc_per_node {size} -m mixkit generate ... --tp {size}")
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # every rank computes the same tokens; one prints them
    return init_device_mesh(dev.type, (size,)), dev
