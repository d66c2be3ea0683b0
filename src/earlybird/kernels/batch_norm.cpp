// Training-mode batch norm (optionally followed by ReLU) for channels-last CPU tensors.
//
// A channels-last activation is an (M, C) row-major matrix, M = N*H*W. ATen's kernel walks it row by
// row, and a row whose width C is not a multiple of the vector width pays a tail each time: at the
// odd widths pruning leaves (C = 8, 24, 40, ...) its backward is 2-10x slower per element than at
// C = 64. Here the matrix is walked in blocks of L = k*C elements (k whole rows), L a multiple of 16
// and at least 64, so every inner loop is full-width and the compiler vectorizes it. The ReLU is
// fused: the forward writes max(0, a*x + b) in the same pass, and the backward recomputes the ReLU's
// mask from x instead of reading the output, which saves the ReLU's own passes over memory.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

// Storage types: float, or bfloat16 as its raw 16 bits (autocast's activations).
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t w = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline void from_float(float v, float* out) { *out = v; }
inline void from_float(float v, uint16_t* out) {
  uint32_t w;
  std::memcpy(&w, &v, 4);
  uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;  // round to nearest even
  *out = uint16_t(v != v ? 0x7FC0u : rounded);                 // NaN stays NaN
}

template <bool relu>
inline float activate(float v) {
  if constexpr (relu) return v > 0.f ? v : 0.f;
  return v;
}

struct Blocks {
  int64_t C, L, rows_per_block, count, tail_rows;
};

Blocks blocks_of(int64_t M, int64_t C) {
  int64_t L = std::lcm<int64_t>(C, 16);
  while (L < 64) L *= 2;
  int64_t k = L / C;
  return {C, L, k, M / k, M % k};
}

// Splits [0, n) over the threads; fn(begin, end, thread) may run several times per thread.
template <typename F>
void parallel(int64_t n, F fn) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) { fn(begin, end, at::get_thread_num()); });
}

std::vector<float> repeat(const std::vector<float>& per_channel, int64_t L) {
  std::vector<float> out(L);
  for (int64_t j = 0; j < L; ++j) out[j] = per_channel[j % per_channel.size()];
  return out;
}

constexpr int64_t kChunk = 256;  // blocks summed in float before adding to the double sums

// Two sums per channel over all M rows. terms(i, j, t1, t2) sets element i's two terms, where j is a
// lane whose channel is i's (j % C == i % C), for looking up per-lane constants. Each thread sums its
// blocks lane by lane in float, kChunk blocks at a time, then in double; the lanes fold to channels,
// and the rows that do not fill a block come last.
template <typename Terms>
std::pair<std::vector<double>, std::vector<double>> channel_sums(const Blocks& b, int64_t M, Terms terms) {
  const int64_t L = b.L, C = b.C;
  std::vector<double> partial(size_t(at::get_num_threads()) * 2 * L, 0.0);
  parallel(b.count, [&](int64_t begin, int64_t end, int thread) {
    double* s1 = partial.data() + size_t(thread) * 2 * L;
    double* s2 = s1 + L;
    std::vector<float> f1(L), f2(L);
    for (int64_t start = begin; start < end; start += kChunk) {
      std::fill(f1.begin(), f1.end(), 0.f);
      std::fill(f2.begin(), f2.end(), 0.f);
      for (int64_t blk = start; blk < std::min(end, start + kChunk); ++blk) {
        const int64_t base = blk * L;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          float t1, t2;
          terms(base + j, j, t1, t2);
          f1[j] += t1;
          f2[j] += t2;
        }
      }
      for (int64_t j = 0; j < L; ++j) s1[j] += f1[j], s2[j] += f2[j];
    }
  });
  std::vector<double> sum1(C, 0.0), sum2(C, 0.0);
  for (size_t t = 0; t < partial.size() / (2 * L); ++t)
    for (int64_t j = 0; j < L; ++j) sum1[j % C] += partial[t * 2 * L + j], sum2[j % C] += partial[t * 2 * L + L + j];
  for (int64_t i = b.count * L; i < M * C; ++i) {
    float t1, t2;
    terms(i, i % C, t1, t2);
    sum1[i % C] += t1, sum2[i % C] += t2;
  }
  return {sum1, sum2};
}

template <typename T, bool relu>
std::vector<at::Tensor> forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                     double eps) {
  const int64_t C = input.size(1), M = input.numel() / C;
  const T* x = reinterpret_cast<const T*>(input.data_ptr());
  const Blocks b = blocks_of(M, C);
  const int64_t L = b.L;
  // Shifted sums (by the first row) keep E[x^2] - E[x]^2 from cancelling when |mean| >> std.
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = to_float(x[c]);
  const std::vector<float> shift_l = repeat(shift, L);
  auto [sum, sumsq] = channel_sums(b, M, [&](int64_t i, int64_t j, float& t1, float& t2) {
    t1 = to_float(x[i]) - shift_l[j];
    t2 = t1 * t1;
  });
  auto stats = at::empty({3, C}, input.options().dtype(at::kFloat));
  float *mean = stats[0].data_ptr<float>(), *var = stats[1].data_ptr<float>(), *invstd = stats[2].data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  std::vector<float> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    double m = sum[c] / M;
    double v = std::max(sumsq[c] / M - m * m, 0.0);
    mean[c] = float(shift[c] + m);
    var[c] = float(v);
    invstd[c] = float(1.0 / std::sqrt(v + eps));
    scale[c] = w[c] * invstd[c];
    offset[c] = bi[c] - mean[c] * scale[c];
  }
  auto output = at::empty_like(input, at::MemoryFormat::ChannelsLast);
  T* y = reinterpret_cast<T*>(output.data_ptr());
  const std::vector<float> scale_l = repeat(scale, L), offset_l = repeat(offset, L);
  parallel(b.count, [&](int64_t begin, int64_t end, int) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const T* in = x + blk * L;
      T* out = y + blk * L;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) from_float(activate<relu>(to_float(in[j]) * scale_l[j] + offset_l[j]), out + j);
    }
  });
  for (int64_t i = b.count * L; i < M * C; ++i)
    from_float(activate<relu>(to_float(x[i]) * scale[i % C] + offset[i % C]), y + i);
  return {output, stats};
}

