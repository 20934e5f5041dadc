"""The emulated GPU's Ampere instructions (csrc/cuda/emu_sm80.cuh) against an independent model.

A host program (tests/emu_programs.py: the instruction models on a tiny thread-per-lane
runtime; no GPU, no HIP CPU runtime) runs one warp through each instruction with numpy
operands, and numpy checks the result against the PTX ISA's fragment tables:
- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: "Matrix Fragments for mma.m16n8k16"
  (A a0..a7, B b0..b3, C/D c0..c3 by groupID and threadID_in_group), operands small
  multiples of 1/4 so the float32 result is exact;
- ldmatrix.sync.aligned.m8n8.{x2,x4}[.trans].shared.b16: lanes 8i..8i+7 address the rows
  of matrix i, lane l receives row l/4, columns 2(l%4), 2(l%4)+1 (of the transpose with
  .trans), each row at its own address;
- cp.async.cg 16 with src_bytes 16 or 0 (zero-fill), commit_group, wait_group n: a
  copy lands only once a wait covers its group (the emulator's latest-possible model),
  so reads before the wait see the old bytes.
Misaligned addresses fail the launch, and each planted mutation (emu.cuh, codes 1-4)
changes the answer.
"""
import struct

import numpy as np
import pytest

from emu_programs import host, run


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return host(tmp_path_factory)


def to_bits(x, dtype):
    if dtype == "bf16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(np.float16).view(np.uint16)


