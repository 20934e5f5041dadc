"""rope against an independent float32 reference, in both layouts."""
import pytest
import torch

import mixkit.ops as ops
import reference as ref
from conftest import DEVICES, on
import tiles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, S, Hq, Hkv, D): Mistral's 32/8 GQA at D=128, MQA, group sizes 3 and 5,
# odd token counts, and head dims that are not multiples of 16.
CASES = [(1, 1, 1, 1, 2), (2, 113, 32, 8, 128), (1, 7, 5, 1, 64), (3, 5, 6, 2, 96), (1, 203, 15, 3, 64),
         (2, 3, 4, 4, 10)]


def _qk(b, s, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g).to(dtype).to(on(device))
    k = torch.randn(b, s, hkv, d, generator=g).to(dtype).to(on(device))
    return q, k




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_rope_forward_backward(case, interleaved, dtype, device):
    b, s, hq, hkv, d = case
    q, k = _qk(b, s, hq, hkv, d, dtype, device)
    pos = torch.arange(s, device=on(device)) + 11
    theta = 1e6 if d == 128 else 1e4
    q_, k_ = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qo, ko = ops.rope(q_, k_, pos, theta, interleaved=interleaved)
    ref.assert_close(qo, ref.rope(q, pos, theta, interleaved), dtype, "q")
    ref.assert_close(ko, ref.rope(k, pos, theta, interleaved), dtype, "k")

    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    q32, k32 = q.float().requires_grad_(True), k.float().requires_grad_(True)
    torch.autograd.backward((ref.rope(q32, pos, theta, interleaved), ref.rope(k32, pos, theta, interleaved)),
                            (gq.float(), gk.float()))
    ref.assert_close(q_.grad, q32.grad, dtype, "dq")
    ref.assert_close(k_.grad, k32.grad, dtype, "dk")


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_agree_under_hf_permutation(device):
    """Half-split RoPE on permuted features equals interleaved RoPE on the
    originals: the equivalence HF's weight converter relies on."""
    q, k = _qk(2, 9, 4, 2, 64, torch.float32, device)
    pos = torch.arange(9, device=on(device))
    p = ref.interleaved_to_half_split(64).to(on(device))
    qi, ki = ops.rope(q, k, pos, interleaved=True)
    qh, kh = ops.rope(q[..., p], k[..., p], pos, interleaved=False)
    torch.testing.assert_close(qh, qi[..., p], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kh, ki[..., p], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_half_split_matches_hf_formula(device):
    """The HF/NeoX rotate_half formulation with HF's float32 cos/sin tables."""
    d, theta = 128, 1e4
    q, k = _qk(1, 50, 3, 1, d, torch.float32, device)
    pos = torch.arange(50, device=on(device))
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float().to(on(device)) / d))
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    qo, _ = ops.rope(q, k, pos, theta)
    torch.testing.assert_close(qo, q * cos + rotate_half(q) * sin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_large_positions_and_batched_positions(pos_dtype, device):
    """Angles come from integer positions in float32, so positions near 32k
    (Mistral's context) still match; (B, S) positions give per-sequence offsets."""
    q, k = _qk(2, 33, 8, 2, 128, torch.bfloat16, device)
    pos = torch.stack((torch.arange(33), torch.arange(33) + 32700)).to(pos_dtype).to(on(device))
    qo, ko = ops.rope(q, k, pos, 1e6)
    ref.assert_close(qo, ref.rope(q, pos, 1e6, False), torch.bfloat16, "q")
    ref.assert_close(ko, ref.rope(k, pos, 1e6, False), torch.bfloat16, "k")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_views_of_fused_qkv(interleaved, device):
    """q and k as views into one (B, S, (Hq + 2Hkv) * D) projection output."""
    b, s, hq, hkv, d = 2, 17, 8, 2, 64
    qkv = torch.randn(b, s, (hq + 2 * hkv) * d, device=on(device), dtype=torch.bfloat16)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(b, s, hq, d), k.view(b, s, hkv, d)
    assert not q.is_contiguous()
    pos = torch.arange(s, device=on(device))
    qo, ko = ops.rope(q, k, pos, interleaved=interleaved)
    assert qo.is_contiguous() and ko.is_contiguous()
    ref.assert_close(qo, ref.rope(q, pos, 1e4, interleaved), torch.bfloat16, "q")
    ref.assert_close(ko, ref.rope(k, pos, 1e4, interleaved), torch.bfloat16, "k")


@pytest.mark.parametrize("device", DEVICES)
def test_odd_offset_falls_back_to_scalar_access(device):
    """A view starting one element into its storage: no 16-byte accesses."""
    buf = torch.randn(1 + 3 * 4 * 64, device=on(device)).to(torch.float16)
    q = buf[1:].view(1, 3, 4, 64)
    k = q[:, :, :2]
    pos = torch.arange(3, device=on(device))
    for interleaved in (False, True):
        qo, ko = ops.rope(q, k, pos, interleaved=interleaved)
        ref.assert_close(qo, ref.rope(q, pos, 1e4, interleaved), torch.float16, "q")
        ref.assert_close(ko, ref.rope(k, pos, 1e4, interleaved), torch.float16, "k")


@pytest.mark.parametrize("tokens,hq,hkv,d,path", list(tiles.rope_design()))
@pytest.mark.parametrize("device", DEVICES)
def test_tile_boundaries(tokens, hq, hkv, d, path, device):
    """tiles.rope_design: for each access path and head dim, token counts at
    the boundaries of the tokens a block, and blocks that walk several
    heads; bfloat16 (float16 has the same access widths). The scalar path
    comes from views one element into their storage, in either layout."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(tokens)
    off = 1 if path == "scalar" else 0
    buf = torch.randn(off + tokens * (hq + hkv) * d, generator=g).to(dtype).to(on(device))
    qk = buf[off:].view(1, tokens, hq + hkv, d)
    q, k = qk[:, :, :hq], qk[:, :, hq:]
    pos = torch.arange(tokens, device=on(device)) * 7 + 3
    interleaved = path == "interleaved" or (path == "scalar" and tokens % 2 == 1)  # both scalar kernels
    qo, ko = ops.rope(q, k, pos, 1e4, interleaved=interleaved)
    ref.assert_close(qo, ref.rope(q, pos, 1e4, interleaved), dtype, "q")
    ref.assert_close(ko, ref.rope(k, pos, 1e4, interleaved), dtype, "k")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_single_token(device):
    q, k = _qk(0, 0, 4, 2, 64, torch.float32, device)
    qo, ko = ops.rope(q, k, torch.zeros(0, dtype=torch.int64, device=on(device)))
    assert qo.shape == q.shape and ko.shape == k.shape
    q, k = _qk(1, 1, 4, 2, 64, torch.float32, device)
    qo, _ = ops.rope(q, k, torch.zeros(1, dtype=torch.int64, device=on(device)))
    torch.testing.assert_close(qo, q)  # position 0 is the identity rotation


# ---- scaled RoPE (linear, YaRN) ------------------------------------------------------

def _hf_table(kind, head_dim, theta, **params):
    """transformers' own frequency table and attention factor for the scaling."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                      max_position_embeddings=4096,
                                      rope_parameters={"rope_type": kind, "rope_theta": theta, **params})
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu")


