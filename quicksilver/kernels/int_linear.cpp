// int4 and int8 weights times int8-rounded activations, for 1..M rows, on x86-64 CPUs.
//
// Why: torch's CPU int4 kernel re-reads and re-expands its weights for every few activation
// rows, so a forward of 8 or 16 tokens (a verify step) costs 2.6-4.7x a one-token step. Here
// each weight block is loaded and unpacked once per call and multiplied against every row
// with integer dot products (VNNI on AVX-512, maddubs on AVX2), 64 multiply-adds a
// instruction, so the cost grows slowly with rows. The activations are rounded to int8 per
// row and per block of 32 inputs (scale = max|x| / 127), which is how llama.cpp multiplies
// these GGUF blocks.
//
// Each output is computed by the same instructions in the same order whatever the number of
// rows, the row's place in the call, or the number of threads: a row's result does not
// depend on its batch-mates, so a verify forward of k tokens gives bit for bit what k
// one-token steps give. The AVX-512 and AVX2 paths give identical results too.
//
// Layouts (built by quicksilver/kernels/__init__.py), int4:
//   packed  uint8 [N/16, K/32, 320], one record of 320 bytes per tile t of 16 outputs and
//           block b of 32 inputs, so a call reads the weights as one stream:
//     bytes   0..255  4 vectors of 64; in vector v, byte 4*lane + i holds
//                     code(n = 16t + lane, k = 32b + 4v + i) in its low nibble and
//                     code(n, k = 32b + 4(v + 4) + i) in its high nibble;
//     bytes 256..287  16 float16 weight scales, one per lane;
//     bytes 288..319  16 float16 weights at code 0 ("mins"): w = code * scale + min.
//   float16 as in GGUF's blocks: 5 bits a weight in all, as torch's int4 layout with bf16
//   scales (a step is bound by reading weights, so every byte counts).
// int8: packed uint8 [N/16, K/32, 512], per (tile, block) 8 vectors of 64: in vector j, byte
//   4*lane + i holds w(n = 16t + lane, k = 32b + 4j + i) as int8; and channel_scales float32
//   [N], one per output (the int8 format's symmetric per-channel scales).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QS_X86 1
#endif

namespace {

constexpr int kTile = 16;   // outputs per tile
constexpr int kBlock = 32;  // inputs per block
constexpr int kRecord = 320;   // bytes per (tile, block), int4 weights
constexpr int kRecord8 = 512;  // bytes per (tile, block), int8 weights
// Rows multiplied against one unpacked weight block: 8 rows' accumulators and dot products
// and the 8 weight vectors fill the 32 registers; 16 rows at once spilled and measured 2x
// slower than two passes of 8.
constexpr int kMaxRows = 8;

struct RowsQ8 {
  // One call's activations as int8 codes [M, K], and per (row, block) the scale d and
  // d * sum(codes), the term the weights' minimum multiplies.
  std::vector<int8_t> codes;
  std::vector<float> scale;
  std::vector<float> scaled_sum;
};

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

struct Call {
  const uint8_t* packed;
  const float* channel_scales;  // int8 weights only
  const RowsQ8* q;
  int64_t k, blocks, rows, out_stride;
  float* out_f32;
  uint16_t* out_bf16;
};

inline void store_tile(const Call& c, int64_t row, int64_t col, const float* values) {
  if (c.out_f32 != nullptr) {
    std::memcpy(c.out_f32 + row * c.out_stride + col, values, kTile * sizeof(float));
  } else {
    for (int i = 0; i < kTile; ++i) c.out_bf16[row * c.out_stride + col + i] = float_to_bf16(values[i]);
  }
}

#ifdef QS_X86

// AVX-512: one tile is one register of 16 outputs; the 8 unpacked weight vectors of a block
// stay in registers while every row of the chunk runs its 8 dot products against them.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni,fma"))) void tile_avx512(
    const Call& c, int64_t tile, int64_t row0, int64_t col) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < c.blocks; ++b) {
    const int64_t tb = tile * c.blocks + b;
    const uint8_t* w = c.packed + tb * kRecord;
    __m512i quads[8];
    for (int v = 0; v < 4; ++v) {
      const __m512i raw = _mm512_loadu_si512(w + 64 * v);
      quads[v] = _mm512_and_si512(raw, low);
      quads[v + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 256)));
    const __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 288)));
    // Quads outer, rows inner: R independent dot-product chains in flight (not one chain of
    // 8 dependent instructions per row); the unpacked weights serve every row.
    {
      __m512i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, c.q->codes.data() + (row0 + r) * c.k + b * kBlock + 4 * j, 4);
          dot[r] = _mm512_dpbusd_epi32(dot[r], quads[j], _mm512_set1_epi32(four));
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t rb = (row0 + r) * c.blocks + b;
        const __m512 part =
            _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(c.q->scale[rb]));
        acc[r] = _mm512_fmadd_ps(scale, part, acc[r]);
        acc[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(c.q->scaled_sum[rb]), acc[r]);
      }
    }
  }
  alignas(64) float values[kTile];
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(values, acc[r]);
    store_tile(c, row0 + r, col, values);
  }
}