def pack_pairs(bits, coords, regs):
    """uint32 registers [32][regs] from element coordinates coords(lane, i) (element i is
    register i // 2, half i % 2)."""
    out = np.zeros((32, regs), np.uint32)
    for lane in range(32):
        for i in range(2 * regs):
            out[lane, i // 2] |= np.uint32(bits[coords(lane, i)]) << np.uint32(16 * (i % 2))
    return out


# ---- mma.m16n8k16: the PTX ISA fragment tables --------------------------------------

def a_coord(lane, i):
    group, tig = lane // 4, lane % 4
    row = group if (i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_coord(lane, i):
    group, tig = lane // 4, lane % 4
    row = tig * 2 + (i & 1) + (8 if i >= 2 else 0)
    return row, group


def c_coord(lane, i):
    group, tig = lane // 4, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def mma_case(rng, dtype):
    A = rng.integers(-4, 5, (16, 16)) * 0.25
    B = rng.integers(-4, 5, (16, 8)) * 0.25
    C = rng.integers(-8, 9, (16, 8)).astype(np.float64)
    a = pack_pairs(to_bits(A, dtype), a_coord, 4)
    b = pack_pairs(to_bits(B, dtype), b_coord, 2)
    d = np.array([[C[c_coord(lane, i)] for i in range(4)] for lane in range(32)], np.float32)
    data = struct.pack("<6i", 0, dtype == "bf16", 0, 0, 0, 0) + a.tobytes() + b.tobytes() + d.tobytes()
    return data, C + A @ B


def mma_result(out):
    regs = np.frombuffer(out, np.float32).reshape(32, 4)
    D = np.full((16, 8), np.nan)
    for lane in range(32):
        for i in range(4):
            D[c_coord(lane, i)] = regs[lane, i]
    return D


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_mma_m16n8k16(exe, dtype):
    rng = np.random.default_rng(len(dtype))
    for _ in range(2):
        data, want = mma_case(rng, dtype)
        rc, out, err = run(exe, "sm80", data)
        assert rc == 0, err
        np.testing.assert_array_equal(mma_result(out), want)


def test_mma_rounds_inputs_only_at_16_bits(exe):
    """Products of 16-bit values are exact in float32 and summed in float32: a sum that
    float32 cannot hold exactly rounds as float32 does, not as 16 bits would."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    A[:, 0], B[0, :] = 1.0 + 2.0 ** -7, 1.0 + 2.0 ** -7   # both exact in bf16
    a = pack_pairs(to_bits(A, "bf16"), a_coord, 4)
    b = pack_pairs(to_bits(B, "bf16"), b_coord, 2)
    d = np.full((32, 4), 2.0 ** 10, np.float32)
    data = struct.pack("<6i", 0, 1, 0, 0, 0, 0) + a.tobytes() + b.tobytes() + d.tobytes()
    rc, out, err = run(exe, "sm80", data)
    assert rc == 0, err
    want = np.float32(np.float32(2.0 ** 10) + np.float32((1.0 + 2.0 ** -7) ** 2))
    np.testing.assert_array_equal(mma_result(out), np.full((16, 8), want))


# ---- ldmatrix ---------------------------------------------------------------------------

SMEM_WORDS = 2048


def ldmatrix_case(rng, x, trans, misalign_lane=None):
    image = rng.integers(0, 1 << 16, SMEM_WORDS).astype(np.uint16)
    rows = rng.choice(SMEM_WORDS * 2 // 16, 32, replace=False) * 16  # distinct 16-byte rows, any order
    addr = rows.astype(np.uint32)
    for lane in range(8 * x, 32):
        addr[lane] = 2 * lane + 1  # unused lanes: their (misaligned) addresses are ignored
    if misalign_lane is not None:
        addr[misalign_lane] += 2
    data = (struct.pack("<6i", 1, 0, x, int(trans), 0, 0) + addr.tobytes() + struct.pack("<I", SMEM_WORDS * 2) +
            image.tobytes())
    # matrix m, row r is the 8 halves at lane 8m + r's address
    mats = np.array([[image[addr[8 * m + r] // 2 + np.arange(8)] for r in range(8)] for m in range(x)])
    want = np.zeros((32, 4), np.uint32)
    for m in range(x):
        mat = mats[m].T if trans else mats[m]
        for lane in range(32):
            lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            want[lane, m] = np.uint32(lo) | np.uint32(hi) << np.uint32(16)
    return data, want


@pytest.mark.parametrize("x", [2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(exe, x, trans):
    data, want = ldmatrix_case(np.random.default_rng(x + 10 * trans), x, trans)
    rc, out, err = run(exe, "sm80", data)
    assert rc == 0, err
    np.testing.assert_array_equal(np.frombuffer(out, np.uint32).reshape(32, 4), want)


def test_ldmatrix_misaligned_row_fails(exe):
    data, _ = ldmatrix_case(np.random.default_rng(3), 4, False, misalign_lane=13)
    rc, _, err = run(exe, "sm80", data)
    assert rc == 3 and "16-byte aligned" in err, err


# ---- cp.async ----------------------------------------------------------------------------

def cp_async_case(rng, misalign=False):
    src_bytes = rng.choice([0, 16], (3, 32)).astype(np.int32)
    glob = rng.integers(0, 256, (3, 32, 16)).astype(np.uint8)
    data = struct.pack("<6i", 2, 0, 0, 0, int(misalign), 0) + src_bytes.tobytes() + glob.tobytes()
    return data, src_bytes, glob


def test_cp_async_wait_group(exe):
    """Group g (one 16-byte copy per lane, zero-filled where src_bytes = 0) lands at the
    first wait_group n with n <= 2 - g: before it the destination keeps its old bytes."""
    data, src_bytes, glob = cp_async_case(np.random.default_rng(4))
    rc, out, err = run(exe, "sm80", data)
    assert rc == 0, err
    snaps = np.frombuffer(out, np.uint8).reshape(4, 32, 3, 16)  # before any wait, wait 2, wait 1, wait 0
    landed = np.where((src_bytes == 16)[..., None], glob, 0).transpose(1, 0, 2)  # (lane, group, 16)
    stale = np.full(16, 0xCD, np.uint8)
    for s in range(4):
        for g in range(3):
            want = landed[:, g] if g < s else np.broadcast_to(stale, (32, 16))
            np.testing.assert_array_equal(snaps[s, :, g], want, err_msg=f"snapshot {s}, group {g}")


def test_cp_async_misaligned_fails(exe):
    data, _, _ = cp_async_case(np.random.default_rng(5), misalign=True)
    rc, _, err = run(exe, "sm80", data)
    assert rc == 3 and "16-byte aligned" in err, err


# ---- planted errors ----------------------------------------------------------------------

def _mutation_case(code):
    rng = np.random.default_rng(code)
    if code == 1:
        data, _ = mma_case(rng, "bf16")
        return data
    if code in (2, 3):
        data, _ = ldmatrix_case(rng, 4, trans=code == 3)
        return data
    data, src_bytes, _ = cp_async_case(rng)
    return data


@pytest.mark.parametrize("code", [1, 2, 3, 4])
def test_mutation_changes_the_answer(exe, code):
    data = _mutation_case(code)
    rc, good, err = run(exe, "sm80", data)
    assert rc == 0, err
    rc, bad, err = run(exe, "sm80", data, mutation=code)
    assert rc == 0, err
    assert good != bad, f"mutation {code} went unnoticed"
