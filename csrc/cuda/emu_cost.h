// What the kernels cost, counted on the emulated GPU: the second consumer of
// the memory-access hook (emu_trace.h), after the race checker. Per launch it
// counts what Nsight Compute's first page shows from addresses alone:
//
// Global memory, per warp-level request (the lanes of one warp with equal
// `where` and `occurrence`, emu_trace.h): the bytes requested (each distinct
// byte of a request once), the 32-byte sectors it touches, and the ideal, the
// fewest sectors those bytes fit (ceil(bytes / 32)); over the launch the
// distinct sectors loaded (but those a block reads after writing them) and
// stored: the DRAM traffic of a perfect L2 within the launch, cold between
// launches. cp.async's global source counts as a load, an atomic as both.
//
// Shared memory / LDS, per request: the wavefronts (cycles of 32 banks x 4
// bytes = 128 bytes) it takes, the ideal (ceil(bytes the lanes receive or
// send / 128): the data path's width, which broadcasts use too; at least
// one per phase with a lane in it), and the
// histogram of conflict degrees, one entry per phase. A phase is the set of
// lanes the hardware serves together; its degree is the largest number of
// distinct 4-byte words any one bank holds for it (the same word for several
// lanes is one broadcast), and it takes that many wavefronts.
//   NVIDIA (warp 32; CUDA C++ Programming Guide, "Shared Memory", 5.x and
//   later): accesses up to 32 bits a lane: one phase of 32 lanes; 64-bit: two
//   phases of 16 consecutive lanes; 128-bit: four phases of 8. ldmatrix: one
//   phase per 8x8 matrix (its 8 row addresses, lanes 8i .. 8i + 7); cp.async
//   of 16 bytes writes its destinations as a 128-bit store does.
//   wgmma (SS and RS): the operand bytes of one warpgroup instruction, each
//   8-row x 16-byte core matrix one phase (PTX ISA, "Matrix Descriptor
//   Format": a core matrix is the canonical layouts' unit); B, which every
//   warp of the warpgroup uses, is read once per instruction.
//   AMD gfx90a (warp 64): the CDNA LDS model of AMD's Composable Kernel
//   documentation ("Understanding AMD GPU LDS and Bank Conflicts") and of the
//   AMD OpenCL optimisation guide (LDS section), 32 banks of 4 bytes: up to 32
//   bits a lane, two phases of 32 lanes; 64-bit, four phases of 16 lanes;
//   ds_write_b128, eight phases of 8 consecutive lanes; ds_read_b128, eight
//   phases of the lane groups 0-3+20-23, 4-7+16-19, 8-11+28-31, 12-15+24-27
//   and the same plus 32. MFMA reads its operands from registers: its LDS
//   reads are these plain loads (the 128-bit ones, in mixkit's MFMA kernels).
//
// Instructions: the tensor-core instructions issued (mma.m16n8k16,
// wgmma.m64nNk16, v_mfma_f32_32x32x8), one per warp or warpgroup, and their
// FLOPs; barriers per block.
//
// Access widths are those of the host compiler's code for the kernel (clang
// vectorises 16-byte Pack copies into one 16-byte access, as nvcc and hipcc
// do); where nvcc would split an access the host compiler keeps whole, the
// counters are optimistic. So they are where one thread's scalar accesses
// from one source line fill a 16-byte chunk that nvcc cannot prove aligned:
// the consumer assembles them into one vector access (emu_cost.cpp), nvcc
// issues them one by one (sm_80 dq_convert_kernel's 8 float loads a lane,
// 32 bytes apart across the lanes: 1.7x the ideal sectors counted, 8x per
// request on a GPU, until it read 16-byte vectors).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mixkit {
namespace emu {
namespace cost {

// A lane's part of one shared-memory request: its byte offset and width.
struct LaneAccess {
  int lane;
  uint32_t offset;
  uint32_t bytes;
};

// The phases of a request, as sets of lanes: what the hardware serves at once.
enum class Phases : uint8_t {
  nvidia,       // by width: 32, 16 or 8 consecutive lanes
  cdna_store,   // CDNA: by width, ds_write_b128 in groups of 8 consecutive lanes
  cdna_load,    // CDNA: ds_read_b128 in the lane groups above
  by_8,         // 8 consecutive lanes (ldmatrix matrices, wgmma core matrices)
};

struct Wavefronts {
  uint32_t wavefronts = 0, ideal = 0;
  std::vector<uint32_t> degrees;  // one per non-empty phase
};

// Wavefronts of one request under the 32-bank x 4-byte model.
Wavefronts shared_wavefronts(const std::vector<LaneAccess>& lanes, Phases phases);

// 32-byte sectors of one global request (byte ranges) and its ideal.
struct Sectors {
  uint32_t sectors = 0, ideal = 0;
  uint64_t bytes = 0;  // distinct bytes
};
Sectors global_sectors(std::vector<std::pair<uint64_t, uint32_t>> ranges);

// Starts counting every launch (attaches the consumer). sample_y, sample_z
// > 0 run only the blocks with blockIdx.y < sample_y and blockIdx.z <
// sample_z (the counts are those of the blocks run; the report scales them,
// and the launch's results are then incomplete): for benchmark shapes whose
// blocks along y and z (heads, batch, N tiles) repeat the same work.
// sample_x > 0 also runs only sample_x blocks along x, from the middle of
// the row (grid.x / 2), of the launches with grid.y > sample_y > 0: the
// steady state of a long sequence's tiles, whose per-block counts stand;
// totals over the grid and distinct sectors do not (blocks along x share
// K/V windows or weights).
void start(int sample_y = 0, int sample_z = 0, int sample_x = 0);
// Stops, and returns the launches counted since start() as JSON.
std::string stop();
bool running();

// Runs one of the hand-calculable kernels of cost_probes.cpp under the
// counters and returns its launches as stop() does.
std::string probe(const std::string& name, int variant);

// The planted layout error of the gate's test (emu::mutation() 30): flash
// attention's shared tiles without their swizzle (flash::swz). A call, not a
// read of the mutation in kernel code, so the check costs the counters no
// global load.
bool unswizzled();

}  // namespace cost
}  // namespace emu
}  // namespace mixkit
