"""Cases that the mutation sweep (tools/mutation_sweep.py) found no test for:
each names the kernel line whose mutant it catches. They run on every
device; on the emulated GPU the race checker is what catches most of them.
"""
import pytest
import torch

import mixkit.ops as ops
from conftest import gpu, kernel_devices, on
from test_flash_attn import _randn, assert_fa_rule, varlen_ref


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=on(device))


@pytest.mark.parametrize("device,kernel", kernel_devices())
def test_grid_stride_over_query_blocks_that_see_no_keys(device, kernel, force_kernel):
    """With max_seqlen_q hints of 1 (as under graph capture, where the host
    cannot check them) one block walks every query block of a sequence. Under
    a causal mask with Sk far below Sq the first query blocks see no key: the
    forward kernels then load Q and no K/V, and the Q copies must be waited
    out before the next query block loads Q again (flash_attn_fwd_sm90.cuh,
    the cp.async wait after the key loop). A sequence with queries and no keys
    does the same."""
    force_kernel(kernel)
    dtype = torch.bfloat16 if gpu(device) else torch.float32
    lens_q, lens_k = [300, 200], [20, 0]
    g = torch.Generator().manual_seed(5)
    q = _randn((sum(lens_q), 2, 64), dtype, device, g)
    k = _randn((sum(lens_k), 1, 64), dtype, device, g)
    v = _randn((sum(lens_k), 1, 64), dtype, device, g)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    # Stamped as checked, as a capture would leave them. The CPU backend
    # checks the lengths on every call: it gets the real ones.
    hint_q, hint_k = (1, 1) if gpu(device) else (max(lens_q), max(lens_k))
    cu_q._mixkit_checked = (cu_q._version, q.shape[0], hint_q)
    cu_k._mixkit_checked = (cu_k._version, k.shape[0], hint_k)
    out, lse = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, hint_q, hint_k, causal=True, return_lse=True)
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    ref64, lse64 = varlen_ref(qc, kc, vc, cu_q.cpu(), cu_k.cpu(), causal=True)
    lowp, _ = varlen_ref(qc, kc, vc, cu_q.cpu(), cu_k.cpu(), causal=True, dtype=dtype)
    assert_fa_rule("out", out.cpu(), ref64, lowp, 2)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(lse64)), "lse -inf pattern"
    seen = torch.isfinite(lse64)
    torch.testing.assert_close(lse.cpu()[seen].double(), lse64[seen], rtol=1e-3, atol=1e-3)
