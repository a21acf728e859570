// Grouped-query attention of queries q [B, T, N, H] over a KV buffer k, v [B, S, KV, H] under
// a mask [B, T, S] (true = may attend), out [B, T, N, H], all f32 but the mask. The XLA FFI
// target "griffin_attention" on the CPU (`griffin_jax/cpu_kernels.py` builds and registers it).
//
// Why: XLA's CPU attention over a cache slices and transposes the keys and values into fresh
// buffers for every layer, and runs the two products as small separate library calls; this
// reads the buffer in place, up to the last slot a query may attend, scores, soft-maxes and
// sums in one pass per group of query rows.
//
// Each output row is computed the same way whatever T, the other rows or the buffer's size:
// scores are FMA chains over h in ascending order; the softmax's max and sum run over slots
// from 0 in 16-slot lanes (slots a row may not attend weigh exactly 0); the weighted sum of
// values is an FMA chain over slots in ascending order. So a verification row equals the
// decode of the same query bit for bit.

#include <algorithm>
#include <cstdint>
#include <cstring>
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
using griffin::Store;
using griffin::v16;

constexpr int64_t kSlots = 32;  // slots a score block covers (two vectors)
constexpr int kGroup = 8;       // query rows scored and summed together

// kt[h][s] = k[s][h] for slots [0, last) and every h (H % 16 == 0; rows of k `ldk` apart, kt's
// `ld` apart, zeros for slots [last, ld)), in 16 x 16 tiles: four rounds of two-vector
// shuffles swap ever smaller blocks (8, 4, 2, 1 lanes) across the diagonal.
void Transpose(const float* k, int64_t ldk, int64_t last, int64_t h_dim, float* kt, int64_t ld) {
  typedef int32_t m16 __attribute__((vector_size(64)));
  for (int64_t s = 0; s < ld; s += kLanes) {
    for (int64_t h0 = 0; h0 < h_dim; h0 += kLanes) {
      v16 r[kLanes];
      for (int i = 0; i < kLanes; ++i)
        r[i] = s + i < last ? Load(k + (s + i) * ldk + h0) : v16{};
#define SWAP_BLOCKS(B)                                                        \
  {                                                                           \
    m16 lo, hi;                                                               \
    for (int l = 0; l < kLanes; ++l) {                                        \
      lo[l] = (l & B) ? kLanes + l - B : l;                                   \
      hi[l] = (l & B) ? kLanes + l : l + B;                                   \
    }                                                                         \
    for (int i = 0; i < kLanes; ++i)                                          \
      if (!(i & B)) {                                                         \
        const v16 a = r[i], b = r[i + B];                                     \
        r[i] = __builtin_shuffle(a, b, lo);                                   \
        r[i + B] = __builtin_shuffle(a, b, hi);                               \
      }                                                                       \
  }
      SWAP_BLOCKS(8) SWAP_BLOCKS(4) SWAP_BLOCKS(2) SWAP_BLOCKS(1)
#undef SWAP_BLOCKS
      for (int j = 0; j < kLanes; ++j) Store(kt + (h0 + j) * ld + s, r[j]);
    }
  }
}

// One past the last slot mask row `m` (S slots) may attend; 0 for none.
inline int64_t End(const bool* m, int64_t s_dim) {
  int64_t s = s_dim;
  while (s >= 8) {
    uint64_t word;
    std::memcpy(&word, m + s - 8, 8);
    if (word) break;
    s -= 8;
  }
  while (s > 0 && !m[s - 1]) --s;
  return s;
}

// Scores of MR query rows (q, H apart) against slots [0, s_pad) of the transposed keys kt
// [H, ld], times `scale`, into sc (rows ld apart).
template <int MR>
void Scores(const float* q, int64_t h_dim, const float* kt, int64_t ld, int64_t s_pad, float scale,
            float* sc) {
  for (int64_t s0 = 0; s0 < s_pad; s0 += kSlots) {
    v16 lo[MR], hi[MR];
    for (int m = 0; m < MR; ++m) lo[m] = hi[m] = v16{};
    for (int64_t h = 0; h < h_dim; ++h) {
      const v16 k0 = Load(kt + h * ld + s0), k1 = Load(kt + h * ld + s0 + kLanes);
      for (int m = 0; m < MR; ++m) {
        const float x = q[m * h_dim + h];
        lo[m] += x * k0;
        hi[m] += x * k1;
      }
    }
    for (int m = 0; m < MR; ++m) {
      Store(sc + m * ld + s0, lo[m] * scale);
      Store(sc + m * ld + s0 + kLanes, hi[m] * scale);
    }
  }
}

