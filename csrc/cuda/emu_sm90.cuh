// Hopper's warpgroup instructions (wgmma.mma_async with shared-memory
// descriptors, its fence/commit/wait, fence.proxy.async) on the emulated GPU.
// Included by wgmma_sm90.cuh in MIXKIT_EMULATE builds, after smem_desc.
//
// Semantics (PTX ISA 8.x, "Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate Operation"):
// - Every instruction is warpgroup-collective (.sync.aligned): the 128
//   threads meet at emu::group_sync(128), and wgmma.mma_async fails unless
//   they pass the same descriptors, scale_d and shape.
// - wgmma.mma_async is asynchronous. The emulator takes A's registers (RS
//   form) at issue, and performs the multiply-accumulate at the
//   wgmma.wait_group that covers its commit group, the latest the hardware
//   may: it reads shared memory and the accumulators then. A kernel that
//   reads accumulators, or overwrites its shared operands, before that wait
//   sees the old values, as a missing wait would on the GPU. Each thread's
//   pending wgmmas keep a pointer to its accumulator array, which must stay
//   alive until the wait (on the GPU: the registers stay in place).
// - A wgmma issued with no wgmma.fence since the thread's last wait_group (or
//   kernel start) fails: the ISA requires the fence before the first wgmma
//   and between register accesses and the wgmmas that use those registers.
//   The emulator cannot see register accesses, so it asks for a fence after
//   every wait (stricter than the ISA when no register was touched since;
//   mixkit's kernels fence before each batch, as CUTLASS does).
// - Nothing checks that a kernel waits out its wgmmas before it exits: the
//   pending ones are dropped when the OS thread next runs that thread id in a
//   block of another index or shared-memory buffer (see state(); the runtime
//   has no per-thread hook for it, so a relaunch of the same block index into
//   a buffer at the same address would inherit them).
// - fence.proxy.async is collective-free and a no-op: the emulator's shared
//   memory has one proxy.
// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"): start address,
// LBO and SBO in 16-byte units over the 32-bit shared window (offsets into
// the block's dynamic shared memory, emu::shared_ptr), base offset 0 and the
// 128-byte swizzle only (anything else fails). The swizzle is a function of
// the address: 16-byte chunk bits 4-6 XOR row bits 7-9, so with a base offset
// of 0 every pattern must start at a multiple of 1024 bytes plus an offset
// inside one 128-byte row (bits 7-9 of the start address zero).
// Canonical layouts, T = 8 16-bit elements (see wgmma_sm90.cuh):
//   K-major  (row r, k):  start + (r % 8) * 128 + (r / 8) * SBO + 2 k
//   MN-major (n, k):      start + 2 (n % 64) + (n / 64) * LBO + (k % 8) * 128 + (k / 8) * SBO
// Register fragments (warp w of the warpgroup owns rows 16w .. 16w + 15,
// g = lane / 4, c = 2 (lane % 4)):
//   D: d[4i + 2h + j] = (16w + g + 8h, 8i + c + j)
//   A: a[h + 2q] = (16w + g + 8h, 8q + c .. 8q + c + 1), low half first.
// Products of 16-bit values are exact in float32; they are summed in k order
// onto the accumulator (or 0 with scale_d = 0) in float32.
//
// The pending wgmmas of an emulated thread are kept per OS thread (blocks run
// on one OS thread each) by block-linear thread id, tagged with the block
// (index, grid, shared-memory buffer) they belong to; a record left behind by
// an aborted block is dropped.
//
// tests/test_emu_wgmma.py checks these models against a numpy model of the
// layouts and fragments.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "cuda/emu.cuh"

