"""flash_attn and flash_attn_varlen against a plain-PyTorch reference that
materialises the masked score matrix from absolute positions.

Acceptance is the FlashAttention rule (CONVENTIONS.md): with ref64 the exact
reference and ref_lowp the same reference computed in the input precision,
require max|ours - ref64| <= 2 * max|ref_lowp - ref64| + slack for outputs and
3x for gradients. slack = 1e-5 times the largest reference value covers the
float32 case, where ref_lowp is itself nearly exact and only summation order
separates the kernels from the reference.
"""
import functools
import math

import pytest
import torch

import mixkit.ops as ops
from mixkit import _core
from mixkit.bench.harness import capture_cuda_graph
from conftest import DEVICES, on, gpu, EMULATED
import tiles

NEG_INF = float("-inf")


# ---- reference -------------------------------------------------------------------

def attention_ref(q, k, v, causal=True, window=None, scale=None, dtype=torch.float64):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (out (B, Sq, H, D), lse (B, H, Sq)),
    every step in `dtype`. Query i is the absolute position i + Sk - Sq."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    kf = kf.repeat_interleave(h // hkv, dim=2)
    vf = vf.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= j > i - window
    # A query that sees no key gets p = 0 and lse = -inf; its scores are set
    # to 0 first, so that no NaN from an all -inf softmax reaches a gradient.
    seen = visible.any(-1, keepdim=True)
    s = s.masked_fill(~visible, NEG_INF).masked_fill(~seen, 0.0)
    sm = s.float() if dtype != torch.float64 else s  # softmax in at least float32, as any real kernel does
    lse = torch.logsumexp(sm, dim=-1).masked_fill(~seen[:, 0], NEG_INF)
    p = (torch.softmax(sm, dim=-1) * seen).to(dtype)
    out = torch.einsum("bhij,bjhd->bihd", p, vf)
    return out, lse


def varlen_ref(q, k, v, cu_q, cu_k, **kw):
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, l = attention_ref(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fa_rule(name, ours, ref64, ref_lowp, factor):
    slack = 1e-5 * max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    bound = factor * _err(ref_lowp, ref64) + slack
    err = _err(ours, ref64)
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x reference error {_err(ref_lowp, ref64):.3g} + {slack:.1g}"


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen).to(dtype).to(on(device))


DTYPES = {"cpu": [torch.float32, torch.float16, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16],
          "emu": [torch.float16, torch.bfloat16]}
# The emulated GPU at warp 64 runs the AMD (MFMA) kernels: no sm_80 to force.
_FORCE_SM80 = {"cpu": False, "cuda": True, "emu": EMULATED and _core.build_info()["warp_size"] == 32}


def _dev_dtypes():
    """(device, dtype, kernel): on the GPU each case runs with the default
    forward kernel (wgmma on H100 when built) and with the sm_80 one forced."""
    for device in DEVICES:
        dev = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        for dtype in DTYPES[dev]:
            for kernel in ("default", "sm80") if _FORCE_SM80[dev] else ("default",):
                yield pytest.param(dev, dtype, kernel, marks=marks,
                                   id=f"{dev}-{str(dtype).replace('torch.', '')}-{kernel}")


@pytest.fixture
def select_kernel(monkeypatch):
    def select(device, kernel):
        if kernel == "sm80":
            monkeypatch.setenv("MIXKIT_FORCE_SM80", "1")
            assert ops.flash_attn_fwd_arch(torch.device(on(device))) == 80
    return select


