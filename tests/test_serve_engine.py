"""The serving engine on tiny float32 models: greedy tokens equal
`mixkit.generate` of each request alone under any interleaving, the
window-aware page bound, sampling, streaming detokenisation, the decode
buckets, the prefix cache and the block manager's accounting."""
import math
import random

import pytest
import torch

from mixkit import models
from mixkit.serve import LLM, Engine, PromptTooLong, SamplingParams
from mixkit.serve.blocks import BlockManager
from mixkit.serve.detok import Detokenizer
from mixkit.serve.runner import Chunk, bucket_for, decode_buckets
from mixkit.tokenizer import ByteTokenizer


def tiny(name, seed=0, **changes):
    args = models.CONFIGS[name].replace(**changes)
    return models.Transformer(args).init_weights(seed, std=0.1).eval()


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run_arrivals(engine, requests, every=2):
    """Add requests a few at a time between steps (arrivals over time);
    returns {rid: tokens}."""
    out, pending, step = {}, list(requests), 0
    while pending or engine.has_work():
        if step % every == 0:
            for _ in range(min(3, len(pending))):
                prompt, n = pending.pop(0)
                out[engine.add(prompt, greedy(n))] = []
        for o in engine.step():
            out[o.rid] += o.token_ids
        step += 1
    return out


@pytest.mark.parametrize("name,pages,page_size,chunk", [
    ("tiny-mistral", 14, 4, 8),    # window 16: prompts up to 4 windows, chunks smaller than the window
    pytest.param("tiny-mistral", 20, 8, 24, marks=pytest.mark.slow),  # chunks longer than the window
    pytest.param("tiny-mixtral", 30, 8, 16, marks=pytest.mark.slow),  # full attention, MoE
])
def test_greedy_equals_generate_alone_under_interleaving(name, pages, page_size, chunk):
    """32 requests of mixed lengths arriving over time in a pool small enough
    to force preemption: each request's tokens equal mixkit.generate on it alone."""
    model = tiny(name)
    rng = random.Random(1)
    requests = [([rng.randrange(256) for _ in range(rng.randrange(1, 64))], rng.randrange(1, 24)) for _ in range(32)]
    engine = Engine(model, num_pages=pages, page_size=page_size, max_batch=8, token_budget=max(chunk, 8),
                    chunk=chunk)
    got = run_arrivals(engine, requests)
    assert engine.scheduler.preemptions > 0, "the pool was meant to force preemption"
    for rid, (prompt, n) in zip(sorted(got), requests):
        assert got[rid] == models.generate(model, prompt, n)[0], f"request {rid} (prompt {len(prompt)}, {n} tokens)"
    assert engine.blocks.num_free() == [pages] * len(engine.blocks.groups)


def test_window_freeing_bounds_sliding_pages_and_full_layers_keep_theirs():
    """A window-W request generating 20 W tokens holds at most
    ceil((W + chunk) / page) + 1 pages in a sliding layer; a full-attention
    layer of the same model keeps every page."""
    w, ps, chunk = 16, 4, 8
    model = tiny("tiny-mistral", sliding_window=w)
    model.layers[1].attention.window = None  # a full-attention layer beside the sliding one
    n = 20 * w
    engine = Engine(model, num_pages=math.ceil((40 + n) / ps) + 2, page_size=ps, max_batch=1, token_budget=chunk,
                    chunk=chunk)
    sliding, full = (0, 1) if engine.blocks.groups[0].window == w else (1, 0)
    rid = engine.add(list(range(1, 41)), greedy(n))
    bound, peak, out = math.ceil((w + chunk) / ps) + 1, 0, []
    while engine.has_work():
        for o in engine.step():
            out += o.token_ids
        if engine.has_work():
            held = engine.blocks.held(rid)
            req = engine.states[rid].req
            peak = max(peak, held[sliding])
            assert held[sliding] <= bound
            assert held[full] == math.ceil(req.computed / ps)
    assert len(out) == n and peak >= bound - 2
    assert engine.blocks.num_free() == [engine.blocks.num_pages] * 2


