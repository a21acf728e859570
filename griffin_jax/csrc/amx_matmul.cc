// y[R, N] = x[R, K] @ W for a kernel W [K, N] whose values are all bf16 numbers, stored as
// bf16 tiles [N / 16, K / 2, 32]: tile t, pair p holds W[2p, 16t + n] and W[2p + 1, 16t + n]
// side by side for n = 0 .. 15 (Intel AMX's layout for the second operand). The XLA FFI
// target "griffin_amx_matmul" on a CPU with AMX (`griffin_jax/cpu_kernels.py` builds,
// registers and chooses it; `GriffinAmxReady` says whether this process may use the tiles).
//
// Why: the f32 kernel of `packed_matmul.cc` runs at the vector units' rate, which a product
// of 60 rows (a tree verification) meets; AMX's tile unit multiplies bf16 pairs into f32 sums
// several times faster, and bf16 weights are half the bytes a decode reads. The weights lose
// nothing (they are bf16 numbers already: `cpu_kernels.pack` checks); each f32 input is split
// exactly into three bf16 numbers, hi + mid + lo (each one truncated off what the ones before
// left: 8 + 8 + 8 significant bits of f32's 24), so every product of a weight and a part is
// exact in f32 and the only roundings are the f32 sums, as in an f32 product.
//
// Each output element is the same sequence of tile operations over K whatever R or the row
// block (a tile's rows are independent), so a row's result does not depend on how many rows
// share the product.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define GRIFFIN_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileRows = 16;  // rows of x (and of y) a tile holds
constexpr int64_t kTileCols = 16;  // columns of y a tile holds
constexpr int64_t kStep = 32;      // K values one tile product takes
constexpr int64_t kGroup = 4;      // output tiles in flight: 64 columns

#ifdef GRIFFIN_AMX

