// y[R, N] = x[R, K] @ W for a kernel W [K, N] stored packed as [N / 32, K, 32]: panel p holds
// columns 32p .. 32p+31 of every row k contiguously. (`griffin_jax/cpu_kernels.py` builds and
// registers this as the XLA FFI target "griffin_packed_matmul" on the CPU.)
//
// Why packed: XLA's CPU libraries pack a product's weights on every call, so a product of a
// few rows reads and writes them more than once; this reads each weight once, in order. Each
// output element is one sum over k in ascending order whatever R or the row block, so a row's
// result does not depend on how many rows share the product.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "chunks.h"
#include "simd.h"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using griffin::kLanes;
using griffin::Load;
using griffin::Store;
using griffin::v16;

constexpr int64_t kPanel = 32;  // columns per panel (two vectors)

// Rows [0, MR) of x (row stride ldx) times NP panels (K x 32 each, `stride` floats apart),
// into y (row stride ldy). Several panels at once keep 2 x MR x NP sums in flight: one row's
// two sums alone would wait on each other's additions (latency), not on memory.
template <int MR, int NP>
inline void Block(int64_t k_dim, const float* x, int64_t ldx, const float* w, int64_t stride,
                  float* y, int64_t ldy) {
  v16 lo[MR][NP], hi[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) lo[m][j] = hi[m][j] = v16{};
  for (int64_t k = 0; k < k_dim; ++k) {
    for (int j = 0; j < NP; ++j) {
      const v16 w0 = Load(w + j * stride + k * kPanel);
      const v16 w1 = Load(w + j * stride + k * kPanel + kLanes);
      for (int m = 0; m < MR; ++m) {
        const float s = x[m * ldx + k];
        lo[m][j] += s * w0;
        hi[m][j] += s * w1;
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) {
      Store(y + m * ldy + j * kPanel, lo[m][j]);
      Store(y + m * ldy + j * kPanel + kLanes, hi[m][j]);
    }
}

constexpr int kRows = 8;  // row block of the main loop

// Every row of x times NP panels starting at w, into y's matching columns.
template <int NP>
void Panels(int64_t rows, int64_t k_dim, int64_t n_dim, const float* x, const float* w,
            float* y) {
  const int64_t stride = k_dim * kPanel;
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows)
    Block<kRows, NP>(k_dim, x + m * k_dim, k_dim, w, stride, y + m * n_dim, n_dim);
  const float* xr = x + m * k_dim;
  float* yr = y + m * n_dim;
  switch (rows - m) {
    case 1: Block<1, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    case 2: Block<2, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    case 3: Block<3, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    case 4: Block<4, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    case 5: Block<5, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    case 6: Block<6, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    case 7: Block<7, NP>(k_dim, xr, k_dim, w, stride, yr, n_dim); break;
    default: break;
  }
}

// Panels a block takes at once: 4 for one row, 2 for up to four, else 1.
inline int64_t GroupOf(int64_t rows) { return rows == 1 ? 4 : rows <= 4 ? 2 : 1; }

// Panels [p0, p1), in groups of `GroupOf(rows)`.
void PanelRange(int64_t rows, int64_t k_dim, int64_t n_dim, const float* x, const float* w,
                float* y, int64_t p0, int64_t p1) {
  const int64_t group = GroupOf(rows);
  const int64_t stride = k_dim * kPanel;
  int64_t p = p0;
  for (; group == 4 && p + 4 <= p1; p += 4)
    Panels<4>(rows, k_dim, n_dim, x, w + p * stride, y + p * kPanel);
  for (; group >= 2 && p + 2 <= p1; p += 2)
    Panels<2>(rows, k_dim, n_dim, x, w + p * stride, y + p * kPanel);
  for (; p < p1; ++p) Panels<1>(rows, k_dim, n_dim, x, w + p * stride, y + p * kPanel);
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1])
    return ffi::Error::InvalidArgument("griffin_packed_matmul: expected x [R, K], w [N/32, K, 32]");
  const int64_t rows = xd[0], k_dim = xd[1], panels = wd[0], n_dim = wd[0] * kPanel;
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  // The panels are split between the threads (the caller and chunks.h's helpers), in whole
  // groups of `GroupOf(rows)`; a product of one panel runs where it is.
  const int64_t threads = griffin::Threads(pool);
  const int64_t target = std::min<int64_t>(panels, 4 * threads);
  const int64_t group = GroupOf(rows);
  const int64_t per_chunk = ((panels + target - 1) / target + group - 1) / group * group;
  griffin::RunChunks(pool, (panels + per_chunk - 1) / per_chunk, [&](int64_t c) {
    PanelRange(rows, k_dim, n_dim, xs, ws, ys, c * per_chunk, std::min(panels, (c + 1) * per_chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

// Where the kernels' chunks go from now on (chunks.h): -1 = as `GRIFFIN_CPU_THREADS` says, 0 =
// the library's helpers, 1 = XLA's pool.
extern "C" void GriffinSetChunkThreads(int choice) {
  griffin::ChunkThreads().store(choice < 0 ? -1 : choice > 0 ? 1 : 0);
}

// The setting in force (what `GriffinSetChunkThreads` or a program's `GriffinChunksHere` set).
extern "C" int GriffinChunkThreadsNow() { return griffin::ChunkThreads().load(); }

namespace {

// out = x; first, where the kernels' chunks go from now on as `choice` (a scalar) says: -2
// leaves it, otherwise as `GriffinSetChunkThreads`. A program runs it where a piece of it
// starts (`cpu_kernels.chunks_here`), the data dependency on x ordering it before that piece.
ffi::Error ChunksHere(ffi::Buffer<ffi::S32> choice, ffi::Buffer<ffi::S32> x,
                      ffi::ResultBuffer<ffi::S32> out) {
  const int32_t c = choice.typed_data()[0];
  if (c != -2) GriffinSetChunkThreads(c);
  std::memcpy(out->typed_data(), x.typed_data(), x.element_count() * sizeof(int32_t));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinChunksHere, ChunksHere,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
