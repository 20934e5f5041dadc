"""Chunked prefill (prefill_attn) plus token-by-token decode against one
full flash_attn over the whole sequence with the same window: the test
that catches the "garbage past the window" bugs other engines shipped.

flash_attn itself is held to a float64 reference in test_flash_attn.py, so
here the full-sequence flash_attn is the reference. On the CPU both sides
run float32 math over the same keys in a different blocking, so they agree
to float32 summation error (1e-5); on the GPU the rounding of each output to
bfloat16 allows one bf16 step (2^-8 relative) plus summation order.
"""
import pytest
import torch

import mixkit.ops as ops
from conftest import DEVICES, on
import tiles


def _tol(device):
    return dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1.6e-2, atol=1.6e-2)


# (B, H, Hkv, D, W, C, prompt, total): prompts shorter than, equal to, one
# past and several times the window; C = W (Mistral), C > W, and no window
# (C = the whole sequence); GQA groups 1, 3, 4, 8.
CASES = [
    (2, 6, 2, 64, 16, 16, 37, 60),
    (1, 8, 1, 64, 16, 16, 16, 40),
    (1, 4, 4, 128, 32, 32, 33, 70),
    (2, 3, 1, 64, 8, 20, 5, 30),
    (1, 8, 2, 64, None, 64, 40, 64),
    # tiles.prefill_design: chunks at the attention kernels' largest query tile.
    *tiles.prefill_design(),
]


@pytest.mark.parametrize("b,h,hkv,d,w,c,prompt,total", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_then_decode_equals_full_attention(b, h, hkv, d, w, c, prompt, total, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, total, h, d, generator=g).to(dtype).to(on(device))
    k = torch.randn(b, total, hkv, d, generator=g).to(dtype).to(on(device))
    v = torch.randn(b, total, hkv, d, generator=g).to(dtype).to(on(device))
    full = ops.flash_attn(q, k, v, causal=True, window=w)

    # The cache starts as NaN: reading a slot that was never written shows.
    k_cache = torch.full((b, c, hkv, d), float("nan"), dtype=dtype, device=on(device))
    v_cache = torch.full_like(k_cache, float("nan"))
    chunk = w or prompt
    outs = []
    for start in range(0, prompt, chunk):
        end = min(start + chunk, prompt)
        outs.append(ops.prefill_attn(q[:, start:end], k[:, start:end], v[:, start:end], k_cache, v_cache,
                                     start, window=w))
    for pos in range(prompt, total):
        positions = torch.full((b, 1), pos, dtype=torch.int64, device=on(device))
        ops.kv_cache_append(k[:, pos:pos + 1], v[:, pos:pos + 1], k_cache, v_cache, positions)
        seqlens = torch.full((b,), pos + 1, dtype=torch.int32, device=on(device))
        outs.append(ops.decode_attn(q[:, pos].contiguous(), k_cache, v_cache, seqlens, window=w)[:, None])
    got = torch.cat(outs, 1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), full.float(), **_tol(device))


def test_prefill_rejects_bad_chunks():
    q = torch.randn(1, 8, 2, 64)
    k = torch.randn(1, 8, 1, 64)
    cache = torch.zeros(1, 4, 1, 64)
    with pytest.raises(ValueError, match="at most the window"):
        ops.prefill_attn(q, k, k, cache, cache.clone(), 0, window=4)
    with pytest.raises(ValueError, match="whole sequence"):
        ops.prefill_attn(q, k, k, cache, cache.clone(), 0)
    with pytest.raises(ValueError, match="needs the 5 tokens"):
        ops.prefill_attn(q[:, :2], k[:, :2], k[:, :2], cache, cache.clone(), 9, window=6)
    with pytest.raises(ValueError, match="start_pos"):
        ops.prefill_attn(q[:, :2], k[:, :2], k[:, :2], cache, cache.clone(), -1, window=4)


def test_prefill_non_tensor_arguments_raise_type_error():
    q = torch.randn(1, 4, 2, 8)
    cache = torch.zeros(1, 8, 2, 8)
    with pytest.raises(TypeError, match="prefill_attn: q must be a torch.Tensor, got float"):
        ops.prefill_attn(1.0, q, q, cache, cache, 0)
    with pytest.raises(TypeError, match="prefill_attn: k_cache must be a torch.Tensor, got NoneType"):
        ops.prefill_attn(q, q, q, None, cache, 0)
