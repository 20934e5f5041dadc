"""rms_norm, rms_norm_residual and layer_norm against float32 references."""
import pytest
import torch

import mixkit.ops as ops
import reference as ref
from conftest import DEVICES, GPU_DEVICES, emu_configure, on
from mixkit._backend import launch_args
import tiles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Hidden sizes: 1 and odd sizes hit the scalar path and partial warps; 64/128
# are per-head norms; 4096 and 5120 are Mistral/Llama hidden sizes; 4100 is
# not a multiple of 8 (scalar path over many lanes).
SHAPES = [(1, 1), (3, 7), (17, 64), (5, 2, 127), (113, 128), (4, 1000), (9, 4096), (3, 4100), (2, 5120)]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(on(device))
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype).to(on(device))
    r = torch.randn(shape, generator=g).to(dtype).to(on(device))
    dy = torch.randn(shape, generator=g).to(dtype).to(on(device))
    return x, w, r, dy


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out[0], dy)
    return [o.detach() for o in out], [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype, device):
    x, w, _, dy = _inputs(shape, dtype, device)
    (y,), (dx, dw) = _grads(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w), dy)
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda x, w: ref.rms_norm(x, w, 1e-5), (x, w), dy.float())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    ref.assert_close(y, y_ref, dtype, "y")
    ref.assert_close(dx, dx_ref, dtype, "dx", scale=ref.norm_grad_scale(x, dy, w))
    ref.assert_close(dw, dw_ref, dtype, "dw")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 64), (113, 128), (9, 4096), (3, 4100)])
def test_rms_norm_residual(shape, dtype, device):
    x, w, r, dy = _inputs(shape, dtype, device)
    dh = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(on(device))

    def fused(x, r, w):
        return ops.rms_norm_residual(x, r, w, 1e-6)

    def unfused(x, r, w):
        # h is rounded to dtype, as the op documents, but the rounding is kept
        # out of the float32 gradient path (straight through).
        h32 = x.float() + r.float()
        h = h32 + (h32.to(dtype).float() - h32).detach()
        return ref.rms_norm(h, w, 1e-6), h

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, w)]
    y, h = fused(*leaves)
    torch.autograd.backward((y, h), (dy, dh))
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in (x, r, w)]
    y_ref, h_ref = unfused(*leaves_ref)
    torch.autograd.backward((y_ref, h_ref), (dy.float(), dh.float()))

    assert torch.equal(h, h_ref.to(dtype)), "h must equal x + residual rounded to the input dtype"
    ref.assert_close(y, y_ref, dtype, "y")
    dx_scale = ref.norm_grad_scale(h, dy, w) + dh.abs().max().item()
    for name, a, b in zip(("dx", "dresidual"), [t.grad for t in leaves], [t.grad for t in leaves_ref]):
        ref.assert_close(a, b, dtype, name, scale=dx_scale)
    ref.assert_close(leaves[2].grad, leaves_ref[2].grad, dtype, "dw")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape, dtype, device):
    x, _, _, dy = _inputs(shape, dtype, device)
    x = x + 3.0  # a non-zero mean exercises the centred two-pass variance
    (y,), (dx,) = _grads(lambda x: ops.layer_norm(x, 1e-5), (x,), dy)
    (y_ref,), (dx_ref,) = _grads(lambda x: ref.layer_norm(x, 1e-5), (x.float(),), dy.float())
    ref.assert_close(y, y_ref, dtype, "y")
    ref.assert_close(dx, dx_ref, dtype, "dx", scale=ref.norm_grad_scale(x, dy, centered=True))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp32_summation(device):
    """Squares summed in bf16 would lose the small entries next to large ones;
    float32 accumulation keeps y accurate (the conventions' model-killing bug)."""
    x = torch.full((2, 4096), 0.01)
    x[:, 0] = 30.0
    x = x.to(torch.bfloat16).to(on(device))
    w = torch.ones(4096, dtype=torch.bfloat16, device=on(device))
    ref.assert_close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), torch.bfloat16, "y")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_input(dtype, device):
    """A contiguous view one element into its storage cannot use 16-byte loads."""
    buf = torch.randn(1 + 6 * 256).to(dtype).to(on(device))
    x = buf[1:].view(6, 256)
    w = torch.randn(256).to(dtype).to(on(device))
    ref.assert_close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype, "y")
    ref.assert_close(ops.layer_norm(x), ref.layer_norm(x, 1e-5), dtype, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.empty(0, 4, 64, device=on(device), requires_grad=True)
    w = torch.ones(64, device=on(device), requires_grad=True)
    y = ops.rms_norm(x, w)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(64, device=on(device)))
    assert ops.layer_norm(x).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_propagates(device):
    x = torch.randn(3, 64, device=on(device))
    x[1, 5] = float("nan")
    y = ops.rms_norm(x, torch.ones(64, device=on(device)))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 16384), (torch.bfloat16, 32768), (torch.float16, 16383)])
