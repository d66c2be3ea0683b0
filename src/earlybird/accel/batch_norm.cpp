// Batch norm for channels-last CPU tensors, in training and in evaluation, optionally followed by a
// ReLU or ReLU6, or by a residual add and a ReLU.
//
// A channels-last activation is an (M, C) row-major matrix, M = N*H*W. ATen's kernel walks it row by
// row, and a row whose width C is not a multiple of the vector width pays a tail each time: at the
// odd widths pruning leaves (C = 8, 24, 40, ...) its backward is 2-10x slower per element than at
// C = 64. Here the matrix is walked in blocks of L = k*C elements (k whole rows), L a multiple of 16
// and at least 64, so every inner loop is full-width and the compiler vectorizes it. The activation
// is fused: the forward writes max(0, a*x + b) in the same pass, and the backward recomputes its
// mask from x instead of reading the output, which saves the activation's own passes over memory. A
// residual (ResNet's relu(bn(x) + identity)) is added in the same pass.
//
// VGG's conv -> BN -> ReLU -> 2x2 max-pool can end in the pool too: the forward writes only the pooled
// output (not the full-size activation, which the pool would read again, nor its int64 indices) and
// one byte per pooled value saying which element won, and the backward takes the pooled gradient, so
// the full-size gradient the pool's backward would zero-fill and scatter is never stored.
//
// A pruned pre-activation BN reads some channels of a stream: gather copies them out of the
// channels-last input (torch's index_select returns them contiguous, so every layer after it converts
// back), and scatter is its backward.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
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
// A float's bits rounded to nearest even at bf16's precision: the bf16 in the upper 16 bits.
inline uint32_t rounded_to_bf16(uint32_t w) { return w + 0x7FFFu + ((w >> 16) & 1u); }
inline void from_float(float v, float* out) { *out = v; }
inline void from_float(float v, uint16_t* out) {
  uint32_t w;
  std::memcpy(&w, &v, 4);
  uint32_t rounded = rounded_to_bf16(w) >> 16;
  *out = uint16_t(v != v ? 0x7FC0u : rounded);  // NaN stays NaN
}

// v as the storage type holds it: what torch's max-pool compares after a bf16 batch norm.
template <typename T>
inline float stored(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {  // from_float's rounding, kept in a float (storing and loading a bf16 stops vectorization)
    uint32_t w;
    std::memcpy(&w, &v, 4);
    w = rounded_to_bf16(w) & 0xFFFF0000u;
    float f;
    std::memcpy(&f, &w, 4);
    return v != v ? v : f;
  }
}

