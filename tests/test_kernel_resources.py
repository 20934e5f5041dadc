"""Static kernel resources (tools/kernel_resources.py) and theoretical occupancy
(mixkit.bench.emu_devices) against hand calculations.

The parsers read the text formats ptxas -v and hipcc -save-temps write
(samples below are cut from real output of nvcc 13.0 and Debian's ROCm 5.2
hipcc); occupancy is worked out by hand from the published per-SM/CU limits.
"""
import importlib.util
from pathlib import Path

import pytest

from mixkit.bench import emu_devices
from mixkit.bench.emu_devices import A100, H100, MI250X

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kernel_resources", ROOT / "tools" / "kernel_resources.py")
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

PTXAS = """\
ptxas info    : 24 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN6mixkit39_GLOBAL__N__a250cf50_7_rope_cu_a832301611rope_kernelINS_4bf16ELi8ELb0EiEEvNS_8RopeArgsE' for 'sm_80'
ptxas info    : Function properties for _ZN6mixkit39_GLOBAL__N__a250cf50_7_rope_cu_a832301611rope_kernelINS_4bf16ELi8ELb0EiEEvNS_8RopeArgsE
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 53 registers, used 1 barriers, 32 bytes cumulative stack size, 2048 bytes smem, 472 bytes cmem[0], 184 bytes cmem[2]
ptxas info    : Compile time = 2142.399 ms
ptxas info    : Function properties for __internal_accurate_pow
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN6mixkit4sm803fwd16flash_fwd_kernelILi128ENS_4bf16EEEvNS_12FlashFwdArgsE' for 'sm_90a'
ptxas info    : Function properties for _ZN6mixkit4sm803fwd16flash_fwd_kernelILi128ENS_4bf16EEEvNS_12FlashFwdArgsE
    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 472 bytes cmem[0]
"""

AMDGCN = """\
\t.amdhsa_kernel _ZN6mixkit4mfma2fa16flash_fwd_kernelILi128ENS_4bf16EEEvNS_12FlashFwdArgsE
\t\t.amdhsa_group_segment_fixed_size 18944
\t\t.amdhsa_private_segment_fixed_size 0
\t\t.amdhsa_next_free_vgpr 320
\t\t.amdhsa_next_free_sgpr 88
\t\t.amdhsa_accum_offset 256
\t.end_amdhsa_kernel
\t.amdhsa_kernel _ZN6mixkit12_GLOBAL__N_111rope_kernelIfLi2ELb1ElEEvNS_8RopeArgsE
\t\t.amdhsa_group_segment_fixed_size 2048
\t\t.amdhsa_private_segment_fixed_size 16
\t\t.amdhsa_next_free_vgpr 60
\t\t.amdhsa_next_free_sgpr 62
\t\t.amdhsa_accum_offset 60
\t.end_amdhsa_kernel
amdhsa.kernels:
  - .agpr_count:     64
    .args:
      - .offset:         0
        .size:           8
    .group_segment_fixed_size: 18944
    .name:           _ZN6mixkit4mfma2fa16flash_fwd_kernelILi128ENS_4bf16EEEvNS_12FlashFwdArgsE
    .vgpr_spill_count: 0
  - .agpr_count:     0
    .args:
      - .offset:         0
    .name:           _ZN6mixkit12_GLOBAL__N_111rope_kernelIfLi2ELb1ElEEvNS_8RopeArgsE
    .sgpr_spill_count: 1
    .vgpr_spill_count: 2
"""


def test_ptxas_kernels_registers_spills_and_shared_memory():
    res = kr.collect(PTXAS, None)
    rope = res["sm_80"]["void mixkit::(anonymous namespace)::rope_kernel<mixkit::bf16, 8, false, int>(mixkit::RopeArgs)"]
    assert {k: rope[k] for k in ("registers", "stack", "spill_stores", "spill_loads", "smem_static", "barriers")} == \
        {"registers": 53, "stack": 32, "spill_stores": 0, "spill_loads": 0, "smem_static": 2048, "barriers": 1}
    fa = res["sm_90a"]["void mixkit::sm80::fwd::flash_fwd_kernel<128, mixkit::bf16>(mixkit::FlashFwdArgs)"]
    assert (fa["registers"], fa["spill_stores"], fa["spill_loads"], fa["smem_static"]) == (255, 8, 12, 0)
    # The device function after rope's entry does not overwrite it.
    assert len(res["sm_80"]) == 1 and len(res["sm_90a"]) == 1
    assert kr.problems(res, []) == [
        "sm_90a void mixkit::sm80::fwd::flash_fwd_kernel<128, mixkit::bf16>(mixkit::FlashFwdArgs): "
        "8 bytes of spill stores, 12 of loads"]
    assert kr.problems(res, ["flash_fwd_kernel<128"]) == []


