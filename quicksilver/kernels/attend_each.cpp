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

// One query of one head: out[D] over the keys ``read`` lists (increasing). Eight keys'
// scores and eight value columns are computed side by side, each in its own accumulator with
// the same sequence of operations it would have alone: more instructions in flight, the same
// bits whatever the number of keys.
template <typename Scalar>
__attribute__((target("avx2,fma"))) void one_query(const float* q, const Scalar* keys,
                                                   const Scalar* values, int64_t key_stride,
                                                   const std::vector<int64_t>& read, int64_t d,
                                                   float scale, float* scores, float* out) {
  const int64_t n = static_cast<int64_t>(read.size());
  const __m256 scale8 = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Scalar* k[8];
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) {
      k[c] = keys + read[i + c] * key_stride;
      acc[c] = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 qj = _mm256_loadu_ps(q + j);
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(qj, load8(k[c] + j), acc[c]);
    }
    _mm256_storeu_ps(scores + i, _mm256_mul_ps(sum8_each(acc), scale8));
  }
  for (; i < n; ++i) {
    const Scalar* k = keys + read[i] * key_stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), load8(k + j), acc);
    scores[i] = sum8(acc) * scale;
  }
  const int64_t padded = (n + 7) / 8 * 8;
  for (i = n; i < padded; ++i) scores[i] = -INFINITY;
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (i = 0; i < padded; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  const float best = *std::max_element(lanes, lanes + 8);
  __m256 total8 = _mm256_setzero_ps();
  for (i = 0; i < padded; i += 8) {
    const __m256 shifted = _mm256_sub_ps(_mm256_loadu_ps(scores + i), _mm256_set1_ps(best));
    _mm256_storeu_ps(scores + i, exp_nonpositive(shifted));
    for (int64_t pad = std::max(i, n); pad < i + 8; ++pad) scores[pad] = 0.f;  // not keys
    total8 = _mm256_add_ps(total8, _mm256_loadu_ps(scores + i));
  }
  const __m256 inverse = _mm256_set1_ps(1.f / sum8(total8));
  constexpr int kColumns = 8;  // 8 x 8 floats of the output at a time
  for (int64_t j0 = 0; j0 < d; j0 += 8 * kColumns) {
    const int columns = static_cast<int>(std::min<int64_t>(kColumns, (d - j0) / 8));
    __m256 acc[kColumns];
    for (int c = 0; c < kColumns; ++c) acc[c] = _mm256_setzero_ps();
    for (i = 0; i < n; ++i) {
      const __m256 p = _mm256_set1_ps(scores[i]);
      const Scalar* v = values + read[i] * key_stride + j0;
      for (int c = 0; c < columns; ++c) acc[c] = _mm256_fmadd_ps(p, load8(v + 8 * c), acc[c]);
    }
    for (int c = 0; c < columns; ++c) _mm256_storeu_ps(out + j0 + 8 * c, _mm256_mul_ps(acc[c], inverse));
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
  // One work item per (query, head): a decode step's single query still spreads its heads
  // over every thread. Each item is computed alone, so how items are split never shows.
  at::parallel_for(0, batch * seq * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> read;
    std::vector<float> scores(length + 8);
    int64_t listed = -1;  // the query whose readable keys ``read`` holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bs = item / heads, h = item % heads, b = bs / seq, g = h / group;
      if (bs != listed) {
        read.clear();
        for (int64_t t = 0; t < length; ++t)
          if (rp[bs * length + t]) read.push_back(t);
        listed = bs;
      }
      one_query<Scalar>(qp + item * d, kp + b * keys.stride(0) + g * keys.stride(1),
                        vp + b * values.stride(0) + g * values.stride(1), keys.stride(2), read, d,
                        static_cast<float>(scale), scores.data(), op + item * d);
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
