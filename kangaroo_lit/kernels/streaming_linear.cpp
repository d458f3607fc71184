// The streaming CPU kernel of kangaroo_lit.kernels.streaming_linear, compiled on first use with
// torch.utils.cpp_extension.load_inline (no build step at install time). The Python side checks the row
// limit (kangaroo_lit.settings.KERNEL_MAX_ROWS, 8) before calling in: keep the two, and the cases of the
// switch below, in step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]) for M <= 8 rows. Each weight row is loaded once and used
// for all M rows; each (m, n) is reduced in the same order for every M (batch-invariant).
template <int M>
static void rows_kernel(const float* x, const float* w, const float* b, float* y,
                        int64_t K, int64_t n0, int64_t n1, int64_t N) {
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      // fixed-order horizontal sum: (lo + hi) then pairwise
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
      float total = _mm_cvtss_f32(s);
      for (int64_t k = K8; k < K; ++k) total += x[m * K + k] * wr[k];
      if (b) total += b[n];
      y[m * N + n] = total;
    }
  }
}

torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "1 to 8 rows");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows_kernel<1>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 2: rows_kernel<2>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 3: rows_kernel<3>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 4: rows_kernel<4>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 5: rows_kernel<5>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 6: rows_kernel<6>(xp, wp, bp, yp, K, n0, n1, N); break;
      case 7: rows_kernel<7>(xp, wp, bp, yp, K, n0, n1, N); break;
      default: rows_kernel<8>(xp, wp, bp, yp, K, n0, n1, N); break;
    }
  });
  return y;
}
