// Attention, forward and backward, bf16 in and out, on x86 CPUs with AVX512-BF16: its dot
// product instruction (vdpbf16ps) adds to each of 16 fp32 lanes the dot product of two bf16
// pairs.
//
// Why it exists: torch 2.14's CPU flash kernels run Stable Diffusion's 4,096-token
// self-attention (8 heads of 40) at a third of the bf16 matmul peak on CPUs without AMX: each
// 40-deep block product goes to a general GEMM. Here every product is a register-blocked
// micro-kernel over operands packed once per head, and the softmax runs in the same pass
// (online, as in FlashAttention), so scores and probabilities never leave a tile.
//
// Two operand layouts, both of bf16 pairs as vdpbf16ps reads them:
// - dim pairs, (rows / 16, head_dim / 2, 16, 2): 16 rows' dims 2p and 2p+1, for a product
//   that reduces over the head dim (scores q·k, and dO·v in the backward): its output lanes
//   are 16 rows of the packed operand;
// - row pairs, (rows / 2, ceil(head_dim / 16), 16, 2): two consecutive rows' value of 16 dims,
//   for a product that reduces over rows (probabilities · v): its output lanes are dims.
// The other operand of each product is one bf16 pair broadcast to all lanes.
//
// Tensors: q, k, v, out, dO: per (batch, head), rows of `head_dim` contiguous bf16 at a row
// stride (any batch and head strides). lse: fp32 (batch * heads, q_len), the natural log of
// each query row's softmax denominator over the scaled scores, as torch's flash kernel has it.
//
// The C ABI (no torch headers) keeps the build a one-second g++ call; the caller splits work
// items between threads, one call each.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace {

using bf16 = uint16_t;

constexpr int kMaxDimBlocks = 16;  // head_dim up to 256
constexpr int kForwardQueries = 32;  // query rows per forward work item
constexpr int kForwardKeys = 256;    // keys per block of the forward's online softmax
constexpr int kBackwardKeys = 64;    // keys per backward work item
constexpr int kBackwardQueries = 64;  // query rows per step of the backward's inner loop
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// e^x for x <= 0 (a score minus a running max, or minus its row's log-sum-exp), ~1e-7
// relative error: x·log2(e) = n + f with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial in
// f·ln 2, scaled by 2^n.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below, e^x underflows fp32 anyway
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 g = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512i broadcast_pair(const bf16* pair) {
  int32_t bits;
  std::memcpy(&bits, pair, sizeof(bits));
  return _mm512_set1_epi32(bits);
}

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

inline void store_bf16(bf16* dst, __m512 values, __mmask16 lanes) {
  const __m256bh rounded = _mm512_cvtneps_pbh(values);
  _mm256_mask_storeu_epi16(dst, lanes, reinterpret_cast<const __m256i&>(rounded));
}

// ---------------------------------------------------------------------------- packing

// rows x head_dim at a row stride -> dim pairs (padded_rows / 16, head_dim / 2, 16, 2).
void pack_dim_pairs(const bf16* src, int64_t row_stride, int64_t rows, int64_t head_dim,
                    int64_t padded_rows, bf16* dst) {
  const int64_t pairs = head_dim / 2;
  std::memset(dst, 0, padded_rows * head_dim * sizeof(bf16));
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t p = 0; p < pairs; ++p)
      std::memcpy(dst + (((j / 16) * pairs + p) * 16 + j % 16) * 2, src + j * row_stride + 2 * p,
                  2 * sizeof(bf16));
}

// rows x head_dim at a row stride -> row pairs (padded_rows / 2, blocks, 16, 2).
void pack_row_pairs(const bf16* src, int64_t row_stride, int64_t rows, int64_t head_dim,
                    int64_t padded_rows, bf16* dst) {
  const int64_t blocks = (head_dim + 15) / 16;
  std::memset(dst, 0, padded_rows * blocks * 16 * sizeof(bf16));
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t d = 0; d < head_dim; ++d)
      dst[(((j / 2) * blocks + d / 16) * 16 + d % 16) * 2 + j % 2] = src[j * row_stride + d];
}

// ---------------------------------------------------------------------------- products

