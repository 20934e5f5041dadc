"""The model-level benchmark (mixkit.bench.models) on the CPU: its quick mode
runs every code path the GPU run takes (tiny configs, no CUDA graphs), its
decode loops make the same greedy tokens in mixkit and in transformers when
both hold the same weights (so the benchmark compares like with like), and its
roofline byte and flop counts match the models' parameters."""
from __future__ import annotations

import json

import pytest
import torch

from mixkit.bench import models as bm
from mixkit.models import CONFIGS, Transformer, from_hf_config, load

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def one_thread():
    # Two busy cores shared with other jobs make OpenMP's barriers slow by
    # 100x; one thread keeps the tiny models' steps at about a millisecond.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_cpu(one_thread):
    return bm.run(device="cpu", quick=True, log=None)


def _find(rows, op, impl, batch=None):
    found = [r for r in rows if r["op"] == op and r["impl"] == impl and (batch is None or r.get("batch") == batch)]
    assert len(found) == 1, (op, impl, batch, found)
    return found[0]


def test_quick_cpu_rows(quick_cpu, tmp_path):
    meta, rows = quick_cpu
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    assert meta["copy_gbps"] > 0 and meta["matmul_tflops"] > 0 and meta["transformers"]
    timed = [("prefill", "mixkit", None), ("prefill", "hf-sdpa", None), ("prefill", "hf-compile", None),
             ("decode", "hf-compile", 1)]
    timed += [(op, impl, b) for b in bm.BATCHES for op in ("decode", "moe_decode") for impl in ("mixkit", "hf-sdpa")]
    for op, impl, b in timed:
        r = _find(rows, op, impl, b)
        assert r["median_us"] > 0 and r["tokens_per_s"] > 0 and r["p20_us"] <= r["median_us"] <= r["p80_us"], r
        assert 0 < r["roofline_pct"] and r["roofline_us"] > 0, r
        assert r["roofline"] == ("matmul-peak" if op == "prefill" else "copy-bandwidth")
        if impl != "mixkit":
            assert r["mixkit_speedup"] > 0, r
    # CUDA graphs are a GPU path; --quick compiles batch 1 only.
    for op in ("decode", "moe_decode"):
        for b in bm.BATCHES:
            assert "CUDA graphs" in _find(rows, op, "mixkit+graph", b)["skipped"]
    assert "batch 1 only" in _find(rows, "decode", "hf-compile", 32)["skipped"]
    # decode tokens/s counts every sequence of the batch
    r = _find(rows, "decode", "mixkit", 32)
    assert r["tokens_per_s"] == pytest.approx(32 / (r["median_us"] * 1e-6))
    # the MoE roofline counts the experts the router picked: top_k at batch 1
    top_k, n_exp = CONFIGS["tiny-mixtral"].moe_top_k, CONFIGS["tiny-mixtral"].moe_num_experts
    assert _find(rows, "moe_decode", "mixkit", 1)["experts_touched_per_layer"] == top_k
    assert top_k <= _find(rows, "moe_decode", "mixkit", 32)["experts_touched_per_layer"] <= n_exp
    assert _find(rows, "moe_decode", "hf-sdpa", 1)["experts_touched_per_layer"] == top_k

    # the newer families, mixkit and transformers on the same weights
    for name, peer in (("tiny-gpt-oss", "hf-eager"), ("tiny-qwen3-moe", "hf-sdpa")):
        for impl in ("mixkit", peer):
            found = [r for r in rows if r["model"] == name and r["impl"] == impl]
            assert {r["op"] for r in found} == {"family_prefill", "family_decode"}, found
            assert all(r["median_us"] > 0 and r["roofline_pct"] > 0 for r in found), found

    json_path, md_path = bm.write_results(tmp_path / "models.json", meta, rows)
    saved = json.loads(json_path.read_text())
    assert saved["meta"]["device_name"] and len(saved["rows"]) == len(rows)
    md = md_path.read_text()
    assert md.count("| decode |") == sum(r["op"] == "decode" for r in rows) and "% roofline" in md


