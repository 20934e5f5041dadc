"""kv_cache_append and decode_attn against plain float32 references that
gather the visible tokens explicitly, never through the kernels' slot logic.

Every slot outside the visible window is filled with NaN, so any read of a
slot that was never written, or holds a token older than the window, shows
up as NaN in the output (0 * NaN is NaN: masking after loading is not enough).
"""
import math

import pytest
import torch

import mixkit.ops.decode as ops
from mixkit.bench.harness import capture_cuda_graph
from conftest import DEVICES, on, gpu
import tiles
from mixkit import _core
from mixkit._backend import DTYPE_CODES, launch_args

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, Hkv, D, C, window, seqlens). GQA groups 1, 3, 4, 5, 6, 7, 8 and 16
# (two head tiles on the GPU) and MQA; lengths 0, 1, below, at and far above
# the capacity, W + 1 and several multiples of C; windows smaller than, equal
# to and larger than C; D = 96 runs on the CPU only.
CASES = [
    (3, 8, 8, 64, 64, None, [1, 37, 64]),
    (2, 6, 2, 128, 48, None, [49, 48 * 3 + 7]),
    (3, 5, 1, 64, 32, 32, [33, 96, 5]),
    (2, 12, 2, 96, 40, 17, [203, 16]),
    (2, 16, 2, 128, 64, 100, [113, 7]),
    (2, 14, 2, 64, 24, 10, [30, 11]),
    (1, 32, 2, 64, 64, None, [50]),
    (2, 4, 2, 64, 16, None, [0, 9]),
    # One long sequence: several KV splits on the GPU, and the ring wraps at
    # key 500 of 1000, inside a split.
    (1, 8, 2, 128, 1000, None, [2500]),
    # Mistral 7B: 32/8 heads, W = C = 4096, past two multiples of the window.
    (2, 32, 8, 128, 4096, 4096, [2 * 4096 + 3, 4097]),
]


def _case_id(case):
    b, h, hkv, d, c, w, lens = case
    return f"B{b}-H{h}-Hkv{hkv}-D{d}-C{c}-W{w}-L{'_'.join(map(str, lens))}"


def _skip_gpu_head_dim(device, d):
    if gpu(device) and d not in ops.GPU_HEAD_DIMS:
        pytest.skip(f"head_dim {d} is CPU-only")


def _visible(seqlen, capacity, window):
    n = min(seqlen, window or capacity, capacity)
    return torch.arange(seqlen - n, seqlen)