// out[r][16 g + lane] = scale · Σ_d a[r][d] · b[16 g + lane][d] for `rows` rows of a
// (row-major bf16) and `groups` 16-row groups of b (dim pairs). out: fp32, row stride out_stride.
void dim_pair_product(const bf16* a, int64_t a_stride, int rows, const bf16* packed_b, int groups,
                      int pairs, float scale, float* out, int out_stride) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const bf16* row[4];
    for (int r = 0; r < 4; ++r) row[r] = a + std::min(r0 + r, rows - 1) * a_stride;
    int g = 0;
    for (; g + 4 <= groups; g += 4) {
      __m512 acc[4][4];
      for (auto& line : acc)
        for (auto& value : line) value = _mm512_setzero_ps();
      const bf16* b = packed_b + static_cast<int64_t>(g) * pairs * 32;
      for (int p = 0; p < pairs; ++p) {
        __m512i lanes[4];
        for (int n = 0; n < 4; ++n) lanes[n] = _mm512_loadu_si512(b + (n * pairs + p) * 32);
        for (int r = 0; r < 4; ++r) {
          const __m512i pair = broadcast_pair(row[r] + 2 * p);
          for (int n = 0; n < 4; ++n) acc[r][n] = dot_pairs(acc[r][n], pair, lanes[n]);
        }
      }
      for (int r = 0; r < 4 && r0 + r < rows; ++r)
        for (int n = 0; n < 4; ++n)
          _mm512_storeu_ps(out + (r0 + r) * out_stride + (g + n) * 16,
                           _mm512_mul_ps(acc[r][n], scale_v));
    }
    for (; g < groups; ++g) {
      __m512 acc[4];
      for (auto& value : acc) value = _mm512_setzero_ps();
      const bf16* b = packed_b + static_cast<int64_t>(g) * pairs * 32;
      for (int p = 0; p < pairs; ++p) {
        const __m512i lanes = _mm512_loadu_si512(b + p * 32);
        for (int r = 0; r < 4; ++r) acc[r] = dot_pairs(acc[r], broadcast_pair(row[r] + 2 * p), lanes);
      }
      for (int r = 0; r < 4 && r0 + r < rows; ++r)
        _mm512_storeu_ps(out + (r0 + r) * out_stride + g * 16, _mm512_mul_ps(acc[r], scale_v));
    }
  }
}

// acc[r][d] += Σ_p pair(r, p) · b[p][d], with pair(r, p) the bf16 pair at a + r·a_row + p·a_pair
// and b in row pairs (`pairs` of them). acc: fp32 rows of Blocks·16.
template <int Blocks>
void row_pair_product(const bf16* a, int64_t a_row, int64_t a_pair, int rows, const bf16* packed_b,
                      int pairs, float* acc_rows) {
  constexpr int kRows = std::max(1, 24 / Blocks);  // accumulators that fit 32 zmm registers
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const int count = std::min(kRows, rows - r0);
    __m512 acc[kRows][Blocks];
    for (int r = 0; r < kRows; ++r)
      for (int n = 0; n < Blocks; ++n)
        acc[r][n] = r < count ? _mm512_loadu_ps(acc_rows + ((r0 + r) * Blocks + n) * 16)
                              : _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {
      __m512i lanes[Blocks];
      for (int n = 0; n < Blocks; ++n) lanes[n] = _mm512_loadu_si512(packed_b + (p * Blocks + n) * 32);
      for (int r = 0; r < kRows; ++r) {
        if (r >= count) break;
        const __m512i pair = broadcast_pair(a + (r0 + r) * a_row + p * a_pair);
        for (int n = 0; n < Blocks; ++n) acc[r][n] = dot_pairs(acc[r][n], pair, lanes[n]);
      }
    }
    for (int r = 0; r < count; ++r)
      for (int n = 0; n < Blocks; ++n)
        _mm512_storeu_ps(acc_rows + ((r0 + r) * Blocks + n) * 16, acc[r][n]);
  }
}

using RowPairProduct = void (*)(const bf16*, int64_t, int64_t, int, const bf16*, int, float*);

template <int... Blocks>
RowPairProduct pick_row_pair_product(int blocks, std::integer_sequence<int, Blocks...>) {
  RowPairProduct product = nullptr;
  ((blocks == Blocks + 1 ? (product = row_pair_product<Blocks + 1>, 0) : 0), ...);
  return product;
}

RowPairProduct row_pair_product_for(int64_t head_dim) {
  if (head_dim % 2 || head_dim < 2) return nullptr;
  return pick_row_pair_product(static_cast<int>((head_dim + 15) / 16),
                               std::make_integer_sequence<int, kMaxDimBlocks>{});
}

