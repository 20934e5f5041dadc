"""paged_kv_append and paged_prefill_attn against a float64 reference that
gathers each sequence's keys by position, never through the kernels' page
lookup.

The page pools are built the way a serving engine leaves them: pages
shuffled, the first pages of two sequences shared (a common prefix), pages
entirely behind every query's window freed (their block-table entries -1)
and every page no sequence owns filled with NaN, so a read of a freed or
foreign page shows up as NaN in the output.
"""
import math

import pytest
import torch

import mixkit.ops as ops
from conftest import DEVICES, GPU_DEVICES, gpu, on
import tiles
from test_attn_variants import ref_attention
from test_flash_attn import assert_fa_rule, attention_ref

# (H, Hkv, D, page_size, window, [(queries, keys) per sequence]). Query rows
# per sequence (queries x group) hit 0, 1, 15, 16, 17 and 33 around the GPU
# kernel's 16-row tile; key counts 1, 31, 32, 33, 64 and 65 around its 32- or
# 64-key tile; windows smaller than the chunk, equal to it and larger; page
# sizes that do not divide the lengths (partial last pages); GQA groups 1, 3, 4
# and 8; D = 80 runs on the CPU only.
CASES = [
    (4, 4, 64, 16, None, [(1, 1), (16, 33), (17, 17), (0, 5)]),
    (6, 2, 128, 8, 20, [(5, 65), (11, 11), (1, 64)]),
    (8, 2, 64, 5, 7, [(4, 31), (9, 40), (1, 32)]),
    (8, 1, 64, 16, 32, [(2, 96), (33, 33), (3, 100)]),
    (12, 4, 80, 3, None, [(7, 20), (3, 3)]),
    (6, 2, 256, 16, 48, [(40, 200), (8, 70)]),
]


def _case_id(c):
    h, hkv, d, ps, w, seqs = c
    return f"H{h}-Hkv{hkv}-D{d}-P{ps}-W{w}-" + "_".join(f"{q}of{k}" for q, k in seqs)


def _skip_gpu(device, d, dtype):
    if gpu(device) and (d not in ops.paged.GPU_HEAD_DIMS or (d == 256 and dtype == torch.float32)):
        pytest.skip(f"head_dim {d} in {dtype} is CPU-only")


