"""The MoE variants of the newer families against float32 references, on
every backend: per-expert biases in grouped_gemm and its bias gradient
(grouped_bias_grad), the fused grouped_swiglu with gpt-oss's layouts
((E, H, 2F) weights, interleaved gate/up columns, biases) and its clamped
SwiGLU, and moe_experts serving those layouts.

The clamped SwiGLU reference is transformers' GptOssExperts._apply_gate,
written out here (torch.clamp, sigmoid, (up + 1) * glu) and differentiated
by autograd, so its gradient semantics (zero outside the clamp range, the
ends included, NaN kept) are torch's, not mixkit's.

Tolerances are test_moe_mlp.py's: the GEMMs are float32 sums rounded once
(reference.tolerance); the activation of a rounded-once output is held to
the scale (max|h| + 1)^2, the size of the terms of its error; gradients,
which sum over an expert's rows, to 4x the largest reference term.
"""
import importlib

import pytest
import torch

import reference as ref
from conftest import DEVICES, on, gpu

mm = importlib.import_module("mixkit.ops.moe_mlp")


def _dtypes(device):
    return [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


def _randn(shape, g, dtype, device, scale=1.0):
    """N(0, scale^2) with no float16 subnormals: MI200's MFMA flushes
    subnormal 16-bit inputs to zero (modelled by the emulated GPU at warp
    64, csrc/cuda/emu_mfma.cuh), which the float32 reference would not."""
    x = torch.randn(shape, generator=g) * scale
    x = torch.where(x.abs() < 2 ** -13, torch.full_like(x, 2 ** -13), x)
    return x.to(dtype).to(on(device))


def _offsets(counts, device):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int64, device=on(device))


def _rows_of(offsets, e):
    o = offsets.tolist()
    return slice(o[e], o[e + 1])


def hf_apply_gate(gate, up, alpha=1.702, limit=7.0):
    """transformers' GptOssExperts._apply_gate on already split columns."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def gemm_bias_ref(a, b, bias, offsets, trans_b):
    out = torch.zeros(a.shape[0], b.shape[1] if trans_b else b.shape[2])
    for e in range(b.shape[0]):
        w = b[e].float().cpu()
        rows = _rows_of(offsets, e)
        out[rows] = a[rows].float().cpu() @ (w.t() if trans_b else w)
        if bias is not None:
            out[rows] += bias[e].float().cpu()
    return out


# (K, N_out, counts, rows): tile residues 0, 1 and tile - 1 of the 128-row
# tile, an empty expert, bad-id rows after offsets[E], N over a 128-column
# tile with a tail.
CASES = [(64, 144, [0, 1, 127, 128, 3], 262), (32, 16, [5, 0], 7), (24, 136, [129, 0, 2], 131)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_bias_forward_and_gradients(device, trans_b):
    for dtype in _dtypes(device):
        for i, (k, n, counts, rows) in enumerate(CASES):
            g = torch.Generator().manual_seed(i)
            e = len(counts)
            a = _randn((rows, k), g, dtype, device).requires_grad_(True)
            b = _randn((e, n, k) if trans_b else (e, k, n), g, dtype, device, k ** -0.5).requires_grad_(True)
            bias = _randn((e, n), g, dtype, device).requires_grad_(True)
            off = _offsets(counts, device)
            c = mm.grouped_gemm(a, b, off, trans_b=trans_b, bias=bias)
            expected = gemm_bias_ref(a.detach(), b.detach(), bias.detach(), off, trans_b)
            ref.assert_close(c.detach().cpu(), expected, dtype, f"{dtype} case {i}")
            assert not c[off[-1]:].any(), "rows after offsets[E] must be zero"
            grad = _randn((rows, n), g, dtype, device)
            c.backward(grad)
            a32, b32, bias32 = (t.detach().float().cpu().requires_grad_(True) for t in (a, b, bias))
            out = torch.zeros(rows, n)
            for j in range(e):
                r = _rows_of(off, j)
                w = b32[j].t() if trans_b else b32[j]
                out = out.index_put((torch.arange(rows)[r],), a32[r] @ w + bias32[j])
            out.backward(grad.float().cpu())
            for name, got, want in (("a", a.grad, a32.grad), ("b", b.grad, b32.grad), ("bias", bias.grad, bias32.grad)):
                ref.assert_close(got.cpu(), want, dtype, f"grad_{name} {dtype} case {i}",
                                 scale=want.abs().max().item() * 4 + 1e-6)
            assert not bias.grad[1 if counts[1] == 0 else 0].any() or counts[1] != 0


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_bias_grad_sums_each_experts_rows(device):
    """Empty experts get zeros; rows after offsets[E] (the bad-id bucket) are
    not summed; 300 columns: more than one 256-column block, with a tail."""
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(1)
        dy = _randn((40, 300), g, dtype, device)
        off = _offsets([7, 0, 30], device)  # rows 37..39 are past offsets[E]
        db = torch.ops.mixkit.grouped_bias_grad(dy, off, 3)
        want = torch.stack([dy[_rows_of(off, e)].float().cpu().sum(0) for e in range(3)])
        ref.assert_close(db.cpu(), want, dtype, f"{dtype}", scale=dy.abs().max().item() * 30)
        assert not db[1].any()


# ---- grouped_swiglu: layouts, bias, the clamped SwiGLU ----------------------------

def swiglu_ref(x, w13, bias, offsets, trans_b, interleaved, activation):
    """float32 h (w13's column order, bias included) and act from it."""
    h = gemm_bias_ref(x, w13, bias, offsets, trans_b)
    ffn = h.shape[1] // 2
    gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :ffn], h[:, ffn:])
    act = hf_apply_gate(gate, up) if activation == "swiglu_oss" else torch.nn.functional.silu(gate) * up
    return h, act