// rows 2i and 2i+1 of fp32 `src` (16·groups wide, row stride src_stride; a missing last row is
// zeros) -> bf16 pairs dst[i][j] = (src[2i][j], src[2i+1][j]), row stride dst_stride pairs.
void interleave_row_pairs(const float* src, int src_stride, int rows, int groups, bf16* dst,
                          int dst_stride) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int i = 0; 2 * i < rows; ++i)
    for (int g = 0; g < groups; ++g) {
      const __m512 upper = 2 * i + 1 < rows ? _mm512_loadu_ps(src + (2 * i + 1) * src_stride + g * 16)
                                            : _mm512_setzero_ps();
      const __m256bh even = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + 2 * i * src_stride + g * 16));
      const __m256bh odd = _mm512_cvtneps_pbh(upper);
      const __m512i both = _mm512_inserti64x4(
          _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(even)),
          reinterpret_cast<const __m256i&>(odd), 1);
      _mm512_storeu_si512(dst + (static_cast<int64_t>(i) * dst_stride + g * 16) * 2,
                          _mm512_permutexvar_epi16(order, both));
    }
}

struct HeadOffsets {
  int64_t heads_per_batch, batch_stride, head_stride;
  int64_t at(int64_t head) const {
    return (head / heads_per_batch) * batch_stride + (head % heads_per_batch) * head_stride;
  }
};

}  // namespace