// a where take, else b, as bit arithmetic. Written as ?: on a window's code, GCC threads the four
// tests of one code into branches (k == 1 rules out k == 2), and the loop no longer vectorizes.
inline float pick(bool take, float a, float b) {
  uint32_t wa, wb;
  std::memcpy(&wa, &a, 4);
  std::memcpy(&wb, &b, 4);
  const uint32_t mask = 0u - uint32_t(take), w = (wa & mask) | (wb & ~mask);
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// The (M, C) matrix as `count` blocks of L = k*C elements (k whole rows), then M % k rows left over.
struct Blocks {
  int64_t C, L, count;
};

Blocks blocks_of(int64_t M, int64_t C) {
  int64_t L = std::lcm<int64_t>(C, 16);
  while (L < 64) L *= 2;
  return {C, L, M / (L / C)};
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

// The per-thread partial sums (each thread's L lanes of the first sum, then L of the second) folded
// to two sums per channel, lane j holding channel j % C.
std::pair<std::vector<double>, std::vector<double>> fold_partials(const std::vector<double>& partial, int64_t L,
                                                                   int64_t C) {
  std::vector<double> sum1(C, 0.0), sum2(C, 0.0);
  for (size_t t = 0; t < partial.size() / (2 * L); ++t)
    for (int64_t j = 0; j < L; ++j) sum1[j % C] += partial[t * 2 * L + j], sum2[j % C] += partial[t * 2 * L + L + j];
  return {sum1, sum2};
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
  auto [sum1, sum2] = fold_partials(partial, L, C);
  for (int64_t i = b.count * L; i < M * C; ++i) {
    float t1, t2;
    terms(i, i % C, t1, t2);
    sum1[i % C] += t1, sum2[i % C] += t2;
  }
  return {sum1, sum2};
}

// What follows the batch norm: nothing, a ReLU, a ReLU6 (MobileNet's), or a residual added and then
// a ReLU. The codes are the Python side's.
enum class Tail { none = 0, relu = 1, relu6 = 2, add_relu = 3 };

template <Tail tail>
inline float activate(float v) {
  if constexpr (tail == Tail::none) return v;
  v = v > 0.f ? v : 0.f;
  if constexpr (tail == Tail::relu6) v = v < 6.f ? v : 6.f;
  return v;
}

// Where the activation passes the gradient, given its input v: torch's masks, strict at both ends.
template <Tail tail>
inline bool passes(float v) {
  if constexpr (tail == Tail::none) return true;
  if constexpr (tail == Tail::relu6) return v > 0.f && v < 6.f;
  return v > 0.f;
}

// fn(i, j) for every element i, j a lane of i's channel (as in channel_sums), blocks in parallel.
template <typename F>
void for_each_element(const Blocks& b, int64_t M, F fn) {
  const int64_t L = b.L;
  parallel(b.count, [&](int64_t begin, int64_t end, int) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t base = blk * L;
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) fn(base + j, j);
    }
  });
  for (int64_t i = b.count * L; i < M * b.C; ++i) fn(i, i % b.C);
}

// act(scale * x + offset [+ residual]) per channel in one pass: the forward's second pass, and all of
// evaluation, with the running statistics folded into scale and offset (torch's eval batch norm and
// the ReLU after it are two passes).
template <typename T, Tail tail>
at::Tensor affine_impl(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& scale,
                                    const at::Tensor& offset) {
  const int64_t C = input.size(1), M = input.numel() / C;
  const T* x = reinterpret_cast<const T*>(input.data_ptr());
  const T* r = tail == Tail::add_relu ? reinterpret_cast<const T*>(residual.data_ptr()) : nullptr;
  const Blocks b = blocks_of(M, C);
  const float* sc = scale.data_ptr<float>();
  const float* of = offset.data_ptr<float>();
  const std::vector<float> scale_l = repeat(std::vector<float>(sc, sc + C), b.L);
  const std::vector<float> offset_l = repeat(std::vector<float>(of, of + C), b.L);
  auto output = at::empty_like(input, at::MemoryFormat::ChannelsLast);
  T* y = reinterpret_cast<T*>(output.data_ptr());
  for_each_element(b, M, [&](int64_t i, int64_t j) {
    float v = to_float(x[i]) * scale_l[j] + offset_l[j];
    if constexpr (tail == Tail::add_relu) v += to_float(r[i]);
    from_float(activate<tail>(v), y + i);
  });
  return output;
}

// The 2x2, stride-2 max-pool over a channels-last (N, C, H, W) input, floor mode: output row r is
// image r / OH, input rows 2 (r % OH) and the one below; a window's four elements lie at these steps
// from its first.
struct Steps {
  int64_t right, down;  // to the element on the right, and to the one below
  int64_t operator[](int k) const { return (k & 1 ? right : 0) + (k & 2 ? down : 0); }
};

struct Pool {
  int64_t N, C, H, W, OH, OW;
  Steps step;
  int64_t grain;  // output rows per parallel task: at least ~16k input elements

  int64_t first(int64_t r) const { return ((r / OH) * H + 2 * (r % OH)) * W * C; }  // output row r's first input
};

Pool pool_of(const at::Tensor& input) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OW = W / 2;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * OW * C));
  return {N, C, H, W, H / 2, OW, {C, W * C}, grain};
}

// What the training forward keeps for the backward, one byte per pooled output: the index (0-3) of
// the window's element that torch's max-pool would pick from the stored activation (the first
// largest; a NaN wins), or kBlocked where the activation passes no gradient there. The backward
// then neither recomputes the windows nor needs the full-size gradient the pool would scatter.
constexpr uint8_t kBlocked = 4;