template <typename T, bool relu>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& stats, bool input_grad) {
  const int64_t C = input.size(1), M = input.numel() / C;
  const T* x = reinterpret_cast<const T*>(input.data_ptr());
  const T* dy = reinterpret_cast<const T*>(grad_output.data_ptr());
  const Blocks b = blocks_of(M, C);
  const int64_t L = b.L;
  const float *mean = stats[0].data_ptr<float>(), *invstd = stats[2].data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  std::vector<float> mean_c(mean, mean + C), scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) scale[c] = w[c] * invstd[c], offset[c] = bi[c] - mean[c] * scale[c];
  const std::vector<float> mean_l = repeat(mean_c, L), scale_l = repeat(scale, L), offset_l = repeat(offset, L);
  // The gradient reaching the batch norm: through the ReLU's mask, recomputed exactly as the forward did.
  auto grad_at = [](float xv, float gv, float s, float o) { return (!relu || xv * s + o > 0.f) ? gv : 0.f; };
  auto [sum_g, sum_gx] = channel_sums(b, M, [&](int64_t i, int64_t j, float& t1, float& t2) {
    const float xv = to_float(x[i]);
    t1 = grad_at(xv, to_float(dy[i]), scale_l[j], offset_l[j]);
    t2 = t1 * (xv - mean_l[j]);
  });
  auto grad_weight_t = at::empty({C}, weight.options()), grad_bias_t = at::empty({C}, weight.options());
  float *grad_weight = grad_weight_t.data_ptr<float>(), *grad_bias = grad_bias_t.data_ptr<float>();
  std::vector<float> gain(C), xcoef(C), constant(C);
  for (int64_t c = 0; c < C; ++c) {
    grad_weight[c] = float(sum_gx[c] * invstd[c]);
    grad_bias[c] = float(sum_g[c]);
    // dx = scale * (g - mean(g) - xhat * mean(g * xhat)) = g * gain + x * xcoef + constant
    double is = invstd[c];
    gain[c] = scale[c];
    xcoef[c] = float(-scale[c] * is * is * sum_gx[c] / M);
    constant[c] = float(-scale[c] * sum_g[c] / M - double(xcoef[c]) * mean[c]);
  }
  at::Tensor grad_input;
  if (input_grad) {
    grad_input = at::empty_like(input, at::MemoryFormat::ChannelsLast);
    T* dx = reinterpret_cast<T*>(grad_input.data_ptr());
    const std::vector<float> gain_l = repeat(gain, L), xcoef_l = repeat(xcoef, L), constant_l = repeat(constant, L);
    parallel(b.count, [&](int64_t begin, int64_t end, int) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const T* xr = x + blk * L;
        const T* gr = dy + blk * L;
        T* out = dx + blk * L;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          float xv = to_float(xr[j]);
          float g = grad_at(xv, to_float(gr[j]), scale_l[j], offset_l[j]);
          from_float(g * gain_l[j] + xv * xcoef_l[j] + constant_l[j], out + j);
        }
      }
    });
    for (int64_t i = b.count * L; i < M * C; ++i) {
      const int64_t c = i % C;
      float xv = to_float(x[i]);
      float g = grad_at(xv, to_float(dy[i]), scale[c], offset[c]);
      from_float(g * gain[c] + xv * xcoef[c] + constant[c], dx + i);
    }
  }
  return {grad_input, grad_weight_t, grad_bias_t};
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, " must be a channels-last 4-d CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, " must be float32 or bfloat16");
}

// Calls fn(T{}, std::integral_constant<bool, relu>{}) for the input's storage type and the ReLU flag.
template <typename F>
std::vector<at::Tensor> dispatch(const at::Tensor& input, bool relu, F fn) {
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  if (relu) return bf16 ? fn(uint16_t{}, std::true_type{}) : fn(float{}, std::true_type{});
  return bf16 ? fn(uint16_t{}, std::false_type{}) : fn(float{}, std::false_type{});
}

std::vector<at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                bool relu) {
  check(input, "input");
  return dispatch(input, relu, [&](auto t, auto r) {
    return forward_impl<decltype(t), decltype(r)::value>(input, weight, bias, eps);
  });
}

std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& stats, bool relu, bool input_grad) {
  check(input, "input");
  check(grad_output, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output and input must have one dtype");
  return dispatch(input, relu, [&](auto t, auto r) {
    return backward_impl<decltype(t), decltype(r)::value>(grad_output, input, weight, bias, stats, input_grad);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "batch norm (+ ReLU) forward in training mode: (output, [mean; biased var; invstd])");
  m.def("backward", &backward, "its backward: (grad_input or None, grad_weight, grad_bias)");
}