// Whether the CPU has AMX-TILE and AMX-BF16 and Linux lets this process use the tile data
// (asked once: the permission holds for every thread of the process).
bool AskForTiles() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool TilesReady() {
  static const bool ready = AskForTiles();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 hold sums of `rows` x 16 columns, 4-6 the three parts of `rows` rows of x over
// 32 K values, 7 the weights' 16 pairs x 16 columns.
__attribute__((target("amx-tile"))) void Configure(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  cfg.rows[7] = kStep / 2;
  cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
}

// Rows of x (the three parts, row stride K) times output tiles [t0, t0 + NT) of w, into y
// (row stride ldy). Sums over K in steps of 32, hi then mid then lo at each step.
template <int NT>
__attribute__((target("amx-tile,amx-bf16"))) void Tiles(int64_t k_dim, const uint16_t* hi,
                                                        const uint16_t* mid, const uint16_t* lo,
                                                        const uint16_t* w, float* y,
                                                        int64_t ldy) {
  const int64_t a_stride = k_dim * 2;          // bytes between rows of a part
  const int64_t tile_size = k_dim / 2 * 32;    // elements of w per output tile
  if (NT > 0) _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (NT > 2) _tile_zero(2);
  if (NT > 3) _tile_zero(3);
  for (int64_t k = 0; k < k_dim; k += kStep) {
    _tile_loadd(4, hi + k, a_stride);
    _tile_loadd(5, mid + k, a_stride);
    _tile_loadd(6, lo + k, a_stride);
    const uint16_t* wk = w + k / 2 * 32;
#define GRIFFIN_TILE_STEP(T)                        \
  if (NT > T) {                                     \
    _tile_loadd(7, wk + T * tile_size, 64);         \
    _tile_dpbf16ps(T, 4, 7);                        \
    _tile_dpbf16ps(T, 5, 7);                        \
    _tile_dpbf16ps(T, 6, 7);                        \
  }
    GRIFFIN_TILE_STEP(0)
    GRIFFIN_TILE_STEP(1)
    GRIFFIN_TILE_STEP(2)
    GRIFFIN_TILE_STEP(3)
#undef GRIFFIN_TILE_STEP
  }
  const int64_t ld = ldy * 4;
  if (NT > 0) _tile_stored(0, y, ld);
  if (NT > 1) _tile_stored(1, y + kTileCols, ld);
  if (NT > 2) _tile_stored(2, y + 2 * kTileCols, ld);
  if (NT > 3) _tile_stored(3, y + 3 * kTileCols, ld);
}

__attribute__((target("amx-tile"))) void Release() { _tile_release(); }

#endif  // GRIFFIN_AMX

inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float Float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// x's rows split into three bf16 parts, each [rows_pad, K] (rows past R are 0), in this
// thread's scratch: each thread splits the rows for itself, since tile loads of parts another
// core has just written ran at half speed (the lines cross between the cores' caches). A
// thread that takes several chunks of one call with the same rows splits them once (`call`
// numbers the products).
struct Parts {
  const uint16_t* hi;
  const uint16_t* mid;
  const uint16_t* lo;
};

std::atomic<uint64_t> g_calls{0};

Parts Split(uint64_t call, const float* x, int64_t rows, int64_t rows_pad, int64_t k_dim) {
  thread_local std::vector<uint16_t> scratch;
  thread_local uint64_t last_call = ~uint64_t{0};
  thread_local const float* last_x = nullptr;
  const int64_t plane = rows_pad * k_dim;
  uint16_t* hi = scratch.data();
  if (call == last_call && x == last_x && static_cast<int64_t>(scratch.size()) >= 3 * plane)
    return {hi, hi + plane, hi + 2 * plane};
  if (static_cast<int64_t>(scratch.size()) < 3 * plane) scratch.resize(3 * plane);
  last_call = call;
  last_x = x;
  hi = scratch.data();
  uint16_t* mid = hi + plane;
  uint16_t* lo = mid + plane;
  for (int64_t i = 0; i < rows * k_dim; ++i) {
    const uint32_t h = Bits(x[i]) & 0xFFFF0000u;
    const float r = x[i] - Float(h);  // exact: x's 16 low significant bits
    const uint32_t m = Bits(r) & 0xFFFF0000u;
    const float l = r - Float(m);  // exact, and a bf16 number (<= 8 significant bits)
    hi[i] = static_cast<uint16_t>(h >> 16);
    mid[i] = static_cast<uint16_t>(m >> 16);
    lo[i] = static_cast<uint16_t>(Bits(l) >> 16);
  }
  for (int64_t i = rows * k_dim; i < plane; ++i) hi[i] = mid[i] = lo[i] = 0;
  return {hi, mid, lo};
}

// Products of this many multiply-adds or more are split between threads (a decode's
// 256 x 256 products are not), in up to two chunks a thread.
constexpr int64_t kSplitWork = int64_t{1} << 16;
constexpr int64_t kChunksPerThread = 2;

ffi::Error AmxMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                     ffi::ResultBuffer<ffi::F32> y) {
#ifdef GRIFFIN_AMX
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 32 || wd[1] * 2 != xd[1] || xd[1] % kStep)
    return ffi::Error::InvalidArgument(
        "griffin_amx_matmul: expected x [R, K], w [N/16, K/2, 32] with K % 32 == 0");
  if (!TilesReady()) return ffi::Error::Internal("griffin_amx_matmul: AMX tiles unavailable");
  const int64_t rows = xd[0], k_dim = xd[1], tiles = wd[0], n_dim = wd[0] * kTileCols;
  if (rows == 0 || tiles == 0) return ffi::Error::Success();
  // One row block of `rows` rows, or blocks of 16 with the last one padded with zero rows
  // (its sums land in `tail` and only the real rows are copied out).
  const int64_t block = std::min(rows, kTileRows);
  const int64_t blocks = (rows + block - 1) / block;
  const float* xs = x.typed_data();
  const auto* ws = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* ys = y->typed_data();
  // Chunks: runs of 64-column groups, and runs of row blocks too where there are fewer
  // groups than threads (a product of 256 columns is one group); a product of many rows (a
  // prefill) in runs of row blocks alone, each thread reading every weight once.
  const int64_t groups = (tiles + kGroup - 1) / kGroup;
  const int64_t threads = griffin::Threads(pool);
  int64_t col_chunks = 1, row_chunks = 1;
  if (rows * k_dim * n_dim >= kSplitWork) {
    if (blocks >= 4 * threads) {
      row_chunks = kChunksPerThread * threads;
    } else {
      col_chunks = std::min(groups, kChunksPerThread * threads);
      if (col_chunks < threads) row_chunks = std::min(blocks, threads);
    }
  }
  const int64_t per_col = (groups + col_chunks - 1) / col_chunks;
  const int64_t per_row = (blocks + row_chunks - 1) / row_chunks;
  col_chunks = (groups + per_col - 1) / per_col;
  row_chunks = (blocks + per_row - 1) / per_row;
  const uint64_t call = g_calls.fetch_add(1, std::memory_order_relaxed);
  griffin::RunChunks(pool, col_chunks * row_chunks, [&](int64_t c) {
    const int64_t g0 = c % col_chunks * per_col, g1 = std::min(groups, g0 + per_col);
    const int64_t m0 = c / col_chunks * per_row * block;
    const int64_t m1 = std::min(rows, m0 + per_row * block);
    const int64_t pad = (m1 - m0 + block - 1) / block * block;
    const Parts parts = Split(call, xs + m0 * k_dim, m1 - m0, pad, k_dim);
    Configure(static_cast<int>(block));
    alignas(64) float tail[kTileRows * kGroup * kTileCols];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t t0 = g * kGroup, nt = std::min(kGroup, tiles - t0);
      const uint16_t* wg = ws + t0 * (k_dim / 2) * 32;
      for (int64_t m = m0; m < m1; m += block) {
        const int64_t off = (m - m0) * k_dim;
        const bool whole = m + block <= rows;
        float* out = whole ? ys + m * n_dim + t0 * kTileCols : tail;
        const int64_t ld = whole ? n_dim : kGroup * kTileCols;
        const uint16_t *hi = parts.hi + off, *mid = parts.mid + off, *lo = parts.lo + off;
        switch (nt) {
          case 4: Tiles<4>(k_dim, hi, mid, lo, wg, out, ld); break;
          case 3: Tiles<3>(k_dim, hi, mid, lo, wg, out, ld); break;
          case 2: Tiles<2>(k_dim, hi, mid, lo, wg, out, ld); break;
          default: Tiles<1>(k_dim, hi, mid, lo, wg, out, ld); break;
        }
        if (!whole)
          for (int64_t r = 0; m + r < rows; ++r)
            std::memcpy(ys + (m + r) * n_dim + t0 * kTileCols, tail + r * ld,
                        nt * kTileCols * sizeof(float));
      }
    }
    Release();
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("griffin_amx_matmul: built without AMX support");
#endif
}

}  // namespace

// 1 where this process may run `griffin_amx_matmul` (the CPU has AMX-TILE and AMX-BF16 and
// Linux granted the tile data), else 0.
extern "C" int GriffinAmxReady() {
#ifdef GRIFFIN_AMX
  return TilesReady() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinAmxMatmul, AmxMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
