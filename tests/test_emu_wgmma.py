"""The emulated GPU's wgmma (csrc/cuda/emu_sm90.cuh) against an independent model.

A host program (tests/emu_programs.py: the instruction models on a tiny thread-per-lane
runtime, no GPU and no HIP CPU runtime needed) runs one or two warpgroups through
wgmma.fence / mma_async / commit_group / wait_group with operands that numpy placed in
shared memory and in registers:
- shared memory from the PTX ISA's canonical layouts for the 128-byte swizzle, written
  in the ISA's own (shape):(stride) notation and evaluated generically, then the
  Swizzle<3,4,3> of the byte address; every byte no operand owns holds NaN;
- registers from the ISA's fragment formulas for wgmma .m64nNk16 (A and D).
Operands are small multiples of 1/2, so every product and sum is exact and the
comparison with A @ B + C (float64) is exact. Also checked: the asynchronous model
(accumulators untouched until the covering wait_group, shared memory read at the wait),
descriptor and protocol misuse failing the launch, and that each planted mutation
(emu.cuh, codes 10-15) changes the answer.
"""
import struct

import numpy as np
import pytest

from emu_programs import host, run


M, K = 64, 16


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return host(tmp_path_factory)


# ---- the model (PTX ISA) --------------------------------------------------------------

def colex(coord, shape, stride):
    """Offset of a 1-D coordinate in a (shape):(stride) layout, colexicographic as the ISA's notation."""
    off = 0
    for s, d in zip(shape, stride):
        off += (coord % s) * d
        coord //= s
    return off


def swizzle128(addr):
    """Swizzle<3,4,3> on byte addresses: bits 7-9 XORed into bits 4-6."""
    return addr ^ ((addr & 0x380) >> 3)


def k_major_addr(start, sbo, mn, k):
    """128B K-major ((8, m), (T, 2k)) : ((8T, SBO), (1, T)), T = 8 elements of 2 bytes."""
    return swizzle128(start + colex(mn, (8, 1 << 20), (128, sbo)) + colex(k, (8, 2), (2, 16)))


def mn_major_addr(start, lbo, sbo, mn, k):
    """128B MN-major ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))."""
    return swizzle128(start + colex(mn, (8, 8, 1 << 20), (2, 16, lbo)) + colex(k, (8, 1 << 20), (128, sbo)))


def desc(start, lbo, sbo, swizzle=1, base=0):
    return (swizzle << 62) | (base << 49) | ((sbo >> 4) << 32) | ((lbo >> 4) << 16) | (start >> 4)


def to_bits(x, dtype):
    if dtype == "bf16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(np.float16).view(np.uint16)


def d_coords(t, i):
    """Accumulator register i of warpgroup thread t: (row, col) of D."""
    warp, lane = t // 32, t % 32
    return 16 * warp + lane // 4 + 8 * ((i % 4) // 2), 8 * (i // 4) + 2 * (lane % 4) + i % 2


def a_coords(t, e):
    """Element e (register e // 2, half e % 2) of A's fragment for thread t."""
    warp, lane = t // 32, t % 32
    return 16 * warp + lane // 4 + 8 * ((e % 4) // 2), 2 * (lane % 4) + e % 2 + 8 * (e // 4)