def build(case, dtype, device, seed=0):
    """Random K/V per sequence, written into shuffled pages with
    paged_kv_append (prefix pages of sequences 0 and 1 shared, pages behind
    every query's window never allocated); returns the pieces and the
    contiguous per-sequence K/V for the reference."""
    h, hkv, d, ps, window, seqs = case
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(sk, hkv, d, generator=g).to(dtype) for _, sk in seqs]
    vals = [torch.randn(sk, hkv, d, generator=g).to(dtype) for _, sk in seqs]
    # Sequences 0 and 1 share their first `shared` full pages: equal content.
    shared = min(seqs[0][1], seqs[1][1]) // ps // 2 if len(seqs) > 1 else 0
    for t in (keys, vals):
        t[1][: shared * ps] = t[0][: shared * ps]
    max_pages = max(math.ceil(sk / ps) for _, sk in seqs) or 1
    owners = []  # (sequence, logical page) per physical page, shared prefix pages once
    table = torch.full((len(seqs), max_pages), -1, dtype=torch.int32)
    def first_needed(b):
        sq, sk = seqs[b]
        return max(0, sk - sq - window + 1) if window is not None and sq else 0

    for b, (sq, sk) in enumerate(seqs):
        for i in range(math.ceil(sk / ps)):
            # A shared page lives while either sequence still needs it.
            need = first_needed(b) if b > 1 or i >= shared else min(first_needed(0), first_needed(1))
            if (i + 1) * ps <= need:
                continue  # behind every query's window: freed
            if b == 1 and i < shared:
                continue  # the shared page of sequence 0
            owners.append((b, i))
    num_pages = len(owners) + 3
    perm = torch.randperm(num_pages, generator=g)
    for n, (b, i) in enumerate(owners):
        table[b, i] = int(perm[n])
    table[1, :shared] = table[0, :shared]
    k_pages = torch.full((num_pages, ps, hkv, d), float("nan"), dtype=dtype)
    v_pages = torch.full((num_pages, ps, hkv, d), float("nan"), dtype=dtype)
    # One append of every allocated token, in a shuffled order, with padding rows (-1).
    tok_k, tok_v, slots = [], [], []
    for b, (sq, sk) in enumerate(seqs):
        for p in range(sk):
            page = int(table[b, p // ps])
            if page >= 0 and not (b == 1 and p < shared * ps):  # shared pages written once, by sequence 0
                tok_k.append(keys[b][p]), tok_v.append(vals[b][p]), slots.append(page * ps + p % ps)
    tok_k.append(torch.full((hkv, d), float("nan"), dtype=dtype))
    tok_v.append(torch.full((hkv, d), float("nan"), dtype=dtype))
    slots.append(-1)
    order = torch.randperm(len(slots), generator=g)
    dev = on(device)
    kt = torch.stack(tok_k)[order].to(dev)
    vt = torch.stack(tok_v)[order].to(dev)
    k_pages, v_pages = k_pages.to(dev), v_pages.to(dev)
    ops.paged_kv_append(kt, vt, k_pages, v_pages, torch.tensor(slots)[order].to(dev))
    q = [torch.randn(sq, h, d, generator=g).to(dtype) for sq, _ in seqs]
    cu = torch.tensor([0] + [sum(s for s, _ in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    return dict(q=torch.cat(q).to(dev), qs=q, keys=keys, vals=vals, k_pages=k_pages, v_pages=v_pages,
                table=table.to(dev), cu=cu.to(dev), lens=torch.tensor([sk for _, sk in seqs], dtype=torch.int32).to(dev),
                max_q=max(sq for sq, _ in seqs))


def reference(x, case, dtype, **variant):
    _, _, _, _, window, _ = case
    outs, lses = [], []
    for q, k, v in zip(x["qs"], x["keys"], x["vals"]):
        if variant:
            o, lse = ref_attention(q[None], k[None], v[None], window=window, dtype=dtype, **variant)
        else:
            o, lse = attention_ref(q[None], k[None], v[None], window=window, dtype=dtype)
        outs.append(o[0])
        lses.append(lse[0].t())
    return torch.cat(outs), torch.cat(lses)


def _dtypes(device):
    return [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_paged_prefill_matches_reference(case, dtype, device):
    _skip_gpu(device, case[2], dtype)
    if device == "cpu" and dtype == torch.float16 and case[2] != 64:
        pytest.skip("float16 on the CPU: one case is enough (same code as bfloat16)")
    x = build(case, dtype, device)
    out, lse = ops.paged_prefill_attn(x["q"], x["k_pages"], x["v_pages"], x["table"], x["cu"], x["lens"],
                                      x["max_q"], window=case[4], return_lse=True)
    ref64, lse64 = reference(x, case, torch.float64)
    ref_lowp, _ = reference(x, case, dtype)
    assert torch.isfinite(out).all(), "a freed or foreign page was read"
    assert_fa_rule("out", out.cpu(), ref64, ref_lowp.to(dtype), 2)
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    torch.testing.assert_close(lse.cpu()[seen].double(), lse64[seen], rtol=1e-5, atol=1e-5)


# tiles.paged_design reads paged.cu's row and key tiles (the key tile is the
# warp width) and gives cases whose sequences hit the boundary classes of the
# rows a block, of Sk and Sk - Sq for both warp widths and of Sk against the
# page size. bfloat16 and float32 take turns (they stage K and V in vectors
# of 8 and 4); float16 shares bfloat16's code.
def _tile_cases():
    for i, (h, hkv, d, ps, w, seqs) in enumerate(tiles.paged_design()):
        dtype = torch.float32 if i % 2 and d != 256 else torch.bfloat16
        yield pytest.param((h, hkv, d, ps, w, list(seqs)), dtype, id=f"{_case_id((h, hkv, d, ps, w, seqs))}-{dtype}")


@pytest.mark.parametrize("case,dtype", list(_tile_cases()))
@pytest.mark.parametrize("device", DEVICES)
def test_tile_boundaries(case, dtype, device):
    x = build(case, dtype, device, seed=case[3])
    out, lse = ops.paged_prefill_attn(x["q"], x["k_pages"], x["v_pages"], x["table"], x["cu"], x["lens"],
                                      x["max_q"], window=case[4], return_lse=True)
    ref64, lse64 = reference(x, case, torch.float64)
    ref_lowp, _ = reference(x, case, dtype)
    assert torch.isfinite(out).all(), "a freed or foreign page was read"
    assert_fa_rule("out", out.cpu(), ref64, ref_lowp.to(dtype), 2)
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    torch.testing.assert_close(lse.cpu()[seen].double(), lse64[seen], rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("device", GPU_DEVICES)
def test_max_seqlen_q_hint_below_the_real_lengths(device):
    """max_seqlen_q only sizes the GPU grid, which the kernel loops past (the
    CPU backend checks it; the GPU cannot without a host sync): with a hint of
    1 one block walks every 16-row tile of a sequence, the rows of 9 queries
    x 4 heads a group and of 5 x 4."""
    case = (8, 2, 64, 16, None, [(9, 40), (5, 33)])
    dtype = torch.bfloat16
    x = build(case, dtype, device, seed=1)
    out, lse = ops.paged_prefill_attn(x["q"], x["k_pages"], x["v_pages"], x["table"], x["cu"], x["lens"], 1,
                                      window=None, return_lse=True)
    ref64, lse64 = reference(x, case, torch.float64)
    ref_lowp, _ = reference(x, case, dtype)
    assert_fa_rule("out", out.cpu(), ref64, ref_lowp.to(dtype), 2)
    torch.testing.assert_close(lse.cpu().double(), lse64, rtol=1e-5, atol=1e-5)


VARIANT_CASES = [
    (6, 2, 64, 5, 7, [(4, 31), (3, 1), (9, 40)]),  # rows 0 and 1 of the second sequence see no key
    (8, 1, 128, 16, None, [(17, 17), (2, 70)]),
]


@pytest.mark.parametrize("case", VARIANT_CASES, ids=_case_id)
@pytest.mark.parametrize("variant", ["sinks", "softcap", "both", "high_sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_paged_prefill_sinks_and_softcap(case, variant, dtype, device):
    """The attention-variants semantics (sinks join each row's denominator
    once, softcap caps the scaled scores) against the float64 reference."""
    h = case[0]
    g = torch.Generator().manual_seed(7)
    sinks = None
    if variant in ("sinks", "both"):
        sinks = torch.randn(h, generator=g) * 2
    elif variant == "high_sinks":  # far above every score: the rows are almost all sink
        sinks = torch.full((h,), 40.0)
    softcap = 5.0 if variant in ("softcap", "both") else None
    x = build(case, dtype, device)
    if softcap is not None:
        x["q"] = x["q"] * 8  # scores well beyond the cap
        x["qs"] = [q * 8 for q in x["qs"]]
    out, lse = ops.paged_prefill_attn(x["q"], x["k_pages"], x["v_pages"], x["table"], x["cu"], x["lens"], x["max_q"],
                                      window=case[4], return_lse=True,
                                      sinks=None if sinks is None else sinks.to(on(device)), softcap=softcap)
    ref64, lse64 = reference(x, case, torch.float64, sinks=sinks, softcap=softcap)
    ref_lowp, _ = reference(x, case, dtype, sinks=sinks, softcap=softcap)
    assert_fa_rule("out", out.cpu(), ref64, ref_lowp.to(dtype), 2)
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    torch.testing.assert_close(lse.cpu()[seen].double(), lse64[seen], rtol=1e-5, atol=1e-5)


def test_paged_prefill_rejects_bad_sinks_and_softcap():
    q = torch.randn(5, 4, 64)
    pages = torch.randn(6, 4, 2, 64)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    args = (q, pages, pages, table, torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([5, 2], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="sinks must have shape"):
        ops.paged_prefill_attn(*args, sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="float32"):
        ops.paged_prefill_attn(*args, sinks=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="softcap"):
        ops.paged_prefill_attn(*args, softcap=0.0)
    with pytest.raises(TypeError, match="softcap"):
        ops.paged_prefill_attn(*args, softcap=True)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_append_writes_exactly_the_slots(device):
    """Every slot gets its token's k and v; padding (-1) and untouched slots keep
    their contents; strided views into a fused projection need no copy."""
    dtype = torch.bfloat16
    dev = on(device)
    qkv = torch.randn(7, 3, 2, 64).to(dtype).to(dev)  # (T, q/k/v, Hkv, D)
    k, v = qkv[:, 1], qkv[:, 2]
    pages_k = torch.zeros(4, 5, 2, 64, dtype=dtype, device=dev)
    pages_v = torch.zeros_like(pages_k)
    slots = torch.tensor([19, 0, -1, 4, 5, 12, -1], dtype=torch.int64, device=dev)
    ops.paged_kv_append(k, v, pages_k, pages_v, slots)
    want_k, want_v = torch.zeros_like(pages_k).view(20, 2, 64), torch.zeros_like(pages_v).view(20, 2, 64)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s], want_v[s] = k[t], v[t]
    assert torch.equal(pages_k.view(20, 2, 64), want_k) and torch.equal(pages_v.view(20, 2, 64), want_v)
    ops.paged_kv_append(k[:0], v[:0], pages_k, pages_v, slots[:0])  # no tokens: nothing happens


def test_paged_decode_reads_only_visible_pages():
    """decode_attn_paged over a table whose pages behind the window are freed
    (-1): the CPU's page check covers the visible pages only."""
    g = torch.Generator().manual_seed(3)
    pages = torch.randn(6, 4, 2, 64, generator=g)
    q = torch.randn(1, 4, 64, generator=g)
    table = torch.tensor([[-1, -1, 3, 5]], dtype=torch.int32)
    lens = torch.tensor([15], dtype=torch.int32)
    out = ops.decode_attn_paged(q, pages, pages, table, lens, window=6)
    keys = torch.cat([pages[3], pages[5]])[9 - 8:15 - 8]  # positions 9..14
    ref, _ = attention_ref(q[:, None], keys[None], keys[None], window=None)
    torch.testing.assert_close(out.double(), ref[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a page index"):
        ops.decode_attn_paged(q, pages, pages, table, lens, window=8)  # position 7 lives in freed page 1


def test_paged_prefill_rejects_bad_values_on_cpu():
    q = torch.randn(5, 4, 64)
    pages = torch.randn(6, 4, 2, 64)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    lens = torch.tensor([5, 2], dtype=torch.int32)
    call = lambda **kw: ops.paged_prefill_attn(**{**dict(q=q, k_pages=pages, v_pages=pages, block_table=table,  # noqa: E731
                                                        cu_seqlens_q=cu, seqlens_k=lens, max_seqlen_q=3), **kw})
    call()
    with pytest.raises(ValueError, match="not a page"):
        call(block_table=torch.tensor([[0, 9, 2], [3, 4, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at"):
        call(cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32), max_seqlen_q=6)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        call(max_seqlen_q=2)
    with pytest.raises(ValueError, match="seqlens_k"):
        call(seqlens_k=torch.tensor([13, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        call(block_table=table.long())
    with pytest.raises(ValueError, match="multiple"):
        call(q=torch.randn(5, 3, 64))
    with pytest.raises(ValueError, match="window"):
        call(window=0)
    with pytest.raises(ValueError, match="head_dim"):
        call(q=torch.randn(5, 4, 32))
    with pytest.raises(TypeError, match="dtype"):
        call(q=q.double())
    with pytest.raises(ValueError, match="past the pool"):
        ops.paged_kv_append(q[:1, :2], q[:1, :2], pages, pages.clone(), torch.tensor([24], dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        ops.paged_kv_append(q[:2, :2], q[:2, :2], pages, pages.clone(), torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    dev = on(device)
    q = torch.randn(5, 4, 64, dtype=dtype, device=dev)
    pages = torch.randn(6, 4, 2, 64, dtype=dtype, device=dev)
    table = torch.tensor([[5, 1, 2], [3, 4, 0]], dtype=torch.int32, device=dev)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=dev)
    lens = torch.tensor([9, 4], dtype=torch.int32, device=dev)
    torch.library.opcheck(torch.ops.mixkit.paged_prefill_attn, (q, pages, pages, table, cu, lens, 3, None, None))
    torch.library.opcheck(torch.ops.mixkit.paged_prefill_attn, (q, pages, pages, table, cu, lens, 3, 4, 0.5))
    sinks = torch.randn(4, device=dev)
    torch.library.opcheck(torch.ops.mixkit.paged_prefill_attn, (q, pages, pages, table, cu, lens, 3, 4, None, sinks, 3.0))
    slots = torch.tensor([3, -1, 20, 7, 8], dtype=torch.int32, device=dev)
    torch.library.opcheck(torch.ops.mixkit.paged_kv_append, (q[:, :2], q[:, 2:], pages, pages.clone(), slots))


def test_paged_prefill_compiles():
    q = torch.randn(5, 4, 64)
    pages = torch.randn(6, 4, 2, 64)
    table = torch.tensor([[5, 1, 2], [3, 4, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    lens = torch.tensor([9, 4], dtype=torch.int32)
    fn = lambda q: ops.paged_prefill_attn(q, pages, pages, table, cu, lens, 3, window=4) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q), fn(q))