// A mask row as scores' offsets: 0 for slots [0, pad) the row may attend, -inf elsewhere
// (from `end` on, and past the buffer's S slots).
void Offsets(const bool* mask, int64_t end, int64_t pad, float* bias) {
  const float none = -__builtin_inff();
  for (int64_t s = 0; s < end; ++s) bias[s] = mask[s] ? 0.0f : none;
  for (int64_t s = end; s < pad; ++s) bias[s] = none;
}

// A row's scores -> unnormalised weights e^(score - max) over the slots its offsets (`bias`)
// let it attend, 0 elsewhere; returns the sum of the weights (0 where it attends nothing).
float Weights(float* sc, const float* bias, int64_t pad) {
  const v16 none = Splat(-__builtin_inff());
  v16 top = none;
  for (int64_t s = 0; s < pad; s += kLanes) {
    const v16 x = Load(bias + s) == 0.0f ? Load(sc + s) : none;  // a select: NaN-safe
    Store(sc + s, x);
    top = x > top ? x : top;
  }
  float m = top[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, top[i]);
  if (m == -__builtin_inff()) {
    std::fill(sc, sc + pad, 0.0f);
    return 0.0f;
  }
  v16 total{};
  for (int64_t s = 0; s < pad; s += kLanes) {
    const v16 w = Exp(Load(sc + s) - m);
    Store(sc + s, w);
    total += w;
  }
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += total[i];
  return sum;
}

// Rows' outputs (outs[m], H wide) = weights [MR, ld] @ values (rows `ldv` apart) over slots
// [0, end), each divided by its row's weight sum (0 where a row attends nothing).
template <int MR>
void Values(const float* w, int64_t ld, int64_t end, const float* v, int64_t ldv, int64_t h_dim,
            const float* sums, float* const* outs) {
  float inv[MR];
  for (int m = 0; m < MR; ++m) inv[m] = sums[m] > 0.0f ? 1.0f / sums[m] : 0.0f;
  for (int64_t h0 = 0; h0 < h_dim; h0 += 2 * kLanes) {
    const bool two = h0 + 2 * kLanes <= h_dim;
    v16 lo[MR], hi[MR];
    for (int m = 0; m < MR; ++m) lo[m] = hi[m] = v16{};
    for (int64_t s = 0; s < end; ++s) {
      const float* vs = v + s * ldv + h0;
      const v16 v0 = Load(vs);
      const v16 v1 = two ? Load(vs + kLanes) : v16{};
      for (int m = 0; m < MR; ++m) {
        const float x = w[m * ld + s];
        lo[m] += x * v0;
        hi[m] += x * v1;
      }
    }
    for (int m = 0; m < MR; ++m) {
      Store(outs[m] + h0, lo[m] * inv[m]);
      if (two) Store(outs[m] + h0 + kLanes, hi[m] * inv[m]);
    }
  }
}

// One group of MR query rows (q: MR x H, contiguous) against slots [0, ends[m]) of its own
// mask row each: scores into sc (rows ld apart), weights, then the outputs. `bias` holds
// room for MR offset rows (ld apart); rows of one query share theirs.
template <int MR>
void Group(const float* q, int64_t h_dim, const float* kt, int64_t ld, float scale, float* sc,
           float* bias, const bool* const* masks, const int64_t* ends, const float* v,
           int64_t ldv, float* const* outs) {
  int64_t end = 0;
  for (int m = 0; m < MR; ++m) end = std::max(end, ends[m]);
  const int64_t pad = (end + kSlots - 1) / kSlots * kSlots;
  Scores<MR>(q, h_dim, kt, ld, pad, scale, sc);
  const float* rows[MR];
  for (int m = 0; m < MR; ++m) {
    if (m > 0 && masks[m] == masks[m - 1]) {
      rows[m] = rows[m - 1];
    } else {
      Offsets(masks[m], ends[m], pad, bias + m * ld);
      rows[m] = bias + m * ld;
    }
  }
  float sums[MR];
  for (int m = 0; m < MR; ++m) sums[m] = Weights(sc + m * ld, rows[m], pad);
  Values<MR>(sc, ld, end, v, ldv, h_dim, sums, outs);
}

struct Work {
  int64_t b_dim, t_dim, n_dim, kv_dim, h_dim, s_dim;
  int64_t rows;        // query rows per (batch row, KV head): G * T, query-major
  int64_t per_chunk;   // row groups per chunk
  int64_t per_head;    // chunks per (batch row, KV head)
  float scale;
  const float *q, *k, *v;
  const bool* mask;
  float* out;

  // Chunk c: row groups of one (batch row, KV head) pair.
  void RunChunk(int64_t c) {
    const int64_t head = c / per_head, first = (c % per_head) * per_chunk * kGroup;
    Run(head / kv_dim, head % kv_dim, first, std::min(rows, first + per_chunk * kGroup));
  }