extern "C" {

// Sizes in bf16 elements of one head's packed operands, for the caller's allocations.
int64_t attention_forward_pack_size(int64_t kv_len, int64_t head_dim) {
  return round_up(kv_len, 16) * head_dim + round_up(kv_len, 16) * ((head_dim + 15) / 16) * 16;
}

// Packs the keys (dim pairs) and values (row pairs) of heads [head_begin, head_end).
void attention_forward_pack(const bf16* k, const bf16* v, int64_t heads_per_batch,
                            int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                            int64_t kv_len, int64_t head_dim, bf16* packed, int64_t head_begin,
                            int64_t head_end) {
  const HeadOffsets offsets{heads_per_batch, batch_stride, head_stride};
  const int64_t padded = round_up(kv_len, 16), size = attention_forward_pack_size(kv_len, head_dim);
  for (int64_t head = head_begin; head < head_end; ++head) {
    bf16* dst = packed + head * size;
    pack_dim_pairs(k + offsets.at(head), row_stride, kv_len, head_dim, padded, dst);
    pack_row_pairs(v + offsets.at(head), row_stride, kv_len, head_dim, padded,
                   dst + padded * head_dim);
  }
}

// Forward for work items [item_begin, item_end): item i is (head i / tiles, query rows
// 32·(i % tiles) onward), tiles = ceil(q_len / 32). Returns 0, or -1 for an odd or too large
// head_dim.
int attention_forward(const bf16* q, int64_t heads_per_batch, int64_t q_batch_stride,
                      int64_t q_head_stride, int64_t q_row_stride, int64_t q_len,
                      const bf16* packed, int64_t kv_len, int64_t head_dim, float scale, bf16* out,
                      int64_t out_batch_stride, int64_t out_head_stride, int64_t out_row_stride,
                      float* lse, int64_t item_begin, int64_t item_end) {
  const RowPairProduct value_product = row_pair_product_for(head_dim);
  if (value_product == nullptr) return -1;
  const int pairs = static_cast<int>(head_dim / 2), blocks = static_cast<int>((head_dim + 15) / 16);
  const int64_t padded = round_up(kv_len, 16), size = attention_forward_pack_size(kv_len, head_dim);
  const int64_t tiles = (q_len + kForwardQueries - 1) / kForwardQueries;
  const HeadOffsets q_at{heads_per_batch, q_batch_stride, q_head_stride};
  const HeadOffsets out_at{heads_per_batch, out_batch_stride, out_head_stride};

  alignas(64) float scores[kForwardQueries * kForwardKeys];
  alignas(64) bf16 probs[kForwardQueries * kForwardKeys];
  alignas(64) float acc[kForwardQueries * kMaxDimBlocks * 16];
  float row_max[kForwardQueries], row_sum[kForwardQueries];

  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t head = item / tiles, first = (item % tiles) * kForwardQueries;
    const int rows = static_cast<int>(std::min<int64_t>(kForwardQueries, q_len - first));
    const bf16* query = q + q_at.at(head) + first * q_row_stride;
    const bf16* keys_packed = packed + head * size;
    const bf16* values_packed = keys_packed + padded * head_dim;
    std::fill(row_max, row_max + rows, kNegInf);
    std::fill(row_sum, row_sum + rows, 0.0f);
    std::fill(acc, acc + rows * blocks * 16, 0.0f);

    for (int64_t start = 0; start < kv_len; start += kForwardKeys) {
      const int keys = static_cast<int>(std::min<int64_t>(kForwardKeys, kv_len - start));
      const int groups = (keys + 15) / 16;
      dim_pair_product(query, q_row_stride, rows, keys_packed + start * head_dim, groups, pairs,
                       scale, scores, kForwardKeys);
      for (int r = 0; r < rows; ++r) {
        const float* s = scores + r * kForwardKeys;
        __m512 max_v = _mm512_set1_ps(kNegInf);
        for (int g = 0; g < groups; ++g)
          max_v = _mm512_mask_max_ps(max_v, first_lanes(keys - g * 16), max_v,
                                     _mm512_loadu_ps(s + g * 16));
        const float new_max = std::max(row_max[r], _mm512_reduce_max_ps(max_v));
        const float rescale = std::exp(row_max[r] - new_max);  // 0 on the first block
        const __m512 max_b = _mm512_set1_ps(new_max);
        __m512 sum_v = _mm512_setzero_ps();
        bf16* p = probs + r * kForwardKeys;
        for (int g = 0; g < groups; ++g) {
          const __m512 e = _mm512_maskz_mov_ps(
              first_lanes(keys - g * 16),
              exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + g * 16), max_b)));
          // The denominator sums the fp32 probabilities, as torch's kernel does: the backward
          // recomputes them in fp32 from the lse. The value product reads them in bf16.
          sum_v = _mm512_add_ps(sum_v, e);
          store_bf16(p + g * 16, e, 0xFFFF);
        }
        row_sum[r] = row_sum[r] * rescale + _mm512_reduce_add_ps(sum_v);
        row_max[r] = new_max;
        if (rescale != 1.0f) {
          const __m512 rescale_v = _mm512_set1_ps(rescale);
          float* a = acc + r * blocks * 16;
          for (int n = 0; n < blocks; ++n)
            _mm512_storeu_ps(a + n * 16, _mm512_mul_ps(_mm512_loadu_ps(a + n * 16), rescale_v));
        }
      }
      value_product(probs, kForwardKeys, 2, rows, values_packed + start * blocks * 16,
                    groups * 8, acc);
    }

    bf16* out_rows = out + out_at.at(head) + first * out_row_stride;
    for (int r = 0; r < rows; ++r) {
      const __m512 inverse = _mm512_set1_ps(1.0f / row_sum[r]);
      for (int n = 0; n < blocks; ++n)
        store_bf16(out_rows + r * out_row_stride + n * 16,
                   _mm512_mul_ps(_mm512_loadu_ps(acc + (r * blocks + n) * 16), inverse),
                   first_lanes(head_dim - n * 16));
      lse[head * q_len + first + r] = row_max[r] + std::log(row_sum[r]);
    }
  }
  return 0;
}

// Sizes in bf16 elements of one head's packed operands for the backward.
int64_t attention_backward_pack_size(int64_t q_len, int64_t kv_len, int64_t head_dim) {
  const int64_t width = ((head_dim + 15) / 16) * 16;
  const int64_t keys = round_up(kv_len, kBackwardKeys), queries = round_up(q_len, kBackwardQueries);
  return 2 * keys * head_dim + keys * width + 2 * queries * width;
}

