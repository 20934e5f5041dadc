"""grouped_gemm, grouped_gemm_wgrad, moe_mlp and moe_aux_loss against float32
references.

The MoE reference is written the way mistral-inference writes its layer:
`topk` on the logits, softmax over the selected ones, then
`for e in experts: tok, slot = where(ids == e)` with a float32 expert MLP.
topk only sees tie-free logits (float32 on the CPU, where our logits are the
same torch.matmul); low-precision cases route the reference with the expert
ids of our own logits (computed by the same torch.matmul in the input dtype,
ties to the lower index by a stable sort), because the selection is part of
the op's definition and is piecewise constant: the FlashAttention rule below
then measures only the arithmetic.

Tolerances:
- grouped_gemm / wgrad: float32 sums rounded once, so reference.tolerance
  (2u relative plus 1e-5 of the scale; 1e-5 relative for float32 covers
  another summation order over K <= a few hundred terms).
- moe_mlp: the FlashAttention rule (CONVENTIONS.md). ref32 does every step in
  float32; ref_lowp rounds where the op rounds (the router logits, which the
  op computes in the input dtype, each GEMM, the silu and the product of the
  unfused SwiGLU, and the un-permute). We require max|ours - ref32| <= 2 * max|ref_lowp - ref32|
  for the output and 3x for gradients, plus a slack of 1e-5 (output) / 1e-4
  (gradients, which sum over all rows of an expert) times the reference's
  scale; in float32 the slack alone is the bound.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from mixkit.bench.harness import capture_cuda_graph
from conftest import DEVICES, GPU_DEVICES, kernel_devices, on
import tiles
# The module, not the function of the same name that mixkit.ops exports.
mm = importlib.import_module("mixkit.ops.moe_mlp")


def _dtypes(device):
    return [torch.float32, torch.float16, torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


def _offsets(counts, device):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int64, device=on(device))


def gemm_ref(a, b, offsets, trans_b):
    """Per-expert float32 matmul; rows after offsets[E] are zero."""
    out = torch.zeros(a.shape[0], b.shape[1] if trans_b else b.shape[2])
    off = offsets.tolist()
    for e in range(b.shape[0]):
        w = b[e].float().cpu()
        out[off[e]:off[e + 1]] = a[off[e]:off[e + 1]].float().cpu() @ (w.t() if trans_b else w)
    return out


# (K, N_out, counts per expert): empty experts, all rows to one expert, one
# row, many row tiles, a bad-id tail (counts sum below the row count).
GEMM_CASES = [(64, 96, [5, 0, 12, 3], 20), (32, 40, [0, 0, 37, 0], 37), (16, 8, [1], 1),
              (136, 72, [130, 0, 260, 1, 7], 398), (24, 16, [0, 0, 0], 5), (48, 24, [3, 4], 9)]
ODD_CASES = [(13, 7, [4, 0, 9], 13), (5, 3, [1, 2], 3)]  # CPU only: K, N_out not multiples of 8


def _no_f16_subnormals(x):
    """MI200's MFMA flushes subnormal 16-bit inputs to zero (mfma.cuh; the
    emulated GPU at warp 64 models it), which the float32 reference does
    not: inputs keep clear of float16's subnormal range."""
    return torch.where(x.abs() < 2 ** -13, torch.copysign(torch.full_like(x, 2 ** -13), x), x)


