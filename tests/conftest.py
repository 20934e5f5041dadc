import pytest

from mixkit._backend import has_gpu

# Every op test runs on the CPU backend here and on the GPU backend where one
# is present; GPU cases carry the `gpu` marker so `pytest -m gpu` selects them.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA or ROCm GPU and the matching mixkit backend")
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