LAYOUTS = [(True, False), (True, True), (False, True)]  # (trans_b, interleaved); (E, H, 2F) is gpt-oss's own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_b,interleaved", LAYOUTS)
@pytest.mark.parametrize("activation", ["silu", "swiglu_oss"])
def test_grouped_swiglu_layouts_forward_and_gradients(device, trans_b, interleaved, activation):
    """F = 72: h's 144 columns cross a 128-column tile and the 64-column
    SwiGLU tile; weights scaled so that many gate and up values lie past the
    clamp at +-7."""
    k, ffn, counts, rows = 64, 72, [0, 1, 127, 129], 262
    e = len(counts)
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(7)
        x = _randn((rows, k), g, dtype, device).requires_grad_(True)
        shape = (e, 2 * ffn, k) if trans_b else (e, k, 2 * ffn)
        w13 = _randn(shape, g, dtype, device, 5.0 / k ** 0.5).requires_grad_(True)
        bias = _randn((e, 2 * ffn), g, dtype, device).requires_grad_(True)
        off = _offsets(counts, device)
        act, h = mm.grouped_swiglu(x, w13, off, store_h=True, trans_b=trans_b, interleaved=interleaved,
                                   activation=activation, bias=bias)
        h_ref, act_ref = swiglu_ref(x.detach(), w13.detach(), bias.detach(), off, trans_b, interleaved, activation)
        if activation == "swiglu_oss":
            assert (h_ref.abs() > 7).float().mean() > 0.05, "the clamp must bite"
        name = f"{dtype} {activation} trans_b={trans_b} interleaved={interleaved}"
        ref.assert_close(h.detach().cpu(), h_ref, dtype, "h " + name)
        ref.assert_close(act.detach().cpu(), act_ref, dtype, "act " + name,
                         scale=(h_ref.abs().max().item() + 1) ** 2)
        assert not act[off[-1]:].any() and not h[off[-1]:].any(), "rows after offsets[E] must be zero"

        grad = _randn((rows, ffn), g, dtype, device)
        act.backward(grad)
        # Reference gradient: autograd through the rounded h (what the op
        # stores and differentiates from), transformers' gate in float32.
        h32 = h.detach().float().cpu().requires_grad_(True)
        gate, up = (h32[:, 0::2], h32[:, 1::2]) if interleaved else h32.split(ffn, 1)
        out = hf_apply_gate(gate, up) if activation == "swiglu_oss" else torch.nn.functional.silu(gate) * up
        (dh,) = torch.autograd.grad(out, h32, grad.float().cpu())
        dh = dh.to(dtype).float()  # the op rounds dh once before its GEMMs
        x32, w32 = x.detach().float().cpu(), w13.detach().float().cpu()
        dx, dw, db = torch.zeros_like(x32), torch.zeros_like(w32), torch.zeros(e, 2 * ffn)
        for j in range(e):
            r = _rows_of(off, j)
            dx[r] = dh[r] @ (w32[j] if trans_b else w32[j].t())
            dw[j] = dh[r].t() @ x32[r] if trans_b else x32[r].t() @ dh[r]
            db[j] = dh[r].sum(0)
        for gname, got, want in (("x", x.grad, dx), ("w13", w13.grad, dw), ("bias", bias.grad, db)):
            ref.assert_close(got.cpu(), want, dtype, f"grad_{gname} {name}", scale=want.abs().max().item() * 4 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_clamped_swiglu_exact_semantics(device):
    """Values at and beyond the clamp bounds, and NaN, through the fused
    epilogue: h is made exact (one-hot rows of x select rows of w13), so the
    activation and the gradient are compared with transformers' formula on
    the very same numbers. At gate = 7 and up = +-7 the gradient still
    passes (torch.clamp keeps the ends); past them it is exactly 0; a NaN
    gate gives a NaN output and no gradient to the up value beyond the clamp."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gates = torch.tensor([7.0, 7.5, -20.0, 0.5, 6.0, float("nan"), 2.0, -3.0])
    ups = torch.tensor([7.0, -7.0, 8.0, -9.0, 0.25, 1.0, float("nan"), 7.0])
    ffn, k = 8, 8
    w13 = torch.zeros(1, k, 2 * ffn)
    w13[0, 0, 0::2], w13[0, 0, 1::2] = gates, ups  # interleaved, (E, H, 2F)
    x = torch.zeros(3, k)
    x[:, 0] = 1.0
    x = x.to(dtype).to(on(device)).requires_grad_(True)
    w = w13.to(dtype).to(on(device))
    off = _offsets([3], device)
    # A zero bias: its gradient is the sum of dh over the 3 rows, 3 dh.
    bias = torch.zeros(1, 2 * ffn, dtype=dtype, device=on(device), requires_grad=True)
    act, h = mm.grouped_swiglu(x, w, off, trans_b=False, interleaved=True, activation="swiglu_oss", bias=bias)
    g32, u32 = gates.clone().requires_grad_(True), ups.clone().requires_grad_(True)
    want = hf_apply_gate(g32, u32)
    torch.testing.assert_close(act[0].float().cpu(), want.detach().to(dtype).float(), equal_nan=True, rtol=1e-6,
                               atol=0)
    want.backward(torch.ones_like(want))
    act.backward(torch.ones_like(act))
    dh_want = torch.stack([g32.grad, u32.grad], -1).flatten()
    got = (bias.grad.float().cpu() / 3).view(1, -1)
    torch.testing.assert_close(got[0], dh_want.to(dtype).float(), equal_nan=True, rtol=1e-2 if gpu(device) else 1e-6,
                               atol=0)
    assert got[0, 0] != 0 and got[0, 1] != 0 and got[0, 3] != 0  # the ends pass: gate 7, up 7 and -7
    assert got[0, 2] == 0 and got[0, 5] == 0  # gate 7.5 and up 8 past the bounds get exactly 0
    assert torch.isnan(act[0, 5].float()) and got[0, 10] == 0  # NaN gate: NaN out, no gradient to its gate


def test_grouped_swiglu_rejects_bad_arguments():
    x = torch.randn(4, 16)
    off = _offsets([4], "cpu")
    with pytest.raises(ValueError, match="interleaved"):
        mm.grouped_swiglu(x, torch.randn(1, 16, 32), off, trans_b=False)
    with pytest.raises(ValueError, match="activation"):
        mm.grouped_swiglu(x, torch.randn(1, 32, 16), off, activation="gelu")
    with pytest.raises(ValueError, match="limit"):
        mm.grouped_swiglu(x, torch.randn(1, 32, 16), off, activation="swiglu_oss", limit=0.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        mm.grouped_swiglu(x, torch.randn(1, 32, 16), off, bias=torch.randn(1, 16))
    with pytest.raises(TypeError, match="bias has dtype"):
        mm.grouped_gemm(x, torch.randn(1, 16, 8), off, bias=torch.randn(1, 8, dtype=torch.float64).float().half())


# ---- moe_experts on gpt-oss's own tensors -----------------------------------------

def gpt_oss_experts_ref(x, ids, weights, gate_up, gate_up_bias, down, down_bias):
    """transformers' GptOssExperts.forward, in float32: the per-expert loop."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if not len(tok):
            continue
        gu = x[tok] @ gate_up[e] + gate_up_bias[e]
        y = hf_apply_gate(gu[:, 0::2], gu[:, 1::2]) @ down[e] + down_bias[e]
        out = out.index_add(0, tok, y * weights[tok, slot, None])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_moe_experts_serves_gpt_oss_layout(device, fused):
    """Transposed (E, H, 2F) / (E, F, H) weights, interleaved columns, both
    biases, the clamped SwiGLU: forward and every gradient against the
    per-expert loop, passed as they are (no copies: the op reads them in
    place, so a caller's in-place update is seen)."""
    tokens, hidden, ffn, experts, top_k = 37, 32, 40, 8, 4
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(3)
        x = _randn((tokens, hidden), g, dtype, device)
        logits = torch.randn(tokens, experts, generator=g)
        weights, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(weights, -1)
        params = [torch.randn(experts, hidden, 2 * ffn, generator=g) * 0.6, torch.randn(experts, 2 * ffn, generator=g),
                  torch.randn(experts, ffn, hidden, generator=g) * 0.2, torch.randn(experts, hidden, generator=g) * 0.1]
        params = [p.to(dtype).to(on(device)).requires_grad_(True) for p in params]
        xg = x.clone().requires_grad_(True)
        y = mm.moe_experts(xg, ids.to(on(device)), weights.to(on(device)), params[0], params[2], fused_swiglu=fused,
                           w13_bias=params[1], w2_bias=params[3], transposed=True, interleaved=True,
                           activation="swiglu_oss")
        grad = torch.randn(tokens, hidden, generator=g).to(dtype).to(on(device))
        y.backward(grad)
        ref_in = [t.detach().float().cpu().requires_grad_(True) for t in (x, *params)]
        y32 = gpt_oss_experts_ref(ref_in[0], ids, weights, ref_in[1], ref_in[2], ref_in[3], ref_in[4])
        y32.backward(grad.float().cpu())
        if dtype == torch.float32:
            torch.testing.assert_close(y.detach(), y32.detach(), rtol=1e-5, atol=1e-5 * y32.abs().max().item())
            for name, got, r in zip(("x", "gate_up", "gate_up_bias", "down", "down_bias"), (xg, *params), ref_in):
                torch.testing.assert_close(got.grad, r.grad, rtol=1e-4, atol=1e-4 * r.grad.abs().max().item(),
                                           msg=name)
        else:  # within a few roundings of the low-precision activations
            err = (y.detach().float().cpu() - y32.detach()).abs().max().item()
            assert err <= 8 * ref.UNIT_ROUNDOFF[dtype] * (y32.abs().max().item() + 1) * hidden ** 0.5, err
        assert gpu(device) or y.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_mlp_router_bias_and_renormalization(device, renormalize):
    """moe_mlp with a router bias (added to the logits before selection) and
    either weighting, against the per-expert loop in float32 with the same
    selection, forward and the router's gradients."""
    tokens, hidden, ffn, experts, top_k = 29, 32, 24, 8, 3
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(5)
    x = _randn((tokens, hidden), g, dtype, device)
    rw = _randn((experts, hidden), g, dtype, device, 0.5).requires_grad_(True)
    rb = _randn((experts,), g, dtype, device).requires_grad_(True)
    w13 = _randn((experts, 2 * ffn, hidden), g, dtype, device, hidden ** -0.5)
    w2 = _randn((experts, hidden, ffn), g, dtype, device, ffn ** -0.5)
    y, logits = mm.moe_mlp(x, rw, w13, w2, top_k=top_k, return_router_logits=True, renormalize=renormalize,
                           router_bias=rb)
    ref_logits = x.float().cpu() @ rw.detach().float().cpu().t() + rb.detach().float().cpu()
    torch.testing.assert_close(logits.detach().float().cpu(), ref_logits, rtol=1e-2 if gpu(device) else 1e-5,
                               atol=1e-2 if gpu(device) else 1e-5)
    ids = torch.sort(logits.detach().float().cpu(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    lg = logits.detach().float().cpu()
    probs = torch.softmax(lg.gather(1, ids), -1) if renormalize else torch.softmax(lg, -1).gather(1, ids)
    ref = torch.zeros(tokens, hidden)
    for e in range(experts):
        tok, slot = torch.where(ids == e)
        h = x[tok].float().cpu() @ w13[e].float().cpu().t()
        out = (torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]) @ w2[e].float().cpu().t()
        ref = ref.index_add(0, tok, out * probs[tok, slot, None])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.detach().float().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    y.sum().backward()
    assert rb.grad is not None and rw.grad is not None and torch.isfinite(rb.grad.float()).all()
    if not renormalize and dtype == torch.float32:  # every expert's logit moves the full softmax
        assert (rb.grad != 0).all()