// Output rows [begin, end): y = max over each window of act(scale * x + offset), and the codes
// where codes is not null. Selects rather than branches, and locals rather than captured
// references, so that the loop over channels vectorizes.
template <typename T, Tail tail, bool with_codes>
void pooled_rows(const Pool& p, int64_t begin, int64_t end, const T* x, T* y, uint8_t* codes, const float* scale,
                 const float* offset) {
  const Steps step = p.step;
  const int64_t C = p.C, OW = p.OW;
  // a window's codes as floats first: storing bytes in the loop that loads bf16 stops it vectorizing
  std::vector<float> code_v(with_codes ? C : 0);
  float* code = code_v.data();
  for (int64_t r = begin; r < end; ++r) {
    const T* row = x + p.first(r);
    for (int64_t ow = 0; ow < OW; ++ow) {
      const T* win = row + 2 * ow * C;
      const int64_t o = (r * OW + ow) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float a = to_float(win[c]) * scale[c] + offset[c];
        float m = stored<T>(activate<tail>(a)), best = 0.f;
#pragma GCC unroll 3
        for (int k = 1; k < 4; ++k) {
          const float ak = to_float(win[step[k] + c]) * scale[c] + offset[c], v = stored<T>(activate<tail>(ak));
          const bool take = v > m || v != v;
          best = take ? float(k) : best;
          m = take ? v : m;
          a = take ? ak : a;
        }
        from_float(activate<tail>(a), y + o + c);
        if constexpr (with_codes) code[c] = passes<tail>(a) ? best : float(kBlocked);
      }
      if constexpr (with_codes)
        for (int64_t c = 0; c < C; ++c) codes[o + c] = uint8_t(code[c]);
    }
  }
}