def _gemm_case(device, dtype, k, n, counts, rows, trans_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = _no_f16_subnormals(torch.randn(rows, k, generator=g)).to(dtype).to(on(device))
    shape = (len(counts), n, k) if trans_b else (len(counts), k, n)
    b = _no_f16_subnormals(torch.randn(shape, generator=g) / k ** 0.5).to(dtype).to(on(device))
    return a, b, _offsets(counts, device)


@pytest.mark.parametrize("device,kernel", kernel_devices())
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_matches_per_expert_matmul(device, kernel, trans_b, force_kernel):
    # On an H100 "default" runs the wgmma kernel and "sm80" the mma.sync one.
    force_kernel(kernel)
    cases = GEMM_CASES + (ODD_CASES if device == "cpu" else [])
    for dtype in _dtypes(device):
        for i, (k, n, counts, rows) in enumerate(cases):
            a, b, off = _gemm_case(device, dtype, k, n, counts, rows, trans_b, seed=i)
            c = mm.grouped_gemm(a, b, off, trans_b=trans_b)
            assert c.shape == (rows, n) and c.dtype == dtype
            expected = gemm_ref(a, b, off, trans_b)
            ref.assert_close(c.cpu(), expected, dtype, f"{dtype} {(k, n, counts, rows)}")
            assert not c[off[-1]:].any(), "rows after offsets[E] must be zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_gradients(device, trans_b):
    for dtype in _dtypes(device):
        a, b, off = _gemm_case(device, dtype, 32, 24, [6, 0, 11, 1], 20, trans_b)
        a.requires_grad_(True)
        b.requires_grad_(True)
        grad = torch.randn(20, 24).to(dtype).to(on(device))
        mm.grouped_gemm(a, b, off, trans_b=trans_b).backward(grad)
        a32, b32 = a.detach().float().cpu().requires_grad_(True), b.detach().float().cpu().requires_grad_(True)
        out = torch.zeros(20, 24)
        o = off.tolist()
        for e in range(4):
            w = b32[e].t() if trans_b else b32[e]
            out = out.index_add(0, torch.arange(o[e], o[e + 1]), a32[o[e]:o[e + 1]] @ w)
        out.backward(grad.float().cpu())
        ref.assert_close(a.grad.cpu(), a32.grad, dtype, "grad_a", scale=a32.grad.abs().max().item() * 4)
        ref.assert_close(b.grad.cpu(), b32.grad, dtype, "grad_b", scale=b32.grad.abs().max().item() * 4)
        assert not a.grad[o[-1]:].any()
        assert not b.grad[1].any(), "an expert with no rows gets a zero weight gradient"


# ---- moe_mlp --------------------------------------------------------------------

def mlp_ref(x, rw, w13, w2, top_k, ids=None, round_to=None):
    """mistral-inference's MoE layer in float32 (differentiable). `ids` fixes
    the selection; `round_to` rounds where the op rounds (ref_lowp)."""
    rnd = (lambda t: t.to(round_to).float()) if round_to is not None else (lambda t: t)
    logits = rnd(x @ rw.t())
    if ids is None:
        vals, ids = torch.topk(logits, top_k, dim=-1)
    else:
        vals = logits.gather(-1, ids)
    weights = torch.softmax(vals, dim=-1)
    ffn = w2.shape[2]
    y = torch.zeros_like(x)
    for e in range(rw.shape[0]):
        tok, slot = torch.where(ids == e)
        h = rnd(x[tok] @ w13[e].t())
        act = rnd(rnd(F.silu(h[:, :ffn])) * h[:, ffn:])
        y = y.index_add(0, tok, weights[tok, slot, None] * rnd(act @ w2[e].t()))
    return rnd(y)


def _mlp_inputs(tokens, hidden, ffn, experts, dtype, device, seed=0, tie_rows=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    rw = torch.randn(experts, hidden, generator=g) / hidden ** 0.5
    if tie_rows is not None:
        rw[tie_rows[1]] = rw[tie_rows[0]]  # exact logit ties in every dtype
    w13 = torch.randn(experts, 2 * ffn, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, ffn, generator=g) / ffn ** 0.5
    return [t.to(dtype).to(on(device)) for t in (x, rw, w13, w2)]


def _selected_ids(x, rw, top_k):
    """Our routing rule on our logits: ties to the lower index (stable sort)."""
    logits = torch.matmul(x, rw.t()).float().cpu()
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]


def _check_fa_rule(ours, ref32, lowp, factor, slack, name):
    ours, ref32, lowp = ours.float().cpu(), ref32.float(), lowp.float()
    scale = max(ref32.abs().max().item(), 1e-6)
    err = (ours - ref32).abs().max().item()
    bound = factor * (lowp - ref32).abs().max().item() + slack * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


# (T, H, F, E, k): Mixtral-like k=2 of 8, E=3 with k=1 and 2, T=1.
MLP_SHAPES = [(37, 64, 96, 8, 2), (20, 32, 48, 3, 1), (17, 32, 48, 3, 2), (1, 64, 96, 8, 2), (5, 16, 24, 4, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", MLP_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_moe_mlp_forward_and_gradients(device, shape, fused):
    # The fused SwiGLU rounds less than ref_lowp assumes (once instead of
    # after the GEMM, the silu and the product), so the same bound holds.
    tokens, hidden, ffn, experts, top_k = shape
    for dtype in _dtypes(device):
        params = _mlp_inputs(tokens, hidden, ffn, experts, dtype, device, seed=tokens)
        ours_in = [p.clone().requires_grad_(True) for p in params]
        y, logits = mm.moe_mlp(*ours_in, top_k=top_k, return_router_logits=True, fused_swiglu=fused)
        assert y.shape == (tokens, hidden) and y.dtype == dtype and logits.shape == (tokens, experts)
        grad_y = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(on(device))
        y.backward(grad_y)
        # float32: mistral-inference's topk; low precision: our selection.
        ids = None if dtype == torch.float32 else _selected_ids(params[0], params[1], top_k)
        refs = {}
        for mode in ("ref32", "lowp"):
            inp = [p.detach().float().cpu().requires_grad_(True) for p in params]
            out = mlp_ref(*inp, top_k, ids=ids, round_to=None if mode == "ref32" else dtype)
            out.backward(grad_y.float().cpu())
            refs[mode] = (out.detach(), [p.grad for p in inp])
        _check_fa_rule(y, refs["ref32"][0], refs["lowp"][0], 2, 1e-5, f"{dtype} y")
        for name, p, g32, glp in zip(("x", "router_weight", "w13", "w2"), ours_in, refs["ref32"][1], refs["lowp"][1]):
            _check_fa_rule(p.grad, g32, glp, 3, 1e-4, f"{dtype} grad {name}")


# ---- grouped_swiglu (fused SwiGLU epilogue) -------------------------------------

# (K, F, counts, rows): F over several 64-column GPU tiles with a tail, an
# expert past 128 rows, empty experts, bad-id rows after offsets[E].
SWIGLU_CASES = [(64, 72, [5, 0, 130, 3], 141), (32, 8, [1], 1), (48, 136, [0, 9, 0], 12), (16, 24, [0, 0], 3)]


def swiglu_ref(x, w13, offsets):
    """float32 h (N, 2F) and silu(gate) * up from it."""
    h = gemm_ref(x, w13, offsets, trans_b=True)
    ffn = h.shape[1] // 2
    return h, F.silu(h[:, :ffn]) * h[:, ffn:]


@pytest.mark.parametrize("device,kernel", kernel_devices())
def test_grouped_swiglu_matches_float32_reference(device, kernel, force_kernel):
    force_kernel(kernel)
    for dtype in _dtypes(device):
        for i, (k, ffn, counts, rows) in enumerate(SWIGLU_CASES):
            x, w13, off = _gemm_case(device, dtype, k, 2 * ffn, counts, rows, True, seed=i)
            h_ref, act_ref = swiglu_ref(x, w13, off)
            act, h = mm.grouped_swiglu(x, w13, off, store_h=True)
            assert act.shape == (rows, ffn) and h.shape == (rows, 2 * ffn) and act.dtype == h.dtype == dtype
            # One rounding of a float32 value each: h is the plain GEMM; act is
            # silu(g) * u with |d act| <= |d g| * max|silu'| * |u| + |silu(g)| |d u|,
            # d of a few float32 ulps of the summed terms, hence the scale.
            ref.assert_close(h.cpu(), h_ref, dtype, f"h {dtype} {(k, ffn, counts)}")
            scale = (h_ref.abs().max().item() + 1) ** 2
            ref.assert_close(act.cpu(), act_ref, dtype, f"act {dtype} {(k, ffn, counts)}", scale=scale)
            assert not act[off[-1]:].any() and not h[off[-1]:].any(), "rows after offsets[E] must be zero"
            act2, h2 = mm.grouped_swiglu(x, w13, off, store_h=False)
            assert h2.shape == (0, 2 * ffn)
            torch.testing.assert_close(act2, act, rtol=0, atol=0)


# ---- tile boundaries ----------------------------------------------------------------
# tiles.gemm_design reads the sm_80, sm_90a and MFMA grouped-GEMM tiles from
# their sources and gives cases whose rows per expert, K, N and SwiGLU F hit
# every boundary class, with an empty expert beside one of more than a full
# tile and bad-id rows past offsets[E]. Each case runs the forward in both
# weight layouts, the fused SwiGLU and the weight gradient in both layouts,
# in bfloat16 on the GPU (the dtype moves no index).

def _gemm_tile_cases():
    for k, n, f, counts, bad in tiles.gemm_design():
        yield pytest.param(k, n, f, counts, bad, id=f"K{k}-N{n}-F{f}-rows{'_'.join(map(str, counts))}+{bad}")


@pytest.mark.parametrize("k,n,f,counts,bad", list(_gemm_tile_cases()))
@pytest.mark.parametrize("device,kernel", kernel_devices())
def test_tile_boundaries(k, n, f, counts, bad, device, kernel, force_kernel):
    force_kernel(kernel)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = sum(counts) + bad
    where = f"K={k} N={n} F={f} counts={counts} bad={bad}"
    for trans_b in (False, True):
        a, b, off = _gemm_case(device, dtype, k, n, counts, rows, trans_b, seed=k + n)
        c = mm.grouped_gemm(a, b, off, trans_b=trans_b)
        ref.assert_close(c.cpu(), gemm_ref(a, b, off, trans_b), dtype, f"grouped_gemm trans_b={trans_b} {where}")
        assert not c[off[-1]:].any(), "rows after offsets[E] must be zero"
        # Weight gradient: (K, N) is its output tile, the rows its reduction.
        dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(dtype).to(on(device))
        db = mm.grouped_gemm_wgrad(a, dy, off, trans_b=trans_b).cpu()
        o = off.tolist()
        expected = torch.stack([a[o[e]:o[e + 1]].float().cpu().t() @ dy[o[e]:o[e + 1]].float().cpu()
                                for e in range(len(counts))])
        if trans_b:
            expected = expected.transpose(1, 2)
        scale = (a.float().abs().max() * dy.float().abs().max()).item() * max(counts) ** 0.5
        ref.assert_close(db, expected, dtype, f"wgrad trans_b={trans_b} {where}", scale=scale)
        for e, cnt in enumerate(counts):
            if cnt == 0:
                assert not db[e].any(), "an expert with no rows gets a zero weight gradient"
    x, w13, off = _gemm_case(device, dtype, k, 2 * f, counts, rows, True, seed=f)
    h_ref, act_ref = swiglu_ref(x, w13, off)
    act, h = mm.grouped_swiglu(x, w13, off, store_h=True)
    ref.assert_close(h.cpu(), h_ref, dtype, f"swiglu h {where}")
    ref.assert_close(act.cpu(), act_ref, dtype, f"swiglu act {where}", scale=(h_ref.abs().max().item() + 1) ** 2)
    assert not act[off[-1]:].any() and not h[off[-1]:].any(), "rows after offsets[E] must be zero"


@pytest.mark.parametrize("device", DEVICES)
def test_fused_swiglu_matches_unfused_forward_and_gradients(device):
    """The fused layer against the unfused one: identical math, fewer roundings.
    float32 (CPU): same sums, so float32 noise only. Low precision: both
    within the FlashAttention rule of test_moe_mlp_forward_and_gradients, so
    they differ by at most the sum of the two bounds; we check the tighter
    fact that the fused one is no further from ref32 than the unfused one
    plus one rounding of the output's scale."""
    tokens, hidden, ffn, experts, top_k = 45, 32, 72, 5, 2
    for dtype in _dtypes(device):
        params = _mlp_inputs(tokens, hidden, ffn, experts, dtype, device, seed=3)
        outs = {}
        for fused in (False, True):
            inp = [p.clone().requires_grad_(True) for p in params]
            y = mm.moe_mlp(*inp, top_k=top_k, fused_swiglu=fused)
            y.backward(torch.ones_like(y))
            outs[fused] = [y.detach()] + [p.grad for p in inp]
        if dtype == torch.float32:
            for name, a, b in zip(("y", "x", "router_weight", "w13", "w2"), outs[True], outs[False]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
        else:
            ids = _selected_ids(params[0], params[1], top_k)
            inp = [p.detach().float().cpu().requires_grad_(True) for p in params]
            y32 = mlp_ref(*inp, top_k, ids=ids)
            y32.backward(torch.ones_like(y32))
            refs = [y32.detach()] + [p.grad for p in inp]
            u = ref.UNIT_ROUNDOFF[dtype]
            for name, a, b, r in zip(("y", "x", "router_weight", "w13", "w2"), outs[True], outs[False], refs):
                err_f = (a.float().cpu() - r).abs().max().item()
                err_u = (b.float().cpu() - r).abs().max().item()
                assert err_f <= err_u + 2 * u * r.abs().max().item(), f"{dtype} {name}: fused {err_f} unfused {err_u}"


def test_grouped_swiglu_backward_needs_stored_h():
    x, w13, off = _gemm_case("cpu", torch.float32, 16, 48, [3, 2], 5, True)
    act, h = mm.grouped_swiglu(x.requires_grad_(True), w13, off, store_h=False)
    with pytest.raises(RuntimeError, match="store_h"):
        act.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_moe_mlp_exact_logit_ties_go_to_lower_expert(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for tie in ((0, 1), (2, 5)):
        x, rw, w13, w2 = _mlp_inputs(11, 32, 48, 6, dtype, device, tie_rows=tie)
        y = mm.moe_mlp(x, rw, w13, w2, top_k=2)
        ids = _selected_ids(x, rw, 2)
        params = [p.float().cpu() for p in (x, rw, w13, w2)]
        ref32 = mlp_ref(*params, 2, ids=ids)
        lowp = mlp_ref(*params, 2, ids=ids, round_to=dtype)
        _check_fa_rule(y, ref32, lowp, 2, 1e-5, f"ties {tie}")


def test_moe_aux_loss_matches_hf_and_uniform_gives_k():
    torch.manual_seed(0)
    logits = torch.randn(29, 8, requires_grad=True)
    ids = torch.topk(logits.detach(), 2).indices.to(torch.int32)
    loss = mm.moe_aux_loss(logits, ids, 8, 2)
    # HF load_balancing_loss_func for one layer.
    probs = torch.softmax(logits, dim=-1)
    mask = F.one_hot(ids.long(), 8)  # (T, k, E)
    expected = 8 * torch.sum(mask.float().mean(dim=0) * probs.mean(dim=0).unsqueeze(0))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    uniform = torch.zeros(16, 4)
    ids = torch.arange(32, dtype=torch.int32).view(16, 2) % 4
    torch.testing.assert_close(mm.moe_aux_loss(uniform, ids, 4, 2), torch.tensor(2.0))


# ---- torch.library, torch.compile, CUDA graphs ------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for trans_b in (False, True):
        a, b, off = _gemm_case(device, dtype, 16, 24, [3, 0, 5], 9, trans_b)
        torch.library.opcheck(torch.ops.mixkit.grouped_gemm.default,
                              (a.requires_grad_(True), b.requires_grad_(True), off, trans_b))
        grad = torch.randn(9, 24).to(dtype).to(on(device))
        torch.library.opcheck(torch.ops.mixkit.grouped_gemm_wgrad.default, (a.detach(), grad, off, trans_b))
    x, w13, off = _gemm_case(device, dtype, 16, 48, [3, 0, 5], 9, True)
    torch.library.opcheck(torch.ops.mixkit.grouped_swiglu.default,
                          (x.requires_grad_(True), w13.requires_grad_(True), off, True))
    torch.library.opcheck(torch.ops.mixkit.grouped_swiglu.default, (x.detach(), w13.detach(), off, False))


@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_fullgraph_forward_backward(fused):
    params = _mlp_inputs(24, 32, 48, 8, torch.float32, "cpu")
    eager = [p.clone().requires_grad_(True) for p in params]
    comp = [p.clone().requires_grad_(True) for p in params]
    y_eager = mm.moe_mlp(*eager, top_k=2, fused_swiglu=fused)
    y_comp = torch.compile(mm.moe_mlp, fullgraph=True)(*comp, top_k=2, fused_swiglu=fused)
    torch.testing.assert_close(y_comp, y_eager)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_capture_moe_mlp_forward(fused):
    x, rw, w13, w2 = _mlp_inputs(256, 512, 384, 8, torch.bfloat16, "cuda")
    expected = mm.moe_mlp(x, rw, w13, w2, top_k=2, fused_swiglu=fused)
    graph, out = capture_cuda_graph(lambda: mm.moe_mlp(x, rw, w13, w2, top_k=2, fused_swiglu=fused))
    graph.replay()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, mm.moe_mlp(x, rw, w13, w2, top_k=2, fused_swiglu=fused), rtol=0, atol=0)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_wgrad_large_experts_match_cpu(device):
    """Many 32-row steps per expert, several output tiles with tails in both
    dimensions, an empty expert: the tensor-core wgrad against float32."""
    counts = [300, 0, 77, 1, 129]
    for trans_b in (False, True):
        for dtype in (torch.float16, torch.bfloat16):
            g = torch.Generator().manual_seed(7)
            a = torch.randn(sum(counts) + 5, 136, generator=g).to(dtype)
            dy = torch.randn(sum(counts) + 5, 264, generator=g).to(dtype)
            off = _offsets(counts, "cpu")
            db = mm.grouped_gemm_wgrad(a.to(on(device)), dy.to(on(device)), off.to(on(device)), trans_b=trans_b).cpu()
            o = off.tolist()
            expected = torch.stack([a[o[e]:o[e + 1]].float().t() @ dy[o[e]:o[e + 1]].float() for e in range(5)])
            if trans_b:
                expected = expected.transpose(1, 2)
            scale = (a.float().abs().max() * dy.float().abs().max()).item() * max(counts) ** 0.5
            ref.assert_close(db, expected, dtype, f"{dtype} trans_b={trans_b}", scale=scale)
            assert not db[1].any()


# ---- bad input -------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    x, rw, w13, w2 = _mlp_inputs(4, 16, 24, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="top_k"):
        mm.moe_mlp(x, rw, w13, w2, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        mm.moe_mlp(x, rw, w13, w2, top_k=0)
    with pytest.raises(ValueError, match="router_weight"):
        mm.moe_mlp(x, rw[:, :8], w13, w2)
    with pytest.raises(ValueError, match="w13"):
        mm.moe_mlp(x, rw, w13[:3], w2)
    with pytest.raises(ValueError, match="w13"):
        mm.moe_mlp(x, rw, w13[:, :47], w2)
    with pytest.raises(ValueError, match="w2"):
        mm.moe_mlp(x, rw, w13, w2[:, :, :20])
    with pytest.raises(TypeError, match="w2"):
        mm.moe_mlp(x, rw, w13, w2.double())
    with pytest.raises(TypeError, match="w13"):
        mm.moe_mlp(x, rw, w13.bfloat16(), w2)
    a, b, off = _gemm_case("cpu", torch.float32, 16, 24, [3, 0, 5], 9, False)
    with pytest.raises(TypeError, match="expert_offsets"):
        mm.grouped_gemm(a, b, off.int())
    with pytest.raises(ValueError, match="expert_offsets"):
        mm.grouped_gemm(a, b, off[:3])
    with pytest.raises(ValueError, match="K"):
        mm.grouped_gemm(a, b, off, trans_b=True)
    with pytest.raises(TypeError, match="b"):
        mm.grouped_gemm(a, b.half(), off)
    with pytest.raises(ValueError, match="expert_offsets"):
        mm.grouped_gemm(a, b, torch.tensor([0, 5, 3, 9]))  # decreasing: rejected by the CPU backend
    with pytest.raises(ValueError, match="expert_offsets"):
        mm.grouped_gemm(a, b, torch.tensor([0, 5, 6, 10]))  # past the row count
    # The bias gradient (moe_mlp's backward; callable as torch.ops.mixkit.grouped_bias_grad).
    bias_grad = torch.ops.mixkit.grouped_bias_grad
    g = torch.randn(9, 24)
    with pytest.raises(TypeError, match="expert_offsets"):
        bias_grad(g, off.int(), 3)
    with pytest.raises(ValueError, match="expert_offsets"):
        bias_grad(g, off, 4)
    with pytest.raises(ValueError, match="experts"):
        bias_grad(g, off[:1], 0)
    with pytest.raises(ValueError, match="grad_out"):
        bias_grad(g[None], off, 3)
    with pytest.raises(ValueError, match="grad_out"):
        bias_grad(g.t(), off, 3)
    with pytest.raises(ValueError, match="expert_offsets"):
        bias_grad(g, torch.tensor([0, 5, 3, 9]), 3)  # decreasing: rejected by the CPU backend
    torch.testing.assert_close(bias_grad(g, off, 3), torch.stack([g[0:3].sum(0), g[3:3].sum(0), g[3:8].sum(0)]))


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_bad_input(device):
    a, b, off = _gemm_case(device, torch.bfloat16, 16, 24, [3, 0, 5], 9, False)
    with pytest.raises(ValueError, match="multiples of 8"):
        mm.grouped_gemm(a[:, :12].contiguous(), b[:, :12].contiguous(), off)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        mm.grouped_gemm(a.float(), b.float(), off)
    if device == "cuda":  # the emulated GPU's tensors are all on the CPU
        with pytest.raises(ValueError, match="device|cuda|cpu"):
            mm.grouped_gemm(a, b, off.cpu())


# ---- moe_experts (the router elsewhere, e.g. Hugging Face's) -------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_moe_experts_matches_loop_reference_with_gradients(device):
    """Weights and ids from an outside router (HF's softmax-topk-renormalise,
    int64 ids): output and gradients in x, the weights, w13 and w2 against the
    per-expert float32 loop."""
    tokens, hidden, ffn, experts, top_k = 23, 32, 48, 5, 2
    # The GPU kernels take 16-bit inputs: the reference then runs in float32
    # on the same bf16 values, and the tolerance covers the GPU path's three
    # bf16 roundings (h, the activation, the output; unit roundoff 2^-8).
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=3e-2, atol=3e-2)
    gtol = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=3e-2, atol=3e-2)
    x, rw, w13, w2 = _mlp_inputs(tokens, hidden, ffn, experts, dtype, device, seed=7)
    probs = torch.softmax(x @ rw.t(), dim=-1)
    vals, ids = torch.topk(probs, top_k, dim=-1)
    vals = vals / vals.sum(-1, keepdim=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, vals, w13, w2)]
    y = mm.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    grad_y = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype).to(on(device))
    y.backward(grad_y)

    ref_in = [t.detach().cpu().float().requires_grad_(True) for t in (x, vals, w13, w2)]
    rx, rv, r13, r2 = ref_in
    ref = torch.zeros(tokens, hidden)
    for e in range(experts):
        tok, slot = torch.where(ids.cpu() == e)
        h = rx[tok] @ r13[e].t()
        ref = ref.index_add(0, tok, rv[tok, slot, None] * ((F.silu(h[:, :ffn]) * h[:, ffn:]) @ r2[e].t()))
    ref.backward(grad_y.cpu().float())
    torch.testing.assert_close(y.detach().cpu().float(), ref.detach(), **tol)
    for name, ours, theirs in zip(("x", "weights", "w13", "w2"), leaves, ref_in):
        torch.testing.assert_close(ours.grad.cpu().float(), theirs.grad, **gtol, msg=name)


def test_moe_experts_bad_input():
    x, rw, w13, w2 = _mlp_inputs(4, 16, 8, 3, torch.float32, "cpu")
    ids = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.full((4, 2), 0.5)
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        mm.moe_experts(x, ids.float(), w, w13, w2)
    with pytest.raises(ValueError, match="topk_weights must have topk_ids' shape"):
        mm.moe_experts(x, ids, w[:, :1], w13, w2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        mm.moe_experts(x, ids, w, w13, w2[:, :, :4])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mm.moe_experts(None, ids, w, w13, w2)