// AVX2: the same arithmetic on two halves of 8 outputs; maddubs then madd with ones gives
// the exact int32 sums VNNI gives (no int16 overflow: 2 * 15 * 127 < 32768).
template <int R>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const Call& c, int64_t tile, int64_t row0,
                                                   int64_t col) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float values[R][kTile];
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < c.blocks; ++b) {
      const int64_t tb = tile * c.blocks + b;
      const uint8_t* record = c.packed + tb * kRecord;
      const uint8_t* w = record + 32 * half;
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(record + 256 + 16 * half)));
      const __m256 minimum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(record + 288 + 16 * half)));
      for (int r = 0; r < R; ++r) {
        const int64_t row = row0 + r;
        const int8_t* xq = c.q->codes.data() + row * c.k + b * kBlock;
        __m256i dot = _mm256_setzero_si256();
        for (int v = 0; v < 4; ++v) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * v));
          int32_t lo4, hi4;
          std::memcpy(&lo4, xq + 4 * v, 4);
          std::memcpy(&hi4, xq + 4 * (v + 4), 4);
          const __m256i lo = _mm256_and_si256(raw, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
          dot = _mm256_add_epi32(
              dot, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(lo4)), ones));
          dot = _mm256_add_epi32(
              dot, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(hi4)), ones));
        }
        const int64_t rb = row * c.blocks + b;
        const __m256 part =
            _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(c.q->scale[rb]));
        acc[r] = _mm256_fmadd_ps(scale, part, acc[r]);
        acc[r] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(c.q->scaled_sum[rb]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_store_ps(values[r] + 8 * half, acc[r]);
  }
  for (int r = 0; r < R; ++r) store_tile(c, row0 + r, col, values[r]);
}

// Rounding each row's blocks to int8: scale d = max|x| / 127, code = round(x / d) to nearest
// even (the CPU's default rounding, as torch.round), and d * sum(codes). Both paths do the
// same IEEE operations, so they give the same codes.
__attribute__((target("avx512f,avx512bw"))) void quantize_avx512(const at::Tensor& x,
                                                                 RowsQ8& q) {
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const int64_t base = i * kBlock;
    __m512 v[2];
    for (int h = 0; h < 2; ++h) {
      if (bf16) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + base + 16 * h));
        v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      } else {
        v[h] = _mm512_loadu_ps(xf + base + 16 * h);
      }
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const float d = amax / 127.f;
    const float inv = d != 0.f ? 1.f / d : 0.f;
    const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], _mm512_set1_ps(inv)));
    const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + base), _mm512_cvtepi32_epi8(c0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + base + 16), _mm512_cvtepi32_epi8(c1));
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
    q.scale[i] = d;
    q.scaled_sum[i] = d * static_cast<float>(sum);
  }
}

