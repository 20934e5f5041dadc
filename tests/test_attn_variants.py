"""Attention sinks, logit softcap and head dims beyond 128 in every attention
op (flash_attn, flash_attn_varlen, prefill_attn, decode_attn,
decode_attn_paged), against a float64 reference written here from the
definitions, not from mixkit code: the sink is one more logit column of the
softmax (Hugging Face's eager gpt-oss attention does exactly this), dropped
before the weighted sum; the softcap is c * tanh(s / c) on the scaled scores
before the mask (Gemma 2). Gradients, dsinks included, come from autograd
through that reference.

Acceptance is the FlashAttention rule of test_flash_attn.py: max|ours - ref64|
<= 2 (outputs) or 3 (gradients) times max|ref_lowp - ref64| plus a small
slack, where ref_lowp is the same reference in the input precision (softmax
in float32, as every kernel does it, and the sink kept in float32, as the
ops take it).
"""
import importlib
import math

import pytest
import torch

import mixkit.ops as ops
import mixkit.ops.decode as decode_mod
from conftest import DEVICES, EMULATED, emu_configure, on, gpu
from mixkit._backend import emulate
from mixkit.bench.harness import capture_cuda_graph
from test_flash_attn import _dev_dtypes, _randn, assert_fa_rule, select_kernel  # noqa: F401 (fixture)

NEG_INF = float("-inf")
flash_mod = importlib.import_module("mixkit.ops.flash_attn")  # the attribute is the function of that name


# ---- reference -------------------------------------------------------------------

def ref_attention(q, k, v, causal=True, window=None, scale=None, softcap=None, sinks=None, dtype=torch.float64):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D), sinks (H,) -> out (B, Sq, H, D),
    lse (B, H, Sq). Query i is the absolute position i + Sk - Sq; scores,
    cap and weighted sum in `dtype`, softmax in at least float32."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    kf = k.to(dtype).repeat_interleave(h // hkv, dim=2)
    vf = v.to(dtype).repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.to(dtype), kf) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= j > i - window
    visible = visible.to(q.device)
    soft = torch.float64 if dtype == torch.float64 else torch.float32
    s = s.to(soft)
    if sinks is None:
        # A query that sees no key: p = 0, lse = -inf (scores zeroed first so
        # that no all -inf softmax puts a NaN into a gradient).
        seen = visible.any(-1, keepdim=True)
        s = s.masked_fill(~visible, NEG_INF).masked_fill(~seen, 0.0)
        lse = torch.logsumexp(s, dim=-1).masked_fill(~seen[:, 0], NEG_INF)
        p = torch.softmax(s, dim=-1) * seen
    else:
        s = s.masked_fill(~visible, NEG_INF)
        logits = torch.cat([s, sinks.to(soft)[None, :, None, None].expand(b, h, sq, 1)], dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.softmax(logits, dim=-1)[..., :-1]
    out = torch.einsum("bhij,bjhd->bihd", p.to(dtype), vf)
    return out, lse


def ref_varlen(q, k, v, cu_q, cu_k, **kw):
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, l = ref_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _skip_gpu_head_dim(device, d, dims):
    if gpu(device) and d not in dims:
        pytest.skip(f"head_dim {d} is CPU-only on this path (GPU: {dims}; the rejection is tested below)")


def _sinks(kind, h, device, gen):
    """Sink logits: random around the scores, far above every score, or far below."""
    if kind is None:
        return None
    if kind == "rand":
        s = torch.randn(h, generator=gen) * 2
    else:
        s = torch.full((h,), 40.0 if kind == "high" else -40.0)
        s[::2] += torch.randn(len(s[::2]), generator=gen)
    return s.to(on(device))


def _assert_lse(lse, ref, dtype):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse.cpu()), finite.cpu()), "lse must be -inf exactly where the reference is"
    atol = 2e-3 if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(lse.cpu()[finite.cpu()].double(), ref.cpu()[finite.cpu()], rtol=1e-6, atol=atol)


