// out[i, :] = table[ids[i], :] for an f32 table [V, D] and int32 ids [R] (an id in [-V, 0)
// counts from the end, one outside [-V, V) gives a row of NaNs: `jnp.take(table, ids, axis=0)`).
// The XLA FFI target "griffin_take_rows" on the CPU (`griffin_jax/cpu_kernels.py`).
//
// Why: XLA's CPU backend split the few-row embedding lookup of a verification or a draft
// trunk between its pool's threads, and a round then waited ~40 us for a pool thread to wake
// to copy 5 rows of 256 floats (~1 us of work on the calling thread).

#include <cstdint>
#include <cstring>
#include <limits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error TakeRows(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> ids,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions();
  if (td.size() != 2 || ids.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("griffin_take_rows: expected table [V, D], ids [R]");
  const int64_t v_dim = td[0], d_dim = td[1], rows = ids.dimensions()[0];
  const float* t = table.typed_data();
  const int32_t* id = ids.typed_data();
  float* o = out->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    int64_t i = id[r] < 0 ? id[r] + v_dim : id[r];
    if (i >= 0 && i < v_dim) {
      std::memcpy(o + r * d_dim, t + i * d_dim, d_dim * sizeof(float));
    } else {
      for (int64_t j = 0; j < d_dim; ++j) o[r * d_dim + j] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinTakeRows, TakeRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