// The pooled forward's second pass (with codes), and evaluation (without).
template <typename T, Tail tail>
std::vector<at::Tensor> pooled_affine_impl(const at::Tensor& input, const float* scale, const float* offset,
                                           bool with_codes) {
  const Pool p = pool_of(input);
  const T* x = reinterpret_cast<const T*>(input.data_ptr());
  auto output = at::empty({p.N, p.C, p.OH, p.OW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  T* y = reinterpret_cast<T*>(output.data_ptr());
  at::Tensor codes = with_codes ? at::empty({output.numel()}, input.options().dtype(at::kByte)) : at::Tensor();
  uint8_t* k = with_codes ? codes.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, p.N * p.OH, p.grain, [&](int64_t begin, int64_t end) {
    if (with_codes)
      pooled_rows<T, tail, true>(p, begin, end, x, y, k, scale, offset);
    else
      pooled_rows<T, tail, false>(p, begin, end, x, y, nullptr, scale, offset);
  });
  return {output, codes};
}

// An output row's codes as floats, converted in one long loop: read as bytes in the loops over a
// window's channels, they made those loops 32 lanes wide, and at C < 32 every iteration ran scalar.
inline const float* row_codes(const uint8_t* codes, int64_t n, std::vector<float>& buffer) {
  buffer.resize(size_t(n));
  float* out = buffer.data();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = codes[i];
  return out;
}

// The pooled backward's two sums per channel: only where a code names an element does the pooled
// gradient reach the batch norm.
template <typename T>
std::pair<std::vector<double>, std::vector<double>> pooled_sums(const Pool& p, const T* x_, const T* dy_,
                                                                 const uint8_t* codes_, const float* mean_) {
  const int64_t C = p.C;
  std::vector<double> partial(size_t(at::get_num_threads()) * 2 * C, 0.0);
  at::parallel_for(0, p.N * p.OH, p.grain, [&](int64_t begin, int64_t end) {
    // locals, not the closure's references, or the loop over channels does not vectorize
    const T *x = x_, *dy = dy_;
    const uint8_t* codes = codes_;
    const float* mean = mean_;
    const Steps step = p.step;
    const int64_t C = p.C, OW = p.OW;
    double* s1 = partial.data() + size_t(at::get_thread_num()) * 2 * C;
    double* s2 = s1 + C;
    std::vector<float> f1_v(C), f2_v(C), code_v;
    float *f1 = f1_v.data(), *f2 = f2_v.data();
    for (int64_t r = begin; r < end; ++r) {  // a row's windows summed in float, rows in double
      std::fill(f1, f1 + C, 0.f);
      std::fill(f2, f2 + C, 0.f);
      const T* row = x + p.first(r);
      const float* code = row_codes(codes + r * OW * C, OW * C, code_v);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const T* win = row + 2 * ow * C;
        const int64_t o = (r * OW + ow) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          // all four loaded, then selected: a load under a condition needs masked loads (AVX-512's)
          const float k = code[ow * C + c], gv = pick(k < float(kBlocked), to_float(dy[o + c]), 0.f);
          float xv = to_float(win[c]);
#pragma GCC unroll 3
          for (int j = 1; j < 4; ++j) xv = pick(k == float(j), to_float(win[step[j] + c]), xv);
          f1[c] += gv;
          f2[c] += gv * (xv - mean[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) s1[c] += f1[c], s2[c] += f2[c];
    }
  });
  return fold_partials(partial, C, C);
}

// dx = g * gain + x * xcoef + constant for every input element, g the pooled gradient where the
// window's code names the element and zero elsewhere (also in a last row or column that an odd
// size leaves out).
template <typename T>
void pooled_grad_input(const Pool& p, const T* x_, const T* dy_, const uint8_t* codes_, T* dx_, const float* gain_,
                       const float* xcoef_, const float* constant_) {
  at::parallel_for(0, p.N * p.OH, p.grain, [&](int64_t begin, int64_t end) {
    // locals, not the closure's references, or the loop over channels does not vectorize
    const T *x = x_, *dy = dy_;
    const uint8_t* codes = codes_;
    T* dx = dx_;
    const float *gain = gain_, *xcoef = xcoef_, *constant = constant_;
    const Steps step = p.step;
    const int64_t C = p.C, OW = p.OW;
    auto no_gradient = [&](int64_t start, int64_t count) {  // count elements from start, past every window
      for (int64_t i = start; i < start + count; ++i)
        from_float(to_float(x[i]) * xcoef[i % C] + constant[i % C], dx + i);
    };
    std::vector<float> code_v;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t first = p.first(r);
      const float* code = row_codes(codes + r * OW * C, OW * C, code_v);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const T* win = x + first + 2 * ow * C;
        T* out = dx + first + 2 * ow * C;
        const int64_t o = (r * OW + ow) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float k = code[ow * C + c], gv = to_float(dy[o + c]) * gain[c];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j)
            from_float(pick(k == float(j), gv, 0.f) + to_float(win[step[j] + c]) * xcoef[c] + constant[c],
                       out + step[j] + c);
        }
      }
      if (p.W % 2)
        for (int64_t row = 0; row < 2; ++row) no_gradient(first + (row * p.W + p.W - 1) * C, C);
      if (p.H % 2 && r % p.OH == p.OH - 1) no_gradient(first + 2 * p.W * C, p.W * C);
    }
  });
}

template <typename T, Tail tail>
std::vector<at::Tensor> forward_impl(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight,
                                     const at::Tensor& bias, double eps, bool pool) {
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
  auto scale_t = at::empty({C}, weight.options()), offset_t = at::empty({C}, weight.options());
  float *scale = scale_t.data_ptr<float>(), *offset = offset_t.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double m = sum[c] / M;
    double v = std::max(sumsq[c] / M - m * m, 0.0);
    mean[c] = float(shift[c] + m);
    var[c] = float(v);
    invstd[c] = float(1.0 / std::sqrt(v + eps));
    scale[c] = w[c] * invstd[c];
    offset[c] = bi[c] - mean[c] * scale[c];
  }
  if (pool) {  // (output, stats, codes)
    auto pooled = pooled_affine_impl<T, tail>(input, scale, offset, true);
    return {pooled[0], stats, pooled[1]};
  }
  return {affine_impl<T, tail>(input, residual, scale_t, offset_t), stats};
}

