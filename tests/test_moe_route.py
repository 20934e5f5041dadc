"""moe_route, moe_permute and moe_unpermute against float32 references.

The references are written the way mistral-inference writes its MoE layer:
`topk` on the logits, softmax over the selected ones, then
`for e in experts: tok, slot = where(ids == e)`. `torch.topk` leaves the order
of ties undefined, so it only sees tie-free logits; ties are checked against a
stable sort, which puts equal logits in ascending expert order.

Tolerances: weights are float32 softmaxes over at most 256 terms computed in
another order (a few float32 ulps, 1e-5 relative covers it). Unpermuted rows
and gradients of bf16/fp16 tensors are float32 sums rounded once, held to
reference.tolerance(dtype). Permuted rows are copies and must match exactly.
"""
import pytest
import torch

import reference as ref
from conftest import DEVICES, GPU_DEVICES, emu_configure, on
import tiles
from mixkit import _core
from mixkit.bench.harness import capture_cuda_graph
from mixkit.ops import moe

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, experts, top_k, hidden): Mixtral's E=8/k=2, E=3, k=1, T=1, odd
# hidden sizes (scalar GPU path), k > warp-group width, E above one warp.
SHAPES = [(1, 8, 2, 64), (37, 8, 2, 127), (113, 3, 1, 33), (64, 3, 2, 4096), (50, 8, 1, 5), (17, 64, 8, 24),
          (9, 256, 40, 16), (300, 16, 4, 72)]


