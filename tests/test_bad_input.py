"""Bad input raises a Python exception that names the argument; nothing
crashes, hangs or silently computes something else."""
import pytest
import torch

import mixkit
import mixkit.ops as ops
from mixkit import _core

X = torch.randn(4, 64)
W = torch.ones(64)
Q = torch.randn(2, 5, 4, 64)
K = torch.randn(2, 5, 2, 64)
POS = torch.arange(5)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        # dtype
        (lambda: ops.rms_norm(X.double(), W.double()), TypeError, "x must have dtype"),
        (lambda: ops.rms_norm(X.to(torch.int32), W), TypeError, "x must have dtype"),
        (lambda: ops.rms_norm(X, W.half()), TypeError, "weight has dtype"),
        (lambda: ops.rms_norm_residual(X, X.half(), W), TypeError, "residual has dtype"),
        (lambda: ops.layer_norm(X.to(torch.int64)), TypeError, "x must have dtype"),
        (lambda: ops.rope(Q.half(), K, POS), TypeError, "k has dtype"),
        (lambda: ops.rope(Q, K, POS.float()), TypeError, "positions must have dtype"),
        (lambda: ops.rms_norm([1.0, 2.0], W), RuntimeError, "argument 'x'"),
        # devices: a real cpu/cuda mix is tested in test_gpu_mixed_devices
        (lambda: ops.rms_norm(X, W.to("meta")), ValueError, "weight is on 'meta'"),
        (lambda: ops.rope(Q, K, POS.to("meta")), ValueError, "positions is on 'meta'"),
        # shapes
        (lambda: ops.rms_norm(X, torch.ones(63)), ValueError, "weight must have shape"),
        (lambda: ops.rms_norm(X, torch.ones(1, 64)), ValueError, "weight must have shape"),
        (lambda: ops.rms_norm(torch.tensor(1.0), W), ValueError, "x must have at least 1"),
        (lambda: ops.rms_norm(torch.ones(4, 0), torch.ones(0)), ValueError, "must be > 0"),
        (lambda: ops.rms_norm_residual(X, X[:2], W), ValueError, "residual must have the shape"),
        (lambda: ops.rope(torch.randn(2, 5, 4, 63), torch.randn(2, 5, 2, 63), POS), ValueError, "must be even"),
        (lambda: ops.rope(Q, torch.randn(2, 5, 2, 32), POS), ValueError, "share the head dimension"),
        (lambda: ops.rope(Q, torch.randn(2, 6, 2, 64), POS), ValueError, "same leading"),
        (lambda: ops.rope(Q, K, torch.arange(6)), ValueError, "do not broadcast"),
        (lambda: ops.rope(Q, K, torch.zeros(3, 2, 5, dtype=torch.int64)), ValueError, "larger than"),
        (lambda: ops.rope(Q[0, 0], K[0, 0], POS), ValueError, "q must have at least 3"),
        (lambda: ops.rope(torch.randn(1, 1, 1, 2048), torch.randn(1, 1, 1, 2048), POS[:1]), ValueError, "in \\[2, 1024\\]"),
        # strides
        (lambda: ops.rms_norm(X.t(), torch.ones(4)), ValueError, "x must be contiguous"),
        (lambda: ops.rms_norm(X, torch.ones(128)[::2]), ValueError, "weight must be contiguous"),
        (lambda: ops.rms_norm_residual(X, torch.randn(64, 4).t(), W), ValueError, "residual must be contiguous"),
        (lambda: ops.rope(torch.randn(2, 5, 64, 4).transpose(-1, -2), K, POS), ValueError, "last dimension of q"),
        # scalars
        (lambda: ops.rms_norm(X, W, eps=-1.0), ValueError, "eps must be"),
        (lambda: ops.layer_norm(X, eps=float("nan")), ValueError, "eps must be"),
        (lambda: ops.rope(Q, K, POS, theta=0.0), ValueError, "theta must be"),
        (lambda: ops.rope(Q, K, POS, theta=float("inf")), ValueError, "theta must be"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_leading_dims_must_flatten():
    """A (B, S) layout whose batch and sequence strides do not combine."""
    q = torch.randn(5, 2, 4, 64).transpose(0, 1)  # (2, 5, 4, 64), batch stride < token stride
    k = torch.randn(2, 5, 2, 64)
    with pytest.raises(ValueError, match="q do not flatten"):
        ops.rope(q, k, POS)


def test_core_rejects_bad_calls_without_crashing():
    """_core is private, but it still validates what its kernels rely on."""
    with pytest.raises(ValueError, match="hidden size"):
        _core.norm_fwd(0, 0, 0, 0, False, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        _core.norm_fwd(0, 0, 0, 7, False, 0, 0, 0, 0, 0, 0, 0, 4, 64, 1e-5)
    with pytest.raises(ValueError, match="null"):
        _core.norm_fwd(0, 0, 0, 0, False, 0, 0, 0, 0, 0, 0, 0, 4, 64, 1e-5)
    with pytest.raises(ValueError, match="overflows"):
        _core.norm_fwd(0, 0, 0, 0, False, 8, 0, 0, 8, 0, 0, 0, 2 ** 40, 2 ** 30, 1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        _core.rope(0, 0, 0, 0, False, 8, 1, 7, 1e4, False, False, 8, 8, 1, 7, 7, 8, 8, 1, 7, 7, 0, 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        _core.norm_fwd(9, 0, 0, 0, False, 0, 0, 0, 0, 0, 0, 0, 0, 64, 1e-5)


@pytest.mark.parametrize("name, code", [("cuda", 1), ("hip", 2)])
def test_missing_backend_is_a_clear_error(name, code):
    if name in mixkit.backends():
        pytest.skip(f"this build has the {name} backend")
    with pytest.raises(RuntimeError, match=f"built without the {name.upper()} backend"):
        _core.norm_fwd(code, 0, 0, 0, False, 0, 0, 0, 0, 0, 0, 0, 0, 64, 1e-5)


def test_unsupported_device_type():
    with pytest.raises(ValueError, match="meta"):
        ops.rms_norm(X.to("meta"), W.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["rms_norm", "residual", "rope"])
def test_gpu_mixed_devices(op):
    x, w = X.cuda(), W.cuda()
    with pytest.raises(ValueError, match="is on cpu but"):
        if op == "rms_norm":
            ops.rms_norm(x, W)
        elif op == "residual":
            ops.rms_norm_residual(x, X, w)
        else:
            ops.rope(Q.cuda(), K.cuda(), POS)
