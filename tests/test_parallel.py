"""mixkit.parallel on two CPU ranks (gloo, torchrun) against one process.

One torchrun launch (tests/parallel_worker.py) runs every two-rank check
and saves what it saw; the tests here compare it with the same models run in
this process.

Tolerances. The tensor-parallel logits meet the FlashAttention rule against
transformers in float64 on the same weights (error at most twice the
one-process float32 error, plus 1e-5), and sit close to the one-process
float32 logits: tensor parallelism changes only the order of float32 sums: wo
and w2 (and the MoE's w2) become two partial sums plus an all-reduce, and
each all-reduce adds one rounding per element. Logits of about unit size
then differ by a few float32 ulps through two layers: measured at most
4.9e-6 on this 2-core CPU; the bound is 5e-5, ten times that and still far
below a wrong head or shard (errors of order 0.1). Expert parallelism
computes every row's GEMMs with the same kernel over the same K, so the
outputs and the activation gradients come out bit for bit; the weight
gradients sum the same rows in another order (rows grouped by source rank),
and the router's gradient is summed over the ranks: 1e-6 absolute. Greedy
tokens must be identical.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mixkit
import parallel_worker as worker
from mixkit import ops
from mixkit.models import CONFIGS, Transformer, generate, save

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")


def _word_tokenizer(path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(worker.VOCAB)},
                                                           unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(path / "tokenizer.json"))


def _write_other_formats(ckpt: Path) -> None:
    """transformers' fused Mixtral experts and Mistral's native format (the
    writers of test_loading.py), for worker.LOAD_DIRS."""
    import transformers
    from safetensors.torch import save_file
    from test_loading import write_native
    from test_models import COMMON, hf_model

    torch.manual_seed(0)  # test_models' Mixtral has one KV head; TP=2 needs two
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()
    hf = mixtral
    (ckpt / "hf_fused_mixtral").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, ckpt / "hf_fused_mixtral" / "model.safetensors")
    hf.config.to_json_file(ckpt / "hf_fused_mixtral" / "config.json")
    for family, model in (("mistral", hf_model("mistral")), ("mixtral", mixtral)):
        (ckpt / f"native_{family}").mkdir()
        write_native(model, ckpt / f"native_{family}", with_theta=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    ckpt = tmp / "ckpt"
    save(Transformer(worker.TP_ARGS["mixtral"]).init_weights(5, std=0.1), ckpt / "mixtral")
    _write_other_formats(ckpt)
    save(Transformer(CONFIGS["tiny-mistral"].replace(n_layers=1)).init_weights(0), ckpt / "kv1")
    save(worker.tp_model("llama"), ckpt / "cli")
    _word_tokenizer(ckpt / "cli")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "parallel_worker.py"), str(tmp), str(ckpt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    results = torch.load(tmp / "results.pt", weights_only=False)
    results["ckpt"] = ckpt
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.TP_ARGS))
def test_tensor_parallel_logits_and_greedy_tokens(run, name, tmp_path):
    import transformers

    got = run["tp"][name]
    model = worker.tp_model(name)
    with torch.no_grad():
        want = model(worker.tp_tokens())
    torch.testing.assert_close(got["logits"], want, atol=5e-5, rtol=0)
    # The FlashAttention rule against transformers in float64 on the same weights:
    # TP's error at most twice the one-process float32 error, plus 1e-5.
    hf = transformers.AutoModelForCausalLM.from_pretrained(save(model, tmp_path), experts_implementation="eager")
    hf = hf.double().eval()  # eager experts: the grouped_mm path takes no float64
    with torch.no_grad():
        ref64 = hf(worker.tp_tokens()).logits
    bound = 2 * (want.double() - ref64).abs().max().item() + 1e-5
    assert (got["logits"].double() - ref64).abs().max().item() <= bound
    assert got["tokens"] == generate(model, worker.PROMPTS, worker.NEW_TOKENS)
    args = worker.TP_ARGS[name]
    assert got["cache_heads"] == args.n_kv_heads // 2  # each rank caches only its own KV heads


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.EP_CASES))
def test_expert_parallel_layer_forward_and_gradients(run, case):
    got = run["ep"][case]
    layer = worker.ep_model(case).layers[0].feed_forward
    x, grad_y = worker.ep_inputs(case)
    x.requires_grad_(True)
    y = layer(x)
    y.backward(grad_y)
    # the case is what its name says
    with torch.no_grad():
        _, ids = ops.moe_route(layer.gate(x), layer.top_k)
    counts = torch.bincount(ids.flatten().long(), minlength=4)
    if case == "empty_expert":
        assert counts[3] == 0 and counts[:3].min() > 0
    if case == "empty_rank":
        assert counts[2:].sum() == 0
    assert got["local_experts"] == 2
    assert torch.equal(got["y"], y.detach())
    assert torch.equal(got["x_grad"], x.grad)
    for name, want in (("gate_grad", layer.gate.weight.grad), ("w13_grad", layer.w13.grad),
                       ("w2_grad", layer.w2.grad)):
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=f"{case}: {name}")
    if case == "empty_rank":  # rank 1's experts got no rows: zero gradients, not garbage
        assert torch.count_nonzero(got["w13_grad"][2:]) == 0


@pytest.mark.slow
def test_sharded_load_reads_only_each_ranks_shard(run):
    for rank, seen in enumerate(run["per_rank"]):
        assert {name for name, _ in seen["load"]} == set(worker.LOAD_DIRS)
        for (name, kind), r in seen["load"].items():
            assert r["same_keys"] and r["equal"], (rank, name, kind)
            # every byte read lands in this rank's parameters, and nothing else is read
            assert r["bytes_read"] == r["local_bytes"], (rank, name, kind, r)
            full_bytes = sum(f.stat().st_size for f in (run["ckpt"] / name).glob("*.safetensors"))
            # TP: all but the norms and the router split in two; EP: the experts (most of the weights)
            assert r["bytes_read"] < (0.52 if kind == "tp" else 0.8) * full_bytes, (rank, name, kind)


@pytest.mark.slow
def test_bad_meshes_and_counts_raise_on_every_rank(run):
    expected = {
        "tp_kv_heads": ("n_heads 2", "n_kv_heads 1", "tensor-parallel size 2"),
        "tp_2d_mesh": ("1-D DeviceMesh", "2-D mesh"),
        "tp_not_a_mesh": ("DeviceMesh", "str"),
        "ep_experts": ("moe_num_experts 3", "expert-parallel size 2"),
        "ep_dense": ("no MoE layers",),
        "ep_unnamed_2d": ("'ep'",),
        "load_kv_heads": ("n_heads 2", "n_kv_heads 1"),
        "train_ep3": ("ep = 3", "number of ranks 2"),
        "save_shard": ("only its shard",),
    }
    for rank, seen in enumerate(run["per_rank"]):
        assert set(seen["errors"]) == set(expected)
        for name, parts in expected.items():
            for part in parts:
                assert part in seen["errors"][name], (rank, name, seen["errors"][name])


@pytest.mark.slow
def test_cli_generate_tp2_gives_the_single_process_tokens(run):
    from mixkit.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["generate", "--checkpoint", str(run["ckpt"] / "cli"), "--prompt", "w5 w9 w17 w3",
                     "--max-new-tokens", "24", "--device", "cpu"]) == 0
    rank0, rank1 = (seen["cli"] for seen in run["per_rank"])
    assert rank0["tp2"]["code"] == 0 and rank1["tp2"]["code"] == 0
    assert rank0["tp2"]["out"] == out.getvalue() and out.getvalue().count("w") == 4 + 24
    assert rank1["tp2"]["out"] == ""  # one rank prints
    for seen in (rank0, rank1):
        assert seen["bad_heads"]["code"] == 2
    assert "n_kv_heads 1" in rank0["bad_heads"]["err"]


def test_train_config_ep_is_validated():
    from mixkit.train import ConfigError, TrainConfig

    assert TrainConfig(ep=2).ep == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="ep must be an integer"):
            TrainConfig(ep=bad)


@pytest.mark.slow
def test_parallel_bench_runs_on_two_ranks(run):
    rows = run["bench"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["ranks"] == 2 and r["tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0
        assert r["allreduce_us"] > 0 and r["bytes_per_rank"] > 0


def test_paper_numbers_against_published_sizes_and_hand_counts():
    from mixkit.bench import parallel as bench

    # Published parameter counts: Mixtral 8x7B 46.7B, Llama 2 70B 69.0B (68.98B in the HF checkpoint).
    assert abs(bench.total_params(CONFIGS["mixtral-8x7b"]) / 1e9 - 46.7) < 0.05
    assert abs(bench.total_params(CONFIGS["llama-2-70b"]) / 1e9 - 68.98) < 0.05
    llama = CONFIGS["llama-2-70b"]
    # two ring all-reduces of 8192 bf16 values; each rank sends 2 (N-1)/N of the 16 KiB message
    assert bench.tp_comm_bytes_per_token_layer(llama, 2) == 2 * 16384
    assert bench.tp_comm_bytes_per_token_layer(llama, 8) == 2 * 2 * 7 / 8 * 16384
    mixtral = CONFIGS["mixtral-8x7b"]
    # two copies of an 8 KiB token, half of them leave the rank, and come back
    assert bench.ep_comm_bytes_per_token_layer(mixtral, 2) == 2 * 2 * 0.5 * 8192
    assert bench.experts_touched(mixtral, 1) == pytest.approx(2.0)
    # batch-1 TP=2 decode: half of every matrix but the embedding, of which one row; bf16, no KV yet
    embed = llama.vocab_size * llama.dim
    assert bench.decode_bytes_per_rank(llama, 2) == pytest.approx(2 * ((bench.total_params(llama) - embed) / 2
                                                                       + llama.dim))
    assert "| llama-2-70b | 2xA100-80GB | TP=2 |" in bench.paper_markdown()
