// Attention that computes every query the same way whatever else is in the call.
//
// Why: verified decoding is exact only if a forward of k tokens gives each token the logits k
// one-token steps give. With activations rounded to int8 (int_linear.cpp) a last-bit
// difference upstream can move a whole int8 step, and SDPA over k queries and two matmuls
// over one round differently in the last bits. Here each (row, query, head) walks the keys it
// may read in increasing order with a fixed sequence of operations: the scores, their
// maximum, exp (one polynomial, lane by lane), the sum, then the values. Nothing depends on
// the number of queries, the keys it may not read, or the threads.
//
//   q       float32 [B, S, H, D], contiguous
//   keys    [B, KVH, T, D] float32 or bfloat16, D contiguous (a slice of the cache)
//   values  as keys
//   reads   bool [B, S, T], contiguous: which keys each query reads
//   returns float32 [B, S, H, D]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace {

// exp(x) for 8 lanes, x <= 0 (scores minus their maximum): 2^n * p(r), x = n ln2 + r.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

template <typename Scalar>
__attribute__((target("avx2,fma"))) inline __m256 load8(const Scalar* p);

template <>
__attribute__((target("avx2,fma"))) inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
__attribute__((target("avx2,fma"))) inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// The sums of eight vectors' lanes, lane i for vector i, each added as sum8 adds it:
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). Eight horizontal sums in 7 instructions.
__attribute__((target("avx2,fma"))) inline __m256 sum8_each(const __m256 (&a)[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

constexpr int64_t kValueTile = 32;  // value rows that serve every head from L1 at a time

// The query heads ``q[0..heads)`` of one query that share one KV head: out[m][D] over the
// keys ``read`` lists (increasing). Each head's arithmetic is exactly what it would be alone:
// eight keys' scores side by side, each in its own accumulator; the maximum, exp and sum;
// then the values, key by key in order. What the heads share is memory traffic: a block of
// eight keys and a tile of values are brought into L1 once and serve every head there, where
// alone each head streamed the keys and values from L2.
template <typename Scalar>
__attribute__((target("avx2,fma"))) void query_heads(const float* const* q, float* const* out,
                                                     int heads, const Scalar* keys,
                                                     const Scalar* values, int64_t key_stride,
                                                     const std::vector<int64_t>& read, int64_t d,
                                                     float scale, float* scores) {
  const int64_t n = static_cast<int64_t>(read.size());
  const int64_t padded = (n + 7) / 8 * 8, pitch = padded;
  const __m256 scale8 = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Scalar* k[8];
    for (int c = 0; c < 8; ++c) k[c] = keys + read[i + c] * key_stride;
    for (int m = 0; m < heads; ++m) {
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < d; j += 8) {
        const __m256 qj = _mm256_loadu_ps(q[m] + j);
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(qj, load8(k[c] + j), acc[c]);
      }
      _mm256_storeu_ps(scores + m * pitch + i, _mm256_mul_ps(sum8_each(acc), scale8));
    }
  }
  for (; i < n; ++i) {
    const Scalar* k = keys + read[i] * key_stride;
    for (int m = 0; m < heads; ++m) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < d; j += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q[m] + j), load8(k + j), acc);
      scores[m * pitch + i] = sum8(acc) * scale;
    }
  }
  float inverse[64];  // heads <= 64 (checked by the caller)
  for (int m = 0; m < heads; ++m) {
    float* s = scores + m * pitch;
    for (i = n; i < padded; ++i) s[i] = -INFINITY;
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (i = 0; i < padded; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top);
    const float best = *std::max_element(lanes, lanes + 8);
    __m256 total8 = _mm256_setzero_ps();
    for (i = 0; i < padded; i += 8) {
      const __m256 shifted = _mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(best));
      _mm256_storeu_ps(s + i, exp_nonpositive(shifted));
      for (int64_t pad = std::max(i, n); pad < i + 8; ++pad) s[pad] = 0.f;  // not keys
      total8 = _mm256_add_ps(total8, _mm256_loadu_ps(s + i));
    }
    inverse[m] = 1.f / sum8(total8);
  }
  // Values: each head's 8 x 8 output floats accumulate key by key, in order; between tiles
  // of keys they wait in ``out`` (a float32 store and load change no bits).
  constexpr int kColumns = 8;
  for (int64_t t0 = 0; t0 < n; t0 += kValueTile) {
    const int64_t t1 = std::min(n, t0 + kValueTile);
    for (int m = 0; m < heads; ++m) {
      const float* s = scores + m * pitch;
      for (int64_t j0 = 0; j0 < d; j0 += 8 * kColumns) {
        const int columns = static_cast<int>(std::min<int64_t>(kColumns, (d - j0) / 8));
        __m256 acc[kColumns];
        for (int c = 0; c < columns; ++c)
          acc[c] = t0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out[m] + j0 + 8 * c);
        for (i = t0; i < t1; ++i) {
          const __m256 p = _mm256_set1_ps(s[i]);
          const Scalar* row = values + read[i] * key_stride + j0;
          for (int c = 0; c < columns; ++c) acc[c] = _mm256_fmadd_ps(p, load8(row + 8 * c), acc[c]);
        }
        for (int c = 0; c < columns; ++c) _mm256_storeu_ps(out[m] + j0 + 8 * c, acc[c]);
      }
    }
  }
  for (int m = 0; m < heads; ++m) {
    const __m256 scale_out = _mm256_set1_ps(inverse[m]);
    for (int64_t j = 0; j < d; j += 8)
      _mm256_storeu_ps(out[m] + j, _mm256_mul_ps(_mm256_loadu_ps(out[m] + j), scale_out));
  }
}

