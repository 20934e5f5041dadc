"""The three GPUs mixkit targets, as published figures, for projections from
the emulated GPU's counters (bench/emu_cost.py) and static resources
(tools/kernel_resources.py). Nothing here is measured: every figure is a
datasheet, whitepaper or programming-guide number, cited beside it.

Two uses:
- `occupancy(...)`: theoretical resident blocks per SM/CU from registers,
  shared memory/LDS and the per-SM/CU limits, the way CUDA's occupancy
  calculator (cuda_occupancy.h, shipped with the toolkit) and AMD's
  register/LDS allocation rules compute it;
- `Device.projection(...)`: a lower bound on a launch's time from its DRAM
  bytes, shared-memory wavefronts and tensor-core work, each at its peak
  rate. A projection, never a measurement: it is labelled so wherever it is
  shown, and never mixed with measured GPU rows.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    arch: str            # the kernel path it runs: sm_80, sm_90a, gfx90a
    warp: int            # lanes per warp / wavefront
    units: int           # SMs or CUs
    clock_ghz: float     # the clock the peak figures below are quoted at
    dram_gbps: float     # DRAM bandwidth, GB/s (10^9 bytes)
    smem_bytes_per_clk: int  # shared memory / LDS bytes per clock per SM/CU: one wavefront
    tensor_tflops: dict  # dense tensor-core peak by input dtype, TFLOP/s
    # Occupancy limits per SM/CU.
    max_threads: int
    max_blocks: int
    max_warps: int
    regs: int            # NVIDIA: 32-bit registers per SM; AMD: VGPRs per lane per SIMD
    smem_bytes: int      # NVIDIA: the largest shared-memory carve-out; AMD: LDS per CU
    smem_reserved: int = 0  # NVIDIA: per block, reserved by the driver
    smem_granule: int = 128
    reg_granule: int = 256  # NVIDIA: registers per warp, allocation unit; AMD: VGPRs per lane
    simds: int = 4       # AMD: SIMDs per CU (waves of a workgroup are spread over them)

    @property
    def smem_gbps(self) -> float:
        return self.smem_bytes_per_clk * self.units * self.clock_ghz

    def projection(self, dram_bytes: float, smem_wavefronts: float, tensor_flops: float,
                   dtype: str) -> dict:
        """Lower-bound seconds of each resource at its peak, and their max."""
        t = {
            "dram_s": dram_bytes / (self.dram_gbps * 1e9),
            "smem_s": smem_wavefronts * self.smem_bytes_per_clk / (self.smem_gbps * 1e9),
            "tensor_s": tensor_flops / (self.tensor_tflops[dtype] * 1e12) if tensor_flops else 0.0,
        }
        t["bound_s"] = max(t.values())
        t["bound_by"] = max(("dram", "smem", "tensor"), key=lambda k: t[k + "_s"])
        return t

    def roofline_s(self, min_bytes: float, flops: float | None, dtype: str) -> float:
        """The op's roofline: its minimal bytes at DRAM peak, its FLOPs at tensor peak."""
        return max(min_bytes / (self.dram_gbps * 1e9),
                   (flops or 0) / (self.tensor_tflops[dtype] * 1e12))


# NVIDIA A100 SXM4 80GB (sm_80).
# - 108 SMs, boost clock 1410 MHz: "NVIDIA A100 Tensor Core GPU Architecture"
#   whitepaper (2020), Table 3.
# - HBM2e 2,039 GB/s; BF16/FP16 tensor 312 TFLOPS dense: NVIDIA A100 datasheet
#   (80GB SXM column).
# - Shared memory: 32 banks of 4 bytes, one 32-bit word per bank per clock
#   (CUDA C++ Programming Guide, "Shared Memory" for compute capability 5.x
#   and later, which 8.0 keeps): 128 bytes per clock per SM.
# - Limits (CUDA C++ Programming Guide, "Technical Specifications per Compute
#   Capability", 8.0): 2048 threads, 32 blocks, 64 warps, 64K registers per SM;
#   164 KB shared memory per SM at the largest carve-out, 1 KB of it reserved per
#   block. Allocation units (cuda_occupancy.h, CUDA 13.0): registers in 256 per
#   warp over 4 sub-partitions, shared memory in 128 bytes.
A100 = Device(
    name="A100-SXM4-80GB", arch="sm_80", warp=32, units=108, clock_ghz=1.41, dram_gbps=2039.0,
    smem_bytes_per_clk=128, tensor_tflops={"bfloat16": 312.0, "float16": 312.0},
    max_threads=2048, max_blocks=32, max_warps=64, regs=65536, smem_bytes=164 * 1024, smem_reserved=1024)

