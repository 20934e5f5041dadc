"""The torch.library layer: opcheck, torch.compile(fullgraph=True), CUDA
graphs, and the build metadata that _core reports."""
import importlib.metadata

import pytest
import torch

import mixkit
import mixkit.ops as ops
from mixkit.bench.harness import capture_cuda_graph
import reference as ref
from conftest import DEVICES, on


def _norm_args(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(dtype).to(on(device))
    w = torch.randn(64, generator=g).to(dtype).to(on(device))
    r = torch.randn(3, 5, 64, generator=g).to(dtype).to(on(device))
    return x, w, r


def _rope_args(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 6, 32, generator=g).to(on(device))
    k = torch.randn(2, 7, 2, 32, generator=g).to(on(device))
    return q, k, torch.arange(7, device=on(device))


def _opcheck_cases(device):
    x, w, r = _norm_args(device)
    q, k, pos = _rope_args(device)
    qkv = torch.randn(2, 7, 10 * 32, device=on(device))
    q_view = qkv[..., : 6 * 32].view(2, 7, 6, 32)
    k_view = qkv[..., 6 * 32: 8 * 32].view(2, 7, 2, 32)
    rstd = torch.rand(3, 5, device=on(device)) + 0.5
    mean = torch.randn(3, 5, device=on(device))
    return {
        "rms_norm": (torch.ops.mixkit.rms_norm, (x.requires_grad_(), w.requires_grad_(), 1e-5)),
        "rms_norm_residual": (torch.ops.mixkit.rms_norm_residual, (x, r.requires_grad_(), w, 1e-5)),
        "layer_norm": (torch.ops.mixkit.layer_norm, (x, 1e-5)),
        "rope": (torch.ops.mixkit.rope, (q.requires_grad_(), k.requires_grad_(), pos, 1e4, False, False)),
        "rope_interleaved_strided": (torch.ops.mixkit.rope, (q_view, k_view, pos, 1e6, True, False)),
        "rms_norm_backward": (torch.ops.mixkit.rms_norm_backward,
                              (torch.randn_like(x), torch.randn_like(x), x.detach(), w.detach(), rstd)),
        "layer_norm_backward": (torch.ops.mixkit.layer_norm_backward, (torch.randn_like(x), x.detach(), mean, rstd)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_opcheck_cases("cpu")))
def test_opcheck(case, device):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def _block(x, residual, w, q, k, pos):
    """One transformer-block's worth of mixkit calls."""
    y, h = ops.rms_norm_residual(x, residual, w, 1e-5)
    qo, ko = ops.rope(q, k, pos, 1e4)
    return ops.rms_norm(y, w, 1e-5).sum() + ops.layer_norm(h).square().sum() + (qo * qo).sum() + ko.sum()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, w, r = _norm_args(device)
    q, k, pos = _rope_args(device)
    inputs = [x, r, w, q, k]

    eager = [t.clone().requires_grad_(True) for t in inputs]
    out = _block(*eager, pos)
    out.backward()

    compiled_fn = torch.compile(_block, fullgraph=True)
    comp = [t.clone().requires_grad_(True) for t in inputs]
    out_c = compiled_fn(*comp, pos)
    out_c.backward()

    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    x, w, r = _norm_args("cuda", torch.bfloat16)
    q, k, pos = _rope_args("cuda")
    static = [x.clone(), r.clone(), q.clone()]

    def step():
        y, h = ops.rms_norm_residual(static[0], static[1], w, 1e-5)
        qo, _ = ops.rope(static[2], k, pos, 1e4)
        return y, h, qo

    graph, outs = capture_cuda_graph(step)

    for seed in range(3):  # new inputs copied into the captured buffers
        g = torch.Generator().manual_seed(seed)
        for t in static:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        graph.replay()
        torch.cuda.synchronize()
        expect = step()
        for got, want in zip(outs, expect):
            assert torch.equal(got, want)


def test_build_info():
    info = mixkit._core.build_info()
    assert info["version"] == mixkit.__version__
    try:  # one version, from pyproject.toml, when installed through pip
        assert importlib.metadata.version("mixkit") == info["version"]
    except importlib.metadata.PackageNotFoundError:
        pass
    assert "cpu" in info["backends"] and info["backends"] == mixkit._core.backends()
    if "cuda" in info["backends"]:
        assert info["cuda_archs"] and info["cuda_version"] and info["warp_size"] == 32
    if "hip" in info["backends"]:
        assert info["hip_archs"] and info["warp_size"] == 64


def test_public_ops_match_reference_in_float64_terms():
    """A smoke test of the public functions' defaults (eps, theta, layout)."""
    x, w, _ = _norm_args("cpu")
    ref.assert_close(ops.rms_norm(x, w), ref.rms_norm(x, w, 1e-6), torch.float32)
    ref.assert_close(ops.layer_norm(x), ref.layer_norm(x, 1e-5), torch.float32)
    q, k, pos = _rope_args("cpu")
    ref.assert_close(ops.rope(q, k, pos)[0], ref.rope(q, pos, 1e4, False), torch.float32)


def test_nn_modules():
    x, w, r = _norm_args("cpu")
    norm = mixkit.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), ops.rms_norm(x, w, 1e-5))
    y, h = norm(x, r)
    torch.testing.assert_close(y, ops.rms_norm(x + r, w, 1e-5))
    norm(x).sum().backward()
    assert norm.weight.grad is not None and [n for n, _ in norm.named_parameters()] == ["weight"]
    ln = mixkit.nn.LayerNorm()
    assert list(ln.parameters()) == []
    torch.testing.assert_close(ln(x), ops.layer_norm(x))


