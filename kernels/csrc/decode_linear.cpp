// Float32 y = x · Wᵀ (+ b) for a few rows of x on CPU: the linear layers of a KV-cached decode step.
//
// With M ≤ 16 rows a linear layer reads every weight once and does M multiply-adds with it, so
// its time is the time to stream W from memory. Each tile below loads NB rows of W once, 16
// floats at a time, and multiplies them into MB rows of x (which stay in L1), accumulating
// MB × NB vectors; the sums over K are reduced once at the end. Weight rows further ahead are
// prefetched. Threads split the rows of W (at::parallel_for, torch's intra-op threads).
// Built by kernels/cpu_decode.py with torch.utils.cpp_extension (-O3, -march=native).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

constexpr int kMB = 8;        // rows of x per tile
constexpr int kNB = 3;        // rows of W per tile
constexpr int kAhead = 64;    // prefetch distance in floats along K
constexpr int64_t kGrain = 16;  // tiles per parallel chunk

inline v16 load(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float reduce(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// y[i, j] = Σ_k x[i, k] w[j, k] for i < MB, j < NB; x, w row-major with row length K.
template <int MB, int NB>
inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y,
                 int64_t K, int64_t ldy) {
  v16 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = v16{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    v16 wv[NB];
    for (int j = 0; j < NB; ++j) {
      wv[j] = load(w + j * K + k);
      __builtin_prefetch(w + (j + NB) * K + k + kAhead, 0, 0);  // a hint: never faults
    }
    for (int i = 0; i < MB; ++i) {
      v16 xv = load(x + i * K + k);
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