# NVIDIA H100 SXM5 80GB (sm_90a).
# - 132 SMs: "NVIDIA H100 Tensor Core GPU Architecture" whitepaper (2022),
#   Table 2 (H100 SXM5).
# - HBM3 3,350 GB/s; BF16/FP16 tensor 989.4 TFLOPS dense (1,979 with
#   sparsity): NVIDIA H100 datasheet (SXM column). That peak is 132 SMs x 4096
#   dense FLOP per clock x 1.83 GHz, the clock used below.
# - Shared memory: 128 bytes per clock per SM, as above (CUDA C++ Programming
#   Guide, compute capability 9.0 keeps the 32 x 4-byte banks).
# - Limits (CUDA C++ Programming Guide, 9.0): 2048 threads, 32 blocks, 64 warps,
#   64K registers per SM; 228 KB shared memory per SM, 227 KB per block, 1 KB
#   reserved per block; allocation units as for 8.0 (cuda_occupancy.h).
H100 = Device(
    name="H100-SXM5-80GB", arch="sm_90a", warp=32, units=132, clock_ghz=1.83, dram_gbps=3350.0,
    smem_bytes_per_clk=128, tensor_tflops={"bfloat16": 989.4, "float16": 989.4},
    max_threads=2048, max_blocks=32, max_warps=64, regs=65536, smem_bytes=228 * 1024, smem_reserved=1024)

# AMD Instinct MI250X, one GCD (gfx90a): the emulator runs one GCD (110 CUs), as
# a ROCm process sees each GCD as its own device.
# - 220 CUs, peak engine clock 1700 MHz, 3,276.8 GB/s HBM2e and 383 TFLOPS peak
#   BF16/FP16 matrix for the whole OAM module: AMD Instinct MI250X datasheet.
#   Per GCD: 110 CUs, 1,638.4 GB/s, 191.5 TFLOPS.
# - LDS: 32 banks x 4 bytes, 128 bytes per clock per CU (ROCm Omniperf
#   documentation, "LDS examples", measured on an MI250: "the LDS can load up to
#   128B per cycle (i.e, 32 banks x 4B / bank / cycle)").
# - Limits: 4 SIMDs a CU with 8 wavefront slots each (ROCm Omniperf
#   documentation, "Pipeline descriptions": 8 slots per SIMD on MI2XX, 32 per
#   CU); a unified 512-entry VGPR file per lane per SIMD shared by architected
#   and accumulation VGPRs, allocated in granules of 8 (LLVM AMDGPUUsage,
#   gfx90a); 64 KB LDS per CU, allocated per workgroup in 128-dword (512-byte)
#   granules (LLVM AMDGPUUsage, COMPUTE_PGM_RSRC2.LDS_SIZE, GFX7-GFX11).
MI250X = Device(
    name="MI250X (one GCD)", arch="gfx90a", warp=64, units=110, clock_ghz=1.7, dram_gbps=1638.4,
    smem_bytes_per_clk=128, tensor_tflops={"bfloat16": 191.5, "float16": 191.5},
    max_threads=2048, max_blocks=32, max_warps=32, regs=512, smem_bytes=64 * 1024,
    smem_granule=512, reg_granule=8)

DEVICES = {d.arch: d for d in (A100, H100, MI250X)}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(dev: Device, threads: int, *, regs: int, smem: int) -> dict:
    """Resident blocks per SM/CU of a kernel with `threads` threads a block,
    `regs` registers a thread (gfx90a: the total a lane takes of the unified
    VGPR file, architected and accumulation registers, as the ISA's
    .amdhsa_next_free_vgpr gives it) and `smem` bytes of shared memory/LDS a
    block (static + dynamic). Returns the blocks, the limit that set them and
    the warps resident as a share of the SM/CU's slots."""
    warps = -(-threads // dev.warp)
    limits = {"threads": dev.max_threads // threads if threads else 0, "blocks": dev.max_blocks}
    if dev.arch.startswith("sm_"):
        # Registers go to warps in units of 256 and live in 4 sub-partitions.
        per_warp = _round_up(max(regs, 1) * dev.warp, dev.reg_granule)
        warps_per_sm = (dev.regs // 4 // per_warp) * 4
        limits["registers"] = warps_per_sm // warps
        limits["warps"] = dev.max_warps // warps
        per_block = _round_up(smem + dev.smem_reserved, dev.smem_granule)
        limits["shared memory"] = dev.smem_bytes // per_block if smem else dev.max_blocks
    else:
        # gfx90a: the total in granules of 8, out of 512 a lane per SIMD; a
        # workgroup's waves go round-robin over the CU's 4 SIMDs.
        total = _round_up(max(regs, 1), dev.reg_granule)
        waves_per_simd = min(dev.max_warps // dev.simds, dev.regs // total)
        limits["registers"] = (waves_per_simd * dev.simds) // warps
        limits["warps"] = dev.max_warps // warps
        limits["shared memory"] = dev.smem_bytes // _round_up(smem, dev.smem_granule) if smem else dev.max_blocks
    blocks = min(limits.values())
    return {"blocks": blocks, "limited_by": min(limits, key=limits.get),
            "occupancy": blocks * warps / dev.max_warps}


def waves(dev: Device, grid_blocks: int, blocks_per_unit: int) -> dict:
    """How a grid fills the device: full waves, and the last wave's fill."""
    slots = max(blocks_per_unit, 1) * dev.units
    n = math.ceil(grid_blocks / slots) if grid_blocks else 0
    last = grid_blocks - (n - 1) * slots if n else 0
    return {"waves": grid_blocks / slots, "whole_waves": n, "last_wave_fill": last / slots if n else 0.0}