SCALINGS = [("linear", dict(factor=4.0)),
            ("yarn", dict(factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                          truncate=False)),  # gpt-oss
            ("yarn", dict(factor=8.0, original_max_position_embeddings=2048)),
            ("yarn", dict(factor=4.0, original_max_position_embeddings=1024, attention_factor=0.9, beta_fast=16))]


@pytest.mark.parametrize("kind,params", SCALINGS)
@pytest.mark.parametrize("head_dim", [64, 128, 10])
def test_frequency_table_equals_transformers(kind, params, head_dim):
    table, factor = ops.rope_frequencies(head_dim, 150000.0, {"rope_type": kind, **params})
    hf_table, hf_factor = _hf_table(kind, head_dim, 150000.0, **params)
    assert table.dtype == torch.float32
    assert torch.equal(table, hf_table.float()), (table - hf_table).abs().max()
    assert factor == pytest.approx(hf_factor, rel=1e-12)
    if kind == "yarn":
        assert factor != 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("kind,params", SCALINGS[:2])
def test_scaled_rope_forward_backward(kind, params, interleaved, dtype, device):
    b, s, hq, hkv, d = 2, 37, 6, 2, 64
    q, k = _qk(b, s, hq, hkv, d, dtype, device)
    pos = torch.arange(s, device=on(device)) * 97 + 5  # angles well past one turn
    scaling = {"rope_type": kind, **params}
    table, factor = ops.rope_frequencies(d, 150000.0, scaling)
    q_, k_ = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qo, ko = ops.rope(q_, k_, pos, 150000.0, interleaved=interleaved, scaling=scaling)
    ref.assert_close(qo, ref.rope(q, pos, 150000.0, interleaved, table, factor), dtype, "q")
    ref.assert_close(ko, ref.rope(k, pos, 150000.0, interleaved, table, factor), dtype, "k")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    q32, k32 = q.float().requires_grad_(True), k.float().requires_grad_(True)
    torch.autograd.backward((ref.rope(q32, pos, 150000.0, interleaved, table, factor),
                             ref.rope(k32, pos, 150000.0, interleaved, table, factor)), (gq.float(), gk.float()))
    ref.assert_close(q_.grad, q32.grad, dtype, "dq")
    ref.assert_close(k_.grad, k32.grad, dtype, "dk")