// Packs, for heads [head_begin, head_end): keys and values in dim pairs (the scores and dO·vᵀ),
// keys in row pairs (dQ = dS·k), queries and dO in row pairs (dK = dSᵀ·q, dV = Pᵀ·dO).
void attention_backward_pack(const bf16* q, const bf16* k, const bf16* v, const bf16* grad_out,
                             int64_t heads_per_batch, int64_t q_batch_stride,
                             int64_t q_head_stride, int64_t q_row_stride, int64_t kv_batch_stride,
                             int64_t kv_head_stride, int64_t kv_row_stride,
                             int64_t go_batch_stride, int64_t go_head_stride, int64_t go_row_stride,
                             int64_t q_len, int64_t kv_len, int64_t head_dim, bf16* packed,
                             int64_t head_begin, int64_t head_end) {
  const HeadOffsets q_at{heads_per_batch, q_batch_stride, q_head_stride};
  const HeadOffsets kv_at{heads_per_batch, kv_batch_stride, kv_head_stride};
  const HeadOffsets go_at{heads_per_batch, go_batch_stride, go_head_stride};
  const int64_t width = ((head_dim + 15) / 16) * 16;
  const int64_t keys = round_up(kv_len, kBackwardKeys), queries = round_up(q_len, kBackwardQueries);
  const int64_t size = attention_backward_pack_size(q_len, kv_len, head_dim);
  for (int64_t head = head_begin; head < head_end; ++head) {
    bf16* dst = packed + head * size;
    pack_dim_pairs(k + kv_at.at(head), kv_row_stride, kv_len, head_dim, keys, dst);
    dst += keys * head_dim;
    pack_dim_pairs(v + kv_at.at(head), kv_row_stride, kv_len, head_dim, keys, dst);
    dst += keys * head_dim;
    pack_row_pairs(k + kv_at.at(head), kv_row_stride, kv_len, head_dim, keys, dst);
    dst += keys * width;
    pack_row_pairs(q + q_at.at(head), q_row_stride, q_len, head_dim, queries, dst);
    dst += queries * width;
    pack_row_pairs(grad_out + go_at.at(head), go_row_stride, q_len, head_dim, queries, dst);
  }
}