template <typename Scalar>
void attend_all(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                const at::Tensor& reads, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), d = q.size(3);
  const int64_t kv_heads = keys.size(1), length = keys.size(2), group = heads / kv_heads;
  const float* qp = q.data_ptr<float>();
  const bool* rp = reads.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const Scalar* kp = keys.data_ptr<Scalar>();
  const Scalar* vp = values.data_ptr<Scalar>();
  // A work item is some of the heads that share a KV head, for one query: all of them when
  // there are enough items to keep every thread busy (a verify forward), fewer when there
  // are not (a decode step's single query). Each head is computed as it would be alone, so
  // how heads are grouped or items split never shows in the bits.
  int64_t per_item = std::min<int64_t>(group, 64);
  while (group % per_item != 0) --per_item;  // the largest divisor of the group up to 64
  const int64_t wanted = 4 * at::get_num_threads();
  while (per_item > 1 && batch * seq * (heads / per_item) < wanted) {
    do --per_item; while (group % per_item != 0);
  }
  const int64_t parts = group / per_item;
  // Items run KV head by KV head, so a thread's consecutive items read the same keys.
  at::parallel_for(0, batch * kv_heads * seq * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> read;
    std::vector<float> scores(per_item * (length + 8));
    const float* q_rows[64];
    float* out_rows[64];
    int64_t listed = -1;  // the query whose readable keys ``read`` holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bg = item / (seq * parts), s = (item / parts) % seq, part = item % parts;
      const int64_t b = bg / kv_heads, g = bg % kv_heads, bs = b * seq + s;
      const int64_t h0 = g * group + part * per_item;
      if (bs != listed) {
        read.clear();
        for (int64_t t = 0; t < length; ++t)
          if (rp[bs * length + t]) read.push_back(t);
        listed = bs;
      }
      for (int64_t m = 0; m < per_item; ++m) {
        q_rows[m] = qp + (bs * heads + h0 + m) * d;
        out_rows[m] = op + (bs * heads + h0 + m) * d;
      }
      query_heads<Scalar>(q_rows, out_rows, static_cast<int>(per_item),
                          kp + b * keys.stride(0) + g * keys.stride(1),
                          vp + b * values.stride(0) + g * values.stride(1), keys.stride(2), read,
                          d, static_cast<float>(scale), scores.data());
    }
  });
}

at::Tensor attend_each(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                       const at::Tensor& reads, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.scalar_type() == at::kFloat,
              "attend_each: q must be contiguous float32 [B, S, H, D]");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.strides() == values.strides() &&
                  keys.stride(3) == 1 && keys.scalar_type() == values.scalar_type(),
              "attend_each: keys and values must be alike [B, KVH, T, D] with D contiguous");
  TORCH_CHECK(keys.size(0) == q.size(0) && keys.size(3) == q.size(3) && q.size(3) % 8 == 0 &&
                  q.size(2) % keys.size(1) == 0,
              "attend_each: shapes of q and keys disagree");
  TORCH_CHECK(reads.scalar_type() == at::kBool && reads.is_contiguous() && reads.dim() == 3 &&
                  reads.size(0) == q.size(0) && reads.size(1) == q.size(1) &&
                  reads.size(2) == keys.size(2),
              "attend_each: reads must be contiguous bool [B, S, T]");
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "attend_each: this CPU has no AVX2");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (keys.scalar_type() == at::kBFloat16) {
    attend_all<at::BFloat16>(q, keys, values, reads, scale, out);
  } else {
    TORCH_CHECK(keys.scalar_type() == at::kFloat, "attend_each: keys must be float32 or bfloat16");
    attend_all<float>(q, keys, values, reads, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quicksilver, m) {
  m.def("attend_each(Tensor q, Tensor keys, Tensor values, Tensor reads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(quicksilver, CPU, m) { m.impl("attend_each", &attend_each); }

#endif