def test_gpu_widest_rows(dtype, hidden, device):
    x, w, _, dy = _inputs((3, hidden), dtype, device)
    (y,), (dx, dw) = _grads(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w), dy)
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda x, w: ref.rms_norm(x, w, 1e-5), (x, w), dy.float())
    ref.assert_close(y, y_ref, dtype, "y")
    ref.assert_close(dx, dx_ref, dtype, "dx", scale=ref.norm_grad_scale(x, dy, w))
    ref.assert_close(dw, dw_ref, dtype, "dw")


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_rows_too_wide(device):
    x = torch.randn(2, 16385, device=on(device))
    with pytest.raises(ValueError, match="too large"):
        ops.rms_norm(x, torch.ones(16385, device=on(device)))


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_gpu_many_rows_weight_grad(device):
    """More rows than row groups: each group walks several rows and the
    float32 weight-gradient partials must add up. The row groups fill every
    SM once, so the emulated GPU is given one SM, and the row count is read
    from the partials count to be 2.5 times it on any device."""
    from mixkit import _core
    if device == "emu":
        emu_configure(sm_count=1)
    backend, dev, _ = launch_args(torch.empty(0, device=on(device)).device)
    groups = _core.norm_bwd_partials(backend, dev, 2, 1 << 30, 64)
    rows = groups * 5 // 2 + 3
    x, w, _, dy = _inputs((rows, 64), torch.bfloat16, device)
    (_,), (dx, dw) = _grads(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w), dy)
    (_,), (dx_ref, dw_ref) = _grads(lambda x, w: ref.rms_norm(x, w, 1e-5), (x, w), dy.float())
    ref.assert_close(dx, dx_ref, torch.bfloat16, "dx", scale=ref.norm_grad_scale(x, dy, w))
    ref.assert_close(dw, dw_ref, torch.bfloat16, "dw")


@pytest.mark.gpu
def test_gpu_matches_cpu_and_second_device_stream():
    """The GPU backend runs on torch's current stream, not the default one."""
    x, w, _, _ = _inputs((64, 4096), torch.bfloat16, "cpu")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = ops.rms_norm(x.cuda(non_blocking=True), w.cuda(non_blocking=True), 1e-5)
    s.synchronize()
    ref.assert_close(y.cpu(), ops.rms_norm(x, w, 1e-5).float(), torch.bfloat16, "y")