namespace mixkit {
namespace emu {
namespace sm90 {

constexpr int kWarpgroup = 128;

struct Desc {
  uint32_t start, lbo, sbo;
};

// Decodes a descriptor, failing on the modes the emulator does not model.
inline Desc decode(uint64_t d) {
  if ((d >> 62) != 1) fail("wgmma descriptor: only the 128-byte swizzle mode (bits 62-63 = 1) is emulated");
  if ((d >> 49) & 7) fail("wgmma descriptor: a nonzero base offset (bits 49-51) is not emulated");
  constexpr uint64_t kReserved = (uint64_t(3) << 14) | (uint64_t(3) << 30) | (uint64_t(7) << 46) |
                                 (uint64_t(0x3FF) << 52);
  if (d & kReserved) fail("wgmma descriptor: reserved bits set");
  Desc r{uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4};
  if (r.start & 0x380)
    fail("wgmma descriptor: a 128B-swizzled pattern must start on a 1024-byte boundary (plus an offset inside "
         "the first 128-byte row) when the base offset is 0");
  if (mutation() == 10) r.sbo /= 2;
  if (mutation() == 15) r.lbo = 0;
  return r;
}

inline uint32_t swizzle128(uint32_t addr) {
  if (mutation() == 13) return addr;
  return addr ^ (((addr >> 7) & 7u) << 4);
}
inline uint32_t k_major(const Desc& d, int r, int k) {
  return swizzle128(d.start + uint32_t(r % 8) * 128 + uint32_t(r / 8) * d.sbo + uint32_t(2 * k));
}
inline uint32_t mn_major(const Desc& d, int n, int k) {
  if (mutation() == 11) {  // n % 8 and k % 8 exchanged: each 8x8 core matrix read untransposed
    const int n8 = n % 8, k8 = k % 8;
    n += k8 - n8;
    k += n8 - k8;
  }
  return swizzle128(d.start + uint32_t(2 * (n % 64)) + uint32_t(n / 64) * d.lbo + uint32_t(k % 8) * 128 +
                    uint32_t(k / 8) * d.sbo);
}

struct Op {
  bool rs, bf16, mn_major_b;
  int n, scale_d;
  uint64_t da, db;
  float* d;
  float a[2][16];  // RS: this thread's rows g and g + 8 of A, taken at issue
  trace::Site site;
};
struct State {
  const unsigned char* smem = nullptr;  // the block this record belongs to
  Index3 bid{}, gdim{};
  bool fenced = false;
  std::vector<Op> ops;
  std::vector<size_t> group_ends;  // ops[0, group_ends[i]) belong to committed groups 0..i
};

// This emulated thread's record. The block's fibers share the OS thread's
// table, which grows while others hold their records: hence one allocation
// per record.
inline State& state() {
  static thread_local std::vector<std::unique_ptr<State>> states;
  const size_t t = size_t(linear_tid());
  while (states.size() <= t) states.push_back(std::make_unique<State>());
  State& s = *states[t];
  const Index3 b = block_idx(), g = grid_dim();
  if (s.smem != dynamic_smem() || s.bid.x != b.x || s.bid.y != b.y || s.bid.z != b.z || s.gdim.x != g.x ||
      s.gdim.y != g.y || s.gdim.z != g.z) {
    s = State{};
    s.smem = dynamic_smem();
    s.bid = b;
    s.gdim = g;
  }
  return s;
}

inline void check_rank() {
  if (int(block_dim().x * block_dim().y * block_dim().z) % kWarpgroup)
    fail("wgmma needs whole warpgroups: the block's thread count is not a multiple of 128");
}

MIXKIT_EMU_OUTLINE inline void fence(const trace::Site& site) {
  trace::Quiet quiet;
  check_rank();
  trace::instruction("wgmma.fence", site);
  group_sync(kWarpgroup, "wgmma.fence");
  state().fenced = true;
}
MIXKIT_EMU_OUTLINE inline void commit(const trace::Site& site) {
  trace::Quiet quiet;
  check_rank();
  trace::instruction("wgmma.commit_group", site);
  group_sync(kWarpgroup, "wgmma.commit_group");
  State& s = state();
  s.group_ends.push_back(s.ops.size());
}

// Issues one wgmma: checks the warpgroup agrees, takes A's registers (RS).
MIXKIT_EMU_OUTLINE inline void issue(Op op, const uint32_t* a) {
  trace::Quiet quiet;
  check_rank();
  // The shape in the name: the cost counters (emu_cost.cpp) count its FLOPs.
  trace::instruction(op.n == 64 ? "wgmma.mma_async.m64n64k16" : "wgmma.mma_async.m64n128k16", op.site);
  State& s = state();
  if (!s.fenced) fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
  struct Post {
    uint64_t da, db;
    int32_t n, scale_d, rs, bf16, mn;
    uint32_t a[4];
  } mine{op.da, op.db, op.n, op.scale_d, op.rs, op.bf16, op.mn_major_b, {0, 0, 0, 0}};
  if (op.rs) {
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    if (mutation() == 14) std::swap(mine.a[1], mine.a[2]);
  }
  unsigned char* scratch = group_scratch(kWarpgroup);
  const int t = linear_tid() % kWarpgroup;
  std::memcpy(scratch + t * kScratchBytes, &mine, sizeof(mine));
  group_sync(kWarpgroup, "wgmma.mma_async");
  Post first;
  std::memcpy(&first, scratch, sizeof(first));
  const bool same = first.da == mine.da && first.db == mine.db && first.n == mine.n &&
                    (first.scale_d != 0) == (mine.scale_d != 0) && first.rs == mine.rs && first.bf16 == mine.bf16 &&
                    first.mn == mine.mn;
  if (op.rs) {
    // Row 16w + g + 8h, k: lane 4 g + (k % 8) / 2 of this warp, register h + 2 (k / 8), half k % 2.
    const int warp0 = t / 32 * 32, g = (t % 32) / 4;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) {
        Post p;
        std::memcpy(&p, scratch + (warp0 + 4 * g + (k % 8) / 2) * kScratchBytes, sizeof(p));
        const uint32_t v = p.a[h + 2 * (k / 8)];
        const uint16_t bits = uint16_t(k % 2 ? v >> 16 : v & 0xffffu);
        op.a[h][k] = op.bf16 ? to_f32(bf16{bits}) : to_f32(f16{bits});
      }
  }
  group_sync(kWarpgroup, "wgmma.mma_async");
  if (!same) fail("wgmma.mma_async: the threads of a warpgroup pass different descriptors, shapes or scale_d");
  // Unsupported modes fail at the instruction; the operands are read at the wait.
  if (!op.rs) decode(op.da);
  decode(op.db);
  s.ops.push_back(op);
}

// Performs one wgmma for this thread's accumulators.
inline void perform(const Op& op) {
  const int t = linear_tid() % kWarpgroup;
  const int w = t / 32, g = (t % 32) / 4, c = 2 * (t % 4);
  const Desc db = decode(op.db);
  const bool mn = op.mn_major_b;
  // One bounds check over the furthest byte any operand element can be at.
  uint32_t far = 0;
  auto widest = [&](uint32_t addr) { far = addr > far ? addr : far; };
  float A[2][16];
  float B[16][32];  // this thread's columns 8i + c + j (i < N / 8 <= 16) by k: B[k][2i + j]
  const int cols = op.n / 8;
  Desc da{};
  if (!op.rs) da = decode(op.da);
  for (int k = 0; k < 16; ++k) {
    if (!op.rs)
      for (int h = 0; h < 2; ++h) widest(k_major(da, 16 * w + g + 8 * h, k));
    for (int i = 0; i < cols; ++i)
      for (int j = 0; j < 2; ++j) widest(mn ? mn_major(db, 8 * i + c + j, k) : k_major(db, 8 * i + c + j, k));
  }
  const unsigned char* smem = static_cast<const unsigned char*>(shared_ptr(0, size_t(far) + 2));
  auto load = [&](uint32_t addr) {
    if (addr % 2) fail("wgmma: a misaligned operand element");
    uint16_t bits;
    std::memcpy(&bits, smem + addr, 2);
    return op.bf16 ? to_f32(bf16{bits}) : to_f32(f16{bits});
  };
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) A[h][k] = op.rs ? op.a[h][k] : load(k_major(da, 16 * w + g + 8 * h, k));
  if (t % 32 == 0 && trace::active()) {
    // The bytes this warp's slice reads (its 16 A rows, all of B), in the
    // 16-byte pieces of the layouts: 8 consecutive k (K-major) or n (MN-major).
    auto piece = [&](uint32_t addr) { trace::model_access(trace::Kind::wgmma, smem + addr, 16, op.site); };
    for (int kc = 0; kc < 2; ++kc) {
      if (!op.rs)
        for (int r = 0; r < 16; ++r) piece(k_major(da, 16 * w + r, 8 * kc));
      if (!mn)
        for (int n = 0; n < op.n; ++n) piece(k_major(db, n, 8 * kc));
    }
    // Core matrix by core matrix (8 k rows of 8 n), as for K-major: the cost
    // counters take each 8 consecutive pieces as one shared-memory phase.
    if (mn)
      for (int k0 = 0; k0 < 16; k0 += 8)
        for (int n = 0; n < op.n; n += 8)
          for (int k = k0; k < k0 + 8; ++k) piece(mn_major(db, n, k));
  }
  float out[64];
  for (int i = 0; i < cols; ++i)
    for (int j = 0; j < 2; ++j) {
      const int n = 8 * i + c + j;
      for (int k = 0; k < 16; ++k) B[k][2 * i + j] = load(mn ? mn_major(db, n, k) : k_major(db, n, k));
    }
  for (int i = 0; i < cols; ++i)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 2; ++j) {
        const int r = 4 * i + 2 * h + j;
        float acc = op.scale_d ? op.d[r] : 0.f;
        for (int k = 0; k < 16; ++k) acc += A[h][k] * B[k][2 * i + j];
        out[r] = acc;
      }
  if (mutation() == 12)
    for (int i = 0; i < cols; ++i) std::swap(out[4 * i + 1], out[4 * i + 2]);
  for (int r = 0; r < op.n / 2; ++r) op.d[r] = out[r];
}