__attribute__((target("avx2,fma"))) void quantize_avx2(const at::Tensor& x, RowsQ8& q) {
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const int64_t base = i * kBlock;
    __m256 v[4];
    __m256 amax8 = _mm256_setzero_ps();
    for (int h = 0; h < 4; ++h) {
      if (bf16) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + base + 8 * h));
        v[h] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      } else {
        v[h] = _mm256_loadu_ps(xf + base + 8 * h);
      }
      amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[h]));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax8);
    float amax = lanes[0];
    for (int l = 1; l < 8; ++l) amax = std::max(amax, lanes[l]);
    const float d = amax / 127.f;
    const float inv = d != 0.f ? 1.f / d : 0.f;
    alignas(32) int32_t codes[kBlock];
    int sum = 0;
    for (int h = 0; h < 4; ++h) {
      const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[h], _mm256_set1_ps(inv)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 8 * h), c);
    }
    for (int l = 0; l < kBlock; ++l) {
      q.codes[base + l] = static_cast<int8_t>(codes[l]);
      sum += codes[l];
    }
    q.scale[i] = d;
    q.scaled_sum[i] = d * static_cast<float>(sum);
  }
}

// int8 weights (one scale per output channel) times int8-rounded activations. VNNI's
// dpbusd multiplies unsigned by signed bytes: the activations go in as x + 128 (flipping
// the sign bit), and 128 * sum(w), taken once per block with the same instruction, comes
// off again. Exact in int32, like the AVX2 path's sign trick below.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni,fma"))) void tile8_avx512(
    const Call& c, int64_t tile, int64_t row0, int64_t col) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = 0; b < c.blocks; ++b) {
    const uint8_t* w = c.packed + (tile * c.blocks + b) * kRecord8;
    __m512i vectors[8];
    __m512i sum = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      vectors[j] = _mm512_loadu_si512(w + 64 * j);
      sum = _mm512_dpbusd_epi32(sum, ones, vectors[j]);
    }
    const __m512i offset = _mm512_slli_epi32(sum, 7);  // 128 * sum(w)
    {  // R dot-product chains in flight, as for int4
      __m512i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        for (int r = 0; r < R; ++r) {
          uint32_t four;
          std::memcpy(&four, c.q->codes.data() + (row0 + r) * c.k + b * kBlock + 4 * j, 4);
          const __m512i x = _mm512_set1_epi32(static_cast<int32_t>(four ^ 0x80808080u));
          dot[r] = _mm512_dpbusd_epi32(dot[r], x, vectors[j]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r], offset));
        const float d = c.q->scale[(row0 + r) * c.blocks + b];
        acc[r] = _mm512_fmadd_ps(exact, _mm512_set1_ps(d), acc[r]);
      }
    }
  }
  const __m512 scale = _mm512_loadu_ps(c.channel_scales + tile * kTile);
  alignas(64) float values[kTile];
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(values, _mm512_mul_ps(acc[r], scale));
    store_tile(c, row0 + r, col, values);
  }
}

// AVX2: maddubs takes |w| as the unsigned side and x with w's sign as the signed one, so no
// int16 pair sum can overflow (activations lie in -127..127: 2 * 128 * 127 < 32768).
template <int R>
__attribute__((target("avx2,fma"))) void tile8_avx2(const Call& c, int64_t tile, int64_t row0,
                                                    int64_t col) {
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float values[R][kTile];
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < c.blocks; ++b) {
      const uint8_t* w = c.packed + (tile * c.blocks + b) * kRecord8 + 32 * half;
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = c.q->codes.data() + (row0 + r) * c.k + b * kBlock;
        __m256i dot = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * j));
          int32_t four;
          std::memcpy(&four, xq + 4 * j, 4);
          const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(four), v);
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(v), x), ones));
        }
        const float d = c.q->scale[(row0 + r) * c.blocks + b];
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d), acc[r]);
      }
    }
    const __m256 scale = _mm256_loadu_ps(c.channel_scales + tile * kTile + 8 * half);
    for (int r = 0; r < R; ++r) _mm256_store_ps(values[r] + 8 * half, _mm256_mul_ps(acc[r], scale));
  }
  for (int r = 0; r < R; ++r) store_tile(c, row0 + r, col, values[r]);
}

enum class Isa { kNone, kAvx2, kAvx512 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kNone;
}

using TileFn = void (*)(const Call&, int64_t, int64_t, int64_t);