# ---- every block layout the GPU kernels can be launched with -------------------
# The GPU kernels lay a row over `tpr` lanes and put `rpb` rows in a block
# (common/norm.h). A reduction that assumed one row per block whenever a row
# is wider than a warp gave every row of a (tpr = 64, rpb = 2) block the sum
# of both rows on CUDA (hidden 264-512 in 16-bit, 132-256 in float32). The
# layouts below come from the config function itself, so a new one cannot go
# untested, and each row is scaled differently, so a row that reads another
# row's partial sums is wrong by far more than the tolerance.
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _layouts(dtype):
    """{(vec, items, tpr, rpb): the smallest hidden size that gives it} over
    16-byte aligned rows (the scalar layouts come from sizes that are not a
    multiple of the vector width)."""
    from mixkit import _core
    largest = 16384 if dtype == torch.float32 else 32768  # the widest row the kernels take
    seen = {}
    cols = 1
    while cols <= largest:
        try:
            seen.setdefault(_core.norm_gpu_config(_CODES[dtype], cols, True), cols)
        except ValueError:  # wider than the scalar path takes
            pass
        # Layouts change only where a count crosses a power of two, and each
        # spans at least a factor of two in width past 1100: a 1.6 % step
        # (whose residues mod 8 vary) cannot miss one.
        cols += 1 if cols < 1100 else cols // 64
    return dict(sorted(seen.items(), key=lambda kv: kv[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_table_has_no_unsupported_shared_rows(dtype):
    """CPU-runnable: no layout puts two rows wider than a warp into one block
    unless the kernel's reduction supports it (norm_multirow_wide_blocks)."""
    from mixkit import _core
    layouts = _layouts(dtype)
    assert len(layouts) > 20, layouts  # the enumeration itself works
    for warp in (32, 64):
        shared = [k for k in layouts if k[2] > warp and k[3] > 1]
        if warp == 32:
            assert shared, "expected (tpr = 64, rpb = 2) layouts on CUDA"
        assert not shared or _core.norm_multirow_wide_blocks, (
            f"warp {warp}: layouts {shared} put several rows wider than a warp in one block")


def _layout_cases():
    for dtype in DTYPES:
        for (vec, items, tpr, rpb), cols in _layouts(dtype).items():
            yield pytest.param(dtype, cols, id=f"{str(dtype)[6:]}-{cols}-vec{vec}-items{items}-tpr{tpr}-rpb{rpb}")
    # The hidden sizes the bug report named (two 2-warp rows per CUDA block).
    for cols in (384, 512):
        yield pytest.param(torch.bfloat16, cols, id=f"bfloat16-{cols}-reported")


def _tile_cases():
    # tiles.norm_design: every layout at its widest row, with row counts at
    # the boundaries of the layout's rows a block.
    for dtype, rows, cols in tiles.norm_design():
        yield pytest.param(getattr(torch, dtype), cols, rows, id=f"{dtype}-{cols}-rows{rows}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,cols,rows", [pytest.param(*p.values, 5, id=p.id) for p in _layout_cases()] +
                         list(_tile_cases()))
def test_every_block_layout(dtype, cols, rows, device):
    """rms_norm (plain and fused residual) and layer_norm, forward and
    backward, at the smallest hidden size of every layout (5 rows: the last
    block of a two-row layout is half empty) and at the widest, with rows of
    clearly different scale."""
    g = torch.Generator().manual_seed(cols)
    scale = torch.tensor([1.0, 7.0, 0.25, 3.0, 40.0]).repeat(-(-rows // 5))[:rows, None]
    x = (torch.randn(rows, cols, generator=g) * scale).to(dtype).to(on(device))
    w = (1 + 0.5 * torch.randn(cols, generator=g)).to(dtype).to(on(device))
    r = torch.randn(rows, cols, generator=g).to(dtype).to(on(device))
    dy = torch.randn(rows, cols, generator=g).to(dtype).to(on(device))
    (y,), (dx, dw) = _grads(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w), dy)
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda x, w: ref.rms_norm(x, w, 1e-5), (x, w), dy.float())
    ref.assert_close(y, y_ref, dtype, "y")
    ref.assert_close(dx, dx_ref, dtype, "dx", scale=ref.norm_grad_scale(x, dy, w))
    ref.assert_close(dw, dw_ref, dtype, "dw")
    y2, h = ops.rms_norm_residual(x, r, w, 1e-5)
    h_ref = (x.float() + r.float()).to(dtype)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    ref.assert_close(y2, ref.rms_norm(h_ref.float(), w.float(), 1e-5), dtype, "y (residual)")
    (yl,), (dxl,) = _grads(lambda x: ops.layer_norm(x, 1e-5), (x,), dy)
    (yl_ref,), (dxl_ref,) = _grads(lambda x: ref.layer_norm(x, 1e-5), (x.float(),), dy.float())
    ref.assert_close(yl, yl_ref, dtype, "y (layer_norm)")
    ref.assert_close(dxl, dxl_ref, dtype, "dx (layer_norm)", scale=ref.norm_grad_scale(x, dy, centered=True))
