// Float32 y = x · Wᵀ (+ b) for a few rows of x on CPU: the linear layers of a KV-cached decode step.
//
// With M ≤ 16 rows a linear layer reads every weight once and does M multiply-adds with it, so
// its time is the time to stream W from memory. Each tile below loads NB rows of W once, one
// vector at a time, and multiplies them into MB rows of x (which stay in L1), accumulating
// MB × NB vectors; the sums over K are reduced once at the end. Weight rows further ahead are
// prefetched. Threads split the rows of W (at::parallel_for, torch's intra-op threads). The tile
// fits the vector registers: 8 × 3 accumulators of 16 floats with AVX-512 (32 registers),
// 4 × 3 of 8 floats otherwise (AVX2: 16 registers).
// Built by kernels/cpu_decode.py with torch.utils.cpp_extension (-O3, -march=native, -fopenmp).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;    // floats per vector register
constexpr int kMB = 8;        // rows of x per tile
constexpr int kNB = 3;        // rows of W per tile
#else
constexpr int kLanes = 8;
constexpr int kMB = 4;
constexpr int kNB = 3;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));  // accumulators
// the same vector at float alignment, for loads from any float address
typedef float vec_u __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
constexpr int kAhead = 64;      // prefetch distance in floats along K
constexpr int64_t kGrain = 16;  // tiles per parallel chunk

inline vec load(const float* p) { return *reinterpret_cast<const vec_u*>(p); }

// Lane permutations with constant indices: clang's builtin, else GCC's (every GCC version has
// __builtin_shuffle; __builtin_shufflevector only from GCC 12).
typedef int ivec __attribute__((vector_size(kLanes * sizeof(int))));
#if defined(__clang__)
#define PERMUTE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define PERMUTE(v, ...) __builtin_shuffle(v, ivec{__VA_ARGS__})
#endif

inline float reduce(vec v) {  // sum of the lanes: log2(kLanes) permute + add steps
#if defined(__AVX512F__)
  v += PERMUTE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
  v += PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
  return v[0];
}

// A prefetch hint `offset` floats past `p`, computed on integers: the address may lie beyond
// the end of W (the last tile), where pointer arithmetic would be undefined; a prefetch never
// faults.
inline void prefetch(const float* p, int64_t offset) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) +
                                                   offset * sizeof(float)),
                     0, 0);
}

// y[i, j] = Σ_k x[i, k] w[j, k] for i < MB, j < NB; x, w row-major with row length K.
template <int MB, int NB>
inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y,
                 int64_t K, int64_t ldy) {
  vec acc[MB][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = vec{};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vec wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      wv[j] = load(w + j * K + k);
      prefetch(w, (j + NB) * K + k + kAhead);  // the next tile's rows
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      vec xv = load(x + i * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = reduce(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * K + t] * w[j * K + t];
      y[i * ldy + j] = s;
    }
}

// Rows [n0, n1) of W against all M rows of x.
void rows(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
          int64_t n1) {
  int64_t n = n0;
  for (; n + kNB <= n1; n += kNB) {
    int64_t m = 0;
    for (; m + kMB <= M; m += kMB) tile<kMB, kNB>(x + m * K, w + n * K, y + m * N + n, K, N);
    for (; m < M; ++m) tile<1, kNB>(x + m * K, w + n * K, y + m * N + n, K, N);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile<1, 1>(x + m * K, w + n * K, y + m * N + n, K, N);
}

}  // namespace

// x: Float[M, K] contiguous, weight: Float[N, K] contiguous, bias: Float[N] or None → Float[M, N].
torch::Tensor decode_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "decode_linear: x [M, K] and weight [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "decode_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_linear: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "decode_linear: contiguous tensors only");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == at::kFloat,
                "decode_linear: bias Float[N] expected");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kNB - 1) / kNB;
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
    rows(xp, wp, yp, M, N, K, t0 * kNB, std::min(N, t1 * kNB));
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_linear", &decode_linear, "y = x · weightᵀ (+ bias) for a few float32 rows on CPU");
}
