import os

import pytest

from mixkit import _core
from mixkit._backend import emulate, has_gpu

# Every op test runs on the CPU backend, on the GPU backend where one is
# present (`gpu` marker, `pytest -m gpu`), and on the emulated GPU where _core
# is an emulated build (-DMIXKIT_EMULATE=ON; `emu` marker, `pytest -m emu`):
# the GPU kernels' own code on CPU tensors, with the GPU path's checks.
EMULATED = "emu" in _core.backends()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
if EMULATED:
    DEVICES.append(pytest.param("emu", marks=pytest.mark.emu))
# The devices that run the GPU kernels: a test of GPU-only behaviour (the
# kernels' limits, their launch shapes) runs on both.
GPU_DEVICES = DEVICES[1:]


def _warp() -> int:
    return _core.build_info()["warp_size"] if EMULATED else 0


def kernel_devices():
    """(device, kernel) parameters: every device with its default kernels,
    and with the sm_80 kernels forced (MIXKIT_FORCE_SM80) where the device
    also has Hopper ones: a CUDA GPU, and the warp-32 emulated GPU (an
    H100). The warp-64 emulated GPU runs the AMD kernels: no sm_80 there."""
    out = [pytest.param("cpu", "default", id="cpu-default")]
    for kernel in ("default", "sm80"):
        out.append(pytest.param("cuda", kernel, marks=pytest.mark.gpu, id=f"cuda-{kernel}"))
    if EMULATED:
        for kernel in ("default", "sm80") if _warp() == 32 else ("default",):
            out.append(pytest.param("emu", kernel, marks=pytest.mark.emu, id=f"emu-{kernel}"))
    return out


@pytest.fixture
def force_kernel(monkeypatch):
    """force_kernel(kernel): "sm80" sets MIXKIT_FORCE_SM80 for the test."""
    def force(kernel):
        if kernel == "sm80":
            monkeypatch.setenv("MIXKIT_FORCE_SM80", "1")
    return force


def on(device: str) -> str:
    """The torch device of a test's tensors: the emulated GPU works on CPU tensors."""
    return "cpu" if device == "emu" else device


def gpu(device: str) -> bool:
    """Whether a test device runs the GPU kernels (and their limits: bf16/f16, head dims 64/128)."""
    return device in ("cuda", "emu")


# The emulated device: an H100 (132 SMs, capability 9.0) at warp 32, so the
# split counts and kernel choices follow the real logic; MI250X's GCD (110
# CUs) at warp 64. MIXKIT_EMU_SCHEDULE picks the order warps and lanes run in
# between synchronisation points: forward, reverse or random:SEED (CI runs
# two). The race checker is on unless MIXKIT_EMU_RACECHECK=0: a race fails
# the op with a RuntimeError naming the kernel, the lines and the threads.
_SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}


def emu_configure(**overrides) -> None:
    wave64 = _core.build_info()["warp_size"] == 64
    name, _, seed = os.environ.get("MIXKIT_EMU_SCHEDULE", "forward").partition(":")
    args = dict(sm_count=110 if wave64 else 132, capability=90, blocks_per_sm=0,
                schedule=_SCHEDULES[name], seed=int(seed or 0), mutation=0,
                racecheck=os.environ.get("MIXKIT_EMU_RACECHECK", "1") != "0")
    args.update(overrides)
    _core.emu_configure(**args)


@pytest.fixture(autouse=True)
def _emulated_device(request):
    """Runs a test whose `device` is "emu" inside mixkit._backend.emulate()."""
    callspec = getattr(request.node, "callspec", None)
    if not (callspec and callspec.params.get("device") == "emu"):
        yield
        return
    emu_configure()
    with emulate():
        yield
    emu_configure()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA or ROCm GPU and the matching mixkit backend")
    config.addinivalue_line("markers", "emu: runs the GPU kernels on the emulated GPU (an emulated build of _core)")
    # Whole-program tests (subprocess training runs, multi-process gloo
    # groups) that take tens of seconds: the README's test command runs them;
    # CI's second pass against the installed wheels leaves them out.
    config.addinivalue_line("markers", "slow: a whole-program test of tens of seconds")


# GPU tests of what the emulated GPU does not have, by test function: CUDA
# graph capture and replay, CUDA streams, tensors on two devices, CUDA-event
# timing. Every other test with a `gpu` case has an `emu` case as well
# (checked at collection in an emulated build, below).
NO_EMU_CASE = {
    "tests/test_flash_attn.py::test_cuda_graph_capture_and_replay": "CUDA graph capture",
    "tests/test_decode.py::test_cuda_graph_capture_of_append_and_decode": "CUDA graph capture",
    "tests/test_moe_mlp.py::test_cuda_graph_capture_moe_mlp_forward": "CUDA graph capture",
    "tests/test_moe_route.py::test_cuda_graph_capture_and_replay": "CUDA graph capture",
    "tests/test_library.py::test_cuda_graph_capture_and_replay": "CUDA graph capture",
    "tests/test_models.py::test_cuda_graph_decode_matches_eager": "CUDA graph capture",
    "tests/test_attn_variants.py::test_cuda_graph_decode_with_sinks_and_softcap": "CUDA graph capture",
    "tests/test_norms.py::test_gpu_matches_cpu_and_second_device_stream": "a second CUDA stream",
    "tests/test_bad_input.py::test_gpu_mixed_devices": "tensors on two devices",
    "tests/test_bench_train.py::test_tiny_cuda": "CUDA-event timing, fused CUDA AdamW, peak memory",
    "tests/test_bench_models.py::test_tiny_models_on_gpu": "CUDA-event timing and CUDA graphs",
}


def _check_emu_cases(items):
    """Every test function with a `gpu` case has an `emu` case, or a reason in NO_EMU_CASE."""
    marks = {}
    for item in items:
        name = item.nodeid.split("[")[0]
        marks.setdefault(name, set()).update(m for m in ("gpu", "emu") if m in item.keywords)
    missing = sorted(n for n, m in marks.items() if "gpu" in m and "emu" not in m and n not in NO_EMU_CASE)
    if missing:
        raise pytest.UsageError("GPU tests without an emulated-GPU case (add one, or a reason to "
                                f"conftest.NO_EMU_CASE): {', '.join(missing)}")


def pytest_collection_modifyitems(config, items):
    if EMULATED:
        _check_emu_cases(items)
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU and a mixkit build with its backend")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
