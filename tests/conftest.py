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


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU and a mixkit build with its backend")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