def test_saved_statistics_are_not_differentiable():
    """rstd and mean are outputs of the raw ops only so backward can reuse
    them; differentiating through them must fail loudly, not return zeros."""
    x = torch.randn(3, 64, requires_grad=True)
    _, rstd = torch.ops.mixkit.rms_norm(x, torch.ones(64), 1e-5)
    _, mean, _ = torch.ops.mixkit.layer_norm(x, 1e-5)
    assert not rstd.requires_grad and not mean.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        mean.sum().backward()


@pytest.mark.parametrize("capability, archs, ok", [
    ((8, 0), "80,90a", True),
    ((8, 6), "80-real", True),            # sm_80 SASS runs on later 8.x
    ((8, 9), "80-real,90a-real,90-virtual", True),
    ((9, 0), "80-real,90a-real,90-virtual", True),
    ((7, 5), "80,90a", False),            # older than every target
    ((10, 0), "80-real,90a-real", False),  # SASS only: no PTX to JIT
    ((10, 0), "80-real,90a-real,90-virtual", True),
    ((12, 0), "90a", False),              # compute_90a PTX runs on 9.0 only
    ((12, 0), "80", True),                # compute_80 PTX JITs forward
    ((9, 0), "100a-real", False),
])
def test_cuda_arch_supported(capability, archs, ok):
    assert mixkit._backend.cuda_arch_supported(capability, archs) is ok


def test_arch_mismatch_message(monkeypatch):
    """The message a user on an unsupported GPU sees (faked: no GPU here)."""
    from types import SimpleNamespace

    backend = mixkit._backend
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="Tesla T4", major=7, minor=5, gcnArchName=""))
    monkeypatch.setattr(torch.version, "hip", None)
    archs = {"cuda_archs": "80-real,90a-real,90-virtual", "hip_archs": ""}
    monkeypatch.setattr(backend, "_core", SimpleNamespace(build_info=lambda: archs))
    msg = backend.arch_mismatch(0)
    assert msg.startswith("mixkit was built for sm_80/sm_90a/compute_90 PTX; this GPU (Tesla T4, cuda:0) is sm_75.")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="H100", major=9, minor=0, gcnArchName=""))
    assert backend.arch_mismatch(0) is None