@pytest.mark.parametrize("device", DEVICES)
def test_yarn_matches_hf_rotary_formula(device):
    """gpt-oss's RoPE as transformers applies it: its cos/sin table times the
    attention factor, half-split. And plain RoPE (no scaling) differs from it."""
    d, theta, scaling = 64, 150000.0, {"rope_type": "yarn", **SCALINGS[1][1]}
    inv_freq, attention = _hf_table("yarn", d, theta, **SCALINGS[1][1])
    q, k = _qk(1, 50, 3, 1, d, torch.float32, device)
    pos = torch.arange(50, device=on(device)) * 31
    freqs = pos.float()[:, None] * inv_freq.to(on(device))[None, :]
    cos, sin = (freqs.cos() * attention)[None, :, None, :], (freqs.sin() * attention)[None, :, None, :]
    x0, x1 = q[..., : d // 2], q[..., d // 2:]
    expect = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    qo, _ = ops.rope(q, k, pos, theta, scaling=scaling)
    torch.testing.assert_close(qo, expect, rtol=1e-5, atol=2e-5)
    assert (ops.rope(q, k, pos, theta)[0] - expect).abs().max() > 0.1


def test_scaling_bad_input():
    q, k = _qk(1, 3, 2, 1, 16, torch.float32, "cpu")
    pos = torch.arange(3)
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported"):
        ops.rope(q, k, pos, scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="does not take 'low_freq_factor'"):
        ops.rope(q, k, pos, scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="factor"):
        ops.rope(q, k, pos, scaling={"rope_type": "linear", "factor": float("nan")})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        ops.rope(q, k, pos, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(TypeError, match="scaling must be a dict"):
        ops.rope(q, k, pos, scaling=2.0)
    with pytest.raises(ValueError, match="inv_freq must have shape"):
        torch.ops.mixkit.rope(q, k, pos, 1e4, False, False, torch.ones(3), 1.0)
    with pytest.raises(TypeError, match="inv_freq must have dtype"):
        torch.ops.mixkit.rope(q, k, pos, 1e4, False, False, torch.ones(8, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="attention_factor"):
        torch.ops.mixkit.rope(q, k, pos, 1e4, False, False, torch.ones(8), 0.0)