def _tie_free_logits(tokens, experts, dtype, device, seed=0):
    """Distinct multiples of 0.5 per row: exact in every dtype, no ties."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(tokens, experts, generator=g), dim=-1).float()
    return ((ranks - experts / 2) * 0.5).to(dtype).to(on(device))


def route_mistral(logits, top_k):
    """mistral-inference: topk on the logits, softmax of the selected in float32."""
    vals, ids = torch.topk(logits.float(), top_k, dim=-1)
    return torch.softmax(vals, dim=-1), ids


def route_hf_unnormalized(logits, top_k):
    """Hugging Face's OLMoE / Qwen3-MoE router without norm_topk_prob: the
    softmax over all experts in float32, then its top_k entries as they are."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def route_sorted(logits, top_k):
    """Ties to the lower index: a stable descending sort keeps equal logits in
    index order (NaN sorts above every number, as in topk)."""
    l32 = logits.float()
    ids = torch.sort(l32, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return torch.softmax(l32.gather(-1, ids), dim=-1), ids


def permute_ref(x, ids, num_experts):
    """The per-expert loop: expert e's rows are x[tok] for tok, slot in where(ids == e)."""
    tokens, top_k = ids.shape
    ids = ids.long()
    rows, offsets = [], [0]
    row_map = torch.empty(tokens * top_k, dtype=torch.int64, device=x.device)
    for e in range(num_experts):
        tok, slot = torch.where(ids == e)
        row_map[tok * top_k + slot] = torch.arange(offsets[-1], offsets[-1] + len(tok), device=x.device)
        rows.append(x[tok])
        offsets.append(offsets[-1] + len(tok))
    return torch.cat(rows), torch.tensor(offsets, device=x.device), row_map


def moe_ref(x, weights, ids, num_experts, expert_fn):
    """y = sum over experts of weights * expert_fn(e, x rows routed to e), in float32."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        tok, slot = torch.where(ids.long() == e)
        y = y.index_add(0, tok, weights[tok, slot, None] * expert_fn(e, x[tok].float()))
    return y


def _check_route(logits, top_k, expect, renormalize=True):
    weights, ids = moe.moe_route(logits, top_k, renormalize=renormalize)
    w_ref, ids_ref = expect(logits, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), ids_ref), (ids, ids_ref)
    torch.testing.assert_close(weights, w_ref, rtol=1e-5, atol=1e-7)
    return weights, ids


# ---- router ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k,_hidden", SHAPES)
def test_route_matches_mistral_reference(tokens, experts, top_k, _hidden, dtype, device):
    _check_route(_tie_free_logits(tokens, experts, dtype, device), top_k, route_mistral)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k,_hidden", SHAPES)
def test_route_without_renormalization_matches_hf(tokens, experts, top_k, _hidden, dtype, device):
    """OLMoE's router: the weights are the full softmax's top-k entries and sum
    to less than 1 unless k = E."""
    weights, _ = _check_route(_tie_free_logits(tokens, experts, dtype, device), top_k, route_hf_unnormalized,
                              renormalize=False)
    if top_k <= 2 < experts:  # logits 0.5 apart: the unselected experts hold a visible share
        assert (weights.sum(-1) < 0.99).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k", [(8, 2), (3, 1), (3, 3), (64, 5), (256, 7)])
def test_route_ties_go_to_the_lower_index(experts, top_k, dtype, device):
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(-2, 3, (200, experts), generator=g).to(dtype).to(on(device))  # many exact ties
    _check_route(logits, top_k, route_sorted)
    flat = torch.zeros(3, experts, dtype=dtype, device=on(device))
    _, ids = _check_route(flat, top_k, route_sorted)
    assert torch.equal(ids.cpu(), torch.arange(top_k, dtype=torch.int32).expand(3, top_k))
    # -0.0 and +0.0 tie as well.
    signed = torch.zeros(1, experts, dtype=dtype, device=on(device))
    signed[0, 0] = -0.0
    assert moe.moe_route(signed, top_k)[1][0, 0].item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_route_nan_ranks_first_and_propagates(device):
    logits = _tie_free_logits(4, 8, torch.float32, device)
    logits[1, 5] = float("nan")
    logits[2, 3] = logits[2, 6] = float("nan")
    weights, ids = moe.moe_route(logits, 2)
    assert ids[1, 0].item() == 5 and ids[2].tolist() == [3, 6]
    assert torch.isnan(weights[1:3]).all() and torch.isfinite(weights[[0, 3]]).all()
    _, ids_ref = route_sorted(logits, 2)
    assert torch.equal(ids.long(), ids_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_route_infinite_logits(device):
    logits = torch.full((2, 4), float("-inf"), device=on(device))
    logits[0, 2] = 1.0
    logits[1, 1] = float("inf")
    weights, ids = moe.moe_route(logits, 2)
    assert ids.tolist() == [[2, 0], [1, 0]]
    assert weights[0].tolist() == [1.0, 0.0]  # exp(-inf) = 0
    assert torch.isnan(weights[1]).all()  # inf - inf, as torch.softmax gives


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k", [(8, 2), (3, 1), (64, 8)])
def test_route_gradient(experts, top_k, dtype, device):
    logits = _tie_free_logits(33, experts, dtype, device)
    g = torch.randn(33, top_k, generator=torch.Generator().manual_seed(2)).to(on(device))
    leaf = logits.clone().requires_grad_(True)
    weights, _ = moe.moe_route(leaf, top_k)
    (grad,) = torch.autograd.grad(weights, leaf, g)
    leaf_ref = logits.float().requires_grad_(True)
    w_ref, _ = route_mistral(leaf_ref, top_k)
    (grad_ref,) = torch.autograd.grad(w_ref, leaf_ref, g)
    assert grad.dtype == dtype
    ref.assert_close(grad, grad_ref, dtype, "grad_logits", scale=g.abs().max().item())
    assert (grad.float()[grad_ref == 0] == 0).all(), "unselected experts get no gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k", [(8, 2), (3, 1), (64, 8), (256, 7)])
def test_route_gradient_without_renormalization(experts, top_k, dtype, device):
    """Every expert's logit moves the full softmax, so every one gets a gradient."""
    logits = _tie_free_logits(33, experts, dtype, device)
    g = torch.randn(33, top_k, generator=torch.Generator().manual_seed(2)).to(on(device))
    leaf = logits.clone().requires_grad_(True)
    weights, _ = moe.moe_route(leaf, top_k, renormalize=False)
    (grad,) = torch.autograd.grad(weights, leaf, g)
    leaf_ref = logits.float().requires_grad_(True)
    w_ref, _ = route_hf_unnormalized(leaf_ref, top_k)
    (grad_ref,) = torch.autograd.grad(w_ref, leaf_ref, g)
    assert grad.dtype == dtype
    ref.assert_close(grad, grad_ref, dtype, "grad_logits", scale=g.abs().max().item())
    if top_k < experts <= 64 and dtype == torch.float32:  # at E = 256 the smallest probabilities underflow
        assert (grad_ref != 0).float().mean() > 0.9 and (grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_route_without_renormalization_nan_and_inf(device):
    logits = _tie_free_logits(3, 8, torch.float32, device)
    logits[1, 5] = float("nan")
    logits[2] = float("-inf")
    logits[2, 4] = 0.0
    weights, ids = moe.moe_route(logits, 2, renormalize=False)
    assert torch.isnan(weights[1]).all() and torch.isfinite(weights[0]).all()
    assert ids[2].tolist() == [4, 0] and weights[2].tolist() == [1.0, 0.0]


# ---- permute / unpermute --------------------------------------------------------

def _routed(tokens, experts, top_k, hidden, dtype, device, seed=0):
    logits = _tie_free_logits(tokens, experts, torch.float32, device, seed)
    weights, ids = moe.moe_route(logits, top_k)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype).to(on(device))
    return x, weights, ids


def _check_permute(x, ids, experts):
    x_perm, offsets, row_map = moe.moe_permute(x, ids, experts)
    p_ref, off_ref, map_ref = permute_ref(x, ids, experts)
    assert offsets.dtype == torch.int64 and offsets.device == x.device and row_map.dtype == torch.int32
    assert torch.equal(offsets, off_ref)
    assert torch.equal(row_map.long(), map_ref)
    assert torch.equal(x_perm, p_ref)
    return x_perm, offsets, row_map


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k,hidden", SHAPES)
def test_permute_and_unpermute_match_per_expert_loop(tokens, experts, top_k, hidden, dtype, device):
    x, weights, ids = _routed(tokens, experts, top_k, hidden, dtype, device)
    x_perm, offsets, row_map = _check_permute(x, ids, experts)
    # A stand-in expert: row scaling by (e + 1) / 4, applied per offsets segment.
    scale = (torch.arange(experts, device=on(device), dtype=torch.float32) + 1) / 4
    counts = (offsets[1:] - offsets[:-1])
    y_rows = (x_perm.float() * scale.repeat_interleave(counts)[:, None]).to(dtype)
    y = moe.moe_unpermute(y_rows, row_map, weights)
    y_ref = moe_ref(x, weights, ids, experts, lambda e, rows: (rows * scale[e]).to(dtype).float())
    assert y.dtype == dtype and y.shape == x.shape
    ref.assert_close(y, y_ref, dtype, "y")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_round_trip(top_k, dtype, device):
    x, _, ids = _routed(97, 8, top_k, 129, dtype, device)
    x_perm, _, row_map = moe.moe_permute(x, ids, 8)
    weights = torch.full(ids.shape, 1.0 / top_k, device=on(device))
    assert torch.equal(moe.moe_unpermute(x_perm, row_map, weights), x)  # 1/k is exact for k = 1, 2, 4


@pytest.mark.parametrize("device", DEVICES)
def test_empty_experts_and_one_expert(device):
    x = torch.randn(40, 16, device=on(device))
    ids = torch.tensor([[1, 5], [5, 1]], dtype=torch.int32, device=on(device)).repeat(20, 1)
    _, offsets, _ = _check_permute(x, ids, 8)
    assert offsets.tolist() == [0, 0, 40, 40, 40, 40, 80, 80, 80]
    ids = torch.full((40, 1), 2, dtype=torch.int32, device=on(device))
    x_perm, offsets, row_map = _check_permute(x, ids, 3)
    assert offsets.tolist() == [0, 0, 0, 40] and torch.equal(x_perm, x)
    assert torch.equal(row_map.cpu(), torch.arange(40, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_many_tokens_cross_chunks(device):
    """More rows than one GPU histogram chunk (512), skewed towards one expert."""
    g = torch.Generator().manual_seed(3)
    ids = torch.where(torch.rand(3001, 2, generator=g) < 0.7, 0, torch.randint(0, 6, (3001, 2), generator=g))
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % 6, ids[:, 1])
    x = torch.randn(3001, 8, generator=g).to(on(device))
    _check_permute(x, ids.to(torch.int32).to(on(device)), 6)


# ---- tile boundaries ----------------------------------------------------------------
# tiles.route_design and tiles.permute_design read moe_route.cu's block
# shapes (tokens a router block at either warp width, the histogram chunk,
# the scan's batch and threads, the row-copy threads) and give shapes that
# hit every boundary class; one 16-bit dtype (bf16: the dtype moves no index,
# and float32 runs the same kernels with 4-element vectors, covered above).

@pytest.mark.parametrize("tokens,experts,top_k", list(tiles.route_design()))
@pytest.mark.parametrize("device", DEVICES)
def test_route_tile_boundaries(tokens, experts, top_k, device):
    _check_route(_tie_free_logits(tokens, experts, torch.bfloat16, device, seed=experts), top_k, route_mistral)


@pytest.mark.parametrize("tokens,experts,top_k,hidden", list(tiles.permute_design()))
@pytest.mark.parametrize("device", DEVICES)
def test_permute_tile_boundaries(tokens, experts, top_k, hidden, device):
    """Permute, unpermute and the weight gradient of unpermute (the row-copy
    kernels and the weight-gradient reduction) against the per-expert loop."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(tokens + experts)
    # Ids drawn at random (not routed), skewed to expert 0 so that one expert
    # spans several chunks and others stay empty.
    ids = torch.where(torch.rand(tokens, top_k, generator=g) < 0.5, 0,
                      torch.randint(0, experts, (tokens, top_k), generator=g)).to(torch.int32).to(on(device))
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(on(device))
    x_perm, offsets, row_map = _check_permute(x, ids, experts)
    weights = torch.rand(tokens, top_k, generator=g).to(on(device)).requires_grad_(True)
    y_rows = x_perm.clone().requires_grad_(True)
    y = moe.moe_unpermute(y_rows, row_map, weights)
    gathered = x_perm.float()[row_map.long()].view(tokens, top_k, hidden)
    y_ref = (weights.detach()[..., None] * gathered).sum(1)
    ref.assert_close(y, y_ref, dtype, "y")
    dy = torch.randn(tokens, hidden, generator=g).to(dtype).to(on(device))
    y.backward(dy)
    dw_ref = (dy.float()[:, None] * gathered).sum(-1)
    dw_scale = (dy.float().abs()[:, None] * gathered.abs()).sum(-1).max().item()
    ref.assert_close(weights.grad, dw_ref, torch.float32, "d weights", scale=dw_scale)
    dy_rows_ref = torch.zeros(tokens * top_k, hidden)
    dy_rows_ref[row_map.long()] = (weights.detach()[..., None] * dy.float()[:, None]).reshape(-1, hidden)
    ref.assert_close(y_rows.grad, dy_rows_ref, dtype, "d y_rows")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.randn(0, 8, device=on(device), requires_grad=True)
    weights, ids = moe.moe_route(logits, 2)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)
    x = torch.randn(0, 32, device=on(device), requires_grad=True)
    x_perm, offsets, row_map = moe.moe_permute(x, ids, 8)
    assert x_perm.shape == (0, 32) and row_map.shape == (0,) and offsets.tolist() == [0] * 9
    y = moe.moe_unpermute(x_perm, row_map, weights)
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 32) and logits.grad.shape == (0, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k,hidden", [(37, 8, 2, 127), (20, 3, 1, 64), (16, 64, 8, 24)])
def test_gradients(tokens, experts, top_k, hidden, dtype, device):
    """Route, permute, a per-expert scaling, unpermute: every gradient against
    autograd through the float32 reference."""
    _check_gradients(tokens, experts, top_k, hidden, dtype, device)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gradients_with_grid_stride_loops(device):
    """Every kernel of moe_route.cu strides over its tokens or rows with a
    grid capped at 2^20 blocks, so a block works more than once only past
    that, beyond any test's size. The emulated GPU is given a cap of 2 blocks
    instead (emu::Device::max_grid), so each block walks many tokens and rows:
    the weight gradient's block reduction runs back to back in one block and
    must not overwrite the partial sums a slower warp still reads
    (block_sum's first barrier). More tokens than one route-backward block."""
    if device == "emu":
        emu_configure(max_grid=2)
    _check_gradients(520, 8, 2, 8, torch.bfloat16, device)


def _check_gradients(tokens, experts, top_k, hidden, dtype, device):
    g = torch.Generator().manual_seed(4)
    logits = _tie_free_logits(tokens, experts, dtype, device) * 0.25
    x = torch.randn(tokens, hidden, generator=g).to(dtype).to(on(device))
    dy = torch.randn(tokens, hidden, generator=g).to(dtype).to(on(device))
    scale = (torch.arange(experts, device=on(device), dtype=torch.float32) + 1) / 4

    def ours(logits, x):
        weights, ids = moe.moe_route(logits, top_k)
        x_perm, offsets, row_map = moe.moe_permute(x, ids, experts)
        per_row = scale.repeat_interleave(offsets[1:] - offsets[:-1])
        y_rows = (x_perm.float() * per_row[:, None]).to(dtype)
        return moe.moe_unpermute(y_rows, row_map, weights)

    def expert(e, rows):
        # ours rounds y_rows to dtype; so does the reference, straight through,
        # so that the logit gradient (dy . y_rows) sees the same values.
        r = rows * scale[e]
        return r + (r.to(dtype).float() - r).detach()

    def reference(logits, x):
        weights, ids = route_mistral(logits, top_k)
        return moe_ref(x, weights, ids, experts, expert)

    leaves = [t.clone().requires_grad_(True) for t in (logits, x)]
    y = ours(*leaves)
    y.backward(dy)
    leaves_ref = [t.float().requires_grad_(True) for t in (logits, x)]
    y_ref = reference(*leaves_ref)
    y_ref.backward(dy.float())
    ref.assert_close(y, y_ref, dtype, "y", scale=y_ref.abs().max().item() + 1e-3)
    # Terms of dx are dy * w * scale; of d logits, dy * y_rows summed over hidden.
    dx_scale = dy.float().abs().max().item() * scale.max().item()
    ref.assert_close(leaves[1].grad, leaves_ref[1].grad, dtype, "dx", scale=dx_scale)
    dl_scale = (dy.float().abs() * x.float().abs()).sum(-1).max().item() * scale.max().item()
    ref.assert_close(leaves[0].grad, leaves_ref[0].grad, dtype, "d logits", scale=dl_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_gradients(dtype, device):
    g = torch.Generator().manual_seed(5)
    tokens, top_k, hidden = 29, 3, 67
    row_map = torch.randperm(tokens * top_k, generator=g).to(torch.int32).to(on(device))
    y_rows = torch.randn(tokens * top_k, hidden, generator=g).to(dtype).to(on(device))
    weights = torch.rand(tokens, top_k, generator=g).to(on(device))
    dy = torch.randn(tokens, hidden, generator=g).to(dtype).to(on(device))

    leaves = [y_rows.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
    moe.moe_unpermute(leaves[0], row_map, leaves[1]).backward(dy)
    leaves_ref = [y_rows.float().requires_grad_(True), weights.clone().requires_grad_(True)]
    gathered = leaves_ref[0][row_map.long()].view(tokens, top_k, hidden)
    (leaves_ref[1][..., None] * gathered).sum(1).backward(dy.float())
    ref.assert_close(leaves[0].grad, leaves_ref[0].grad, dtype, "d y_rows")
    dw_scale = (dy.float().abs()[:, None] * gathered.abs()).sum(-1).max().item()
    ref.assert_close(leaves[1].grad, leaves_ref[1].grad, torch.float32, "d weights", scale=dw_scale)


# ---- bad input and sizes --------------------------------------------------------

L = torch.randn(4, 8)
X = torch.randn(4, 16)
IDS = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)
W = torch.full((4, 2), 0.5)
RM = torch.arange(8, dtype=torch.int32)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: moe.moe_route(L, 0), ValueError, "top_k must be an integer in \\[1, num_experts = 8\\]"),
        (lambda: moe.moe_route(L, 9), ValueError, "top_k must be"),
        (lambda: moe.moe_route(L, -1), ValueError, "top_k must be"),
        (lambda: moe.moe_route(L.double(), 2), TypeError, "router_logits must have dtype"),
        (lambda: moe.moe_route(L.t(), 2), ValueError, "router_logits must be contiguous"),
        (lambda: moe.moe_route(torch.randn(4, 257), 2), ValueError, "1 to 256 experts"),
        (lambda: moe.moe_permute(X, IDS.long(), 8), TypeError, "expert_ids must have dtype"),
        (lambda: moe.moe_permute(X, IDS[:3], 8), ValueError, "expert_ids must have shape \\(tokens = 4"),
        (lambda: moe.moe_permute(X, IDS.flatten(), 8), ValueError, "expert_ids must have at least 2"),
        (lambda: moe.moe_permute(X, IDS, 0), ValueError, "num_experts must be"),
        (lambda: moe.moe_permute(X, IDS, 1), ValueError, "exceeds num_experts = 1"),
        (lambda: moe.moe_permute(X, IDS, 6), ValueError, "expert_ids\\[3, 0\\] = 6 is outside \\[0, num_experts = 6\\)"),
        (lambda: moe.moe_permute(X, -IDS, 8), ValueError, "is outside"),
        (lambda: moe.moe_permute(X.int(), IDS, 8), TypeError, "x must have dtype"),
        (lambda: moe.moe_permute(X.t(), IDS[:, :1].repeat(4, 1), 8), ValueError, "x must be contiguous"),
        (lambda: moe.moe_permute(X, IDS.t().contiguous().t(), 8), ValueError, "expert_ids must be contiguous"),
        (lambda: moe.moe_permute(X, IDS.to("meta"), 8), ValueError, "expert_ids is on 'meta'"),
        (lambda: moe.moe_unpermute(X.repeat(2, 1), RM, W.half()), TypeError, "weights must have dtype"),
        (lambda: moe.moe_unpermute(X, RM, W), ValueError, "y_rows has 4 rows"),
        (lambda: moe.moe_unpermute(X.repeat(2, 1), RM[:7], W), ValueError, "row_map must have shape \\(8,\\)"),
        (lambda: moe.moe_unpermute(X.repeat(2, 1), RM.long(), W), TypeError, "row_map must have dtype"),
        (lambda: moe.moe_unpermute(X.repeat(2, 1), RM + 1, W), ValueError, "row_map holds a row outside"),
        (lambda: moe.moe_unpermute(X.repeat(2, 1), RM, W.to("meta")), ValueError, "weights is on 'meta'"),
        (lambda: moe.moe_unpermute(X.repeat(2, 1), RM, W.t().contiguous().t()), ValueError,
         "weights must be contiguous"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_row_count_beyond_int32_raises_and_int64_elements_pass():
    """T * k rows above 2^31 - 1 are rejected before anything is allocated;
    T * k * H above 2^31 elements is accepted (offsets are int64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2 ** 20, 4096, dtype=torch.bfloat16)
        ids = torch.empty(2 ** 20, 2, dtype=torch.int32)
        x_perm, offsets, row_map = torch.ops.mixkit.moe_permute(x, ids, 8)
        assert x_perm.shape == (2 ** 21, 4096) and x_perm.numel() > 2 ** 31 and offsets.shape == (9,)
        with pytest.raises(ValueError, match="exceeds the int32 row map"):
            torch.ops.mixkit.moe_permute(torch.empty(2 ** 30, 1), torch.empty(2 ** 30, 2, dtype=torch.int32), 8)
        with pytest.raises(ValueError, match="exceeds the int32 row map"):
            torch.ops.mixkit.moe_unpermute(torch.empty(2 ** 31, 1), torch.empty(2 ** 31, dtype=torch.int32),
                                           torch.empty(2 ** 30, 2))
    # _core re-checks what its kernels rely on.
    with pytest.raises(ValueError, match="exceeds the int32 row map"):
        _core.moe_gather(0, 0, 0, 0, 8, 8, 0, 8, 0, 0, 2 ** 30, 2, 64)
    with pytest.raises(ValueError, match="top_k must be in \\[1, experts\\]"):
        _core.moe_route(0, 0, 0, 0, 8, 8, 8, 4, 8, 9, True)
    with pytest.raises(ValueError, match="null"):
        _core.moe_permute(0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 4, 2, 16, 8)


# ---- torch.library, torch.compile, CUDA graphs ------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = _tie_free_logits(6, 8, torch.float32, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.mixkit.moe_route.default, (logits, 2))
    torch.library.opcheck(torch.ops.mixkit.moe_route.default, (logits, 3, False))
    weights, ids = moe.moe_route(logits.detach(), 2)
    x = torch.randn(6, 24, device=on(device), requires_grad=True)
    torch.library.opcheck(torch.ops.mixkit.moe_permute.default, (x, ids, 8))
    _, _, row_map = moe.moe_permute(x.detach(), ids, 8)
    y_rows = torch.randn(12, 24, device=on(device), requires_grad=True)
    torch.library.opcheck(torch.ops.mixkit.moe_unpermute.default, (y_rows, row_map, weights.requires_grad_(True)))


def _moe_block(logits, x, scale, top_k):
    """route -> permute -> per-expert row scaling (a grouped-GEMM stand-in) -> unpermute."""
    weights, ids = moe.moe_route(logits, top_k)
    x_perm, offsets, row_map = moe.moe_permute(x, ids, scale.shape[0])
    rows = torch.arange(x_perm.shape[0], device=x.device)
    expert_of_row = torch.searchsorted(offsets[1:], rows, right=True)
    y_rows = x_perm * scale[expert_of_row][:, None]
    return moe.moe_unpermute(y_rows, row_map, weights)


def test_torch_compile_fullgraph():
    logits = _tie_free_logits(24, 8, torch.float32, "cpu")
    x = torch.randn(24, 40)
    scale = torch.rand(8) + 0.5
    eager = [t.clone().requires_grad_(True) for t in (logits, x)]
    comp = [t.clone().requires_grad_(True) for t in (logits, x)]
    y_eager = _moe_block(*eager, scale, 2)
    y_comp = torch.compile(_moe_block, fullgraph=True)(*comp, scale, 2)
    torch.testing.assert_close(y_comp, y_eager)
    y_eager.sum().backward()
    y_comp.sum().backward()
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    logits = _tie_free_logits(256, 8, torch.bfloat16, "cuda")
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    scale = torch.rand(8, device="cuda") + 0.5
    expected = _moe_block(logits, x, scale, 2)
    graph, out = capture_cuda_graph(lambda: _moe_block(logits, x, scale, 2))
    logits.copy_(_tie_free_logits(256, 8, torch.bfloat16, "cuda", seed=7))
    graph.replay()
    torch.testing.assert_close(out, _moe_block(logits, x, scale, 2), rtol=0, atol=0)
    assert not torch.equal(out, expected)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_out_of_range_ids_stay_in_bounds(device):
    """The GPU cannot raise without a host sync: bad ids go to a trailing
    bucket after offsets[E], flagged by offsets[E] < T * k."""
    ids = torch.tensor([[0, 9], [-1, 2], [2, 0]], dtype=torch.int32, device=on(device))
    x = torch.arange(3 * 8, dtype=torch.float32, device=on(device)).view(3, 8)
    x_perm, offsets, row_map = moe.moe_permute(x, ids, 3)
    assert offsets.tolist() == [0, 2, 2, 4]
    assert row_map.tolist() == [0, 4, 5, 2, 3, 1]
    assert torch.equal(x_perm[4], x[0]) and torch.equal(x_perm[5], x[1])


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_cpu_bitwise_on_indices(dtype, device):
    """ids, offsets and row_map are exact on both backends; weights agree to
    float32 rounding (expf vs std::exp). (The emulated GPU: a narrower row,
    since the row copies are checked above.)"""
    logits = torch.randint(-3, 4, (5000, 8)).to(dtype)
    x = torch.randn(5000, 4096 if device == "cuda" else 24).to(dtype)
    from mixkit._backend import emulate
    with emulate(False):
        w_cpu, ids_cpu = moe.moe_route(logits, 2)
        cpu = moe.moe_permute(x, ids_cpu, 8)
    w_gpu, ids_gpu = moe.moe_route(logits.to(on(device)), 2)
    assert torch.equal(ids_gpu.cpu(), ids_cpu)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-6, atol=1e-7)
    gpu = moe.moe_permute(x.to(on(device)), ids_gpu, 8)
    for a, b in zip(gpu, cpu):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("bad, exc", [(float("inf"), ValueError), (float("nan"), ValueError), (2.5, ValueError),
                                      ("8", TypeError), (None, TypeError)])
def test_non_integer_counts_raise_type_or_value_error(bad, exc):
    """float('inf') once escaped as OverflowError from int(); every
    non-integer count names its argument."""
    import mixkit.ops as ops

    x = torch.randn(4, 8)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(exc, match="moe_permute: num_experts"):
        ops.moe_permute(x, ids, bad)
    with pytest.raises(exc, match="moe_route: top_k"):
        ops.moe_route(torch.randn(4, 8), bad)