def to_regs(C, threads, n):
    out = np.zeros((threads, 64), np.float32)
    for t in range(threads):
        for i in range(n // 2):
            out[t, i] = C[t // 128][d_coords(t % 128, i)]
    return out


def from_regs(regs, threads, n):
    D = np.full((threads // 128, M, n), np.nan)
    for t in range(threads):
        for i in range(n // 2):
            D[t // 128][d_coords(t % 128, i)] = regs[t, i]
    return D


def a_regs(A, dtype):
    bits = to_bits(A, dtype)
    regs = np.zeros((128, 4), np.uint32)
    for t in range(128):
        for e in range(8):
            regs[t, e // 2] |= np.uint32(bits[a_coords(t, e)]) << np.uint32(16 * (e % 2))
    return regs


class Smem:
    """A shared-memory image: NaN everywhere no operand element was placed."""

    def __init__(self, size):
        self.words = np.full(size // 2, 0xFFFF, np.uint16)
        self.used = np.zeros(size // 2, bool)

    def put(self, addr, bits):
        assert addr % 2 == 0 and not self.used[addr // 2], "operands overlap"
        self.used[addr // 2] = True
        self.words[addr // 2] = bits


def place_a(smem, A, dtype, start, sbo):
    bits = to_bits(A, dtype)
    for r in range(M):
        for k in range(K):
            smem.put(k_major_addr(start, sbo, r, k), bits[r, k])


def place_b(smem, B, dtype, start, lbo, sbo, mn_major):
    """B is K x N; K-major stores each column n's 16 k values together."""
    bits = to_bits(B, dtype)
    for k in range(K):
        for n in range(B.shape[1]):
            addr = mn_major_addr(start, lbo, sbo, n, k) if mn_major else k_major_addr(start, sbo, n, k)
            smem.put(addr, bits[k, n])


SMEM = 128 * 1024
A_BASE, B_BASE = 0, 32 * 1024  # 16 KB of A and 40 KB of B per k step


def case(rng, form, n, dtype, mn, steps=1, threads=128):
    """Random operands and layouts for `steps` k-steps; returns (header args, inputs, want per step)."""
    smem = Smem(SMEM)
    As = [rng.integers(-3, 4, (M, K)) * 0.5 for _ in range(steps)]
    Bs = [rng.integers(-3, 4, (K, n)) * 0.5 for _ in range(steps)]
    C = rng.integers(-8, 9, (threads // 128, M, n)).astype(np.float64)
    descs, regs = [], np.zeros((128, 8), np.uint32)
    for s in range(steps):
        # Step s: A and B in their own 1024-aligned areas, with a K-major start inside the row
        # (bytes 32 ks of each 128-byte row) and a random SBO (gaps hold NaN).
        ks = int(rng.integers(0, 4))
        sbo_a = int(rng.choice([1024, 2048]))
        a_start = A_BASE + s * 16384 + ks * 32
        if form == "ss":
            place_a(smem, As[s], dtype, a_start, sbo_a)
        else:
            regs[:, 4 * s:4 * s + 4] = a_regs(As[s], dtype)
        if mn:
            sbo_b = int(rng.choice([1024, 2048]))
            lbo_b = int(rng.choice([4096, 8192])) if n == 128 else 16
            b_start = B_BASE + s * 40960
        else:
            sbo_b, lbo_b = int(rng.choice([1024, 2048])), 16
            b_start = B_BASE + s * 40960 + int(rng.integers(0, 4)) * 32
        place_b(smem, Bs[s], dtype, b_start, lbo_b, sbo_b, mn)
        descs += [desc(a_start, 16, sbo_a) if form == "ss" else 0, desc(b_start, lbo_b, sbo_b)]
    want = [As[s] @ Bs[s] for s in range(steps)]
    return descs, regs, smem, C, want


def pack(form, n, dtype, mn, scale_d, mode, threads, descs, C, regs, smem):
    descs = (descs + [0, 0])[:4]
    header = struct.pack("<8i4Q", form == "rs", n, dtype == "bf16", int(mn), scale_d, mode, SMEM, threads, *descs)
    return (header + to_regs(C, threads, n).tobytes() + np.tile(regs, (threads // 128, 1)).tobytes() +
            smem.words.tobytes())


def snapshots(out, threads):
    return np.frombuffer(out, np.float32).reshape(4, threads, 64)


CONFIGS = [(form, n, dtype, mn) for form in ("ss", "rs") for n in (64, 128) for dtype in ("bf16", "f16")
           for mn in ((False, True) if form == "ss" else (True,))]


@pytest.mark.parametrize("form,n,dtype,mn", CONFIGS)
def test_wgmma_matches_model(exe, form, n, dtype, mn):
    """One wgmma (scale_d 1 and 0), then two k steps in one group, on two warpgroups
    (threads run forward, then reversed, between collectives)."""
    rng = np.random.default_rng([n, int(mn), len(form), len(dtype)])
    for scale_d in (1, 0):
        descs, regs, smem, C, want = case(rng, form, n, dtype, mn, threads=256)
        rc, out, err = run(exe, "sm90", pack(form, n, dtype, mn, scale_d, 0, 256, descs, C, regs, smem))
        assert rc == 0, err
        got = from_regs(snapshots(out, 256)[0], 256, n)
        np.testing.assert_array_equal(got, scale_d * C + want[0])
    descs, regs, smem, C, want = case(rng, form, n, dtype, mn, steps=2, threads=256)
    for reverse in (False, True):
        rc, out, err = run(exe, "sm90", pack(form, n, dtype, mn, 1, 1, 256, descs, C, regs, smem), reverse=reverse)
        assert rc == 0, err
        np.testing.assert_array_equal(from_regs(snapshots(out, 256)[0], 256, n), C + want[0] + want[1])


def test_wgmma_is_asynchronous(exe):
    """Accumulators change only at the wait_group covering their group, and wait_group 1 leaves
    the newest group pending."""
    rng = np.random.default_rng(5)
    descs, regs, smem, C, want = case(rng, "ss", 64, "bf16", True, steps=2)
    rc, out, err = run(exe, "sm90", pack("ss", 64, "bf16", True, 1, 2, 128, descs, C, regs, smem))
    assert rc == 0, err
    s = snapshots(out, 128)
    np.testing.assert_array_equal(from_regs(s[0], 128, 64), C)             # before any wait
    np.testing.assert_array_equal(from_regs(s[1], 128, 64), C + want[0])   # wait_group 1: group 0 done
    np.testing.assert_array_equal(from_regs(s[2], 128, 64), C)             # ... group 1 still pending
    np.testing.assert_array_equal(from_regs(s[3], 128, 64), C + want[1])   # wait_group 0


def test_wgmma_reads_shared_memory_at_the_wait(exe):
    """Operands overwritten between issue and wait are what the emulated wgmma multiplies
    (the latest the hardware may read them): zeros here, so D = C."""
    rng = np.random.default_rng(6)
    for form in ("ss", "rs"):
        descs, regs, smem, C, want = case(rng, form, 128, "f16", True)
        rc, out, err = run(exe, "sm90", pack(form, 128, "f16", True, 1, 3, 128, descs, C, regs, smem))
        assert rc == 0, err
        np.testing.assert_array_equal(from_regs(snapshots(out, 128)[0], 128, 128), C)


def _bad(rng, **change):
    descs, regs, smem, C, _ = case(rng, "ss", 64, "bf16", False)
    if "da" in change:
        descs[0] = change["da"](descs[0])
    return pack("ss", 64, "bf16", False, 1, change.get("mode", 0), change.get("threads", 128), descs, C, regs, smem)


# name -> (how the launch is spoiled, what the error says)
MISUSE = {
    "no swizzle": (dict(da=lambda d: d & ~(3 << 62)), "only the 128-byte swizzle mode"),
    "64-byte swizzle": (dict(da=lambda d: (d & ~(3 << 62)) | (2 << 62)), "only the 128-byte swizzle mode"),
    "base offset": (dict(da=lambda d: d | (1 << 49)), "base offset"),
    "reserved bits": (dict(da=lambda d: d | (1 << 14)), "reserved bits"),
    "start off the swizzle period": (dict(da=lambda d: d + (128 >> 4)), "1024-byte boundary"),
    "out of range": (dict(da=lambda d: d + ((SMEM - 4096) >> 4)), "past the block's dynamic shared memory"),
    "no fence": (dict(mode=4), "without a wgmma.fence"),
    "no fence after a wait": (dict(mode=6), "without a wgmma.fence since the last wgmma.wait_group"),
    "descriptors differ": (dict(mode=5), "different descriptors"),
}


@pytest.mark.parametrize("what", sorted(MISUSE))
def test_wgmma_misuse_fails(exe, what):
    change, message = MISUSE[what]
    rc, _, err = run(exe, "sm90", _bad(np.random.default_rng(7), **change))
    assert rc == 3 and message in err, err


def test_wgmma_needs_whole_warpgroups(exe):
    rng = np.random.default_rng(8)
    descs, regs, smem, C, _ = case(rng, "ss", 64, "bf16", False, threads=128)
    data = pack("ss", 64, "bf16", False, 1, 0, 128, descs, C, regs, smem)
    header = bytearray(data[:struct.calcsize("<8i4Q")])
    struct.pack_into("<i", header, 28, 96)
    rc, _, err = run(exe, "sm90", bytes(header) + data[len(header):])
    assert rc == 3 and "whole warpgroups" in err, err


# code -> a configuration it must change
MUTATIONS = {10: ("ss", 64, "bf16", False), 11: ("ss", 128, "f16", True), 12: ("ss", 64, "bf16", False),
             13: ("ss", 128, "bf16", True), 14: ("rs", 64, "bf16", True), 15: ("rs", 128, "f16", True)}


@pytest.mark.parametrize("code", sorted(MUTATIONS))
def test_wgmma_mutation_changes_the_answer(exe, code):
    form, n, dtype, mn = MUTATIONS[code]
    rng = np.random.default_rng(code)
    descs, regs, smem, C, want = case(rng, form, n, dtype, mn)
    data = pack(form, n, dtype, mn, 1, 0, 128, descs, C, regs, smem)
    rc, out, err = run(exe, "sm90", data)
    assert rc == 0, err
    np.testing.assert_array_equal(from_regs(snapshots(out, 128)[0], 128, n), C + want[0])
    rc, out, err = run(exe, "sm90", data, mutation=code)
    assert rc == 0, err
    got = from_regs(snapshots(out, 128)[0], 128, n)
    assert not np.array_equal(got, C + want[0]), f"mutation {code} went unnoticed"