// wgmma.wait_group n: every committed group but the newest n is complete.
MIXKIT_EMU_OUTLINE inline void wait(int n, const trace::Site& site) {
  trace::Quiet quiet;
  check_rank();
  trace::instruction("wgmma.wait_group", site);
  group_sync(kWarpgroup, "wgmma.wait_group");
  State& s = state();
  const int groups = int(s.group_ends.size());
  if (groups > n) {
    // Taken off the queue first: a launch that fails inside perform leaves
    // nothing behind for a later block to write into dead accumulators.
    const size_t done = s.group_ends[size_t(groups - n - 1)];
    std::vector<Op> now(s.ops.begin(), s.ops.begin() + long(done));
    s.ops.erase(s.ops.begin(), s.ops.begin() + long(done));
    s.group_ends.erase(s.group_ends.begin(), s.group_ends.begin() + (groups - n));
    for (size_t& e : s.group_ends) e -= done;
    for (const Op& op : now) perform(op);
  }
  s.fenced = false;
  // Nobody leaves the wait (and writes shared memory) before the warpgroup's
  // multiply-accumulates have read it.
  group_sync(kWarpgroup, "wgmma.wait_group");
}

}  // namespace sm90
}  // namespace emu

namespace sm90 {

using emu::trace::Site;
inline void wgmma_fence(const Site& site = {}) { emu::sm90::fence(site); }
inline void wgmma_commit(const Site& site = {}) { emu::sm90::commit(site); }
template <int N>
inline void wgmma_wait(const Site& site = {}) {
  emu::sm90::wait(N, site);
}
// No-op for the data (one proxy here), but the race checker wants it between
// a thread's generic-proxy writes and the wgmmas that read them.
inline void fence_proxy_async(const Site& site = {}) { emu::trace::proxy_fence(site); }
template <int N>
inline void pin(float (&)[N]) {}

template <class T, int N, bool MN_MAJOR_B = false>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d, const Site& site = {}) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
  emu::sm90::Op op{};
  op.rs = false;
  op.bf16 = std::is_same_v<T, bf16>;
  op.mn_major_b = MN_MAJOR_B;
  op.n = N;
  op.scale_d = scale_d != 0;
  op.da = da;
  op.db = db;
  op.d = d;
  op.site = site;
  emu::sm90::issue(op, nullptr);
}
template <class T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d, const Site& site = {}) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
  emu::sm90::Op op{};
  op.rs = true;
  op.bf16 = std::is_same_v<T, bf16>;
  op.mn_major_b = true;
  op.n = N;
  op.scale_d = scale_d != 0;
  op.da = 0;
  op.db = db;
  op.d = d;
  op.site = site;
  emu::sm90::issue(op, a);
}

}  // namespace sm90
}  // namespace mixkit