// With Tail::add_relu the ReLU's mask comes from the saved output (the residual is not kept), and
// the gradient past the mask, which is also the residual's, is written out in the first pass.
template <typename T, Tail tail>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& stats,
                                      bool input_grad, const at::Tensor& codes) {
  const bool pool = codes.defined();
  const int64_t C = input.size(1), M = input.numel() / C;
  const T* x = reinterpret_cast<const T*>(input.data_ptr());
  const T* dy = reinterpret_cast<const T*>(grad_output.data_ptr());
  const T* z = tail == Tail::add_relu ? reinterpret_cast<const T*>(output.data_ptr()) : nullptr;
  at::Tensor grad_residual;
  T* gres = nullptr;
  if constexpr (tail == Tail::add_relu) {
    grad_residual = at::empty_like(input, at::MemoryFormat::ChannelsLast);
    gres = reinterpret_cast<T*>(grad_residual.data_ptr());
  }
  const Blocks b = blocks_of(M, C);
  const int64_t L = b.L;
  const float *mean = stats[0].data_ptr<float>(), *invstd = stats[2].data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  std::vector<float> mean_c(mean, mean + C), scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) scale[c] = w[c] * invstd[c], offset[c] = bi[c] - mean[c] * scale[c];
  const std::vector<float> mean_l = repeat(mean_c, L), scale_l = repeat(scale, L), offset_l = repeat(offset, L);
  // The gradient reaching the batch norm. The activation's mask is recomputed from x exactly as the
  // forward computed its input; after a residual it is read from the output.
  auto grad_at = [&](int64_t i, int64_t j, float xv) {
    const float g = to_float(dy[i]);
    if constexpr (tail == Tail::add_relu) return to_float(z[i]) > 0.f ? g : 0.f;
    return passes<tail>(xv * scale_l[j] + offset_l[j]) ? g : 0.f;
  };
  // with the pool, dy is the pooled gradient
  const auto sums = pool ? pooled_sums<T>(pool_of(input), x, dy, codes.data_ptr<uint8_t>(), mean)
                         : channel_sums(b, M, [&](int64_t i, int64_t j, float& t1, float& t2) {
                             const float xv = to_float(x[i]);
                             t1 = grad_at(i, j, xv);
                             if constexpr (tail == Tail::add_relu) from_float(t1, gres + i);  // exact: g is dy or 0
                             t2 = t1 * (xv - mean_l[j]);
                           });
  const std::vector<double>&sum_g = sums.first, &sum_gx = sums.second;
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
    if (pool) {
      pooled_grad_input<T>(pool_of(input), x, dy, codes.data_ptr<uint8_t>(), dx, gain.data(), xcoef.data(),
                           constant.data());
      return {grad_input, grad_weight_t, grad_bias_t, grad_residual};
    }
    const std::vector<float> gain_l = repeat(gain, L), xcoef_l = repeat(xcoef, L), constant_l = repeat(constant, L);
    for_each_element(b, M, [&](int64_t i, int64_t j) {
      const float xv = to_float(x[i]);
      const float g = tail == Tail::add_relu ? to_float(gres[i]) : grad_at(i, j, xv);
      from_float(g * gain_l[j] + xv * xcoef_l[j] + constant_l[j], dx + i);
    });
  }
  return {grad_input, grad_weight_t, grad_bias_t, grad_residual};
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, " must be a channels-last 4-d CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, " must be float32 or bfloat16");
}

// Calls fn(T{}, std::integral_constant<Tail, tail>{}) for the input's storage type and the tail.
template <typename F>
std::vector<at::Tensor> dispatch(const at::Tensor& input, int64_t activation, bool residual, F fn) {
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  auto with = [&](auto t) {
    if (residual) return fn(t, std::integral_constant<Tail, Tail::add_relu>{});
    if (activation == int64_t(Tail::relu)) return fn(t, std::integral_constant<Tail, Tail::relu>{});
    if (activation == int64_t(Tail::relu6)) return fn(t, std::integral_constant<Tail, Tail::relu6>{});
    TORCH_CHECK(activation == int64_t(Tail::none), "activation must be 0 (none), 1 (ReLU) or 2 (ReLU6)");
    return fn(t, std::integral_constant<Tail, Tail::none>{});
  };
  return bf16 ? with(uint16_t{}) : with(float{});
}

