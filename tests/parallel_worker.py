"""Worker for tests/test_parallel.py, launched once per test session as
`torchrun --nproc_per_node 2 tests/parallel_worker.py OUT_DIR CKPT_DIR` on
gloo: runs every two-rank check of mixkit.parallel (tensor-parallel logits,
generation and caches; the expert-parallel MoE layer forward and backward;
sharded loading with a count of the bytes each rank reads; the CLI; bad
meshes and counts; a smoke run of mixkit.bench.parallel) and saves what it saw; the test compares that with one
process. The shared inputs (model shapes, tokens, routing cases) live here so
that both sides build the same things."""
from __future__ import annotations

import contextlib
import io
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mixkit.models import CONFIGS, Transformer
from mixkit.parallel import exit_rank

TIMEOUT = timedelta(seconds=90)  # a collective that waits longer fails instead of hanging the test
VOCAB = 128
_GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=VOCAB, max_seq_len=128)
# The four families with GQA (group 2, and group 3 for Llama: 6 query heads over 2 KV heads).
TP_ARGS = {
    "mistral": CONFIGS["tiny-mistral"].replace(**_GQA),  # window 16
    "mixtral": CONFIGS["tiny-mixtral"].replace(**_GQA, moe_num_experts=4),
    "llama": CONFIGS["tiny-llama"].replace(**{**_GQA, "n_heads": 6, "dim": 96}),
    "olmo": CONFIGS["tiny-olmo"].replace(**_GQA),  # non-parametric LayerNorm, clip_qkv, tied embeddings
}
PROMPTS = [[int(t) for t in torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (23, 5)]
NEW_TOKENS = 30  # prompt + new tokens pass the window of 16 several times

EP_ARGS = CONFIGS["tiny-mixtral"].replace(**{**_GQA, "n_layers": 1}, moe_num_experts=4)
# Routing cases for the expert-parallel layer: tokens per rank, and a
# router that starves some experts (rank 1 holds experts 2 and 3).
EP_CASES = {
    "random": dict(tokens=(9, 4), starve=()),
    "empty_expert": dict(tokens=(8, 6), starve=(3,)),  # expert 3 gets no rows
    "empty_rank": dict(tokens=(7, 5), starve=(2, 3)),  # rank 1 receives no rows
    "rank_without_tokens": dict(tokens=(11, 0), starve=()),  # rank 1 sends none
}


# Checkpoints the test writes for the sharded loads: mixkit's save (per-expert
# Mixtral keys), transformers' fused expert tensors, Mistral's native format
# (q/k rows in the interleaved RoPE layout, permuted per shard of whole heads).
LOAD_DIRS = ("mixtral", "hf_fused_mixtral", "native_mistral", "native_mixtral")


def ep_model(case: str) -> Transformer:
    model = Transformer(EP_ARGS).init_weights(1, std=0.1)
    with torch.no_grad():  # inputs have x[:, 0] near 4: a large negative weight there starves the expert
        for e in EP_CASES[case]["starve"]:
            model.layers[0].feed_forward.gate.weight[e, 0] = -10.0
    return model


def ep_inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, upstream gradient) of all tokens, rank 0's first."""
    n = sum(EP_CASES[case]["tokens"])
    gen = torch.Generator().manual_seed(len(case))
    x = torch.randn(n, EP_ARGS.dim, generator=gen)
    x[:, 0] = 4.0 + 0.1 * x[:, 0]
    return x, torch.randn(n, EP_ARGS.dim, generator=gen)


def tp_model(name: str) -> Transformer:
    return Transformer(TP_ARGS[name]).init_weights(0, std=0.1).eval()


def tp_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(3))