  // Query rows [r0, r1) of batch row b and KV head j.
  void Run(int64_t b, int64_t j, int64_t r0, int64_t r1) {
    const int64_t g_dim = n_dim / kv_dim;
    thread_local std::vector<int64_t> ends;
    ends.assign(r1 - r0, 0);
    int64_t last = 0;
    for (int64_t r = r0, t = -1, e = 0; r < r1; ++r) {
      if (r / g_dim != t) {  // the G rows of one query share its mask row
        t = r / g_dim;
        e = End(mask + (b * t_dim + t) * s_dim, s_dim);
      }
      ends[r - r0] = e;
      last = std::max(last, e);
    }
    const int64_t ld = (last + kSlots - 1) / kSlots * kSlots;
    thread_local std::vector<float> kt, sc, qs, bias;
    kt.resize(h_dim * ld);
    sc.resize(kGroup * std::max<int64_t>(ld, kSlots));
    bias.resize(sc.size());
    qs.resize(kGroup * h_dim);
    const int64_t ldv = kv_dim * h_dim;
    const float* kb = k + (b * s_dim * kv_dim + j) * h_dim;
    Transpose(kb, ldv, last, h_dim, kt.data(), ld);
    const float* vb = v + (b * s_dim * kv_dim + j) * h_dim;
    for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
      const int mr = static_cast<int>(std::min<int64_t>(kGroup, r1 - g0));
      const bool* masks[kGroup];
      float* outs[kGroup];
      for (int m = 0; m < mr; ++m) {
        const int64_t r = g0 + m, t = r / g_dim, n = j * g_dim + r % g_dim;
        const int64_t at = ((b * t_dim + t) * n_dim + n) * h_dim;
        std::memcpy(qs.data() + m * h_dim, q + at, h_dim * sizeof(float));
        masks[m] = mask + (b * t_dim + t) * s_dim;
        outs[m] = out + at;
      }
      const int64_t* e = ends.data() + (g0 - r0);
      const float* qd = qs.data();
      float* scd = sc.data();
      float* bd = bias.data();
      switch (mr) {
#define GROUP_CASE(M) \
  case M: Group<M>(qd, h_dim, kt.data(), ld, scale, scd, bd, masks, e, vb, ldv, outs); break;
        GROUP_CASE(1) GROUP_CASE(2) GROUP_CASE(3) GROUP_CASE(4)
        GROUP_CASE(5) GROUP_CASE(6) GROUP_CASE(7) GROUP_CASE(8)
#undef GROUP_CASE
        default: break;
      }
    }
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      kd[0] != qd[0] || kd[3] != qd[3] || qd[2] % kd[2] != 0 || qd[3] % kLanes != 0 ||
      md[0] != qd[0] || md[1] != qd[1] || md[2] != kd[1])
    return ffi::Error::InvalidArgument(
        "griffin_attention: expected q [B, T, N, H], k and v [B, S, KV, H] (N % KV == 0, "
        "H % 16 == 0), mask [B, T, S]");
  Work work;
  work.b_dim = qd[0];
  work.t_dim = qd[1];
  work.n_dim = qd[2];
  work.h_dim = qd[3];
  work.s_dim = kd[1];
  work.kv_dim = kd[2];
  work.scale = scale;
  work.q = q.typed_data();
  work.k = k.typed_data();
  work.v = v.typed_data();
  work.mask = mask.typed_data();
  work.out = out->typed_data();
  work.rows = work.t_dim * (work.n_dim / work.kv_dim);
  const int64_t heads = work.b_dim * work.kv_dim;
  const int64_t groups = (work.rows + kGroup - 1) / kGroup;
  // Chunks: whole (batch row, KV head) pairs where there are enough of them for the
  // threads, else row groups of one pair (each chunk transposes its pair's keys once). Calls
  // under 16K query-row x slot pairs (a decode's, up to ~2,000 slots for 8 heads) run where
  // they are. On a 2-core VM a 60-query verification's attention at 360 slots took 3.1 ms on
  // one thread and 1.5 ms split with the spinning helpers (`chunks.h`); split on XLA's pool,
  // whose threads wake late, it had run 5-20% slower than one thread.
  const int64_t threads = griffin::Threads(pool);
  const int64_t cost = heads * work.rows * work.s_dim;
  const int64_t target = cost < (int64_t{1} << 14) ? 1 : 2 * threads;
  const int64_t split = heads >= target ? 1 : std::min(groups, (target + heads - 1) / heads);
  work.per_chunk = (groups + split - 1) / split;
  work.per_head = (groups + work.per_chunk - 1) / work.per_chunk;
  const int64_t chunks = heads * work.per_head;
  griffin::RunChunks(pool, chunks, [&](int64_t c) { work.RunChunk(c); }, target > 1);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GriffinAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