# (B, Sq, Sk, H, Hkv, D, causal, window). GQA groups 1-8 (3, 5, 6 included) and
# MQA; odd lengths; windows smaller than, equal to and larger than the
# sequence, W + 1 and multiples of W; Sq < Sk and Sq > Sk (bottom-right
# alignment); causal=False; D = 40 and 80 run on the CPU only.
CASES = [
    (2, 113, 113, 4, 4, 64, True, None),
    (1, 203, 203, 6, 2, 128, True, 64),
    (2, 65, 65, 5, 1, 64, True, 64),        # S = W + 1
    (1, 192, 192, 8, 1, 64, True, 48),      # S = 4W
    (1, 130, 130, 7, 7, 128, True, 130),    # W = S
    (1, 77, 77, 3, 1, 64, True, 500),       # W > S
    (2, 50, 170, 6, 3, 64, True, 37),       # Sq < Sk: chunked prefill
    (1, 90, 40, 4, 2, 64, True, None),      # Sq > Sk: the first 50 queries see nothing
    (2, 70, 95, 8, 2, 128, False, None),
    (1, 1, 1, 2, 1, 64, True, None),
    (1, 1, 300, 8, 8, 64, True, 100),       # one query against a long cache
    (1, 100, 100, 6, 1, 40, True, 31),
    (1, 33, 61, 4, 4, 80, False, None),
]


def _case_id(c):
    b, sq, sk, h, hkv, d, causal, w = c
    return f"b{b}-q{sq}-k{sk}-h{h}/{hkv}-d{d}-{'causal' if causal else 'full'}-w{w}"


def _inputs(case, dtype, device, seed=0):
    b, sq, sk, h, hkv, d, causal, w = case
    g = torch.Generator().manual_seed(seed)
    q = _randn((b, sq, h, d), dtype, device, g)
    k = _randn((b, sk, hkv, d), dtype, device, g)
    v = _randn((b, sk, hkv, d), dtype, device, g)
    return q, k, v


def _skip_gpu_head_dim(device, d):
    if gpu(device) and d not in (64, 128):
        pytest.skip("the GPU kernels take head_dim 64 and 128 (other sizes raise; tested below)")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device,dtype,kernel", list(_dev_dtypes()))
def test_forward_and_backward_match_reference(case, device, dtype, kernel, select_kernel):
    b, sq, sk, h, hkv, d, causal, w = case
    _skip_gpu_head_dim(device, d)
    select_kernel(device, kernel)
    q, k, v = _inputs(case, dtype, device)
    g = torch.Generator().manual_seed(1)
    dout = _randn((b, sq, h, d), dtype, device, g)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = ops.flash_attn(*leaves, causal=causal, window=w, return_lse=True)
    out.backward(dout)

    ref = {}
    for name, rdtype in (("64", torch.float64), ("lowp", dtype)):
        rl = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        o, l = attention_ref(*rl, causal=causal, window=w, dtype=rdtype)
        o.backward(dout.to(rdtype))
        ref[name] = (o, l, *(t.grad for t in rl))

    assert out.shape == q.shape and out.dtype == dtype
    assert_fa_rule("out", out, ref["64"][0], ref["lowp"][0], 2)
    finite = torch.isfinite(ref["64"][1])
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly for queries that see no key"
    torch.testing.assert_close(lse[finite].double(), ref["64"][1][finite], rtol=0, atol=2e-3 if dtype != torch.float32 else 1e-5)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert leaves[i].grad.dtype == dtype
        assert_fa_rule(name, leaves[i].grad, ref["64"][2 + i], ref["lowp"][2 + i], 3)