def _errors(mesh, ckpt: Path) -> dict[str, str]:
    """The message of each bad call (or 'no error'); every rank must raise."""
    from torch.distributed.device_mesh import init_device_mesh

    from mixkit import models
    from mixkit.parallel import expert_parallel, tensor_parallel
    from mixkit.parallel.expert import shard_for_training

    mesh_2d = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "ep"))
    calls = {
        "tp_kv_heads": lambda: tensor_parallel(Transformer(CONFIGS["tiny-mistral"]), mesh),  # 2 heads, 1 KV head
        "tp_2d_mesh": lambda: tensor_parallel(tp_model("llama"), mesh_2d),
        "tp_not_a_mesh": lambda: tensor_parallel(tp_model("llama"), "cpu"),
        "ep_experts": lambda: expert_parallel(Transformer(EP_ARGS.replace(moe_num_experts=3)), mesh),
        "ep_dense": lambda: expert_parallel(tp_model("llama"), mesh),
        "ep_unnamed_2d": lambda: expert_parallel(ep_model("random"), init_device_mesh("cpu", (1, 2))),
        "load_kv_heads": lambda: models.load(ckpt / "kv1", mesh=mesh),
        "train_ep3": lambda: shard_for_training(ep_model("random"), ep_model("random"), 3),
        "save_shard": lambda: models.save(tensor_parallel(tp_model("llama"), mesh), ckpt / "never"),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    return out


class _CountingSafeOpen:
    """safetensors.safe_open that adds the bytes of every tensor read
    (whole or sliced) to `read`."""
    read = 0

    def __init__(self, *args, **kwargs):
        self._f = _CountingSafeOpen.real(*args, **kwargs)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def get_tensor(self, key):
        t = self._f.get_tensor(key)
        _CountingSafeOpen.read += t.numel() * t.element_size()
        return t

    def get_slice(self, key):
        sl = self._f.get_slice(key)

        class _Slice:
            def get_shape(self):
                return sl.get_shape()

            def get_dtype(self):
                return sl.get_dtype()

            def __getitem__(self, index):
                t = sl[index]
                _CountingSafeOpen.read += t.numel() * t.element_size()
                return t
        return _Slice()


def _load_checks(mesh, ckpt: Path) -> dict:
    """Sharded loads against sharding a fully loaded model: same local
    parameters, and the bytes each rank read."""
    import safetensors

    from mixkit import models
    from mixkit.parallel import expert_parallel, tensor_parallel

    out = {}
    _CountingSafeOpen.real = safetensors.safe_open
    for name in LOAD_DIRS:
        for kind, to_parallel in (("tp", tensor_parallel), ("ep", expert_parallel)):
            if kind == "ep" and "mixtral" not in name:
                continue
            safetensors.safe_open = _CountingSafeOpen
            _CountingSafeOpen.read = 0
            try:
                sharded = models.load(ckpt / name, mesh=mesh, parallel=kind)
            finally:
                safetensors.safe_open = _CountingSafeOpen.real
            reference = to_parallel(models.load(ckpt / name), mesh)
            want = {k: getattr(v, "_local_tensor", v) for k, v in reference.state_dict().items()}
            got = {k: getattr(v, "_local_tensor", v) for k, v in sharded.state_dict().items()}
            out[name, kind] = {"bytes_read": _CountingSafeOpen.read, "same_keys": sorted(got) == sorted(want),
                               "equal": all(torch.equal(got[k], want[k]) for k in want),
                               "local_bytes": sum(t.numel() * t.element_size() for t in got.values())}
    return out


def _cli(ckpt: Path) -> dict:
    from mixkit.cli import main

    out = {}
    for name, argv in (("tp2", ["generate", "--checkpoint", str(ckpt / "cli"), "--prompt", "w5 w9 w17 w3",
                                "--max-new-tokens", "24", "--device", "cpu", "--tp", "2"]),
                       ("bad_heads", ["generate", "--device", "cpu", "--tp", "2"])):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
        out[name] = {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue()}
    return out


def main(out_dir: str, ckpt_dir: str):
    from torch.distributed.device_mesh import init_device_mesh

    from mixkit.models import generate
    from mixkit.parallel import expert_parallel, tensor_parallel

    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    mesh = init_device_mesh("cpu", (2,))
    ckpt = Path(ckpt_dir)
    results: dict = {"tp": {}, "ep": {}}

    for name in TP_ARGS:
        model = tensor_parallel(tp_model(name), mesh)
        with torch.no_grad():
            logits = model(tp_tokens())
        tokens = generate(model, PROMPTS, NEW_TOKENS)
        model.setup_caches(1, 64)
        cache_heads = model.layers[0].attention.cache.k.shape[2]
        model.clear_caches()
        results["tp"][name] = {"logits": logits, "tokens": tokens, "cache_heads": cache_heads}

    for case, spec in EP_CASES.items():
        model = expert_parallel(ep_model(case), mesh)
        layer = model.layers[0].feed_forward
        x, grad_y = ep_inputs(case)
        start = sum(spec["tokens"][:rank])
        rows = slice(start, start + spec["tokens"][rank])
        x_local = x[rows].clone().requires_grad_(True)
        y = layer(x_local)
        y.backward(grad_y[rows])
        gate_grad = layer.gate.weight.grad.clone()
        dist.all_reduce(gate_grad)  # the router is replicated: its gradient sums over the ranks' tokens
        per_rank = [None, None]
        dist.all_gather_object(per_rank, (y.detach(), x_local.grad))
        results["ep"][case] = {"y": torch.cat([p[0] for p in per_rank]), "x_grad": torch.cat([p[1] for p in per_rank]),
                               "gate_grad": gate_grad, "w13_grad": layer.w13.grad.full_tensor(),
                               "w2_grad": layer.w2.grad.full_tensor(),
                               "local_experts": layer.w13.to_local().shape[0]}

    from mixkit.bench.parallel import measure  # the N-device decode benchmark, wired end to end
    results["bench"] = measure(TP_ARGS["llama"], mesh, torch.device("cpu"), torch.float32, (1, 2), steps=2,
                               context=8)

    results["load"] = _load_checks(mesh, ckpt)
    results["errors"] = _errors(mesh, ckpt)
    results["cli"] = _cli(ckpt)

    gathered = [None, None]
    dist.all_gather_object(gathered, {k: results[k] for k in ("load", "errors", "cli")})
    if rank == 0:
        results["per_rank"] = gathered
        torch.save(results, Path(out_dir) / "results.pt")
    exit_rank(0)  # barrier, destroy_process_group, os._exit: see its docstring


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
