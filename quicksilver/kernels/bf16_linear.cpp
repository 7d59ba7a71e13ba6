// bfloat16 weights times bfloat16 activations for a few rows, with AVX-512 BF16 dot products.
//
// Why: a decode step multiplies one row by every weight, so it is bound by reading them.
// oneDNN's pre-packed bf16 product read SmolLM2-135M's 270 MB of products at ~37 GB/s on two
// Zen 4 cores; this kernel streams them once at ~52 GB/s (the machine's measured bandwidth),
// 7.3 -> 5.1 ms a step's products. Each output is a float32 sum of bf16 x bf16 products
// (``vdpbf16ps``, as oneDNN's bf16 path computes them), rounded to bf16 at the end; the order
// of the sum is fixed, so a row's result does not depend on the other rows of the call or on
// the threads.
//
// Layout (built by quicksilver/kernels/__init__.py): packed bfloat16 [N/16, K/32, 512], one
// record of 16 vectors of 32 bf16 per tile t of 16 outputs and block b of 32 inputs: in vector
// j, lane n holds w(16t + n, 32b + 2j) and w(16t + n, 32b + 2j + 1), the pair one
// ``vdpbf16ps`` lane multiplies by the activations' pair (x[32b + 2j], x[32b + 2j + 1]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace {

constexpr int kTile = 16;
constexpr int kBlock = 32;
constexpr int kRecord = 512;  // bf16 per (tile, block)
constexpr int kMaxRows = 4;   // rows sharing one weight record's loads (2 accumulators each)

// Rows [row0, row0 + R) of x [M, K] times one tile: two accumulators a row (even and odd
// pairs of a block, so two dot-product chains are in flight), added at the end.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_rows(
    const uint16_t* packed, const uint16_t* x, int64_t k, int64_t blocks, int64_t tile,
    int64_t row0, uint16_t* out, int64_t n_out) {
  __m512 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  const uint16_t* w = packed + tile * blocks * kRecord;
  for (int64_t b = 0; b < blocks; ++b, w += kRecord) {
    for (int j = 0; j < 16; j += 2) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + 32 * j);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32 * (j + 1));
      for (int r = 0; r < R; ++r) {
        uint32_t pair0, pair1;
        const uint16_t* xr = x + (row0 + r) * k + b * kBlock + 2 * j;
        std::memcpy(&pair0, xr, 4);
        std::memcpy(&pair1, xr + 2, 4);
        even[r] = _mm512_dpbf16_ps(even[r], w0, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair0)));
        odd[r] = _mm512_dpbf16_ps(odd[r], w1, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair1)));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_add_ps(even[r], odd[r]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (row0 + r) * n_out + tile * kTile),
                        (__m256i)rounded);
  }
}

using TileFn = void (*)(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                        uint16_t*, int64_t);
constexpr TileFn kTiles[] = {tile_rows<1>, tile_rows<2>, tile_rows<3>, tile_rows<4>};

// Asked on every product (121 a decode step), answered once.
bool bf16_linear_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "bf16_linear: x must be a contiguous bfloat16 matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kRecord && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "bf16_linear: packed must be bfloat16 [N/16, K/32, 512]");
  const int64_t rows = x.size(0), k = x.size(1), tiles = packed.size(0), blocks = packed.size(1);
  TORCH_CHECK(k == blocks * kBlock, "bf16_linear: x has ", k, " inputs, the weight ", blocks * kBlock);
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear: this CPU has no AVX-512 BF16");
  const int64_t n_out = tiles * kTile;
  at::Tensor out = at::empty({rows, n_out}, x.options());
  if (rows == 0) return out;
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      for (int64_t row0 = 0; row0 < rows; row0 += kMaxRows) {
        const int64_t chunk = std::min<int64_t>(kMaxRows, rows - row0);
        kTiles[chunk - 1](wp, xp, k, blocks, tile, row0, op, n_out);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quicksilver, m) {
  m.def("bf16_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("bf16_linear_supported() -> bool", &bf16_linear_supported);
}

TORCH_LIBRARY_IMPL(quicksilver, CPU, m) { m.impl("bf16_linear", &bf16_linear); }

#endif