def test_window_convention_pins_exact_keys():
    """Query i sees exactly keys i-W+1..i: with q = 0 every visible key gets
    the same weight, and v = one-hot of the key position spells out the set."""
    s, w, d = 24, 5, 32
    q = torch.zeros(1, s, 1, d)
    k = torch.randn(1, s, 1, d)
    v = torch.eye(s, d)[None, :, None, :]
    out = ops.flash_attn(q, k, v, causal=True, window=w)[0, :, 0]
    for i in range(s):
        seen = set(torch.nonzero(out[i]).flatten().tolist())
        assert seen == set(range(max(0, i - w + 1), i + 1)), f"query {i} sees keys {sorted(seen)}"
        torch.testing.assert_close(out[i].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_window_convention_on_device(device):
    s, w, d = 64, 7, 64
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    q = torch.zeros(1, s, 2, d, dtype=dtype, device=on(device))
    k = torch.randn(1, s, 1, d, dtype=dtype, device=on(device))
    v = torch.eye(s, d, dtype=dtype, device=on(device))[None, :, None, :]
    out = ops.flash_attn(q, k, v, causal=True, window=w)[0].float().cpu()
    for i in range(s):
        for head in range(2):
            seen = set(torch.nonzero(out[i, head]).flatten().tolist())
            assert seen == set(range(max(0, i - w + 1), i + 1)), f"query {i} sees keys {sorted(seen)}"


# Varlen: documents of lengths that straddle the 64-row blocks, an empty one,
# one token; Sq == Sk (packed training) and Sq < Sk (chunked prefill).
VARLEN = [
    ([63, 1, 0, 130, 65, 7], None, True, None),
    ([100, 64, 129], None, True, 50),
    ([5, 90, 33], [40, 90, 100], True, 32),
    ([20, 70], [20, 75], False, None),
]


@pytest.mark.parametrize("lens_q,lens_k,causal,w", VARLEN)
@pytest.mark.parametrize("device,dtype,kernel", list(_dev_dtypes()))
def test_varlen_matches_per_sequence_reference(lens_q, lens_k, causal, w, device, dtype, kernel, select_kernel):
    select_kernel(device, kernel)
    lens_k = lens_k or lens_q
    h, hkv, d = 6, 2, 64
    g = torch.Generator().manual_seed(0)
    q = _randn((sum(lens_q), h, d), dtype, device, g)
    k = _randn((sum(lens_k), hkv, d), dtype, device, g)
    v = _randn((sum(lens_k), hkv, d), dtype, device, g)
    dout = _randn(q.shape, dtype, device, g)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=on(device))
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=on(device))

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = ops.flash_attn_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window=w,
                                     return_lse=True)
    out.backward(dout)
    assert lse.shape == (h, sum(lens_q))
    ref = {}
    for name, rdtype in (("64", torch.float64), ("lowp", dtype)):
        rl = [t.detach().cpu().clone().requires_grad_(True) for t in (q, k, v)]
        o, l = varlen_ref(*rl, cu_q.cpu(), cu_k.cpu(), causal=causal, window=w, dtype=rdtype)
        o.backward(dout.cpu().to(rdtype))
        ref[name] = (o, l, *(t.grad for t in rl))
    assert_fa_rule("out", out.cpu(), ref["64"][0], ref["lowp"][0], 2)
    finite = torch.isfinite(ref["64"][1])
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_fa_rule(name, leaves[i].grad.cpu(), ref["64"][2 + i], ref["lowp"][2 + i], 3)


# ---- tile boundaries ----------------------------------------------------------------
# tiles.attention_design reads every attention kernel's tiles (sm_80, sm_90a,
# MFMA; forward and backward) from its source and picks varlen calls whose
# sequences hit the boundary residues of Sq, Sk, Sk - Sq, the window and its
# edge for each tile and warp split, plus empty, key-only, query-only and
# one-token sequences in every call. bfloat16 only: the dtype moves no index.
# The two backward kernels (atomic and deterministic dQ) take turns with the
# two forward kernels where the GPU has both (warp 32), so each forward and
# each backward sees every shape.

def _tile_variants():
    for device in DEVICES:
        dev = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        if dev == "cpu":
            runs = [("default", False)]
        elif _FORCE_SM80[dev]:
            runs = [("default", False), ("sm80", True)]
        else:
            runs = [("default", False), ("default", True)]
        for kernel, det in runs:
            yield pytest.param(dev, kernel, det, marks=marks, id=f"{dev}-{kernel}-{'det' if det else 'atomic'}")


def _tile_calls():
    for d in tiles.GPU_HEAD_DIMS:
        for causal, w, h, hkv, seqs in tiles.attention_design(d):
            yield pytest.param(d, causal, w, h, hkv, seqs, id=f"d{d}-{'causal' if causal else 'full'}-w{w}-h{h}/{hkv}")


