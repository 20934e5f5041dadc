"""The emulated GPU's cost counters against hand calculations (emulated builds only).

Each probe kernel (csrc/cuda/cost_probes.cpp) has a cost worked out below from
the hardware models csrc/cuda/emu_cost.h states: 32-byte sectors; 32 banks of
4 bytes; NVIDIA phases of 32/16/8 lanes by access width and one per ldmatrix
matrix or wgmma core matrix; CDNA phases of 32/16/8 lanes and ds_read_b128's
lane groups. The counters must equal these numbers exactly. The model
functions are also checked on their own, on requests too irregular for a
kernel (broadcasts, sub-word accesses, partial warps).
"""
import pytest

from conftest import EMULATED

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not EMULATED, reason="needs an emulated build of _core")]

if EMULATED:
    from mixkit import _core
    from mixkit.bench import emu_cost

    WARP = _core.build_info()["warp_size"]
else:
    WARP = 0


def _one(name, variant=0):
    launches = emu_cost.probe(name, variant)
    assert len(launches) == 1, launches
    return launches[0]


@pytest.mark.parametrize("stride", [1, 2, 32])
def test_copy_sectors_per_request(stride):
    # 256 threads, 4-byte loads of in[stride * i] and stores of out[i], both
    # buffers 256-byte aligned. A warp's load spans 4 * WARP * stride bytes:
    # stride 1 is WARP / 8 sectors (4 per 128 bytes), stride 2 twice that,
    # stride 32 one sector per lane; the ideal is always 4 * WARP / 32.
    l = _one("copy", stride)
    warps = 256 // WARP
    load, store = l["global"]["load"], l["global"]["store"]
    ideal = WARP // 8
    sectors = {1: WARP // 8, 2: WARP // 4, 32: WARP}[stride]
    assert load == {"requests": warps, "bytes": 4 * 256, "sectors": warps * sectors, "ideal": warps * ideal}
    assert store == {"requests": warps, "bytes": 4 * 256, "sectors": warps * ideal, "ideal": warps * ideal}
    assert l["unique_load_sectors"] == warps * sectors and l["unique_store_sectors"] == 256 * 4 // 32


@pytest.mark.parametrize("padded", [False, True])
def test_transpose_through_shared_memory(padded):
    # A 32 x 32 float tile, 1024 threads: each warp stores WARP / 32 rows
    # (conflict-free: 32 consecutive words) and loads WARP / 32 columns. A
    # column of tile[32][32] is one bank: 32 distinct words, 32 wavefronts per
    # 32 lanes; tile[32][33] puts element (x, y) in bank (x + y) % 32: 1 each.
    l = _one("transpose", int(padded))
    warps = 1024 // WARP
    per_warp = WARP // 32  # phases of 32 lanes (4-byte accesses), one per row or column
    load, store = l["shared"]["load"], l["shared"]["store"]
    assert store["requests"] == warps and store["wavefronts"] == warps * per_warp == store["ideal"]
    assert store["degrees"] == {"1": warps * per_warp}
    assert load["requests"] == warps and load["ideal"] == warps * per_warp
    if padded:
        assert load["wavefronts"] == warps * per_warp and load["degrees"] == {"1": warps * per_warp}
    else:
        assert load["wavefronts"] == warps * per_warp * 32 and load["degrees"] == {"32": warps * per_warp}
    # Global traffic stays coalesced either way.
    assert l["global"]["load"]["sectors"] == l["global"]["load"]["ideal"] == 1024 * 4 // 32


@pytest.mark.skipif(WARP != 32, reason="ldmatrix is an NVIDIA (warp 32) instruction")
@pytest.mark.parametrize("swizzled", [False, True])
def test_ldmatrix_over_64_byte_rows(swizzled):
    # ldmatrix.x4 of a 16-row x 64-byte tile: matrix m is 8 rows of 16 bytes.
    # Plain rows put row r's chunk at byte 64 r + 16 c: rows r, r + 2, r + 4,
    # r + 6 share a 16-byte bank group, so each matrix takes 4 wavefronts (16
    # in all against the ideal 4). flash::swz<4> moves chunk c of row r to
    # c ^ ((r >> 1) & 3): the 8 rows of a matrix land in 8 distinct groups.
    l = _one("ldmatrix", int(swizzled))
    ld = l["shared"]["ldmatrix"]
    assert ld["requests"] == 1 and ld["ideal"] == 4 and ld["bytes"] == 32 * 16
    if swizzled:
        assert ld["wavefronts"] == 4 and ld["degrees"] == {"1": 4}
    else:
        assert ld["wavefronts"] == 16 and ld["degrees"] == {"4": 4}
    assert l["instructions"]["ldmatrix.x4"]["count"] == 1


@pytest.mark.skipif(WARP != 32, reason="wgmma is an NVIDIA (warp 32) instruction")
@pytest.mark.parametrize("swizzle", [True, False])
def test_wgmma_descriptor_read(swizzle):
    # One m64n64k16 SS wgmma: A is 64 rows x 32 bytes (k 0-15) and B 64 rows
    # x 32 bytes, 4096 bytes in 32 core matrices of 8 rows x 16 bytes, each
    # read once (B once for the warpgroup, not once per warp): ideal 32
    # wavefronts. In the 128-byte swizzle a core matrix's 8 rows, 128 bytes
    # apart, sit at chunk c ^ (r % 8): 8 distinct bank groups, 1 wavefront
    # each. Read without the swizzle (the planted "swizzle not applied"), the
    # 8 rows share one bank group: 8 wavefronts each, 256 in all.
    l = _one("wgmma", 0 if swizzle else 1)
    w = l["shared"]["wgmma"]
    assert w["bytes"] == 4096 and w["ideal"] == 32 and w["requests"] == 32
    if swizzle:
        assert w["wavefronts"] == 32 and w["degrees"] == {"1": 32}
    else:
        assert w["wavefronts"] == 256 and w["degrees"] == {"8": 32}
    assert l["instructions"]["wgmma.mma_async.m64n64k16"] == {"count": 1, "flops": 2 * 64 * 64 * 16}


@pytest.mark.skipif(WARP != 64, reason="MFMA is an AMD (warp 64) instruction")
@pytest.mark.parametrize("pad", [0, 8])
def test_mfma_lds_read(pad):
    # The MFMA kernels' operand read, ds_read_b128: lane l reads 16 bytes of
    # row l % 32 at element 8 (l / 32) of a [32][64 + pad] bf16 tile. CDNA
    # serves it in 8 phases of 8 lanes (0-3 + 20-23, 4-7 + 16-19, ...). With
    # 128-byte rows (pad 0) the 8 rows of a phase share 4 banks: 8 cycles a
    # phase, 64 against the ideal 8. Padded to 144 bytes, row r starts at bank
    # 4 r % 32, lane half h adds 4: bank group (r + h) % 8, distinct in every
    # phase (rows {0-3, 20-23} give groups 0-7): 8 cycles, the ideal.
    l = _one("mfma_lds", 1 if pad else 0)
    ld = l["shared"]["load"]
    assert ld["requests"] == 1 and ld["ideal"] == 8 and ld["bytes"] == 64 * 16
    if pad:
        assert ld["wavefronts"] == 8 and ld["degrees"] == {"1": 8}
    else:
        assert ld["wavefronts"] == 64 and ld["degrees"] == {"8": 8}


def test_report_rows_carry_the_probe_counters():
    # The report's launch row reads the same counters: a stride-32 copy is
    # 8x the ideal sectors per request.
    row = emu_cost.launch_row(_one("copy", 32), "gfx90a" if WARP == 64 else "sm_90a", None)
    assert row["sectors_vs_ideal"] == pytest.approx((WARP + WARP // 8) / (2 * WARP // 8))
    assert row["kernel"] == "cost_probes::copy_kernel"
