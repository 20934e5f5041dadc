"""Worker for tests/test_serve_engine.py's tensor-parallel test, launched as
`torchrun --nproc_per_node 2 tests/serve_tp_worker.py OUT.json [CONFIG]` on gloo
(CONFIG: a tiny-* config, default tiny-mistral, at the sizes below):
LLM.generate on a 2-rank tensor-parallel model, then the server's path (rank
0's EngineLoop broadcasting each step's requests, rank 1 a Follower), both
with greedy and seeded sampling requests; rank 0 writes the tokens."""
import asyncio
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mixkit.models import CONFIGS, Transformer
from mixkit.parallel import exit_rank, tensor_parallel
from mixkit.serve import LLM, Engine, SamplingParams
from mixkit.serve.parallel import Follower, Leader
from mixkit.serve.server import EngineLoop

PROMPTS = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate((23, 5, 40, 2))]
PARAMS = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)] * 2
ENGINE = dict(num_pages=24, page_size=4, max_batch=4, token_budget=8, chunk=8)


def model(name="tiny-mistral"):
    args = CONFIGS[name].replace(n_heads=4, n_kv_heads=2, head_dim=16, dim=64, hidden_dim=96, vocab_size=128)
    if args.moe_expert_bias:  # tensor_parallel refuses expert biases (its layout does not split them)
        args = args.replace(moe_expert_bias=False)
    m = Transformer(args).init_weights(2, std=0.1).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # biases and sinks start at 0: make them matter (norm weights stay)
        for n, p in m.named_parameters():
            if "norm" not in n and (p.dim() == 1 or n.endswith((".b13", ".b2"))):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


async def through_loop(engine, mesh):
    loop = EngineLoop(engine, Leader(mesh)).start()
    jobs = [loop.submit(p, s, asyncio.get_running_loop()) for p, s in zip(PROMPTS, PARAMS)]
    out = []
    for _, q in jobs:
        toks = []
        while (item := await q.get()) is not None:
            toks += item.token_ids
        out.append(toks)
    await asyncio.get_running_loop().run_in_executor(None, loop.stop)
    return out


def main():
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    mesh = init_device_mesh("cpu", (2,))
    m = tensor_parallel(model(*sys.argv[2:3]), mesh)
    offline = [o.token_ids for o in LLM(m, **ENGINE).generate(PROMPTS, PARAMS)]
    engine = Engine(m, **ENGINE)
    if dist.get_rank() == 0:
        served = asyncio.run(through_loop(engine, mesh))
        with open(sys.argv[1], "w") as f:
            json.dump({"offline": offline, "served": served}, f)
    else:
        Follower(engine, mesh).run()
    exit_rank(0)  # barrier, destroy_process_group, os._exit: see its docstring


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