@functools.lru_cache(maxsize=4)
def _tile_call(d, causal, w, h, hkv, seqs, dtype):
    """Inputs and per-sequence references of one design call (CPU tensors),
    kept for the next kernel variant of the same call."""
    lens_q, lens_k = [s[0] for s in seqs], [s[1] for s in seqs]
    g = torch.Generator().manual_seed(len(seqs) + d)
    q = _randn((sum(lens_q), h, d), dtype, "cpu", g)
    k = _randn((sum(lens_k), hkv, d), dtype, "cpu", g)
    v = _randn((sum(lens_k), hkv, d), dtype, "cpu", g)
    dout = _randn(q.shape, dtype, "cpu", g)
    cu_q = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(lens_k).cumsum(0).tolist()
    refs = []
    for i in range(len(seqs)):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        ref = {}
        for name, rdtype in (("64", torch.float64), ("lowp", dtype)):
            rl = [t[None, s].clone().requires_grad_(True) for t, s in ((q, rows), (k, keys), (v, keys))]
            o, l = attention_ref(*rl, causal=causal, window=w, dtype=rdtype)
            o.backward(dout[None, rows].to(rdtype))
            ref[name] = (o[0].detach(), l[0].detach(), *(t.grad[0] for t in rl))
        refs.append((rows, keys, ref))
    return (q, k, v, dout, cu_q, cu_k), refs


@pytest.mark.parametrize("device,kernel,deterministic", list(_tile_variants()))  # fastest: a call's references are reused
@pytest.mark.parametrize("d,causal,w,h,hkv,seqs", list(_tile_calls()))
def test_tile_boundaries(d, causal, w, h, hkv, seqs, device, kernel, deterministic, select_kernel):
    select_kernel(device, kernel)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    (q, k, v, dout, cu_q, cu_k), refs = _tile_call(d, causal, w, h, hkv, seqs, dtype)
    leaves = [t.clone().to(on(device)).requires_grad_(True) for t in (q, k, v)]
    lens_q, lens_k = [s[0] for s in seqs], [s[1] for s in seqs]
    out, lse = ops.flash_attn_varlen(*leaves, torch.tensor(cu_q, dtype=torch.int32, device=on(device)),
                                     torch.tensor(cu_k, dtype=torch.int32, device=on(device)), max(lens_q),
                                     max(lens_k), causal=causal, window=w, return_lse=True,
                                     deterministic=deterministic)
    out.backward(dout.to(on(device)))
    got = [out, lse, *(t.grad for t in leaves)]
    for i, ((sq, sk), (rows, keys, ref)) in enumerate(zip(seqs, refs)):
        where = f"sequence {i} (Sq={sq}, Sk={sk})"
        ours = [got[0][rows].cpu(), got[1][:, rows].cpu(), got[2][rows].cpu(), got[3][keys].cpu(), got[4][keys].cpu()]
        assert_fa_rule(f"out, {where}", ours[0], ref["64"][0], ref["lowp"][0], 2)
        assert torch.equal(torch.isfinite(ours[1]), torch.isfinite(ref["64"][1])), f"lse -inf pattern, {where}"
        for j, name in ((2, "dq"), (3, "dk"), (4, "dv")):
            assert_fa_rule(f"{name}, {where}", ours[j], ref["64"][j], ref["lowp"][j], 3)