void check_like(const at::Tensor& t, const at::Tensor& input, const char* what) {
  check(t, what);
  TORCH_CHECK(t.sizes() == input.sizes() && t.scalar_type() == input.scalar_type(), what,
              " must have the input's shape and dtype");
}

void check_params(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) {
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == input.size(1),
                "weight and bias (scale and offset) must be float32 vectors of the input's channels");
}

void check_pool(const at::Tensor& input) {
  TORCH_CHECK(input.size(2) >= 2 && input.size(3) >= 2, "the 2x2 max-pool needs inputs of at least 2x2");
}

// The checked residual: None (undefined), or a tensor to add before a ReLU (the activation must be 1)
// where no pool follows.
at::Tensor checked_inputs(const at::Tensor& input, const std::optional<at::Tensor>& residual_or_none,
                          const at::Tensor& weight, const at::Tensor& bias, int64_t activation, bool pool) {
  check(input, "input");
  check_params(input, weight, bias);
  if (pool) check_pool(input);
  const at::Tensor residual = residual_or_none.value_or(at::Tensor());
  if (residual.defined()) {
    TORCH_CHECK(activation == int64_t(Tail::relu) && !pool, "a residual is added before a ReLU (and no pool) only");
    check_like(residual, input, "residual");
  }
  return residual;
}

std::vector<at::Tensor> forward(const at::Tensor& input, const std::optional<at::Tensor>& residual_or_none,
                                const at::Tensor& weight, const at::Tensor& bias, double eps, int64_t activation,
                                bool pool) {
  const at::Tensor residual = checked_inputs(input, residual_or_none, weight, bias, activation, pool);
  return dispatch(input, activation, residual.defined(), [&](auto t, auto tail) {
    return forward_impl<decltype(t), decltype(tail)::value>(input, residual, weight, bias, eps, pool);
  });
}

// scale and offset: float32 per channel (the running statistics, weight and bias folded).
at::Tensor affine(const at::Tensor& input, const std::optional<at::Tensor>& residual_or_none, const at::Tensor& scale,
                  const at::Tensor& offset, int64_t activation, bool pool) {
  const at::Tensor residual = checked_inputs(input, residual_or_none, scale, offset, activation, pool);
  return dispatch(input, activation, residual.defined(), [&](auto t, auto tail) {
    using T = decltype(t);
    constexpr Tail tail_v = decltype(tail)::value;
    return std::vector<at::Tensor>{pool ? pooled_affine_impl<T, tail_v>(input, scale.data_ptr<float>(),
                                                                         offset.data_ptr<float>(), false)[0]
                                        : affine_impl<T, tail_v>(input, residual, scale, offset)};
  })[0];
}

// output: the forward's output where it added a residual (its ReLU mask), else undefined; codes: the
// pooled forward's third output, where a pool followed (grad_output is then the pooled output's
// gradient), else undefined. Returns (grad_input or None, grad_weight, grad_bias, grad_residual or None).
std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 const std::optional<at::Tensor>& output_or_none, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& stats, int64_t activation,
                                 bool input_grad, const std::optional<at::Tensor>& codes_or_none) {
  check(input, "input");
  check_params(input, weight, bias);
  const at::Tensor output = output_or_none.value_or(at::Tensor());
  const at::Tensor codes = codes_or_none.value_or(at::Tensor());
  TORCH_CHECK(!(codes.defined() && output.defined()), "a pool follows a batch norm without a residual only");
  if (codes.defined()) {
    check_pool(input);
    check(grad_output, "grad_output");
    TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({input.size(0), input.size(1), input.size(2) / 2,
                                                        input.size(3) / 2}) &&
                    grad_output.scalar_type() == input.scalar_type(),
                "grad_output must have the pooled output's shape and the input's dtype");
    TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                    codes.numel() == grad_output.numel(),
                "codes must be the pooled forward's codes: a uint8 vector of the pooled output's size");
  } else {
    check_like(grad_output, input, "grad_output");
  }
  if (output.defined()) check_like(output, input, "output");
  return dispatch(input, activation, output.defined(), [&](auto t, auto tail) {
    return backward_impl<decltype(t), decltype(tail)::value>(grad_output, input, output, weight, bias, stats,
                                                              input_grad, codes);
  });
}