def _run_and_check(fn, inputs, sinks, dout, ref_fn, dtype, what):
    """Runs fn(q, k, v, sinks) -> (out, lse) and ref_fn(q, k, v, sinks,
    dtype) -> (out, lse) with gradients, and holds out, lse, dq, dk, dv and
    dsinks to the FlashAttention rule."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    sink_leaf = sinks.clone().requires_grad_(True) if sinks is not None else None
    out, lse = fn(*leaves, sink_leaf)
    out.backward(dout)
    ref = {}
    for name, rdtype in (("64", torch.float64), ("lowp", dtype)):
        rl = [t.detach().cpu().clone().requires_grad_(True) for t in inputs]
        rs = sinks.detach().cpu().double().clone().requires_grad_(True) if sinks is not None else None
        o, l = ref_fn(*rl, rs, rdtype)
        o.backward(dout.cpu().to(rdtype))
        ref[name] = (o, l, *(t.grad for t in rl), rs.grad if rs is not None else None)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_fa_rule(f"out {what}", out.cpu(), ref["64"][0], ref["lowp"][0], 2)
    _assert_lse(lse, ref["64"][1], dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_fa_rule(f"{name} {what}", leaves[i].grad.cpu(), ref["64"][2 + i], ref["lowp"][2 + i], 3)
    if sinks is not None:
        assert sink_leaf.grad.dtype == torch.float32 and sink_leaf.grad.shape == sinks.shape
        assert_fa_rule(f"dsinks {what}", sink_leaf.grad.cpu(), ref["64"][5], ref["lowp"][5], 3)


# ---- flash_attn ---------------------------------------------------------------------

# (B, Sq, Sk, H, Hkv, D, window, softcap, sinks, q scale). Windows W - 1, W,
# W + 1 and none against S = 65 (the window edge inside, at and past the
# sequence); GQA groups 1, 3 and 8; softcap 5 with q scaled so that raw
# logits reach beyond +-20 (std 10); sinks random, far above every score
# (+40) and far below (-40); Sq > Sk (the first queries see no key: zeros,
# lse = sink); Sq < Sk (a prefill chunk); head dims 256 and 96 (CPU, and the
# GPU paths that take them) and 40 (CPU).
CASES = [
    (2, 65, 65, 3, 1, 64, 64, None, "rand", 1.0),
    (1, 65, 65, 8, 1, 64, 65, 5.0, "rand", 10.0),
    (1, 65, 65, 4, 4, 64, 66, 5.0, None, 10.0),
    (1, 65, 65, 6, 2, 128, None, None, "rand", 1.0),
    (1, 77, 77, 3, 1, 64, 20, 5.0, "high", 10.0),
    (1, 77, 77, 8, 8, 128, None, 5.0, "low", 10.0),
    (2, 90, 40, 4, 2, 64, None, 5.0, "rand", 10.0),       # Sq > Sk: rows that see no key
    (1, 50, 170, 6, 3, 64, 37, 5.0, "rand", 10.0),        # Sq < Sk, window
    (1, 70, 70, 4, 2, 256, 33, 5.0, "rand", 10.0),
    (2, 45, 45, 3, 1, 256, None, None, "rand", 1.0),
    (1, 66, 66, 2, 1, 96, None, 5.0, "rand", 10.0),
    (1, 33, 33, 5, 5, 40, 9, 5.0, "high", 10.0),
]


def _case_id(c):
    b, sq, sk, h, hkv, d, w, cap, sk_kind, qs = c
    return f"b{b}-q{sq}-k{sk}-h{h}/{hkv}-d{d}-w{w}-cap{cap}-sinks{sk_kind}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device,dtype,kernel", list(_dev_dtypes()))
def test_flash_attn_sinks_softcap_match_reference(case, device, dtype, kernel, select_kernel):
    b, sq, sk, h, hkv, d, w, softcap, sink_kind, qscale = case
    _skip_gpu_head_dim(device, d, flash_mod.GPU_HEAD_DIMS)
    select_kernel(device, kernel)
    g = torch.Generator().manual_seed(sq + d)
    q = (torch.randn(b, sq, h, d, generator=g) * qscale).to(dtype).to(on(device))
    k = _randn((b, sk, hkv, d), dtype, device, g)
    v = _randn((b, sk, hkv, d), dtype, device, g)
    dout = _randn((b, sq, h, d), dtype, device, g)
    sinks = _sinks(sink_kind, h, device, g)

    def fn(q, k, v, s):
        return ops.flash_attn(q, k, v, window=w, softcap=softcap, sinks=s, return_lse=True)

    def ref(q, k, v, s, rdtype):
        return ref_attention(q, k, v, window=w, softcap=softcap, sinks=s, dtype=rdtype)

    _run_and_check(fn, (q, k, v), sinks, dout, ref, dtype, _case_id(case))


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("device,dtype,kernel", [p for p in _dev_dtypes() if p.values[1] == torch.bfloat16])
def test_deterministic_backward_with_softcap_and_sinks(d, device, dtype, kernel, select_kernel):
    """deterministic=True takes the GPU's separate dQ pass (dq_kernel), which
    recomputes the capped scores and their 1 - tanh^2 on its own: it must
    match the reference, and bit for bit itself."""
    select_kernel(device, kernel)
    g = torch.Generator().manual_seed(d)
    q = (torch.randn(1, 75, 4, d, generator=g) * 10).to(dtype).to(on(device))
    k, v = (_randn((1, 75, 2, d), dtype, device, g) for _ in range(2))
    dout = _randn(q.shape, dtype, device, g)
    sinks = _sinks("rand", 4, device, g)

    def fn(q, k, v, s):
        return ops.flash_attn(q, k, v, window=40, softcap=5.0, sinks=s, return_lse=True, deterministic=True)

    def ref(q, k, v, s, rdtype):
        return ref_attention(q, k, v, window=40, softcap=5.0, sinks=s, dtype=rdtype)

    _run_and_check(fn, (q, k, v), sinks, dout, ref, dtype, f"deterministic d{d}")
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves, sinks)[0].backward(dout)
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key_output_zeros_with_lse_the_sink(device):
    """Sq > Sk: the first Sq - Sk queries see no key. With sinks they output
    zeros and lse = sink_h (the softmax over {sink} alone puts every weight
    on the valueless sink), and they add nothing to dsinks, dq, dk or dv."""
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    sinks = torch.tensor([0.5, -3.0, 7.0, 0.0], device=on(device))
    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(s, dtype, device, g) for s in ((1, 20, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, sinks)]
    out, lse = ops.flash_attn(*leaves[:3], sinks=leaves[3], return_lse=True)
    assert torch.equal(out[:, :12], torch.zeros_like(out[:, :12]))
    assert torch.equal(lse[0, :, :12], sinks[:, None].expand(4, 12))
    dout = torch.zeros_like(out)
    dout[:, :12] = 1.0  # only the blind rows carry a gradient
    out.backward(dout)
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_sink_of_minus_infinity_is_no_sink():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((1, 30, 2, 16), (1, 20, 1, 16), (1, 20, 1, 16)))
    out, lse = ops.flash_attn(q, k, v, sinks=torch.full((2,), NEG_INF), return_lse=True)
    want, want_lse = ops.flash_attn(q, k, v, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


# Packed documents, one of them empty, with sinks, softcap and a window.
VARLEN = [
    ([63, 0, 1, 130, 65], None, 40, 5.0, "rand"),
    ([5, 0, 90, 33], [40, 0, 90, 100], 32, None, "rand"),
    ([20, 70, 0], None, None, 5.0, "high"),
]


@pytest.mark.parametrize("lens_q,lens_k,w,softcap,sink_kind", VARLEN)
@pytest.mark.parametrize("device,dtype,kernel", list(_dev_dtypes()))
def test_varlen_sinks_softcap_match_reference(lens_q, lens_k, w, softcap, sink_kind, device, dtype, kernel,
                                              select_kernel):
    select_kernel(device, kernel)
    lens_k = lens_k or lens_q
    h, hkv, d = 6, 2, 64
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(sum(lens_q), h, d, generator=g) * 10).to(dtype).to(on(device))
    k = _randn((sum(lens_k), hkv, d), dtype, device, g)
    v = _randn((sum(lens_k), hkv, d), dtype, device, g)
    dout = _randn(q.shape, dtype, device, g)
    sinks = _sinks(sink_kind, h, device, g)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=on(device))
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=on(device))
    mq, mk = max(lens_q), max(lens_k)

    def fn(q, k, v, s):
        return ops.flash_attn_varlen(q, k, v, cu_q, cu_k, mq, mk, window=w, softcap=softcap, sinks=s,
                                     return_lse=True)

    def ref(q, k, v, s, rdtype):
        return ref_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), window=w, softcap=softcap, sinks=s, dtype=rdtype)

    _run_and_check(fn, (q, k, v), sinks, dout, ref, dtype, f"lens={lens_q}")


# Every GPU tile (query and key blocks of the forward and backward kernels,
# sm_80, wgmma and MFMA) is 16, 32, 64 or 128 long, so documents of 127, 128
# and 129 rows hit residues tile - 1, 0 and 1 of each at once; a 1-row and an
# empty document, and keys longer than the queries (bottom-right alignment:
# the first key blocks are partly visible). One varlen call per head dim runs
# them all through the same kernels as flash_attn.
TILE_DOCS_Q = [127, 128, 129, 1, 0, 64]
TILE_DOCS_K = [127, 193, 129, 33, 3, 64]


@pytest.mark.parametrize("d,w,softcap,sink_kind", [(64, 64, 5.0, "rand"), (128, None, 5.0, "high"),
                                                   (256, 33, 5.0, "rand")])
@pytest.mark.parametrize("device,dtype,kernel", [p for p in _dev_dtypes() if p.values[1] != torch.float16])
def test_sinks_softcap_at_tile_boundaries(d, w, softcap, sink_kind, device, dtype, kernel, select_kernel):
    select_kernel(device, kernel)
    h, hkv = 3, 1
    g = torch.Generator().manual_seed(d)
    q = (torch.randn(sum(TILE_DOCS_Q), h, d, generator=g) * 10).to(dtype).to(on(device))
    k = _randn((sum(TILE_DOCS_K), hkv, d), dtype, device, g)
    v = _randn((sum(TILE_DOCS_K), hkv, d), dtype, device, g)
    dout = _randn(q.shape, dtype, device, g)
    sinks = _sinks(sink_kind, h, device, g)
    cu_q = torch.tensor([0] + torch.tensor(TILE_DOCS_Q).cumsum(0).tolist(), dtype=torch.int32, device=on(device))
    cu_k = torch.tensor([0] + torch.tensor(TILE_DOCS_K).cumsum(0).tolist(), dtype=torch.int32, device=on(device))
    mq, mk = max(TILE_DOCS_Q), max(TILE_DOCS_K)

    def fn(q, k, v, s):
        return ops.flash_attn_varlen(q, k, v, cu_q, cu_k, mq, mk, window=w, softcap=softcap, sinks=s,
                                     return_lse=True)

    def ref(q, k, v, s, rdtype):
        return ref_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), window=w, softcap=softcap, sinks=s, dtype=rdtype)

    _run_and_check(fn, (q, k, v), sinks, dout, ref, dtype, f"tiles d{d}")


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_separate_calls_with_sinks(device):
    """Packing never lets a document see its neighbours, nor count a sink twice."""
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    lens = [37, 64, 0, 1, 100]
    g = torch.Generator().manual_seed(3)
    q = _randn((sum(lens), 4, 64), dtype, device, g)
    k = _randn((sum(lens), 2, 64), dtype, device, g)
    v = _randn((sum(lens), 2, 64), dtype, device, g)
    sinks = torch.randn(4, generator=g).to(on(device))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=on(device))
    out, lse = ops.flash_attn_varlen(q, k, v, cu, cu, 100, 100, window=20, sinks=sinks, softcap=3.0,
                                     return_lse=True)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        if a == b:
            continue
        alone, alone_lse = ops.flash_attn(q[None, a:b], k[None, a:b], v[None, a:b], window=20, sinks=sinks,
                                          softcap=3.0, return_lse=True)
        torch.testing.assert_close(out[a:b], alone[0], rtol=0, atol=0)
        torch.testing.assert_close(lse[:, a:b], alone_lse[0], rtol=0, atol=0)


# ---- prefill_attn -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w,softcap", [(16, 5.0), (None, None), (16, None)])
def test_chunked_prefill_with_sinks_equals_whole_sequence(device, w, softcap):
    """Each chunk's rows carry the sink once: chunked prefill over the ring
    cache equals one flash_attn over the whole prompt, gradients included."""
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    b, h, hkv, d, total = 2, 6, 2, 64, 53
    c = w or total
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(b, total, h, d, generator=g) * 4).to(dtype).to(on(device))
    k = _randn((b, total, hkv, d), dtype, device, g)
    v = _randn((b, total, hkv, d), dtype, device, g)
    sinks = torch.randn(h, generator=g).to(on(device))
    k_cache = torch.full((b, c, hkv, d), float("nan"), dtype=dtype, device=on(device))
    v_cache = torch.full_like(k_cache, float("nan"))
    full, full_lse = ops.flash_attn(q, k, v, window=w, sinks=sinks, softcap=softcap, return_lse=True)
    outs, lses = [], []
    for start in range(0, total, w or 20):
        end = min(start + (w or 20), total)
        o, l = ops.prefill_attn(q[:, start:end], k[:, start:end], v[:, start:end], k_cache, v_cache, start,
                                window=w, sinks=sinks, softcap=softcap, return_lse=True)
        outs.append(o)
        lses.append(l)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), **tol)
    torch.testing.assert_close(torch.cat(lses, 2), full_lse, rtol=1e-5, atol=1e-4)

    s = sinks.clone().requires_grad_(True)
    qq = q.clone().requires_grad_(True)
    o = ops.prefill_attn(qq[:, :w or 20], k[:, :w or 20], v[:, :w or 20], k_cache.clone(), v_cache.clone(), 0,
                         window=w, sinks=s, softcap=softcap)
    o.float().square().sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert torch.isfinite(qq.grad).all()


# ---- decode_attn, decode_attn_paged -------------------------------------------------

# (B, H, Hkv, D, C, window, seqlens, softcap, sinks): ring caches shorter
# than, equal to and longer than the window; a sequence of length 0 (zeros,
# lse = sink); GQA groups 1, 3 and 8; one long sequence that takes several
# KV splits on the GPU (the combine must add each sink once).
DECODE = [
    (3, 6, 2, 64, 64, None, [1, 37, 64], 5.0, "rand"),
    (2, 8, 1, 128, 48, 48, [0, 150], None, "rand"),
    (2, 3, 1, 64, 40, 17, [203, 16], 5.0, "high"),
    (1, 8, 8, 64, 32, 33, [70], 5.0, "low"),
    (1, 8, 2, 128, 1000, None, [2500], 5.0, "rand"),
    (2, 4, 2, 256, 64, 64, [65, 9], 5.0, "rand"),
    (1, 6, 3, 96, 20, None, [20], None, "rand"),
    # The kernel's key steps (16, 32 or 64 keys a step by head dim) and its
    # 128-key splits: lengths at residues 0, 1 and step - 1 of each, split-KV
    # over a 300-slot ring, head dim 256.
    (4, 4, 2, 256, 300, None, [127, 128, 129, 257], 5.0, "rand"),
]


def _decode_id(c):
    b, h, hkv, d, cap, w, lens, sc, kind = c
    return f"B{b}-H{h}/{hkv}-D{d}-C{cap}-W{w}-L{'_'.join(map(str, lens))}-cap{sc}-sinks{kind}"


def _decode_inputs(case, dtype, device, seed=0):
    """Per row its whole K/V history, the ring cache that holds it (NaN in
    every slot never written) and the decode query."""
    b, h, hkv, d, c, w, lens, softcap, kind = case
    g = torch.Generator().manual_seed(seed)
    hist_k = [(torch.randn(n, hkv, d, generator=g)).to(dtype) for n in lens]
    hist_v = [(torch.randn(n, hkv, d, generator=g)).to(dtype) for n in lens]
    k_cache = torch.full((b, c, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for i, n in enumerate(lens):
        for p in range(max(0, n - c), n):
            k_cache[i, p % c], v_cache[i, p % c] = hist_k[i][p], hist_v[i][p]
    q = (torch.randn(b, h, d, generator=g) * (10 if softcap else 1)).to(dtype)
    sinks = _sinks(kind, h, "cpu", g)
    return q, hist_k, hist_v, k_cache, v_cache, sinks


def _decode_ref(q, hist_k, hist_v, c, w, softcap, sinks, dtype):
    outs, lses = [], []
    for i in range(q.shape[0]):
        n = hist_k[i].shape[0]
        keep = min(n, c, w or c)
        o, l = ref_attention(q[i][None, None], hist_k[i][None, n - keep:], hist_v[i][None, n - keep:],
                             softcap=softcap, sinks=sinks, dtype=dtype)
        outs.append(o[0, 0])
        lses.append(l[0, :, 0])
    return torch.stack(outs), torch.stack(lses)


def _paged(k_cache, v_cache, page_size, gen):
    """The same caches as shuffled pages and a block table."""
    b, c, hkv, d = k_cache.shape
    per_row = c // page_size
    order = torch.randperm(b * per_row, generator=gen)
    k_pages = torch.empty(b * per_row, page_size, hkv, d, dtype=k_cache.dtype)
    v_pages = torch.empty_like(k_pages)
    table = torch.empty(b, per_row, dtype=torch.int32)
    for i in range(b):
        for p in range(per_row):
            page = int(order[i * per_row + p])
            table[i, p] = page
            k_pages[page] = k_cache[i, p * page_size:(p + 1) * page_size]
            v_pages[page] = v_cache[i, p * page_size:(p + 1) * page_size]
    return k_pages, v_pages, table


@pytest.mark.parametrize("paged", [False, True], ids=["ring", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DECODE, ids=_decode_id)
def test_decode_sinks_softcap_match_reference(case, device, dtype, paged):
    b, h, hkv, d, c, w, lens, softcap, kind = case
    _skip_gpu_head_dim(device, d, decode_mod.GPU_HEAD_DIMS)
    q, hist_k, hist_v, k_cache, v_cache, sinks = _decode_inputs(case, dtype, device)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if paged:
        # Paged caches hold positions linearly: no ring, so a page table
        # as long as the longest sequence, with NaN pages past each length.
        page = 16
        longest = (max(lens) + page - 1) // page * page
        lin_k = torch.full((b, longest, hkv, d), float("nan"), dtype=dtype)
        lin_v = torch.full_like(lin_k, float("nan"))
        for i, n in enumerate(lens):
            keep = min(n, w or n)
            lin_k[i, n - keep:n], lin_v[i, n - keep:n] = hist_k[i][n - keep:], hist_v[i][n - keep:]
        k_pages, v_pages, table = _paged(lin_k, lin_v, page, torch.Generator().manual_seed(1))
        dev = [t.to(on(device)) for t in (q, k_pages, v_pages, table, seqlens, sinks)]

        def call():
            return ops.decode_attn_paged(dev[0], dev[1], dev[2], dev[3], dev[4], window=w, softcap=softcap,
                                         sinks=dev[5], return_lse=True)
        cap = longest
    else:
        dev = [t.to(on(device)) for t in (q, k_cache, v_cache, seqlens, sinks)]

        def call():
            return ops.decode_attn(dev[0], dev[1], dev[2], dev[3], window=w, softcap=softcap, sinks=dev[4],
                                   return_lse=True)
        cap = c
    _check_decode(case, call, q, hist_k, hist_v, cap, sinks, seqlens, dtype)


def _check_decode(case, call, q, hist_k, hist_v, cap, sinks, seqlens, dtype):
    b, h, hkv, d, c, w, lens, softcap, kind = case
    out, lse = call()
    ref64, lse64 = _decode_ref(q, hist_k, hist_v, cap, w, softcap, sinks.double(), torch.float64)
    lowp, _ = _decode_ref(q, hist_k, hist_v, cap, w, softcap, sinks.double(), dtype)
    assert_fa_rule(f"decode {_decode_id(case)}", out.cpu(), ref64, lowp, 2)
    _assert_lse(lse, lse64, dtype)
    empty = seqlens == 0
    if empty.any():
        assert torch.equal(out.cpu()[empty], torch.zeros_like(out.cpu()[empty]))
        assert torch.equal(lse.cpu()[empty], sinks.expand(int(empty.sum()), h))


# ---- the torch.library contract ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_sinks_and_softcap(device):
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    g = torch.Generator().manual_seed(0)
    q = _randn((2, 19, 4, 64), dtype, device, g).requires_grad_(True)
    k = _randn((2, 23, 2, 64), dtype, device, g).requires_grad_(True)
    v = _randn((2, 23, 2, 64), dtype, device, g).requires_grad_(True)
    sinks = torch.randn(4, generator=g).to(on(device)).requires_grad_(True)
    torch.library.opcheck(torch.ops.mixkit.flash_attn, (q, k, v, None, None, 19, 23, True, 9, None, False, sinks, 5.0))
    kc = _randn((2, 16, 2, 64), dtype, device, g)
    lens = torch.tensor([16, 3], dtype=torch.int32, device=on(device))
    torch.library.opcheck(torch.ops.mixkit.decode_attn, (q[:, 0].detach(), kc, kc.clone(), lens, 8, None, None,
                                                         sinks.detach(), 5.0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_with_sinks_and_softcap(device):
    torch._dynamo.reset()
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(s, dtype, device, g) for s in ((1, 40, 4, 64), (1, 40, 2, 64), (1, 40, 2, 64)))
    sinks = torch.randn(4, generator=g).to(on(device))

    def f(q, k, v, s):
        return (ops.flash_attn(q, k, v, window=16, sinks=s, softcap=5.0).float() ** 2).sum()

    eager = [t.clone().requires_grad_(True) for t in (q, k, v, sinks)]
    f(*eager).backward()
    comp = [t.clone().requires_grad_(True) for t in (q, k, v, sinks)]
    torch.compile(f, fullgraph=True)(*comp).backward()
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---- bad input ------------------------------------------------------------------------

def _qkv():
    return torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)


def _decode_args():
    kc = torch.randn(1, 8, 2, 16)
    return torch.randn(1, 4, 16), kc, kc.clone(), torch.tensor([5], dtype=torch.int32)


def _every_op(sinks=None, softcap=None):
    """Each of the five ops called with the given sinks and softcap."""
    q, k, v = _qkv()
    cu = torch.tensor([0, 8], dtype=torch.int32)
    cache = torch.zeros(1, 8, 2, 16)
    dq, kc, vc, lens = _decode_args()
    table = torch.tensor([[0]], dtype=torch.int32)
    return {
        "flash_attn": lambda: ops.flash_attn(q, k, v, sinks=sinks, softcap=softcap),
        "flash_attn_varlen": lambda: ops.flash_attn_varlen(q[0], k[0], v[0], cu, cu, 8, 8, sinks=sinks,
                                                           softcap=softcap),
        "prefill_attn": lambda: ops.prefill_attn(q, k, v, cache, cache.clone(), 0, sinks=sinks, softcap=softcap),
        "decode_attn": lambda: ops.decode_attn(dq, kc, vc, lens, sinks=sinks, softcap=softcap),
        "decode_attn_paged": lambda: ops.decode_attn_paged(dq, kc, vc, table, lens, sinks=sinks, softcap=softcap),
    }


@pytest.mark.parametrize("op", list(_every_op()))
@pytest.mark.parametrize("sinks,softcap,err,match", [
    (torch.zeros(3), None, ValueError, r"sinks must have shape \(heads,\) = \(4,\)"),
    (torch.zeros(1, 4), None, ValueError, "sinks must have shape"),
    (torch.zeros(4, dtype=torch.bfloat16), None, TypeError, "sinks must be float32"),
    (torch.zeros(4, dtype=torch.float64), None, TypeError, "sinks must be float32"),
    (torch.zeros(4, device="meta"), None, ValueError, "sinks is on meta"),
    (torch.zeros(8)[::2], None, ValueError, "sinks must be contiguous"),
    ([0.0] * 4, None, TypeError, "sinks must be a torch.Tensor"),
    (None, 0.0, ValueError, "softcap must be a finite number > 0"),
    (None, -5.0, ValueError, "softcap must be a finite number > 0"),
    (None, float("nan"), ValueError, "softcap must be a finite number > 0"),
    (None, float("inf"), ValueError, "softcap must be a finite number > 0"),
    (None, "5", TypeError, "softcap must be a float"),
    (None, True, TypeError, "softcap must be a float"),
])
def test_bad_sinks_and_softcap_raise_naming_the_op(op, sinks, softcap, err, match):
    with pytest.raises(err, match=f"{op}: {match}"):
        _every_op(sinks, softcap)[op]()


def test_bad_softcap_reaches_no_kernel_from_core():
    """_core re-checks what the kernels rely on: a negative or NaN softcap
    passed past Python raises, never reaches a kernel."""
    from mixkit import _core
    for cap in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            _core.flash_attn_fwd(0, 0, 0, 0, 8, 8, 8, 8, 8, 0, 0, 1, 1, 1, 16, 1, 1, 1, 1, (16, 16, 16),
                                 (16, 16, 16), (16, 16, 16), (16, 16, 16), (1, 1), True, 0, 0.25, cap, 0)
        with pytest.raises(ValueError, match="softcap"):
            _core.decode_attn(0, 0, 0, 0, 8, 8, 8, 8, 0, 8, 8, 1, 4, 2, 64, 16, 0, 1.0, cap, 0, (0, 0), (0, 0, 0),
                              (0, 0, 0), 1, 0, 0, 0, 0, 0, 0)


# ---- the GPU paths: split-KV, planted errors, head dims, CUDA graphs ------------------

@pytest.mark.emu
@pytest.mark.skipif(not EMULATED, reason="needs an emulated build of _core")
def test_a_sink_dropped_in_the_split_kv_combine_fails_the_decode_test():
    """The long decode case runs split-KV, whose combine adds each sink once;
    with that term planted away (emulator mutation 30, csrc/cuda/decode.cu)
    the reference comparison must fail."""
    case = (1, 8, 2, 128, 1000, None, [2500], None, "rand")
    dtype = torch.bfloat16
    q, hist_k, hist_v, k_cache, v_cache, sinks = _decode_inputs(case, dtype, "emu")
    sinks = sinks + 8.0  # about log(2500 keys): the sink takes half of each row's mass
    seqlens = torch.tensor(case[6], dtype=torch.int32)

    def call():
        return ops.decode_attn(q, k_cache, v_cache, seqlens, sinks=sinks, return_lse=True)

    emu_configure()
    with emulate():
        assert decode_mod._splits(3, 0, 2, 1, 8, 2, 128, 1000, 0) > 1, "the case must take the split-KV path"
        _check_decode(case, call, q, hist_k, hist_v, 1000, sinks, seqlens, dtype)
        emu_configure(mutation=30)
        try:
            with pytest.raises(AssertionError):
                _check_decode(case, call, q, hist_k, hist_v, 1000, sinks, seqlens, dtype)
        finally:
            emu_configure()


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_gpu_paths_reject_an_unsupported_head_dim(device):
    """Head dims the GPU kernels lack (96, 192, 512) raise a ValueError that
    names the supported ones, in every op; the CPU takes any."""
    for d in (96, 192):
        q = torch.zeros(1, 4, 2, d, dtype=torch.bfloat16, device=on(device))
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported on the GPU.*64, 128, 256"):
            ops.flash_attn(q, q, q)
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported on the GPU.*64, 128, 256"):
            ops.flash_attn_varlen(q[0], q[0], q[0], *(torch.tensor([0, 4], dtype=torch.int32, device=on(device)),) * 2,
                                  4, 4)
        cache = torch.zeros(1, 8, 2, d, dtype=torch.bfloat16, device=on(device))
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported on the GPU"):
            ops.decode_attn(q[:, 0], cache, cache, torch.tensor([3], dtype=torch.int32, device=on(device)))
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported on the GPU"):
            ops.prefill_attn(q, q, q, cache, cache.clone(), 0, window=4)


@pytest.mark.gpu
def test_cuda_graph_decode_with_sinks_and_softcap():
    """A captured decode step with sinks and a softcap replays exactly like
    the eager call, at head dim 256 and on the split-KV path."""
    b, h, hkv, d, c = 2, 8, 2, 256, 2048
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(b, c, hkv, d, generator=g).bfloat16().cuda()
    v_cache = torch.randn(b, c, hkv, d, generator=g).bfloat16().cuda()
    q = torch.randn(b, h, d, generator=g).bfloat16().cuda()
    sinks = torch.randn(h, generator=g).cuda()
    seqlens = torch.tensor([7, 2000], dtype=torch.int32, device="cuda")

    def step():
        return ops.decode_attn(q, k_cache, v_cache, seqlens, window=1024, sinks=sinks, softcap=30.0, return_lse=True)

    graph, (out, lse) = capture_cuda_graph(step)
    for t in range(3):
        q.copy_(torch.randn(b, h, d, generator=g))
        sinks.copy_(torch.randn(h, generator=g))
        seqlens.copy_(torch.tensor([8 + t, 1990 + t]))
        graph.replay()
        want, want_lse = step()
        torch.cuda.synchronize()
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