def test_cli_subset(one_thread, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert bm.main(["--device", "cpu", "--quick", "--sections", "mixkit", "--steps", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"mixkit", "mixkit+graph"}
    assert all(r["reps"] == 2 for r in rows if r["op"] == "decode" and "median_us" in r)
    assert "| decode |" in capsys.readouterr().out
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # the parser checks --sections: a one-line error, exit code 2
        bm.main(["--device", "cpu", "--sections", "nope"])
    assert exc.value.code == 2
    assert "unknown sections nope" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-mixtral"])
def test_greedy_tokens_match_hf(one_thread, tmp_path, name):
    """The benchmark's decode loops on the same weights: transformers' model
    saved, loaded into mixkit, then prefill + greedy decode steps in both
    (float32, a rolling window for tiny-mistral: 24 > 16 tokens)."""
    args = CONFIGS[name]
    hf = bm.build_hf(args, "cpu", torch.float32)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert from_hf_config(json.loads((tmp_path / "config.json").read_text())) == args  # the same config
    ours = load(tmp_path)
    prompt = bm.make_prompt(2, 24, args.vocab_size, "cpu", seed=3)
    mine = _greedy_tokens(bm.MixkitDecoder(ours, prompt, max_len=64))
    assert torch.equal(mine, _greedy_tokens(bm.HFDecoder(hf, prompt, "dynamic", 64)))
    assert mine.unique().numel() > 3  # not a degenerate constant stream


def _greedy_tokens(dec, steps=12):
    """The decoder's greedy tokens: the prefill's, then one per step."""
    out = [dec.token.view(-1).clone()]
    for _ in range(steps):
        dec.step()
        out.append(dec.token.view(-1).clone())
    dec.close()
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", bm.FAMILIES)
def test_family_rows_compare_the_same_model(one_thread, tmp_path, name):
    """The family rows' two decoders on one set of weights (mixkit's, saved
    and read by transformers, as Bench.families does), float32: the same
    greedy tokens past the sliding window (24 + 12 > 16)."""
    import transformers

    args = CONFIGS[name]
    ours = bm.build_mixkit(args, "cpu", torch.float32, std=0.05)
    from mixkit.models import save
    save(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager" if args.attn_sinks else "sdpa").eval()
    prompt = bm.make_prompt(2, 24, args.vocab_size, "cpu", seed=3)
    mine = _greedy_tokens(bm.MixkitDecoder(ours, prompt, max_len=64))
    assert torch.equal(mine, _greedy_tokens(bm.HFDecoder(hf, prompt, "dynamic", 64)))
    assert mine.unique().numel() > 3


def test_compiled_static_cache_peer_matches_mixkit(one_thread, tmp_path):
    """The hf-compile peer: no sliding window (see Bench.hf_compiled), a
    StaticCache and a compiled forward. While every position stays inside
    the window it makes mixkit's greedy tokens."""
    args = CONFIGS["tiny-mistral"]
    hf = bm.build_hf(args, "cpu", torch.float32)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load(tmp_path)
    no_window = bm.build_hf(args.replace(sliding_window=None), "cpu", torch.float32)
    no_window.load_state_dict(hf.state_dict())
    prompt = bm.make_prompt(1, 8, args.vocab_size, "cpu", seed=4)
    steps = args.sliding_window - 8 - 1  # the last step's token sits at position window - 1
    fwd = torch.compile(no_window.forward, backend="eager", dynamic=False)
    decoders = [bm.MixkitDecoder(ours, prompt, 64), bm.HFDecoder(no_window, prompt, "static", 32, fwd=fwd)]
    streams = []
    for dec in decoders:
        seq = [dec.token.view(-1).clone()]
        for _ in range(steps):
            dec.step()
            seq.append(dec.token.view(-1).clone())
        assert dec.position() == 8 + steps
        dec.close()
        streams.append(torch.cat(seq))
    assert torch.equal(*streams)


def test_decode_bytes_match_parameters():
    """Weights read per decode step = every parameter, less the embedding
    table (only B rows are read), less the experts the router skipped."""
    for name in ("mistral-7b-v0.1", "mixtral-8x7b", "tiny-mistral", "tiny-mixtral"):
        args = CONFIGS[name]
        with torch.device("meta"):
            model = Transformer(args)
        params = sum(p.numel() for p in model.parameters())
        embed = args.vocab_size * args.dim
        for b in (1, 32):
            assert bm.decode_weight_elems(args, b) == params - embed + b * args.dim, name
        if args.moe_num_experts:
            expert = 3 * args.dim * args.hidden_dim
            skipped = args.n_layers * (args.moe_num_experts - args.moe_top_k) * expert
            assert bm.decode_weight_elems(args, 1, args.moe_top_k) == params - embed + args.dim - skipped
    m7 = CONFIGS["mistral-7b-v0.1"]
    # bf16 Mistral 7B: about 14.2 GB of weights per step, and 1024 tokens of
    # K and V at batch 32: 32 layers * 2 * 32 * 1024 * 8 heads * 128 * 2 bytes.
    assert 14.1e9 < bm.decode_bytes(m7, 1, 0, 2) < 14.3e9
    assert bm.decode_kv_elems(m7, 32, 1023) * 2 == 32 * 2 * 32 * 1024 * 8 * 128 * 2
    assert bm.decode_kv_elems(m7, 1, 10_000) == bm.decode_kv_elems(m7, 1, 4095)  # the window caps it
    # prefill: 2 flops per matmul weight per token, plus causal attention
    t = 4096
    matmul = 7_241_732_096 - 32000 * 4096 - 32 * 2 * 4096 - 4096  # params less embedding and norms
    assert bm.prefill_flops(m7, t) == 2 * matmul * t + 4 * (t * (t + 1) // 2) * 32 * 128 * 32


@pytest.mark.gpu
def test_tiny_models_on_gpu():
    """The GPU code paths (CUDA-event timing, the checked CUDA-graph replay,
    torch.compile with mode="reduce-overhead") on the tiny configs."""
    _, rows = bm.run(device="cuda", quick=True, tiny=True, log=None)
    for r in rows:
        assert "error" not in r, r
        assert "skipped" in r or (r["median_us"] > 0 and r["method"].startswith("cuda-events")), r
    # Dense and MoE decode steps both capture (the MoE FFN runs grouped GEMMs
    # over device-side offsets), and a replay matches an eager step.
    for op in ("decode", "moe_decode"):
        for b in bm.BATCHES:
            graph = _find(rows, op, "mixkit+graph", b)
            assert graph["max_abs_err_vs_eager"] <= 0.1, graph
