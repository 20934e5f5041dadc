"""The training-throughput benchmark (mixkit.bench.train) on the CPU: its
quick mode runs every code path the GPU run takes on the tiny configs, and
its steps compare like with like: mixkit's Trainer and the transformers peer,
started from the same weights on the same packed tokens, make the same losses
step after step (so the same model, masking, loss and optimizer are timed).

Tolerances on the loss (a mean over the step's ~120 target tokens, ~5.5 nats):
- float32: 1e-5. Both compute in float32; measured differences are <= 5e-7.
- bf16: 1e-3. The two precision policies round differently (mixkit: bf16
  weights, norms and residual stream; transformers under autocast: bf16
  matmul inputs only), per-token differences of a few 2^-8 that average out
  over the targets; measured <= 1.6e-4 over three steps on both tiny models.
A peer that let attention cross document boundaries differs by more than
2e-3 at float32 (test_peer_that_crosses_documents_is_caught), so neither
tolerance would hide it.
"""
from __future__ import annotations

import json

import pytest
import torch

from mixkit.bench import train as bt
from mixkit.models import CONFIGS, load
from mixkit.train import batch_flops

transformers = pytest.importorskip("transformers")

FP32_LOSS_TOL = 1e-5
BF16_LOSS_TOL = 1e-3
MODELS = ("tiny-mistral", "tiny-mixtral")
IMPLS = ("mixkit", "hf-sdpa", "hf-compile")


@pytest.fixture(scope="module")
def one_thread():
    # Two busy cores shared with other jobs make OpenMP's barriers slow by
    # 100x; one thread keeps the tiny models' steps at tens of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_cpu(one_thread):
    return bt.run(device="cpu", quick=True, log=None)


def _find(rows, model, impl):
    found = [r for r in rows if r["model"] == model and r["impl"] == impl]
    assert len(found) == 1, (model, impl, found)
    return found[0]


def _check_rows(meta, rows, impls):
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    assert meta["matmul_tflops"] > 0 and meta["transformers"]
    p = bt.plan(meta["device"], meta["quick"], tiny=meta["tiny"])
    steps = bt.make_steps(1, p["grad_accum"], p["seq_len"], 256)
    for model in MODELS:
        args = CONFIGS[model]
        flops = sum(batch_flops(args, torch.diff(mb["cu_seqlens"].long()).tolist()) for mb in steps[0])
        mine = _find(rows, model, "mixkit")
        for impl in impls:
            r = _find(rows, model, impl)
            assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"], r
            assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["steps"] == p["steps"], r
            assert r["tokens_per_step"] == p["seq_len"] * p["grad_accum"]
            assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_s"])
            # the same FLOP count for every implementation, from the documents' lengths
            assert r["flops_per_step"] == pytest.approx(flops)
            assert r["mfu"] == pytest.approx(r["tflops"] / meta["matmul_tflops_by_dtype"][r["dtype"]])
            assert r["activation_checkpointing"] is False
            assert len(r["losses"]) == p["warmup"] + p["steps"]
            if impl != "mixkit":
                assert r["mixkit_speedup"] > 0
                # same weights, same tokens: the same loss before and after the AdamW steps
                assert abs(r["loss_diff_vs_mixkit"]) <= BF16_LOSS_TOL, r
                for mine_loss, peer_loss in zip(mine["losses"], r["losses"]):
                    assert abs(mine_loss - peer_loss) <= BF16_LOSS_TOL, (mine["losses"], r["losses"])