def test_kv_memory_with_and_without_window_freeing():
    """The same long request on a window model and on the same model with
    the window's pages kept (no freeing): pages held at the end."""
    w, ps = 16, 4
    model = tiny("tiny-mistral")
    engine = Engine(model, num_pages=64, page_size=ps, max_batch=1, chunk=8, token_budget=8)
    rid = engine.add([1] * 8, greedy(200))
    held = 0
    while engine.has_work():
        engine.step()
        if engine.has_work():
            held = max(held, engine.blocks.held(rid)[0])
    assert held <= math.ceil((w + 8) / ps) + 1  # O(W), not the 208 / 4 = 52 pages of the whole sequence


def test_sampling_seed_is_per_request_and_topk1_is_greedy():
    model = tiny("tiny-mistral")
    llm = LLM(model, num_pages=64, page_size=8, max_batch=8)
    p = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], p)[0].token_ids
    batched = llm.generate([[1, 2], [5, 6, 7], [9] * 30], [p.replace(seed=1), p, p.replace(seed=3)])
    assert batched[1].token_ids == alone, "a seeded request must not depend on its batch"
    assert batched[0].token_ids != alone
    top1 = llm.generate([[5, 6, 7]], p.replace(top_k=1, seed=None))[0].token_ids
    assert top1 == llm.generate([[5, 6, 7]], greedy(12))[0].token_ids


def test_logprobs_are_those_of_the_chosen_tokens():
    model = tiny("tiny-llama")
    prompt = [3, 1, 4, 1, 5]
    out = LLM(model, num_pages=32, page_size=8).generate([prompt], SamplingParams(max_tokens=5, temperature=0.7,
                                                                                 seed=3, logprobs=True,
                                                                                 ignore_eos=True))[0]
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(seq).float()[0], -1)
    want = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(want, abs=1e-4)


def test_detokenizer_never_splits_a_character_and_stops_on_strings():
    tok = ByteTokenizer()
    text = "héllo wörld ∑ 😀 ok"
    ids = tok.encode(text)
    d, pieces = Detokenizer(tok), []
    for t in ids:
        pieces.append(d.add(t))
    pieces.append(d.finish())
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    d, pieces = Detokenizer(tok, stop=["wör", "zz"]), []
    for t in ids:
        pieces.append(d.add(t))
        if d.stopped:
            break
    pieces.append(d.finish())
    assert "".join(pieces) == "héllo " and d.stopped
    d = Detokenizer(tok, stop=["lo!"])  # a held-back tail that never becomes the stop string is released
    assert "".join([d.add(t) for t in tok.encode("hello")] + [d.finish()]) == "hello"


def test_stop_strings_and_max_tokens_through_the_engine():
    model = tiny("tiny-mistral")
    llm = LLM(model, ByteTokenizer(), num_pages=64, page_size=8)
    free = llm.generate([[104, 105]], greedy(40))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    text = free.text
    stop = text[5:8]
    if stop and "\ufffd" not in text[:8]:
        cut = llm.generate([[104, 105]], greedy(40).replace(stop=[stop]))[0]
        assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
    end = free.token_ids.index(free.token_ids[3])
    eos = llm.generate([[104, 105]], greedy(40).replace(stop_token_ids=[free.token_ids[3]]))[0]
    assert eos.finish_reason == "stop" and eos.token_ids == free.token_ids[:end + 1]