// Backward for work items [item_begin, item_end): item i is (head i / tiles, keys
// 64·(i % tiles) onward), tiles = ceil(kv_len / 64). It writes those keys' rows of grad_k and
// grad_v, and adds its part of grad_q to grad_q_acc: fp32 (heads from first_head on,
// round_up(q_len, 64), blocks·16), one per thread for the heads of its items (items of one head
// share query rows). delta: fp32 (batch·heads, q_len), Σ_d dO·out per query row. Returns 0, or
// -1 for a head_dim it cannot take.
int attention_backward(const bf16* q, int64_t heads_per_batch, int64_t q_batch_stride,
                       int64_t q_head_stride, int64_t q_row_stride, const bf16* grad_out,
                       int64_t go_batch_stride, int64_t go_head_stride, int64_t go_row_stride,
                       const float* lse, const float* delta, const bf16* packed, int64_t q_len,
                       int64_t kv_len, int64_t head_dim, float scale, bf16* grad_k, bf16* grad_v,
                       int64_t gkv_batch_stride, int64_t gkv_head_stride, int64_t gkv_row_stride,
                       float* grad_q_acc, int64_t first_head, int64_t item_begin,
                       int64_t item_end) {
  const RowPairProduct product = row_pair_product_for(head_dim);
  if (product == nullptr) return -1;
  constexpr int QT = kBackwardQueries, KT = kBackwardKeys;
  const int pairs = static_cast<int>(head_dim / 2), blocks = static_cast<int>((head_dim + 15) / 16);
  const int64_t width = blocks * 16;
  const int64_t keys_padded = round_up(kv_len, KT), queries_padded = round_up(q_len, QT);
  const int64_t size = attention_backward_pack_size(q_len, kv_len, head_dim);
  const int64_t tiles = keys_padded / KT;
  const HeadOffsets q_at{heads_per_batch, q_batch_stride, q_head_stride};
  const HeadOffsets go_at{heads_per_batch, go_batch_stride, go_head_stride};
  const HeadOffsets gkv_at{heads_per_batch, gkv_batch_stride, gkv_head_stride};

  alignas(64) float probs[QT * KT];         // P, fp32
  alignas(64) float grad_scores[QT * KT];   // dP, then dS = scale · P ⊙ (dP − delta)
  alignas(64) bf16 grad_scores_rows[QT * KT];  // dS in bf16, row-major (for dQ)
  alignas(64) bf16 probs_pairs[QT * KT];    // P, query-row pairs (for dV)
  alignas(64) bf16 grad_scores_pairs[QT * KT];  // dS, query-row pairs (for dK)
  alignas(64) float grad_k_acc[KT * kMaxDimBlocks * 16];
  alignas(64) float grad_v_acc[KT * kMaxDimBlocks * 16];

  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t head = item / tiles, first_key = (item % tiles) * KT;
    const int keys = static_cast<int>(std::min<int64_t>(KT, kv_len - first_key));
    const bf16* k_dims = packed + head * size;
    const bf16* v_dims = k_dims + keys_padded * head_dim;
    const bf16* k_rows = v_dims + keys_padded * head_dim;
    const bf16* q_rows = k_rows + keys_padded * width;
    const bf16* go_rows = q_rows + queries_padded * width;
    const bf16* query = q + q_at.at(head);
    const bf16* grad_output = grad_out + go_at.at(head);
    float* grad_q_head = grad_q_acc + (head - first_head) * queries_padded * width;
    std::fill(grad_k_acc, grad_k_acc + KT * width, 0.0f);
    std::fill(grad_v_acc, grad_v_acc + KT * width, 0.0f);

    for (int64_t first = 0; first < q_len; first += QT) {
      const int rows = static_cast<int>(std::min<int64_t>(QT, q_len - first));
      dim_pair_product(query + first * q_row_stride, q_row_stride, rows,
                       k_dims + first_key * head_dim, KT / 16, pairs, scale, probs, KT);
      dim_pair_product(grad_output + first * go_row_stride, go_row_stride, rows,
                       v_dims + first_key * head_dim, KT / 16, pairs, 1.0f, grad_scores, KT);
      const __m512 scale_v = _mm512_set1_ps(scale);
      for (int r = 0; r < QT; ++r) {
        float* p = probs + r * KT;
        float* ds = grad_scores + r * KT;
        if (r >= rows) {  // padding query rows: no probability, no gradient
          std::fill(p, p + KT, 0.0f);
          std::fill(ds, ds + KT, 0.0f);
          std::fill(grad_scores_rows + r * KT, grad_scores_rows + (r + 1) * KT, bf16{0});
          continue;
        }
        const __m512 row_lse = _mm512_set1_ps(lse[head * q_len + first + r]);
        const __m512 row_delta = _mm512_set1_ps(delta[head * q_len + first + r]);
        for (int g = 0; g < KT / 16; ++g) {
          const __m512 prob = _mm512_maskz_mov_ps(
              first_lanes(keys - g * 16),
              exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + g * 16), row_lse)));
          const __m512 grad = _mm512_mul_ps(
              _mm512_mul_ps(prob, _mm512_sub_ps(_mm512_loadu_ps(ds + g * 16), row_delta)), scale_v);
          _mm512_storeu_ps(p + g * 16, prob);
          _mm512_storeu_ps(ds + g * 16, grad);
          store_bf16(grad_scores_rows + r * KT + g * 16, grad, 0xFFFF);
        }
      }
      interleave_row_pairs(probs, KT, QT, KT / 16, probs_pairs, KT);
      interleave_row_pairs(grad_scores, KT, QT, KT / 16, grad_scores_pairs, KT);
      // dV[j] += Σ_i P[i][j] dO[i]; dK[j] += Σ_i dS[i][j] q[i]; (pairs of i, output rows j)
      product(probs_pairs, 2, 2 * KT, keys, go_rows + first * width, QT / 2, grad_v_acc);
      product(grad_scores_pairs, 2, 2 * KT, keys, q_rows + first * width, QT / 2, grad_k_acc);
      // dQ[i] += Σ_j dS[i][j] k[j]; (pairs of j, output rows i)
      product(grad_scores_rows, KT, 2, rows, k_rows + first_key * width, KT / 2,
              grad_q_head + first * width);
    }

    bf16* gk = grad_k + gkv_at.at(head) + first_key * gkv_row_stride;
    bf16* gv = grad_v + gkv_at.at(head) + first_key * gkv_row_stride;
    for (int r = 0; r < keys; ++r)
      for (int n = 0; n < blocks; ++n) {
        const __mmask16 lanes = first_lanes(head_dim - n * 16);
        store_bf16(gk + r * gkv_row_stride + n * 16, _mm512_loadu_ps(grad_k_acc + r * width + n * 16), lanes);
        store_bf16(gv + r * gkv_row_stride + n * 16, _mm512_loadu_ps(grad_v_acc + r * width + n * 16), lanes);
      }
  }
  return 0;
}

}  // extern "C"