def make_caches(b, c, hkv, d, seqlens, window, dtype, device, seed=0):
    """Caches holding random K/V in the visible slots and NaN everywhere else."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.full((b, c, hkv, d), float("nan"))
    v_cache = torch.full((b, c, hkv, d), float("nan"))
    for i, seqlen in enumerate(seqlens):
        slots = _visible(seqlen, c, window) % c
        k_cache[i, slots] = torch.randn(len(slots), hkv, d, generator=g)
        v_cache[i, slots] = torch.randn(len(slots), hkv, d, generator=g)
    return k_cache.to(dtype).to(on(device)), v_cache.to(dtype).to(on(device))


def decode_ref(q, k_cache, v_cache, seqlens, window=None, scale=None, compute_dtype=torch.float32):
    """Plain attention over the explicitly gathered visible tokens.

    compute_dtype float32 is the reference; the input dtype gives the
    low-precision reference of the FlashAttention rule (scores, softmax
    output and weighted sum rounded to that dtype, as in flash-attn's
    attention_ref with upcast=False).
    """
    b, h, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    outs, lses = [], []
    for i, seqlen in enumerate(seqlens.tolist()):
        slots = (_visible(seqlen, c, window) % c).to(k_cache.device)
        if len(slots) == 0:
            outs.append(torch.zeros(h, d, dtype=compute_dtype, device=q.device))
            lses.append(torch.full((h,), float("-inf"), device=q.device))
            continue
        k = k_cache[i, slots].to(compute_dtype).repeat_interleave(h // hkv, dim=1)  # (n, H, D)
        v = v_cache[i, slots].to(compute_dtype).repeat_interleave(h // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].to(compute_dtype), k) * scale
        p = torch.softmax(s.float(), dim=-1).to(compute_dtype)
        outs.append(torch.einsum("hn,nhd->hd", p, v))
        lses.append(torch.logsumexp(s.float(), dim=-1))
    return torch.stack(outs), torch.stack(lses)


def assert_fa_rule(out, q, k_cache, v_cache, seqlens, window, scale=None, name="out"):
    """CONVENTIONS.md: max|ours - ref32| <= 2 max|ref_lowp - ref32| + slack.

    float32 inputs have ref_lowp == ref32, so only the slack remains: 2e-5,
    the float32 summation-order error of up to 8k terms of size ~1 (about
    sqrt(8192) * 2^-24 ~ 5e-6) plus exp2-vs-exp differences of a few ulps.
    """
    ref32, lse32 = decode_ref(q, k_cache, v_cache, seqlens, window, scale)
    ref_lowp, _ = decode_ref(q, k_cache, v_cache, seqlens, window, scale, compute_dtype=q.dtype)
    err = (out.float() - ref32).abs().max().item() if out.numel() else 0.0
    bound = 2 * (ref_lowp.float() - ref32).abs().max().item() + 2e-5
    assert err <= bound, f"{name}: max error {err:.3g} exceeds {bound:.3g}"
    return lse32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_attn_matches_reference(case, dtype, device):
    b, h, hkv, d, c, window, lens = case
    _skip_gpu_head_dim(device, d)
    if device == "emu" and max(lens) > 4096 and dtype != torch.bfloat16:
        # About 40 s a case under ASan; bf16 runs the same split-KV plan, and
        # the other dtypes run every kernel path at the smaller caches.
        pytest.skip("emulated GPU: the 8k-token case runs in bfloat16 only")
    k_cache, v_cache = make_caches(b, c, hkv, d, lens, window, dtype, device)
    q = torch.randn(b, h, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(on(device))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=on(device))
    out, lse = ops.decode_attn(q, k_cache, v_cache, seqlens, window=window, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h) and lse.dtype == torch.float32
    assert torch.isfinite(out).all(), "a NaN slot outside the visible window was read"
    lse32 = assert_fa_rule(out, q, k_cache, v_cache, seqlens, window)
    # lse is float32 math on the same rounded inputs in every dtype: only the
    # summation order differs.
    torch.testing.assert_close(lse, lse32, rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lens):
        if n == 0:  # nothing visible: zeros and lse = -inf, documented
            assert (out[i] == 0).all() and (lse[i] == float("-inf")).all()


# ---- tile boundaries ----------------------------------------------------------------
# tiles.decode_design reads decode.cu's lane-group layout, head tiles and
# split rule and gives one case per kernel instance (T's size, D, head tile);
# its sequences hit the boundary classes of the visible keys, of the last
# split's length and of the ring's wrap point, with an empty sequence in
# every (split) batch. Each case also runs through a page table (the
# capacity's largest divisor up to 32 as page size), which must give the
# ring's result bit for bit.

def _tile_cases():
    for e, d, h, hkv, c, w, lens in tiles.decode_design():
        yield pytest.param(e, d, h, hkv, c, w, lens, id=f"{'f32' if e == 4 else 'bf16'}-D{d}-H{h}-Hkv{hkv}-C{c}-W{w}")


@pytest.mark.parametrize("e,d,h,hkv,c,window,lens", list(_tile_cases()))
@pytest.mark.parametrize("device", DEVICES)
def test_tile_boundaries(e, d, h, hkv, c, window, lens, device):
    dtype = torch.float32 if e == 4 else torch.bfloat16
    b = len(lens)
    k_cache, v_cache = make_caches(b, c, hkv, d, lens, window, dtype, device)
    q = torch.randn(b, h, d, generator=torch.Generator().manual_seed(2)).to(dtype).to(on(device))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=on(device))
    if device == "emu":  # the design's split count is the kernel's
        backend, dev, _ = launch_args(q.device)
        got = _core.decode_splits(backend, dev, DTYPE_CODES[dtype], b, h, hkv, d, c, window or 0)
        assert got == tiles.decode_splits(min(window or c, c))
    out, lse = ops.decode_attn(q, k_cache, v_cache, seqlens, window=window, return_lse=True)
    assert torch.isfinite(out).all(), "a NaN slot outside the visible window was read"
    lse32 = assert_fa_rule(out, q, k_cache, v_cache, seqlens, window)
    torch.testing.assert_close(lse, lse32, rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lens):
        if n == 0:
            assert (out[i] == 0).all() and (lse[i] == float("-inf")).all()
    # Past C tokens the ring wraps and a page table does not: the paged call
    # sees the sequences that fit (the others as empty).
    ps = max(p for p in range(1, 33) if c % p == 0)
    max_pages = c // ps
    num_pages = b * max_pages + 2
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(ps))[: b * max_pages].to(on(device))
    table = perm.view(b, max_pages).to(torch.int32).contiguous()
    fits = torch.tensor(lens) <= c
    paged, paged_lse = ops.decode_attn_paged(q, _to_pages(k_cache, ps, perm, num_pages),
                                             _to_pages(v_cache, ps, perm, num_pages), table,
                                             torch.where(fits, seqlens.cpu(), 0).to(torch.int32).to(on(device)),
                                             window=window, return_lse=True)
    assert torch.equal(paged[fits], out[fits]) and torch.equal(paged_lse[fits], lse[fits]), \
        f"page size {ps}: the page lookup changed the result"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_scale(dtype, device):
    k_cache, v_cache = make_caches(2, 32, 2, 64, [40, 3], 20, dtype, device)
    q = torch.randn(2, 4, 64, device=on(device)).to(dtype)
    seqlens = torch.tensor([40, 3], dtype=torch.int32, device=on(device))
    out = ops.decode_attn(q, k_cache, v_cache, seqlens, window=20, softmax_scale=0.3)
    assert_fa_rule(out, q, k_cache, v_cache, seqlens, 20, scale=0.3)


# ---- per-row first key and strided caches (Hugging Face layouts) -----------------

def _starts_ref(q, k, v, seqlens, starts, window, capacity):
    """float32 reference over positions max(seen - n, start) .. seen - 1 of a
    (B, C, Hkv, D) view, gathered explicitly."""
    b, h, d = q.shape
    group = h // k.shape[2]
    out = torch.zeros(b, h, d)
    for i in range(b):
        seen = int(seqlens[i])
        n = min(seen, window or capacity, capacity)
        pos = torch.arange(max(seen - n, int(starts[i])), seen)
        if len(pos) == 0:
            continue
        kk = k[i, pos % capacity].float().repeat_interleave(group, dim=1)  # (n, H, D)
        vv = v[i, pos % capacity].float().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), kk) / math.sqrt(d), dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", p, vv)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 5])
def test_cache_starts_on_a_head_major_cache(window, device):
    """A Hugging Face (B, Hkv, C, D) cache read through .transpose(1, 2), no
    copy; rows start at cache_starts (left padding). Slots before a row's
    start hold NaN, so reading one shows. GQA 6 / 2, D = 64."""
    b, h, hkv, d, c = 3, 6, 2, 64, 12
    g = torch.Generator().manual_seed(3)
    k_hm = torch.randn(b, hkv, c, d, generator=g)
    v_hm = torch.randn(b, hkv, c, d, generator=g)
    starts = torch.tensor([0, 4, 9], dtype=torch.int32)
    seqlens = torch.tensor([12, 10, 11], dtype=torch.int32)
    for i in range(b):
        k_hm[i, :, :starts[i]] = float("nan")
        v_hm[i, :, :starts[i]] = float("nan")
    q = torch.randn(b, h, 1, d, generator=g)[:, :, 0]  # a strided (B, H, D) view
    expect = _starts_ref(q, k_hm.transpose(1, 2), v_hm.transpose(1, 2), seqlens, starts, window, c)
    k_hm, v_hm, q = k_hm.to(on(device)), v_hm.to(on(device)), q.to(on(device))
    k, v = k_hm.transpose(1, 2), v_hm.transpose(1, 2)
    assert not k.is_contiguous()
    out = ops.decode_attn(q, k, v, seqlens.to(on(device)), window=window, cache_starts=starts.to(on(device)))
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-5, atol=1e-5)
    # Without starts the padding is read: the argument is what keeps it out.
    # A NaN that is read reaches the output on every backend (the GPU kernel
    # once dropped it: fmaxf skips NaN and a NaN sum took the "no key" branch).
    if window is None:
        assert torch.isnan(ops.decode_attn(q, k, v, seqlens.to(on(device))).cpu()[1:]).any()
        padded = ops.decode_attn(q, k.nan_to_num(5.0), v.nan_to_num(5.0), seqlens.to(on(device))).cpu()
        assert not torch.allclose(padded[1:], expect[1:], rtol=1e-2, atol=1e-2)
    torch.library.opcheck(torch.ops.mixkit.decode_attn,
                          (q, k.nan_to_num(), v.nan_to_num(), seqlens.to(on(device)), window, None, starts.to(on(device))))


@pytest.mark.parametrize("device", DEVICES)
def test_cache_starts_paged_equals_ring(device):
    b, h, hkv, d, page = 2, 4, 2, 64, 4
    g = torch.Generator().manual_seed(4)
    ring_k = torch.randn(b, 16, hkv, d, generator=g).to(on(device))
    ring_v = torch.randn(b, 16, hkv, d, generator=g).to(on(device))
    pages_k = ring_k.reshape(b * 4, page, hkv, d)
    pages_v = ring_v.reshape(b * 4, page, hkv, d)
    table = torch.arange(b * 4, dtype=torch.int32, device=on(device)).view(b, 4)
    q = torch.randn(b, h, d, generator=g).to(on(device))
    seqlens = torch.tensor([16, 13], dtype=torch.int32, device=on(device))
    starts = torch.tensor([3, 6], dtype=torch.int32, device=on(device))
    ring = ops.decode_attn(q, ring_k, ring_v, seqlens, cache_starts=starts)
    paged = ops.decode_attn_paged(q, pages_k, pages_v, table, seqlens, cache_starts=starts)
    torch.testing.assert_close(paged, ring, rtol=0, atol=0)


# ---- kv_cache_append ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_append_writes_slot_p_mod_c(pos_dtype, dtype, device):
    b, s, hkv, d, c = 3, 5, 2, 64, 8
    kv = torch.randn(b, s, 2 * hkv, d, device=on(device)).to(dtype)
    k, v = kv[:, :, :hkv], kv[:, :, hkv:]  # strided views, as from a fused projection
    k_cache = torch.zeros(b, c, hkv, d, device=on(device), dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    start = torch.tensor([0, 6, 8 * 1000 + 3])  # from empty, wrapping mid-call, far past C
    pos = (start[:, None] + torch.arange(s)).to(pos_dtype).to(on(device))
    ops.kv_cache_append(k, v, k_cache, v_cache, pos)
    expect_k, expect_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for i in range(b):
        for t in range(s):
            slot = int(pos[i, t]) % c
            expect_k[i, slot], expect_v[i, slot] = k[i, t], v[i, t]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@pytest.mark.parametrize("hkv,d,vec,c,s", list(tiles.append_design()))
@pytest.mark.parametrize("device", DEVICES)
def test_append_tile_boundaries(hkv, d, vec, c, s, device):
    """tiles.append_design: KV heads x vectors a token at the boundaries of
    the append kernel's threads, on the 16-byte path and the scalar one (k
    and v then strided views of padded rows), and tokens a call below, at
    and past the capacity."""
    b, dtype = 2, torch.bfloat16
    g = torch.Generator().manual_seed(hkv * d)
    pad = 0 if vec else 1
    k = torch.randn(b, s, hkv, d + pad, generator=g).to(dtype).to(on(device))[..., :d]
    v = torch.randn(b, s, hkv, d + pad, generator=g).to(dtype).to(on(device))[..., :d]
    k_cache = torch.zeros(b, c, hkv, d, dtype=dtype, device=on(device))
    v_cache = torch.zeros_like(k_cache)
    start = torch.tensor([0, 3 * c + 1])
    pos = (start[:, None] + torch.arange(s)).to(on(device))
    ops.kv_cache_append(k, v, k_cache, v_cache, pos)
    expect_k, expect_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for i in range(b):
        for t in range(max(0, s - c), s):
            slot = int(pos[i, t]) % c
            expect_k[i, slot], expect_v[i, slot] = k[i, t], v[i, t]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@pytest.mark.parametrize("device", DEVICES)
def test_append_longer_than_capacity_keeps_the_last_c(device):
    b, s, hkv, d, c = 2, 23, 1, 64, 8
    k = torch.randn(b, s, hkv, d, device=on(device))
    v = torch.randn(b, s, hkv, d, device=on(device))
    k_cache, v_cache = torch.zeros(b, c, hkv, d, device=on(device)), torch.zeros(b, c, hkv, d, device=on(device))
    pos = torch.arange(s, device=on(device)).expand(b, s).contiguous()
    ops.kv_cache_append(k, v, k_cache, v_cache, pos)
    last = torch.arange(s - c, s)
    assert torch.equal(k_cache[:, last % c], k[:, last]) and torch.equal(v_cache[:, last % c], v[:, last])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity, window", [(16, 16), (16, None), (32, 11)])
def test_prefill_then_token_by_token_decode(capacity, window, dtype, device):
    """Append + decode step by step equals attention over the full history
    with the same window: the check that catches garbage past W tokens."""
    hkv, h, d, steps = 2, 6, 64, 40
    prefill = [20, 3]  # different lengths; 20 > C exercises the S > C rule
    g = torch.Generator().manual_seed(0)
    b = len(prefill)
    total = max(prefill) + steps
    keys = torch.randn(b, total, hkv, d, generator=g).to(dtype).to(on(device))
    vals = torch.randn(b, total, hkv, d, generator=g).to(dtype).to(on(device))
    queries = torch.randn(b, steps, h, d, generator=g).to(dtype).to(on(device))
    k_cache = torch.full((b, capacity, hkv, d), float("nan"), dtype=dtype, device=on(device))
    v_cache = torch.full_like(k_cache, float("nan"))
    for i, n in enumerate(prefill):  # per sequence: a batch slice of the cache is contiguous
        pos = torch.arange(n, device=on(device))[None]
        ops.kv_cache_append(keys[i:i + 1, :n], vals[i:i + 1, :n], k_cache[i:i + 1], v_cache[i:i + 1], pos)
    lengths = torch.tensor(prefill)
    for t in range(steps):
        pos = lengths[:, None].to(on(device))
        idx = lengths.to(on(device))[:, None, None, None].expand(b, 1, hkv, d)
        ops.kv_cache_append(keys.gather(1, idx), vals.gather(1, idx), k_cache, v_cache, pos)
        lengths += 1
        out = ops.decode_attn(queries[:, t].contiguous(), k_cache, v_cache, lengths.to(torch.int32).to(on(device)), window=window)
        for i in range(b):
            n = min(int(lengths[i]), window or capacity, capacity)
            hist_k = keys[i, lengths[i] - n: lengths[i]].float().repeat_interleave(h // hkv, dim=1)
            hist_v = vals[i, lengths[i] - n: lengths[i]].float().repeat_interleave(h // hkv, dim=1)
            s = torch.einsum("hd,nhd->hn", queries[i, t].float(), hist_k) / math.sqrt(d)
            ref = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), hist_v)
            # Inputs are exact in dtype; one rounding of the float32 result to
            # the output dtype (2 ulp of |out| <= max |v|) plus summation order.
            tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps / 2 * 4
            torch.testing.assert_close(out[i].float(), ref, rtol=tol, atol=tol,
                                       msg=lambda m: f"step {t}, sequence {i}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_no_new_tokens(device):
    k_cache = torch.randn(2, 8, 2, 64, device=on(device))
    v_cache = k_cache.clone()
    before = k_cache.clone()
    ops.kv_cache_append(torch.randn(2, 0, 2, 64, device=on(device)), torch.randn(2, 0, 2, 64, device=on(device)),
                        k_cache, v_cache, torch.zeros(2, 0, dtype=torch.int64, device=on(device)))
    assert torch.equal(k_cache, before)
    empty = torch.zeros(0, 8, 2, 64, device=on(device))
    out = ops.decode_attn(torch.randn(0, 4, 64, device=on(device)), empty, empty,
                          torch.zeros(0, dtype=torch.int32, device=on(device)))
    assert out.shape == (0, 4, 64)


# ---- torch.library layer -----------------------------------------------------------

def _small_step_inputs(device, dtype=torch.float32):
    b, h, hkv, d, c = 2, 6, 2, 64, 16
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(b, c, hkv, d, generator=g).to(dtype).to(on(device))
    v_cache = torch.randn(b, c, hkv, d, generator=g).to(dtype).to(on(device))
    k = torch.randn(b, 1, hkv, d, generator=g).to(dtype).to(on(device))
    v = torch.randn(b, 1, hkv, d, generator=g).to(dtype).to(on(device))
    q = torch.randn(b, h, d, generator=g).to(dtype).to(on(device))
    pos = torch.tensor([[21], [4]], device=on(device))
    seqlens = (pos[:, 0] + 1).to(torch.int32)
    return q, k, v, k_cache, v_cache, pos, seqlens


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, k_cache, v_cache, pos, seqlens = _small_step_inputs(device)
    torch.library.opcheck(torch.ops.mixkit.kv_cache_append, (k, v, k_cache, v_cache, pos))
    torch.library.opcheck(torch.ops.mixkit.decode_attn, (q, k_cache, v_cache, seqlens, None, None))
    torch.library.opcheck(torch.ops.mixkit.decode_attn, (q, k_cache, v_cache, seqlens, 7, 0.2))


def _step(q, k, v, k_cache, v_cache, pos, seqlens):
    ops.kv_cache_append(k, v, k_cache, v_cache, pos)
    return ops.decode_attn(q, k_cache, v_cache, seqlens, window=12, return_lse=True)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_decode_step(device):
    torch._dynamo.reset()
    q, k, v, k_cache, v_cache, pos, seqlens = _small_step_inputs(device)
    kc_e, vc_e = k_cache.clone(), v_cache.clone()
    out_e, lse_e = _step(q, k, v, kc_e, vc_e, pos, seqlens)
    compiled = torch.compile(_step, fullgraph=True)
    out_c, lse_c = compiled(q, k, v, k_cache, v_cache, pos, seqlens)
    assert torch.equal(k_cache, kc_e) and torch.equal(v_cache, vc_e), "the compiled append did not mutate the caches"
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_c, lse_e, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_capture_of_append_and_decode():
    b, h, hkv, d, c = 2, 32, 8, 128, 256
    dtype = torch.bfloat16
    # Finite stand-ins for tokens before the first step: the second sequence
    # starts at position 300, so its window also covers older slots.
    k_cache = torch.randn(b, c, hkv, d, device="cuda").to(dtype)
    v_cache = torch.randn(b, c, hkv, d, device="cuda").to(dtype)
    q = torch.zeros(b, h, d, device="cuda", dtype=dtype)
    k = torch.zeros(b, 1, hkv, d, device="cuda", dtype=dtype)
    v = torch.zeros_like(k)
    pos = torch.zeros(b, 1, dtype=torch.int64, device="cuda")
    seqlens = torch.ones(b, dtype=torch.int32, device="cuda")

    def step():
        return _step(q, k, v, k_cache, v_cache, pos, seqlens)

    graph, (out, lse) = capture_cuda_graph(step)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()  # after the warm-up's writes

    g = torch.Generator().manual_seed(0)
    start = torch.tensor([0, 300])  # the second sequence is past C from the start
    for t in range(20):
        q.copy_(torch.randn(b, h, d, generator=g))
        k.copy_(torch.randn(b, 1, hkv, d, generator=g))
        v.copy_(torch.randn(b, 1, hkv, d, generator=g))
        pos.copy_(start[:, None] + t)
        seqlens.copy_(start + t + 1)
        graph.replay()
        expect, expect_lse = _step(q, k, v, eager_k, eager_v, pos, seqlens)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expect, rtol=0, atol=0)
        torch.testing.assert_close(lse, expect_lse, rtol=0, atol=0)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)


# ---- bad input ---------------------------------------------------------------------

KC = torch.zeros(2, 16, 2, 64)
Q = torch.randn(2, 6, 64)
SL = torch.tensor([3, 16], dtype=torch.int32)
K1 = torch.randn(2, 1, 2, 64)
POS = torch.tensor([[2], [15]])


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.decode_attn(Q.double(), KC, KC, SL), TypeError, "q must have dtype"),
        (lambda: ops.decode_attn(Q, KC.half(), KC.half(), SL), TypeError, "q has dtype"),
        (lambda: ops.decode_attn(Q, KC, KC.half(), SL), TypeError, "v_cache has dtype"),
        (lambda: ops.decode_attn(Q, KC, KC, SL.long()), TypeError, "cache_seqlens must have dtype"),
        (lambda: ops.decode_attn(Q, KC, KC, SL[:1]), ValueError, "cache_seqlens must have shape"),
        (lambda: ops.decode_attn(Q, KC, KC, SL.to("meta")), ValueError, "cache_seqlens is on 'meta'"),
        (lambda: ops.decode_attn(Q[None], KC, KC, SL), ValueError, "q must be \\(batch, heads, head_dim\\)"),
        (lambda: ops.decode_attn(Q[:1], KC, KC, SL), ValueError, "q has batch 1"),
        (lambda: ops.decode_attn(torch.randn(2, 6, 32), KC, KC, SL), ValueError, "q has head_dim 32"),
        (lambda: ops.decode_attn(torch.randn(2, 5, 64), KC, KC, SL), ValueError, "multiple of the 2 kv_heads"),
        (lambda: ops.decode_attn(Q, KC[None], KC[None], SL), ValueError, "k_cache must be \\(batch"),
        (lambda: ops.decode_attn(Q, KC[0], KC[0], SL), ValueError, "k_cache must have at least 4"),
        (lambda: ops.decode_attn(Q, KC, torch.zeros(2, 8, 2, 64), SL), ValueError, "v_cache must have the shape"),
        (lambda: ops.decode_attn(Q, KC.transpose(1, 3), KC.transpose(1, 3), SL), ValueError,
         "last dimension of k_cache must be contiguous"),
        (lambda: ops.decode_attn(Q, KC, KC, SL, cache_starts=SL.long()), TypeError, "cache_starts must have dtype"),
        (lambda: ops.decode_attn(Q, KC, KC, SL, cache_starts=SL[:1]), ValueError, "cache_starts must have shape"),
        (lambda: ops.decode_attn(Q, KC, KC, SL, cache_starts=torch.tensor([0, -2], dtype=torch.int32)), ValueError,
         "cache_starts must be >= 0"),
        (lambda: ops.decode_attn(Q, KC, KC, SL, window=0), ValueError, "window must be >= 1"),
        (lambda: ops.decode_attn(Q, KC, KC, SL, softmax_scale=-1.0), ValueError, "softmax_scale must be"),
        (lambda: ops.decode_attn(Q, KC, KC, torch.tensor([3, -1], dtype=torch.int32)), ValueError,
         "cache_seqlens must be >= 0"),
        (lambda: ops.kv_cache_append(K1.double(), K1, KC, KC, POS), TypeError, "k must have dtype"),
        (lambda: ops.kv_cache_append(K1, K1, KC.half(), KC.half(), POS), TypeError, "k has dtype"),
        (lambda: ops.kv_cache_append(K1, K1, KC, KC, POS.float()), TypeError, "positions must have dtype"),
        (lambda: ops.kv_cache_append(K1, K1, KC, KC, POS.to("meta")), ValueError, "positions is on 'meta'"),
        (lambda: ops.kv_cache_append(K1, K1, KC, KC, POS[:, 0]), ValueError, "positions must have shape"),
        (lambda: ops.kv_cache_append(K1, K1[:, :, :1], KC, KC, POS), ValueError, "k and v must have the same"),
        (lambda: ops.kv_cache_append(torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32), KC, KC, POS), ValueError,
         "does not match k_cache"),
        (lambda: ops.kv_cache_append(K1, K1, KC[:1], KC[:1], POS), ValueError, "does not match k_cache"),
        (lambda: ops.kv_cache_append(K1, K1, KC, KC, torch.tensor([[2], [-1]])), ValueError,
         "positions must be >= 0"),
        (lambda: ops.kv_cache_append(torch.randn(2, 1, 64, 2).transpose(-1, -2), K1, KC, KC, POS), ValueError,
         "last dimension of k"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_core_rejects_bad_calls_without_crashing():
    from mixkit import _core

    with pytest.raises(ValueError, match="multiple of kv_heads"):
        _core.decode_attn(0, 0, 0, 0, 8, 8, 8, 8, 0, 8, 8, 1, 5, 2, 64, 16, 0, 1.0, 0.0, 0, (0, 0), (0, 0, 0),
                          (0, 0, 0), 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="workspace"):
        _core.decode_attn(0, 0, 0, 0, 8, 8, 8, 8, 0, 8, 8, 1, 4, 2, 64, 16, 0, 1.0, 0.0, 0, (0, 0), (0, 0, 0),
                          (0, 0, 0), 4, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="null"):
        _core.kv_cache_append(0, 0, 0, 0, False, 0, 8, 8, 8, 8, 1, 1, 2, 64, 16, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_gpu_errors(device):
    with pytest.raises(ValueError, match="head_dim 96 is not supported on the GPU"):
        ops.decode_attn(torch.randn(2, 6, 96, device=on(device)), torch.zeros(2, 16, 2, 96, device=on(device)),
                        torch.zeros(2, 16, 2, 96, device=on(device)), SL.to(on(device)))
    if device == "emu":  # the emulated GPU's tensors are all on the CPU: no device mix-ups
        return
    kc = KC.cuda()
    with pytest.raises(ValueError, match="positions is on cpu but"):
        ops.kv_cache_append(K1.cuda(), K1.cuda(), kc, kc.clone(), POS)
    with pytest.raises(ValueError, match="cache_seqlens is on cpu but"):
        ops.decode_attn(Q.cuda(), kc, kc, SL)


# ---- benchmark cases ---------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_bench_cases_run_and_agree(tokens, monkeypatch):
    """bench/decode.py's cases on the CPU: every peer runs and agrees with the
    eager reference (300 > 256: the bench window caps C below the length)."""
    import mixkit.ops
    from mixkit.bench import decode as bench_decode
    from mixkit.bench import harness

    # Until mixkit.ops re-exports these, the bench looks them up there.
    monkeypatch.setattr(mixkit.ops, "decode_attn", ops.decode_attn, raising=False)
    monkeypatch.setattr(mixkit.ops, "kv_cache_append", ops.kv_cache_append, raising=False)
    monkeypatch.setattr(bench_decode, "WINDOW", 256)
    cases = [bench_decode.decode_attn_b1_case("cpu", tokens, torch.bfloat16, None),
             bench_decode.decode_attn_case("cpu", tokens, torch.bfloat16, None, batch=2),
             bench_decode.kv_cache_append_case("cpu", tokens, torch.bfloat16, None)]
    rows = harness.run_cases(cases, "cpu", budget_s=0.01, log=None)
    assert not [r for r in rows if "error" in r], rows
    for r in rows:
        if r["impl"] != "eager":
            assert r["max_abs_err"] <= 0.02, r


# ---- paged caches -------------------------------------------------------------------

def _to_pages(cache, page_size, perm, num_pages):
    """(B, C, Hkv, D) -> (num_pages, page_size, Hkv, D): page perm[b * max_pages + i]
    holds positions i * page_size.. of sequence b; unused pages are NaN."""
    b, c, hkv, d = cache.shape
    pages = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=cache.dtype, device=cache.device)
    pages[perm] = cache.reshape(b * (c // page_size), page_size, hkv, d)
    return pages


# (B, H, Hkv, D, page_size, max_pages, window, seqlens): lengths within a
# page, across pages, filling the table; windows that skip early pages.
PAGED = [
    (3, 8, 2, 64, 16, 4, None, [1, 17, 64]),
    (2, 6, 1, 128, 8, 10, 20, [80, 33]),
    (2, 12, 2, 96, 5, 7, 9, [35, 0]),
    (1, 32, 8, 128, 64, 40, 1000, [2500]),
]


@pytest.mark.parametrize("b,h,hkv,d,ps,max_pages,window,seqlens", PAGED)
@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_equals_ring_decode(b, h, hkv, d, ps, max_pages, window, seqlens, device):
    _skip_gpu_head_dim(device, d)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    c = ps * max_pages  # every length fits, so the ring never wraps and slot == position
    k_cache, v_cache = make_caches(b, c, hkv, d, seqlens, window, dtype, device)
    q = torch.randn(b, h, d, generator=torch.Generator().manual_seed(5)).to(dtype).to(on(device))
    lens = torch.tensor(seqlens, dtype=torch.int32, device=on(device))
    num_pages = b * max_pages + 3
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(1))[: b * max_pages].to(on(device))
    table = perm.view(b, max_pages).to(torch.int32).contiguous()
    k_pages, v_pages = _to_pages(k_cache, ps, perm, num_pages), _to_pages(v_cache, ps, perm, num_pages)

    out, lse = ops.decode_attn_paged(q, k_pages, v_pages, table, lens, window=window, return_lse=True)
    ring, ring_lse = ops.decode_attn(q, k_cache, v_cache, lens, window=window, return_lse=True)
    assert torch.equal(out, ring) and torch.equal(lse, ring_lse), "the page lookup changed the result"
    assert_fa_rule(out.cpu(), q.cpu(), k_cache.cpu(), v_cache.cpu(), lens.cpu(), window)


def test_paged_decode_rejects_bad_tables_on_cpu():
    q = torch.randn(2, 4, 64)
    pages = torch.randn(6, 4, 2, 64)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match="not a page index"):
        ops.decode_attn_paged(q, pages, pages, table.clone().fill_(9), torch.tensor([5, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds"):
        ops.decode_attn_paged(q, pages, pages, table, torch.tensor([13, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table must be"):
        ops.decode_attn_paged(q, pages, pages, table[:1], torch.tensor([5, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        ops.decode_attn_paged(q, pages, pages, table.long(), torch.tensor([5, 1], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 4, 64, dtype=dtype, device=on(device))
    pages = torch.randn(6, 4, 2, 64, dtype=dtype, device=on(device))
    table = torch.tensor([[5, 1, 2], [3, 4, 0]], dtype=torch.int32, device=on(device))
    lens = torch.tensor([9, 4], dtype=torch.int32, device=on(device))
    torch.library.opcheck(torch.ops.mixkit.decode_attn_paged, (q, pages, pages, table, lens, None, None))
    torch.library.opcheck(torch.ops.mixkit.decode_attn_paged, (q, pages, pages, table, lens, 3, 0.5))