def test_quick_cpu_rows(quick_cpu, tmp_path):
    meta, rows = quick_cpu
    _check_rows(meta, rows, IMPLS)
    assert "experts_implementation" in _find(rows, "tiny-mixtral", "hf-sdpa")["note"]
    assert meta["compile_mode"] == "backend=eager"
    json_path, md_path = bt.write_results(tmp_path / "train.json", meta, rows)
    saved = json.loads(json_path.read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["flops"].startswith("batch_flops")
    md = md_path.read_text()
    assert md.count("| tiny-mixtral |") == len(IMPLS) and "MFU" in md


def test_quick_cpu_quickstart_rows(quick_cpu):
    """--device cpu compares mixkit and transformers at the quick start's
    shapes and precision (read from quickstart_config), steps interleaved:
    the same weights, tokens, FLOPs and optimizer, so the same losses."""
    from mixkit.train.run import quickstart_config

    meta, rows = quick_cpu
    tcfg, dcfg = quickstart_config("cpu")
    mine, peer = _find(rows, "quickstart", "mixkit"), _find(rows, "quickstart", "hf-sdpa")
    p = bt.plan("cpu", True)
    for r in (mine, peer):
        assert "error" not in r and r["interleaved"] and r["dtype"] == tcfg.precision, r
        assert (r["rows"], r["seq_len"], r["grad_accum"]) == (dcfg.batch_size, dcfg.seq_len, tcfg.grad_accum)
        assert r["tokens_per_step"] == dcfg.batch_size * dcfg.seq_len * tcfg.grad_accum
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_s"]) and r["cpu_s"] > 0
        assert r["steps"] == p["cpu_steps"] and len(r["losses"]) == p["cpu_warmup"] + p["cpu_steps"]
        assert r["params"] == bt.param_count(tcfg.model_args())
    want = {**tcfg.model, "max_seq_len": max(tcfg.model.get("max_seq_len", 0), dcfg.seq_len)}
    assert meta["cpu_speed_models"]["quickstart"]["model"] == want
    assert mine["flops_per_step"] == peer["flops_per_step"]
    # the quick start's precision on both sides (bf16 where this CPU has it
    # natively): the same losses before and after the AdamW steps
    tol = FP32_LOSS_TOL if tcfg.precision == "fp32" else BF16_LOSS_TOL
    assert mine["losses"] == pytest.approx(peer["losses"], abs=tol, rel=0)
    assert peer["pair_speedup_min"] <= peer["pair_speedup_median"] == peer["mixkit_speedup"] <= peer["pair_speedup_max"]
    assert len(peer["load_avg"]) == 2


def test_cli(one_thread, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert bt.main(["--device", "cpu", "--quick", "--models", "tiny-mistral", "--no-compile", "--steps", "1",
                    "--seq-len", "32", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["mixkit", "hf-sdpa", "hf-compile"]
    assert "skipped" in rows[2] and all(r["steps"] == 1 and r["seq_len"] == 32 for r in rows[:2])
    assert "| tiny-mistral |" in capsys.readouterr().out
    assert bt.main(["--device", "cpu", "--models", "nope"]) == 2


def test_packed_rows():
    gen = torch.Generator().manual_seed(0)
    lengths = bt.doc_lengths(64, gen)
    assert sum(lengths) == 64 and all(1 <= n <= 64 for n in lengths)
    mb = bt.packed_row([3, 5], 256, gen)
    ids, labels = mb["input_ids"][0], mb["labels"][0]
    assert mb["cu_seqlens"].tolist() == [0, 3, 8] and mb["max_seqlen"] == 5
    assert labels[2] == -100 and labels[7] == -100  # no loss across a document boundary
    assert torch.equal(labels[:2], ids[1:3]) and torch.equal(labels[3:7], ids[4:8])
    steps = bt.make_steps(2, 3, 64, 256)
    for a, b in zip(*steps):  # the same document lengths every step, fresh tokens
        assert torch.equal(a["cu_seqlens"], b["cu_seqlens"]) and not torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("name", MODELS)
def test_weights_match_a_saved_checkpoint(one_thread, tmp_path, name):
    """The benchmark's in-memory copy of transformers' weights into mixkit is
    what saving the HF model and mixkit.models.load gives."""
    args = CONFIGS[name]
    state = bt.reference_weights(args, "cpu")
    hf = bt.hf_from_state(args, state, "cpu", "sdpa")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load(tmp_path).state_dict()
    copied = bt.mixkit_from_hf_state(args, state, "cpu").state_dict()
    assert loaded.keys() == copied.keys()
    for key in loaded:
        assert torch.equal(loaded[key], copied[key]), key


def _losses(step, steps):
    return [step(micro_batches) for micro_batches in steps]


@pytest.mark.parametrize("name", MODELS)
def test_fp32_steps_match(one_thread, name):
    """At float32 the benchmark's mixkit and transformers steps are the same
    computation: three optimizer steps of two packed micro-batches each."""
    args = CONFIGS[name]
    steps = bt.make_steps(3, 2, 64, args.vocab_size, seed=1)
    state = bt.reference_weights(args, "cpu")
    mine = _losses(bt.MixkitStep(bt.mixkit_from_hf_state(args, state, "cpu"), bt.train_config(args, precision="fp32")),
                   steps)
    peer = _losses(bt.HFStep(bt.hf_from_state(args, state, "cpu", "sdpa"), bt.train_config(args, precision="fp32")),
                   steps)
    assert mine == pytest.approx(peer, abs=FP32_LOSS_TOL, rel=0)
    assert mine[0] != pytest.approx(mine[2], abs=1e-3)  # the optimizer moved the weights


def test_peer_that_crosses_documents_is_caught(one_thread):
    """The tolerances are tight enough to tell masking apart: transformers
    fed one document per row (attention crossing the packed documents'
    boundaries) misses mixkit's first-step loss by far more than FP32_LOSS_TOL."""
    args = CONFIGS["tiny-mixtral"]
    steps = bt.make_steps(1, 2, 64, args.vocab_size, seed=1)
    crossed = [[{**mb, "cu_seqlens": torch.tensor([0, 64], dtype=torch.int32)} for mb in steps[0]]]
    state = bt.reference_weights(args, "cpu")
    cfg = bt.train_config(args, precision="fp32")
    mine = bt.MixkitStep(bt.mixkit_from_hf_state(args, state, "cpu"), cfg)(steps[0])
    peer = bt.HFStep(bt.hf_from_state(args, state, "cpu", "sdpa"), cfg)(crossed[0])
    assert abs(mine - peer) > 2e-3 > 100 * FP32_LOSS_TOL


@pytest.mark.gpu
def test_tiny_cuda():
    """The GPU code paths (fused AdamW, CUDA flash_attn_varlen, the
    inductor-compiled peer, peak memory) on the tiny configs."""
    meta, rows = bt.run(device="cuda", quick=True, tiny=True, log=None)
    fa2 = [r for r in rows if r["impl"] == "hf-fa2"]
    impls = IMPLS + (("hf-fa2",) if fa2 and "skipped" not in fa2[0] else ())
    _check_rows(meta, rows, impls)
    assert meta["compile_mode"] == "default"
    assert all(r["peak_mem_gib"] > 0 for r in rows if "median_s" in r)
