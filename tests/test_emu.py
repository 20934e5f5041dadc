"""The emulated GPU catches a wrong fragment layout (emulated builds only).

Each emulated tensor-core instruction has a run-time planted error
(`emu::mutation()`, listed in csrc/cuda/emu.cuh): a swapped register, a wrong
lane mapping, a wrong descriptor stride. With it, the real kernels (flash
attention forward and backward, the grouped GEMM and its weight gradient) must
give wrong answers, and without it right ones: so the kernel tests do test
the layouts, and the instruction models are what the kernels depend on.
"""
import pytest
import torch

import mixkit.ops as ops
from conftest import EMULATED, emu_configure
from test_flash_attn import attention_ref
from mixkit import _core
from mixkit._backend import emulate

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not EMULATED, reason="needs an emulated build of _core")]

WARP = _core.build_info()["warp_size"] if EMULATED else 0
# (mutation, capability): which kernel family it plants an error in.
SM80 = [(1, 80), (2, 80), (3, 80), (4, 80)]
SM90 = [(10, 90), (11, 90), (12, 90), (13, 90), (14, 90), (15, 90)]
MFMA = [(20, 90), (21, 90), (22, 90)]
MUTATIONS = (SM80 + SM90) if WARP == 32 else MFMA


def _errors():
    """Relative max errors of the kernels against float64 references; every
    shape has partial tiles (70 rows, K = 72, N = 136) so zero-filled copies
    matter."""
    g = torch.Generator().manual_seed(0)
    errs = {}
    q, k, v = (torch.randn(1, 70, h, 64, generator=g).bfloat16().requires_grad_() for h in (2, 1, 1))
    out = ops.flash_attn(q, k, v, causal=True)
    dout = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qr, kr, vr, causal=True)[0]
    ref.backward(dout.double())
    for name, got, want in (("attn", out, ref), ("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad),
                            ("dv", v.grad, vr.grad)):
        errs[name] = float((got.double() - want).abs().max() / want.abs().max())
    offsets = torch.tensor([0, 37, 37, 70], dtype=torch.int64)
    a = torch.randn(70, 72, generator=g).bfloat16()
    b = torch.randn(3, 72, 136, generator=g).bfloat16()  # N > 64: MN-major B steps by LBO
    c = ops.grouped_gemm(a, b, offsets)
    want = torch.cat([a[s:e].double() @ b[i].double() for i, (s, e) in enumerate(zip(offsets, offsets[1:]))])
    errs["gemm"] = float((c.double() - want).abs().max() / want.abs().max())
    dc = torch.randn(70, 136, generator=g).bfloat16()
    db = ops.grouped_gemm_wgrad(a, dc, offsets)
    want = torch.stack([a[s:e].double().T @ dc[s:e].double() for s, e in zip(offsets, offsets[1:])])
    errs["wgrad"] = float((db.double() - want).abs().max() / want.abs().max())
    return errs


# bf16 inputs with float32 accumulation: a few bf16 units of relative error at
# most (measured ~0.4 %); every planted error is off by tens of per cent.
TOLERANCE = 0.03


@pytest.mark.parametrize("capability", [80, 90] if WARP == 32 else [90])
def test_kernels_pass_without_a_planted_error(capability):
    emu_configure(capability=capability)
    with emulate():
        errs = _errors()
    assert max(errs.values()) < TOLERANCE, errs


@pytest.mark.parametrize("mutation,capability", MUTATIONS)
def test_a_planted_layout_error_fails_a_kernel(mutation, capability):
    emu_configure(capability=capability, mutation=mutation)
    try:
        with emulate():
            errs = _errors()
    except RuntimeError as e:  # the model noticed the misuse itself: also a failure
        errs = {"emulator error": str(e)}
    finally:
        emu_configure()
    bad = {k: v for k, v in errs.items() if not isinstance(v, float) or v > TOLERANCE}
    assert bad, f"mutation {mutation} went unnoticed: {errs}"


def test_configure_rejects_a_negative_grid_cap():
    with pytest.raises(ValueError, match="max_grid must be >= 0"):
        emu_configure(max_grid=-1)