def test_gfx90a_isa_registers_lds_and_scratch():
    kernels = kr.parse_amdgcn(AMDGCN)
    fa = kernels["_ZN6mixkit4mfma2fa16flash_fwd_kernelILi128ENS_4bf16EEEvNS_12FlashFwdArgsE"]
    assert {k: fa[k] for k in ("vgprs", "arch_vgprs", "agprs", "sgprs", "lds_static", "scratch", "vgpr_spills")} == \
        {"vgprs": 320, "arch_vgprs": 256, "agprs": 64, "sgprs": 88, "lds_static": 18944, "scratch": 0, "vgpr_spills": 0}
    rope = kernels["_ZN6mixkit12_GLOBAL__N_111rope_kernelIfLi2ELb1ElEEvNS_8RopeArgsE"]
    assert (rope["vgprs"], rope["agprs"], rope["scratch"], rope["vgpr_spills"], rope["sgpr_spills"]) == (60, 0, 16, 2, 1)
    bad = kr.problems({"gfx90a": {"rope": rope, "fa": fa}}, [])
    assert bad == ["gfx90a rope: 2 VGPRs spilled, 16 bytes of scratch"]


def test_demangled_names_meet_across_compilers():
    # nvcc names an anonymous namespace per file; GCC and clang (the emulated
    # build, hipcc) say "(anonymous namespace)".
    names = kr.demangle(["_ZN6mixkit39_GLOBAL__N__a250cf50_7_rope_cu_a832301611rope_kernelINS_4bf16ELi8ELb0EiEEvNS_8RopeArgsE",
                         "_ZN6mixkit12_GLOBAL__N_111rope_kernelINS_4bf16ELi8ELb0EiEEvNS_8RopeArgsE"])
    assert len(set(names.values())) == 1
    assert next(iter(names.values())).startswith("void mixkit::(anonymous namespace)::rope_kernel<mixkit::bf16, 8")


@pytest.mark.parametrize("dev,threads,regs,smem,blocks,limit", [
    # sm_80 attention forward, D = 128: 255 registers round to 8192 a warp, 2
    # warps per 16K-register sub-partition, 8 warps: 2 blocks of 4 warps; 80 KB
    # of shared memory + 1 KB reserved fits twice in 164 KB.
    (A100, 128, 255, 81920, 2, "registers"),
    # The same kernel with 96 KB: 97 KB a block, once in 164 KB.
    (A100, 128, 255, 98304, 1, "shared memory"),
    # sm_90a attention forward, D = 128: 161 KB + 1 KB of shared memory, once
    # in 228 KB; 252 registers: 8 warps, one block of 8.
    (H100, 256, 252, 164864, 1, "registers"),
    # A light kernel: 32 registers, 256 threads: the 2048-thread limit, 8 blocks.
    (H100, 256, 32, 0, 8, "threads"),
    # gfx90a attention forward, D = 128: 320 unified VGPRs, 512 / 320 = 1 wave
    # per SIMD, 4 per CU: one workgroup of 4 waves; 18944 bytes of LDS (37
    # granules of 512) would have allowed 3.
    (MI250X, 256, 320, 18944, 1, "registers"),
    # 60 VGPRs (64 after the granule of 8): 8 waves per SIMD (the slot
    # limit), 32 per CU: 8 workgroups of 4 waves; LDS 2048 x 8 fits.
    (MI250X, 256, 60, 2048, 8, "threads"),
])
def test_occupancy_by_hand(dev, threads, regs, smem, blocks, limit):
    # (On a tie the first limit named wins: threads, blocks, registers, warps, shared memory.)
    occ = emu_devices.occupancy(dev, threads, regs=regs, smem=smem)
    assert (occ["blocks"], occ["limited_by"]) == (blocks, limit)


def test_waves_and_last_wave_fill():
    # 256 blocks at 1 block per SM on 132 SMs: 1.94 waves, the second 94% full.
    w = emu_devices.waves(H100, 256, 1)
    assert w["whole_waves"] == 2 and w["waves"] == pytest.approx(256 / 132)
    assert w["last_wave_fill"] == pytest.approx(124 / 132)


def test_projection_is_the_slowest_resource_at_peak():
    # 2039 GB/s: 2.039 GB take 1 ms; 19.49 TB/s of shared memory (128 B x 108 x
    # 1.41 GHz): 152.3M wavefronts take 1 ms; 312 TFLOP/s: 312 GFLOP take 1 ms.
    p = A100.projection(2.039e9, 0, 0, "bfloat16")
    assert p["bound_s"] == pytest.approx(1e-3) and p["bound_by"] == "dram"
    wf = A100.smem_gbps * 1e9 * 1e-3 / 128
    p = A100.projection(1e9, 2 * wf, 312e9, "bfloat16")
    assert p["bound_s"] == pytest.approx(2e-3) and p["bound_by"] == "smem"
    assert A100.roofline_s(2.039e9, 624e9, "bfloat16") == pytest.approx(2e-3)