@pytest.mark.parametrize("device,kernel,deterministic", [p for p in _tile_variants() if p.values[0] != "cpu"])
def test_max_seqlen_hints_below_the_real_lengths(device, kernel, deterministic, select_kernel):
    """Under graph capture or torch.compile the host cannot check cu_seqlens
    against the max_seqlen hints, and the GPU kernels size their grids from
    the hints: with hints of 1 every block walks all the query (key) blocks
    of its sequence with a grid stride, and the result must not change. (The
    tensors are stamped as checked, as a capture would leave them; the CPU
    backend checks the lengths on every call.)"""
    select_kernel(device, kernel)
    dtype = torch.bfloat16
    lens_q, lens_k, w = [130, 0, 200, 65], [130, 40, 250, 70], 70
    g = torch.Generator().manual_seed(11)
    q = _randn((sum(lens_q), 2, 64), dtype, device, g)
    k = _randn((sum(lens_k), 1, 64), dtype, device, g)
    v = _randn((sum(lens_k), 1, 64), dtype, device, g)
    dout = _randn(q.shape, dtype, device, g)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=on(device))
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=on(device))
    results = []
    for max_q, max_k in ((max(lens_q), max(lens_k)), (1, 1)):
        cu_q._mixkit_checked = (cu_q._version, q.shape[0], max_q)
        cu_k._mixkit_checked = (cu_k._version, k.shape[0], max_k)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = ops.flash_attn_varlen(*leaves, cu_q, cu_k, max_q, max_k, window=w, return_lse=True,
                                         deterministic=deterministic)
        out.backward(dout)
        results.append([out, lse] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        if deterministic or name in ("out", "lse", "dk", "dv"):
            assert torch.equal(a, b), f"{name} changed with the grid-stride loops"
        else:  # atomic dQ: the same sums in another order
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_fixed_length_per_document(device):
    """Packing never lets a document see its neighbours: each document's rows
    equal a separate flash_attn call on it."""
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    lens = [37, 64, 1, 100]
    g = torch.Generator().manual_seed(3)
    q = _randn((sum(lens), 4, 64), dtype, device, g)
    k = _randn((sum(lens), 2, 64), dtype, device, g)
    v = _randn((sum(lens), 2, 64), dtype, device, g)
    cu = torch.tensor([0, 37, 101, 102, 202], dtype=torch.int32, device=on(device))
    out = ops.flash_attn_varlen(q, k, v, cu, cu, 100, 100, window=20)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        alone = ops.flash_attn(q[None, a:b], k[None, a:b], v[None, a:b], window=20)[0]
        torch.testing.assert_close(out[a:b], alone, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_of_a_fused_qkv(device):
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    b, s, h, hkv, d = 2, 70, 4, 2, 64
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, dtype=dtype, device=on(device))
    q = qkv[..., : h * d].view(b, s, h, d)
    k = qkv[..., h * d: (h + hkv) * d].view(b, s, hkv, d)
    v = qkv[..., (h + hkv) * d:].view(b, s, hkv, d)
    out = ops.flash_attn(q, k, v, window=33)
    want = ops.flash_attn(q.contiguous(), k.contiguous(), v.contiguous(), window=33)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward(device):
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    q, k, v = _inputs((1, 300, 300, 8, 2, 64, True, None), dtype, device)
    dout = torch.randn_like(q)
    grads = []
    for deterministic in (True, True, False):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ops.flash_attn(*leaves, window=100, deterministic=deterministic).backward(dout)
        grads.append([t.grad for t in leaves])
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b), "two deterministic backward passes differ"
    for a, b in zip(grads[0], grads[2]):  # atomic dQ: same values up to summation order
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


# On the emulated GPU (about 100 times slower) the same test at a length
# that still spans several query and key blocks of every kernel (128 rows,
# up to 128 keys) and several windows, one not a multiple of a key block.
_LONG = {"cuda": [(32768, 4096), (8192, None)], "emu": [(700, 160), (448, None)]}


@pytest.mark.parametrize("s,w,device,kernel", [
    pytest.param(s, w, dev, kernel, marks=p.marks, id=f"{dev}-{kernel}-s{s}-w{w}")
    for p in DEVICES[1:] for dev in p.values for s, w in _LONG[dev]
    for kernel in (("default", "sm80") if _FORCE_SM80[dev] else ("default",))])
