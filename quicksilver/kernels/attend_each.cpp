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

// One query of one head: out[D] over the keys ``read`` lists (increasing). Four keys' scores
// and eight value columns are computed side by side, each in its own accumulator with the
// same sequence of operations it would have alone: more instructions in flight, the same bits.
template <typename Scalar>
__attribute__((target("avx2,fma"))) void one_query(const float* q, const Scalar* keys,
                                                   const Scalar* values, int64_t key_stride,
                                                   const std::vector<int64_t>& read, int64_t d,
                                                   float scale, float* scores, float* out) {
  const int64_t n = static_cast<int64_t>(read.size());
  float best = -INFINITY;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const Scalar* k0 = keys + read[i] * key_stride;
    const Scalar* k1 = keys + read[i + 1] * key_stride;
    const Scalar* k2 = keys + read[i + 2] * key_stride;
    const Scalar* k3 = keys + read[i + 3] * key_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 qj = _mm256_loadu_ps(q + j);
      a0 = _mm256_fmadd_ps(qj, load8(k0 + j), a0);
      a1 = _mm256_fmadd_ps(qj, load8(k1 + j), a1);
      a2 = _mm256_fmadd_ps(qj, load8(k2 + j), a2);
      a3 = _mm256_fmadd_ps(qj, load8(k3 + j), a3);
    }
    scores[i] = sum8(a0) * scale;
    scores[i + 1] = sum8(a1) * scale;
    scores[i + 2] = sum8(a2) * scale;
    scores[i + 3] = sum8(a3) * scale;
  }
  for (; i < n; ++i) {
    const Scalar* k = keys + read[i] * key_stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), load8(k + j), acc);
    scores[i] = sum8(acc) * scale;
  }
  for (i = 0; i < n; ++i) best = std::fmax(best, scores[i]);
  const int64_t padded = (n + 7) / 8 * 8;
  for (i = n; i < padded; ++i) scores[i] = -INFINITY;
  for (i = 0; i < padded; i += 8) {
    const __m256 shifted = _mm256_sub_ps(_mm256_loadu_ps(scores + i), _mm256_set1_ps(best));
    _mm256_storeu_ps(scores + i, exp_nonpositive(shifted));
  }
  float total = 0.f;
  for (i = 0; i < n; ++i) total += scores[i];
  const __m256 inverse = _mm256_set1_ps(1.f / total);
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
  at::parallel_for(0, batch * seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> read;
    std::vector<float> scores(length + 8);
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / seq;
      read.clear();
      for (int64_t t = 0; t < length; ++t)
        if (rp[bs * length + t]) read.push_back(t);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t g = h / group;
        one_query<Scalar>(qp + (bs * heads + h) * d, kp + b * keys.stride(0) + g * keys.stride(1),
                          vp + b * values.stride(0) + g * values.stride(1), keys.stride(2), read,
                          d, static_cast<float>(scale), scores.data(), op + (bs * heads + h) * d);
      }
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
