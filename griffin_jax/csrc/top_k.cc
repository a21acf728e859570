// The k largest log-probabilities of each row of logits [R, V] (f32): values [R, k] =
// log_softmax(logits)[r, i] at the chosen i, and indices [R, k] (int32), in descending order of
// value, ties to the smaller index (as `jax.lax.top_k`). The XLA FFI target
// "griffin_top_k_log_softmax" on the CPU (`griffin_jax/cpu_kernels.py` builds and registers it).
//
// Why: a draft tree level soft-maxed its [R, V] logits and took `lax.top_k` of the result as
// separate XLA operations: on the CPU the soft-max's two reductions and the top-k took ~0.3 ms
// a level for 10 rows of 8,192 (the level's lm_head product 0.31 ms). One pass per row finds
// the max, one sums e^(x - max), and one keeps the k largest, skipping each 16-value block
// none of whose values beats the k-th so far.
//
// Also "griffin_argmax": each row's first index of its maximum (greedy targets, acceptance).
// XLA's CPU backend ran `sampling.argmax`'s max as a YNNPACK reduction that took ~120 us for
// the 5 x 8,192 logits of a verification, and its first-index pass another ~45 us.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "chunks.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using griffin::Exp;
using griffin::kLanes;
using griffin::Load;
using griffin::Splat;
using griffin::v16;

// The largest value of x [V] (-inf for a row of NaNs and -infs: NaNs never win).
float RowMax(const float* x, int64_t v_dim) {
  const int64_t whole = v_dim / kLanes * kLanes;
  float top = -__builtin_inff();
  v16 m = Splat(-__builtin_inff());
  for (int64_t i = 0; i < whole; i += kLanes) {
    const v16 y = Load(x + i);
    m = y > m ? y : m;
  }
  for (int l = 0; l < kLanes; ++l) top = std::max(top, m[l]);
  for (int64_t i = whole; i < v_dim; ++i) top = std::max(top, x[i]);
  return top;
}

// Row x [V] -> its k largest values and their indices (descending, ties to the smaller index)
// as log-probabilities: (x - max) - log(sum e^(x - max)), the order of `jax.nn.log_softmax`.
void Row(const float* x, int64_t v_dim, int64_t k, float* values, int32_t* indices) {
  const int64_t whole = v_dim / kLanes * kLanes;
  const float top = RowMax(x, v_dim);
  float sum = 0.0f;
  {
    v16 total{};
    for (int64_t i = 0; i < whole; i += kLanes) total += Exp(Load(x + i) - top);
    for (int l = 0; l < kLanes; ++l) sum += total[l];
    for (int64_t i = whole; i < v_dim; ++i) {
      v16 one = Splat(-__builtin_inff());
      one[0] = x[i] - top;
      sum += Exp(one)[0];
    }
  }
  const float lse = std::log(sum);
  // The k best so far, sorted: values descending, equal values in index order.
  int64_t count = 0;
  auto offer = [&](float y, int32_t i) {
    if (count == k && !(y > values[k - 1])) return;  // ties keep the earlier index
    int64_t at = count < k ? count++ : k - 1;
    while (at > 0 && y > values[at - 1]) {
      values[at] = values[at - 1];
      indices[at] = indices[at - 1];
      --at;
    }
    values[at] = y;
    indices[at] = i;
  };
  auto block_max = [](v16 y) {  // the largest of 16 values
    float m = y[0];
    for (int l = 1; l < kLanes; ++l) m = std::max(m, y[l]);
    return m;
  };
  auto block = [&](int64_t i, v16 y) {
    if (count == k && !(block_max(y) > values[k - 1])) return;
    for (int l = 0; l < kLanes; ++l) offer(y[l], static_cast<int32_t>(i + l));
  };
  int64_t i = 0;
  for (; i + 4 * kLanes <= whole; i += 4 * kLanes) {  // 64 values at a time while none beats
    const v16 a = Load(x + i), b = Load(x + i + kLanes);
    const v16 c = Load(x + i + 2 * kLanes), e = Load(x + i + 3 * kLanes);
    const v16 ab = a > b ? a : b, ce = c > e ? c : e;
    if (count == k && !(block_max(ab > ce ? ab : ce) > values[k - 1])) continue;
    block(i, a);
    block(i + kLanes, b);
    block(i + 2 * kLanes, c);
    block(i + 3 * kLanes, e);
  }
  for (; i < whole; i += kLanes) block(i, Load(x + i));
  for (i = whole; i < v_dim; ++i) offer(x[i], static_cast<int32_t>(i));
  for (int64_t j = 0; j < count; ++j) values[j] = (values[j] - top) - lse;
}

ffi::Error TopKLogSoftmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, int64_t k,
                          ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices) {
  const auto d = logits.dimensions();
  if (d.size() != 2 || k < 1 || k > d[1])
    return ffi::Error::InvalidArgument(
        "griffin_top_k_log_softmax: expected logits [R, V] and 1 <= k <= V");
  const int64_t rows = d[0], v_dim = d[1];
  const float* x = logits.typed_data();
  float* out_v = values->typed_data();
  int32_t* out_i = indices->typed_data();
  // A level's few rows run where they are (a split costs more than it saves on them).
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(v_dim, 1));
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  auto run = [&](int64_t c) {
    for (int64_t r = c * per_chunk; r < std::min(rows, (c + 1) * per_chunk); ++r)
      Row(x + r * v_dim, v_dim, k, out_v + r * k, out_i + r * k);
  };
  griffin::RunChunks(pool, chunks, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinTopKLogSoftmax, TopKLogSoftmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

namespace {

// Each row's first index of its largest value: one pass for the max, then the first index
// holding it (a row of NaNs gives V - 1, an index in range, as `sampling.argmax` promises).
ffi::Error Argmax(ffi::Buffer<ffi::F32> logits, ffi::ResultBuffer<ffi::S32> index) {
  const auto d = logits.dimensions();
  if (d.size() != 2 || d[1] < 1)
    return ffi::Error::InvalidArgument("griffin_argmax: expected logits [R, V] with V >= 1");
  const int64_t rows = d[0], v_dim = d[1];
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits.typed_data() + r * v_dim;
    const float top = RowMax(x, v_dim);
    int64_t i = 0;
    while (i < v_dim - 1 && !(x[i] == top)) ++i;
    index->typed_data()[r] = static_cast<int32_t>(i);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinArgmax, Argmax,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