def test_long_sequences_on_gpu(s, w, device, kernel, select_kernel):
    """32k tokens with Mistral's window, checked query chunk by query chunk
    against the reference over the keys each chunk can see."""
    select_kernel(device, kernel)
    torch.manual_seed(0)
    q = torch.randn(1, s, 4, 128, dtype=torch.bfloat16).to(on(device))
    k = torch.randn(1, s, 1, 128, dtype=torch.bfloat16).to(on(device))
    v = torch.randn(1, s, 1, 128, dtype=torch.bfloat16).to(on(device))
    out = ops.flash_attn(q, k, v, window=w)
    chunk = min(1024, s // 3)
    for start in (0, s // 2 - chunk // 2 - 3, s - chunk):
        end = start + chunk
        k0 = max(0, start - w + 1) if w else 0
        want, _ = attention_ref(q[:, start:end], k[:, k0:end], v[:, k0:end], window=w, dtype=torch.float32)
        lowp, _ = attention_ref(q[:, start:end], k[:, k0:end], v[:, k0:end], window=w, dtype=torch.bfloat16)
        assert_fa_rule(f"rows {start}..{end}", out[:, start:end], want, lowp, 2)


def test_32k_tokens_with_a_window_on_cpu():
    """Long sequences on the CPU backend: 32k tokens, W = 64 (so that the
    O(S * W) cost stays small), rows checked chunk by chunk as on the GPU."""
    s, w = 32768 + 77, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, 2, 16, generator=g)
    k = torch.randn(1, s, 1, 16, generator=g)
    v = torch.randn(1, s, 1, 16, generator=g)
    out = ops.flash_attn(q, k, v, window=w)
    for start in (0, 20000, s - 300):
        end = min(start + 300, s)
        k0 = max(0, start - w + 1)
        want, _ = attention_ref(q[:, start:end], k[:, k0:end], v[:, k0:end], window=w)
        torch.testing.assert_close(out[:, start:end].double(), want, rtol=1e-5, atol=1e-5)


def test_cpu_speed_is_fit_for_ci():
    """Not a benchmark: a guard that the CPU path stays blocked and parallel
    (2k tokens must take well under a second), asserted with a 10x margin."""
    import time
    q = torch.randn(1, 2048, 8, 64)
    k = torch.randn(1, 2048, 2, 64)
    v = torch.randn(1, 2048, 2, 64)
    ops.flash_attn(q, k, v)
    t0 = time.perf_counter()
    ops.flash_attn(q, k, v)
    assert time.perf_counter() - t0 < 10.0


def _cpu_isas(monkeypatch):
    """The instruction sets the CPU backend can run here (MIXKIT_CPU_ISA)."""
    x = torch.zeros(1, 1, 1, 16)
    found = []
    for isa in ("base", "avx2", "avx512"):
        monkeypatch.setenv("MIXKIT_CPU_ISA", isa)
        try:
            ops.flash_attn(x, x, x)
            found.append(isa)
        except ValueError as exc:
            assert "cannot run it" in str(exc)
    monkeypatch.delenv("MIXKIT_CPU_ISA")
    return found


# Packed documents with GQA: few (sequence, KV head) pairs, where the backward
# gives each query head its own task and sums dK/dV partials, and many, where
# one task takes a KV head's whole group; head dims 40 (padded to 48) and 64.
ISA_CASES = [([63, 1, 130, 65], 6, 2, 40, 50), ([23, 64, 9, 40] * 5, 6, 2, 64, None), ([90] * 8, 4, 4, 16, 30)]


def test_every_cpu_instruction_set_matches_reference(monkeypatch):
    """The tile code is compiled once per instruction set (AVX-512, AVX2 +
    FMA, baseline); each one this CPU has is held to the reference, as is the
    choice of backward task layout."""
    isas = _cpu_isas(monkeypatch)
    assert isas[0] == "base"
    with pytest.raises(ValueError, match="MIXKIT_CPU_ISA must be"):
        monkeypatch.setenv("MIXKIT_CPU_ISA", "sse9")
        ops.flash_attn(*(torch.zeros(1, 1, 1, 16),) * 3)
    for lens, h, hkv, d, w in ISA_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(len(lens))
            q = _randn((sum(lens), h, d), dtype, "cpu", g)
            k = _randn((sum(lens), hkv, d), dtype, "cpu", g)
            v = _randn((sum(lens), hkv, d), dtype, "cpu", g)
            dout = _randn(q.shape, dtype, "cpu", g)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            ref = {}
            for name, rdtype in (("64", torch.float64), ("lowp", dtype)):
                rl = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
                o, _ = varlen_ref(*rl, cu, cu, window=w, dtype=rdtype)
                o.backward(dout.to(rdtype))
                ref[name] = (o, *(t.grad for t in rl))
            for isa in isas:
                monkeypatch.setenv("MIXKIT_CPU_ISA", isa)
                leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
                out = ops.flash_attn_varlen(*leaves, cu, cu, max(lens), max(lens), window=w)
                out.backward(dout)
                where = f"{isa} {dtype} lens={lens[:4]} h={h}/{hkv} d={d}"
                assert_fa_rule(f"out {where}", out, ref["64"][0], ref["lowp"][0], 2)
                for i, name in enumerate(("dq", "dk", "dv")):
                    assert_fa_rule(f"{name} {where}", leaves[i].grad, ref["64"][1 + i], ref["lowp"][1 + i], 3)


_THREADS_SCRIPT = """
import hashlib, torch, mixkit.ops as ops
g = torch.Generator().manual_seed(0)
digest = hashlib.sha256()
for lens, h, hkv, d, w in {cases}:
    q = torch.randn(sum(lens), h, d, generator=g, requires_grad=True)
    k = torch.randn(sum(lens), hkv, d, generator=g, requires_grad=True)
    v = torch.randn(sum(lens), hkv, d, generator=g, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out = ops.flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens), window=w)
    out.backward(torch.randn(out.shape, generator=g))
    for t in (out, q.grad, k.grad, v.grad):
        digest.update(t.detach().numpy().tobytes())
print(digest.hexdigest())
"""


def test_cpu_backward_is_bitwise_the_same_for_any_thread_count():
    """The CPU backward owns every output row in one task (no atomics, no
    thread-dependent split), so OpenMP's thread count cannot change a bit."""
    import os
    import subprocess
    import sys
    script = _THREADS_SCRIPT.format(cases=ISA_CASES)
    digests = set()
    for threads in (1, 3):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1


# ---- torch.library, torch.compile, CUDA graphs ------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    q, k, v = _inputs((2, 19, 23, 4, 2, 64, True, 9), dtype, device)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.mixkit.flash_attn, (q, k, v, None, None, 19, 23, True, 9, None, False))
    cu = torch.tensor([0, 10, 38], dtype=torch.int32, device=on(device))
    qv, kv, vv = (t.detach()[0].repeat(2, 1, 1)[:38].clone().requires_grad_(True) for t in (q, k, k))
    torch.library.opcheck(torch.ops.mixkit.flash_attn, (qv, kv, vv, cu, cu, 28, 28, True, None, 0.3, False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    q, k, v = _inputs((1, 40, 40, 4, 2, 64, True, 16), dtype, device)

    def f(q, k, v):
        return (ops.flash_attn(q, k, v, window=16) ** 2).sum()

    eager = [t.clone().requires_grad_(True) for t in (q, k, v)]
    f(*eager).backward()
    comp = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.compile(f, fullgraph=True)(*comp).backward()
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    q, k, v = _inputs((2, 100, 100, 8, 2, 128, True, 40), torch.bfloat16, "cuda")
    cu = torch.tensor([0, 30, 200], dtype=torch.int32, device="cuda")
    ops.flash_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 170, 170)  # checks cu once

    def step():
        return (ops.flash_attn(q, k, v, window=40),
                ops.flash_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 170, 170))

    graph, outs = capture_cuda_graph(step)
    for seed in range(2):
        torch.manual_seed(seed)
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            assert torch.equal(got, want)


# ---- bad input ---------------------------------------------------------------------

def _bad(device="cpu"):
    q = torch.randn(2, 8, 4, 64, device=on(device))
    k = torch.randn(2, 8, 2, 64, device=on(device))
    return q, k, k.clone()


@pytest.mark.parametrize("fn,err,match", [
    (lambda q, k, v: ops.flash_attn(q, k[:, :, :1].expand(2, 8, 3, 64), v[:, :, :1].expand(2, 8, 3, 64)),
     ValueError, "multiple"),
    (lambda q, k, v: ops.flash_attn(q, k[..., :32], v[..., :32]), ValueError, "head_dim"),
    (lambda q, k, v: ops.flash_attn(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), ValueError,
     "last dimension"),
    (lambda q, k, v: ops.flash_attn(q, k, v, window=0), ValueError, "window"),
    (lambda q, k, v: ops.flash_attn(q, k, v, window=-3), ValueError, "window"),
    (lambda q, k, v: ops.flash_attn(q, k, v, causal=False, window=4), ValueError, "causal"),
    (lambda q, k, v: ops.flash_attn(q[:0], k[:0], v[:0]), ValueError, "empty batch"),
    (lambda q, k, v: ops.flash_attn(q, k.half(), v.half()), TypeError, "dtype"),
    (lambda q, k, v: ops.flash_attn(q, k, v[:, :7]), ValueError, "same shape"),
    (lambda q, k, v: ops.flash_attn(q, k[:1], v[:1]), ValueError, "batch"),
    (lambda q, k, v: ops.flash_attn(q[0], k[0], v[0]), ValueError, "4 dimension"),
    (lambda q, k, v: ops.flash_attn(q, k, v, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda q, k, v: ops.flash_attn(q.int(), k, v), TypeError, "dtype"),
])
def test_bad_input_raises(fn, err, match):
    with pytest.raises(err, match=match):
        fn(*_bad())


@pytest.mark.parametrize("cu,max_len,match", [
    ([0, 9, 5, 16], 9, "non-decreasing"),
    ([0, 5, 9, 15], 9, "must equal|must end|last"),
    ([0, 5, 9, 17], 9, "must equal|must end|last"),
    ([1, 5, 9, 16], 9, r"\[0\]|must start|first"),
    ([0, 2, 12, 16], 5, "max_seqlen_q.*smaller"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_cu_seqlens_raise(cu, max_len, match, device):
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    q = torch.randn(16, 4, 64, dtype=dtype, device=on(device))
    k = torch.randn(16, 2, 64, dtype=dtype, device=on(device))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=on(device))
    good = torch.tensor([0, 5, 9, 16], dtype=torch.int32, device=on(device))
    with pytest.raises(ValueError, match=match):
        ops.flash_attn_varlen(q, k, k, cu_t, good, max_len, 9)


def test_bad_varlen_arguments():
    q = torch.randn(16, 4, 64)
    k = torch.randn(16, 2, 64)
    cu = torch.tensor([0, 5, 9, 16], dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        ops.flash_attn_varlen(q, k, k, cu.long(), cu, 9, 9)
    with pytest.raises(ValueError, match="same shape"):
        ops.flash_attn_varlen(q, k, k, cu, cu[:3], 9, 9)
    with pytest.raises(ValueError, match="empty batch"):
        ops.flash_attn_varlen(q[:0], k[:0], k[:0], cu[:1], cu[:1], 0, 0)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        ops.flash_attn_varlen(q, k, k, cu, cu, 9, -1)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_gpu_rejects_unsupported_head_dim_and_float32(device):
    q = torch.randn(1, 8, 2, 96, dtype=torch.bfloat16).to(on(device))
    with pytest.raises(ValueError, match="head_dim 96"):
        ops.flash_attn(q, q, q)
    q = torch.randn(1, 8, 2, 64).to(on(device))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        ops.flash_attn(q, q, q)


def test_kernel_choice_on_cpu_is_none():
    assert ops.flash_attn_fwd_arch(torch.device("cpu")) == 0


def test_non_tensor_arguments_raise_type_error_naming_them():
    q = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="flash_attn: q must be a torch.Tensor, got list"):
        ops.flash_attn([[1.0]], q, q)
    with pytest.raises(TypeError, match="flash_attn: v must be a torch.Tensor, got NoneType"):
        ops.flash_attn(q, q, None)
    with pytest.raises(TypeError, match="flash_attn_varlen: cu_seqlens_k must be a torch.Tensor, got list"):
        ops.flash_attn_varlen(q[0], q[0], q[0], cu, [0, 4], 4, 4)