template <int... Rs>
struct Table {
  static constexpr TileFn avx512[] = {tile_avx512<Rs>...};
  static constexpr TileFn avx2[] = {tile_avx2<Rs>...};
  static constexpr TileFn avx512_int8[] = {tile8_avx512<Rs>...};
  static constexpr TileFn avx2_int8[] = {tile8_avx2<Rs>...};
};
using Tiles = Table<1, 2, 3, 4, 5, 6, 7, 8>;

#endif  // QS_X86

}  // namespace

namespace {

int64_t isa_code(const std::string& name) {
  if (name == "auto") {
#ifdef QS_X86
    const Isa isa = detect_isa();
    return isa == Isa::kAvx512 ? 2 : isa == Isa::kAvx2 ? 1 : 0;
#else
    return 0;
#endif
  }
  if (name == "avx512") return 2;
  if (name == "avx2") return 1;
  TORCH_CHECK(false, "int_linear: unknown instruction set ", name);
}

// The product of x [M, K] with tiles [tile_start, tile_stop) of a packed weight (int4
// records, or int8 ones with ``channel_scales``), in x's dtype. ``isa`` names the path
// ("auto": the best this CPU runs), so tests can compare them.
at::Tensor int_linear(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& channel_scales, int64_t tile_start,
                      int64_t tile_stop, const std::string& isa) {
  const bool int8 = channel_scales.has_value();
  const int64_t record = int8 ? kRecord8 : kRecord;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int_linear: x must be a contiguous matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int_linear: x must be float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == record && packed.is_contiguous() &&
                  packed.scalar_type() == at::kByte,
              "int_linear: packed must be uint8 [N/16, K/32, ", record, "]");
  TORCH_CHECK(!int8 || (channel_scales->scalar_type() == at::kFloat &&
                        channel_scales->is_contiguous() &&
                        channel_scales->numel() == packed.size(0) * kTile),
              "int_linear: channel scales must be float32 [N]");
  const int64_t rows = x.size(0), k = x.size(1), blocks = packed.size(1);
  TORCH_CHECK(k == blocks * kBlock, "int_linear: x has ", k, " inputs, the weight ", blocks * kBlock);
  TORCH_CHECK(0 <= tile_start && tile_start <= tile_stop && tile_stop <= packed.size(0),
              "int_linear: tiles out of range");
  const int64_t n_out = (tile_stop - tile_start) * kTile;
  at::Tensor out = at::empty({rows, n_out}, x.options());
  if (rows == 0 || n_out == 0) return out;
  const int64_t code = isa_code(isa);
  TORCH_CHECK(code > 0, "int_linear: this CPU has neither AVX-512 VNNI nor AVX2");
#ifdef QS_X86
  RowsQ8 q;
  q.codes.resize(rows * k);
  q.scale.resize(rows * blocks);
  q.scaled_sum.resize(rows * blocks);
  if (code == 2) quantize_avx512(x, q);
  else quantize_avx2(x, q);
  Call c{packed.data_ptr<uint8_t>(), int8 ? channel_scales->data_ptr<float>() : nullptr, &q, k,
         blocks, rows, n_out, nullptr, nullptr};
  if (x.scalar_type() == at::kFloat) c.out_f32 = out.data_ptr<float>();
  else c.out_bf16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const TileFn* table = code == 2 ? (int8 ? Tiles::avx512_int8 : Tiles::avx512)
                                  : (int8 ? Tiles::avx2_int8 : Tiles::avx2);
  at::parallel_for(tile_start, tile_stop, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t col = (tile - tile_start) * kTile;
      for (int64_t row0 = 0; row0 < rows; row0 += kMaxRows) {
        const int64_t chunk = std::min<int64_t>(kMaxRows, rows - row0);
        table[chunk - 1](c, tile, row0, col);
      }
    }
  });
#endif
  return out;
}

std::string best_isa() {
  const int64_t code = isa_code("auto");
  return code == 2 ? "avx512" : code == 1 ? "avx2" : "none";
}

}  // namespace

TORCH_LIBRARY(quicksilver, m) {
  m.def("int_linear(Tensor x, Tensor packed, Tensor? channel_scales, int tile_start, "
        "int tile_stop, str isa) -> Tensor");
  m.def("int_linear_best_isa() -> str", &best_isa);
}

TORCH_LIBRARY_IMPL(quicksilver, CPU, m) { m.impl("int_linear", &int_linear); }