// out[m, c] = input[m, index[c]] for the (M, Cin) channels-last matrix: the channels a select BN reads.
template <typename T>
void gather_rows(const T* x, T* out, const int64_t* idx, int64_t M, int64_t Cin, int64_t C) {
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * Cin;
      T* o = out + m * C;
      for (int64_t c = 0; c < C; ++c) o[c] = row[idx[c]];
    }
  });
}

// out[m, index[c]] = grad[m, c], zero in the other channels: the gather's backward.
template <typename T>
void scatter_rows(const T* g, T* out, const int64_t* idx, int64_t M, int64_t Cin, int64_t C) {
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      T* row = out + m * Cin;
      std::memset(row, 0, sizeof(T) * Cin);
      const T* gi = g + m * C;
      for (int64_t c = 0; c < C; ++c) row[idx[c]] = gi[c];
    }
  });
}

void check_index(const at::Tensor& index, int64_t channels) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous() &&
                  index.numel() > 0 && index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < channels,
              "index must be a non-empty contiguous int64 CPU vector of channels of the input");
}

// Copies move bits: fn(E{}) with E the unsigned integer of the tensor's element size (bf16: 2, float: 4).
template <typename F>
void with_bits(const at::Tensor& t, F fn) {
  if (t.element_size() == 2)
    fn(uint16_t{});
  else
    fn(uint32_t{});
}

at::Tensor gather(const at::Tensor& input, const at::Tensor& index) {
  check(input, "input");
  check_index(index, input.size(1));
  const int64_t Cin = input.size(1), M = input.numel() / Cin, C = index.numel();
  auto out = at::empty({input.size(0), C, input.size(2), input.size(3)},
                       input.options().memory_format(at::MemoryFormat::ChannelsLast));
  with_bits(input, [&](auto e) {
    using E = decltype(e);
    gather_rows(reinterpret_cast<const E*>(input.data_ptr()), reinterpret_cast<E*>(out.data_ptr()),
                index.data_ptr<int64_t>(), M, Cin, C);
  });
  return out;
}

at::Tensor scatter(const at::Tensor& grad, const at::Tensor& index, int64_t Cin) {
  check(grad, "grad");
  check_index(index, Cin);
  TORCH_CHECK(index.numel() == grad.size(1), "grad must have a channel per index entry");
  const int64_t C = grad.size(1), M = grad.numel() / C;
  auto out = at::empty({grad.size(0), Cin, grad.size(2), grad.size(3)},
                       grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  with_bits(grad, [&](auto e) {
    using E = decltype(e);
    scatter_rows(reinterpret_cast<const E*>(grad.data_ptr()), reinterpret_cast<E*>(out.data_ptr()),
                 index.data_ptr<int64_t>(), M, Cin, C);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward,
        "batch norm (+ residual) (+ activation) (+ 2x2 max-pool) in training mode: (output, [mean; var; invstd]"
        "[, the pool's codes])");
  m.def("affine", &affine, "evaluation: act(scale * input + offset (+ residual)) (+ 2x2 max-pool) in one pass");
  m.def("gather", &gather, "a select BN's input channels: the index's channels, channels-last");
  m.def("scatter", &scatter, "the gather's backward: the gradient in the listed channels, zero elsewhere");
  m.def("backward", &backward, "its backward: (grad_input or None, grad_weight, grad_bias, grad_residual or None)");
}