def test_decode_buckets_and_padded_decode():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(n, decode_buckets(20)) for n in (1, 3, 5, 9, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]
    # The graphed path's padded batch (slot -1, length 0, fixed-width tables)
    # gives the unpadded logits on its real rows; run eagerly here.
    model = tiny("tiny-mistral")
    engine = Engine(model, num_pages=32, page_size=4, max_batch=8)
    for prompt in ([1, 2, 3], [4] * 20, [7] * 9):
        engine.add(prompt, greedy(8))
    for _ in range(3):
        engine.step()
    reqs = engine.scheduler.running
    chunks = [Chunk(r.rid, r.tokens[r.computed:], r.computed, True) for r in reqs]
    runner = engine.runner
    with torch.inference_mode():
        plain = runner.forward(runner.prepare(chunks))
        padded = runner.forward(runner.prepare(chunks, pad_to=8, width=runner.max_pages), torch.arange(8))
    # (Not bitwise: a matmul of 8 rows may sum in another order than one of 3.)
    torch.testing.assert_close(padded[:3], plain, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()


def test_prefix_cache_shares_pages_and_keeps_tokens():
    model = tiny("tiny-llama")
    engine = Engine(model, num_pages=40, page_size=4, max_batch=4)
    shared = list(range(10, 30))
    first = engine.add(shared + [1, 2], greedy(6))
    while engine.has_work():
        engine.step()
    second = engine.add(shared + [3], greedy(6))
    engine.step()
    assert engine.states[second].req.computed == 20 + 1  # 5 cached pages, then the last token
    out = [engine.step() for _ in range(10)]
    del first, out
    assert engine.blocks.num_free() == [40]
    llm_tokens = LLM(model, num_pages=40, page_size=4).generate([shared + [3]], greedy(6))[0].token_ids
    assert llm_tokens == models.generate(model, shared + [3], 6)[0]


def test_abort_and_bad_requests_release_everything():
    model = tiny("tiny-mistral")
    engine = Engine(model, num_pages=16, page_size=4, max_batch=4, chunk=8, token_budget=8)
    a = engine.add([1] * 30, greedy(20))
    engine.add([2] * 5, greedy(20))
    engine.step(), engine.step()
    engine.abort(a)
    while engine.has_work():
        engine.step()
    assert engine.blocks.num_free() == [16]
    with pytest.raises(PromptTooLong, match="maximum context length is 512"):
        engine.add([1] * 600, greedy(1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add([1], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        engine.add([1], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.add([300], greedy(1))
    full = Engine(tiny("tiny-llama"), num_pages=4, page_size=4)
    with pytest.raises(PromptTooLong, match="16 tokens"):
        full.add([1] * 16, greedy(1))


def test_block_manager_refcounts():
    bm = BlockManager(num_pages=6, page_size=2, windows=[None])
    assert bm.allocate("a", 0, 5) and bm.held("a") == [3]
    bm.register_full_pages("a", [1, 2, 3, 4, 5], 5)
    assert bm.match_prefix("b", [1, 2, 3, 4, 9]) == 4 and bm.held("b") == [2]
    assert not bm.allocate("c", 0, 8)  # 4 pages wanted, 3 free
    assert bm.num_free() == [3]
    bm.free("a")
    assert bm.num_free() == [4]  # the shared pages still belong to b
    bm.free("b")
    assert bm.num_free() == [6]
    assert bm.allocate("c", 0, 12) and bm.num_free() == [0]  # cached pages are reused when needed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-gpt-oss", "tiny-gemma2"])
def test_tensor_parallel_engine_and_server_loop_match_one_process(tmp_path, name):
    """LLM.generate and the server's engine loop (rank 0 broadcasting each
    step's requests to a follower) on 2 gloo ranks give the tokens of one
    process, greedy and seeded sampling alike; gpt-oss's sinks (random, split
    with their heads), router bias and sliding/full layers (its expert biases
    left out: tensor_parallel refuses them), and Gemma 2's softcaps, scales
    and tied embeddings on the ranks too."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mixkit

    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    import serve_tp_worker as worker

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(here / "serve_tp_worker.py"), str(out), name], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(out.read_text())
    want = [o.token_ids for o in LLM(worker.model(name), **worker.ENGINE).generate(worker.PROMPTS, worker.PARAMS)]
    assert got["offline"] == want
    assert got["served"] == want


def test_engine_loop_tells_the_other_ranks_it_stops_whenever_stop_lands():
    """A stop() that lands between the broadcast of a step's commands and the
    loop's own check must still reach the other ranks: the loop's last
    broadcast says stop, or the followers wait for it forever."""
    from mixkit.serve.server import EngineLoop

    class Engine:
        def has_work(self):
            return False

    class Leader:
        def __init__(self):
            self.sent = []

        def send(self, commands, stop=False):
            self.sent.append(stop)
            if len(self.sent) == 1:
                loop.stopping = True  # stop() arrives right after the first broadcast

    leader = Leader()
    loop = EngineLoop(Engine(), leader)
    loop._run()
    assert leader.sent[-1] is True and leader.sent.count(True) == 1
