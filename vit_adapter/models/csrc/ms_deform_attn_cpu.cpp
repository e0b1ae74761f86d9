// Multi-scale deformable attention core, CPU kernel (forward and backward) for vit_adapter.models.ops.
//
// Same function as ops.ms_deform_attn_pytorch / ms_deform_attn_reference: bilinear sampling with
// align_corners=False (pixel = loc * size - 0.5) and zero padding, weighted by the attention and summed over
// levels and points. Layouts (all contiguous):
//   value (B, S, M, C), loc (B, Q, M, L, P, 2) as (x, y), attn (B, Q, M, L, P), out (B, Q, M*C),
//   shapes = [H_0, W_0, H_1, W_1, ...].
// Built by vit_adapter/models/deform_ext.py with -DVA_NAMESPACE=<name keyed by the build's hash>, so two builds
// of different sources never register the same operator namespace in one process.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef VA_NAMESPACE
#define VA_NAMESPACE vit_adapter_deform
#endif
// TORCH_LIBRARY pastes its first argument with ##, which would not expand a macro: expand it one level up.
#define VA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

namespace {

struct Geometry {
  int64_t batch, length, heads, channels, queries, levels, points;
  std::vector<int64_t> height, width, start;  // per level; start = first token of the level in value
};

Geometry check_inputs(const at::Tensor& value, at::IntArrayRef shapes, const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.device().is_cpu() && loc.device().is_cpu() && attn.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(),
              "value, loc and attn must share one dtype");
  TORCH_CHECK(value.is_contiguous() && loc.is_contiguous() && attn.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5, "value 4-D, loc 6-D, attn 5-D");
  Geometry g;
  g.batch = value.size(0);
  g.length = value.size(1);
  g.heads = value.size(2);
  g.channels = value.size(3);
  g.queries = loc.size(1);
  g.levels = loc.size(3);
  g.points = loc.size(4);
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 * g.levels, "shapes must hold (H, W) for every level");
  int64_t total = 0;
  for (int64_t l = 0; l < g.levels; ++l) {
    g.height.push_back(shapes[2 * l]);
    g.width.push_back(shapes[2 * l + 1]);
    g.start.push_back(total);
    total += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK(total == g.length, "value length != sum(H*W)");
  TORCH_CHECK(loc.size(0) == g.batch && loc.size(2) == g.heads && loc.size(5) == 2, "loc shape mismatch");
  TORCH_CHECK(attn.size(0) == g.batch && attn.size(1) == g.queries && attn.size(2) == g.heads &&
                  attn.size(3) == g.levels && attn.size(4) == g.points,
              "attn shape mismatch");
  return g;
}

// One sampling point: its 4 bilinear corners as value-row offsets (-1 = in the zero padding) and weights.
template <typename scalar_t>
struct Corners {
  int64_t row[4];      // token index within the batch item, or -1
  scalar_t weight[4];  // bilinear weights (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx: corners (x0,y0) (x1,y0) (x0,y1) (x1,y1)
  scalar_t fx, fy;
};

// Returns 0: no corner inside the map (contributes 0, gradient 0), 1: corners filled, -1: NaN location.
template <typename scalar_t>
inline int corners_of(scalar_t x, scalar_t y, int64_t h, int64_t w, int64_t start, Corners<scalar_t>& c) {
  const scalar_t px = x * static_cast<scalar_t>(w) - scalar_t(0.5);
  const scalar_t py = y * static_cast<scalar_t>(h) - scalar_t(0.5);
  if (std::isnan(px) || std::isnan(py)) return -1;
  // Outside [-1, size] every corner lies in the zero padding (and the test keeps huge values off the int cast).
  // The closed interval matches the pure-PyTorch path's clamp: at exactly -1 the (one-sided) location gradient
  // still sees corner 0.
  if (!(px >= scalar_t(-1) && px <= static_cast<scalar_t>(w) && py >= scalar_t(-1) && py <= static_cast<scalar_t>(h)))
    return 0;
  const scalar_t fx0 = std::floor(px), fy0 = std::floor(py);
  const int64_t x0 = static_cast<int64_t>(fx0), y0 = static_cast<int64_t>(fy0);
  c.fx = px - fx0;
  c.fy = py - fy0;
  const bool x0_in = x0 >= 0 && x0 < w, x1_in = x0 + 1 >= 0 && x0 + 1 < w;
  const bool y0_in = y0 >= 0 && y0 < h, y1_in = y0 + 1 >= 0 && y0 + 1 < h;
  const int64_t base = start + y0 * w + x0;
  c.row[0] = (x0_in && y0_in) ? base : -1;
  c.row[1] = (x1_in && y0_in) ? base + 1 : -1;
  c.row[2] = (x0_in && y1_in) ? base + w : -1;
  c.row[3] = (x1_in && y1_in) ? base + w + 1 : -1;
  const scalar_t gx = scalar_t(1) - c.fx, gy = scalar_t(1) - c.fy;
  c.weight[0] = gy * gx;
  c.weight[1] = gy * c.fx;
  c.weight[2] = c.fy * gx;
  c.weight[3] = c.fy * c.fx;
  return 1;
}

// Inner loops over the C channels of one value row. The rows never alias (output, gradient and value buffers are
// distinct tensors), which __restrict__ tells the compiler so that it vectorises them without runtime checks.
template <typename scalar_t>
inline void axpy(int64_t n, scalar_t a, const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Dot product fused with the scatter. A single running sum is a serial dependency chain that the compiler may not
// reorder (no -ffast-math), and 4 such chains per sampling point were the backward's bottleneck. Instead, one
// 32-byte vector of partial sums (GCC/Clang vector extension: AVX2/AVX-512 registers with -march=native) and a tree
// reduction of depth 3 at the end. Only the summation order changes, which the float64 rule judges.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
template <typename scalar_t>
struct Vec;
template <>
struct Vec<float> {
  using type = f32x8;
  static float sum(f32x8 a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }
};
template <>
struct Vec<double> {
  using type = f64x4;
  static double sum(f64x4 a) { return (a[0] + a[2]) + (a[1] + a[3]); }
};

template <typename scalar_t>
inline scalar_t dot_and_axpy(int64_t n, const scalar_t* __restrict__ g, const scalar_t* __restrict__ v, scalar_t a,
                             scalar_t* __restrict__ gv) {
  using V = typename Vec<scalar_t>::type;
  constexpr int64_t kLanes = sizeof(V) / sizeof(scalar_t);
  V acc = {};
  const V av = V{} + a;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V gx, vx, gvx;  // memcpy: unaligned loads/stores without aliasing violations
    std::memcpy(&gx, g + i, sizeof(V));
    std::memcpy(&vx, v + i, sizeof(V));
    std::memcpy(&gvx, gv + i, sizeof(V));
    acc += gx * vx;
    gvx += av * gx;
    std::memcpy(gv + i, &gvx, sizeof(V));
  }
  scalar_t s = 0;
  for (; i < n; ++i) {
    s += g[i] * v[i];
    gv[i] += a * g[i];
  }
  return s + Vec<scalar_t>::sum(acc);
}

// The value rows a query samples are scattered over maps of up to a few MiB, which other ops have evicted from the
// caches by the time the core runs: each miss would stall the loop. So the corners of a block of points are computed
// first and their rows prefetched, and the arithmetic on them runs after, with up to 4 * kBlock misses in flight.
constexpr int64_t kBlock = 8;

template <bool kWrite, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(scalar_t)); off += 64)
    __builtin_prefetch(bytes + off, kWrite ? 1 : 0);
}

// kC > 0: the channel count is a compile-time constant (the common head widths), so the channel loops unroll into a
// few vector instructions and the forward accumulates its output row in registers; kC = 0: any C, at run time.
template <typename scalar_t, int64_t kC>
void forward_impl(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                  scalar_t* out) {
  const int64_t M = g.heads, C = kC > 0 ? kC : g.channels, L = g.levels, P = g.points;
  const int64_t token_stride = M * C;
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  // Rows (b, q) are independent: each thread owns whole output rows, so no synchronisation is needed.
  const int64_t LP = L * P;
  at::parallel_for(0, g.batch * g.queries, 8, [&](int64_t begin, int64_t end) {
    Corners<scalar_t> corners[kBlock];
    int states[kBlock];
    for (int64_t bq = begin; bq < end; ++bq) {
      const scalar_t* v_b = value + (bq / g.queries) * g.length * token_stride;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t bqm = bq * M + m;
        scalar_t* o = out + bqm * C;
        scalar_t row[kC > 0 ? kC : 1] = {};
        scalar_t* acc = kC > 0 ? row : o;  // a local row, or the output row itself
        if (kC == 0) std::fill(o, o + C, scalar_t(0));
        const scalar_t* v_bm = v_b + m * C;
        for (int64_t lp0 = 0; lp0 < LP; lp0 += kBlock) {
          const int64_t n = std::min(kBlock, LP - lp0);
          for (int64_t i = 0; i < n; ++i) {  // point (l, p) = divmod(lp0 + i, P)
            const int64_t l = (lp0 + i) / P, point = bqm * LP + lp0 + i;
            Corners<scalar_t>& c = corners[i];
            states[i] = corners_of(loc[2 * point], loc[2 * point + 1], g.height[l], g.width[l], g.start[l], c);
            if (states[i] > 0)
              for (int k = 0; k < 4; ++k)
                if (c.row[k] >= 0) prefetch_row<false>(v_bm + c.row[k] * token_stride, C);
          }
          for (int64_t i = 0; i < n; ++i) {
            const Corners<scalar_t>& c = corners[i];
            if (states[i] == 0) continue;
            if (states[i] < 0) {  // NaN location: NaN output, as grid_sample gives
              for (int64_t ch = 0; ch < C; ++ch) acc[ch] = nan;
              continue;
            }
            const scalar_t a = attn[bqm * LP + lp0 + i];
            for (int k = 0; k < 4; ++k) {
              if (c.row[k] < 0) continue;
              axpy(C, a * c.weight[k], v_bm + c.row[k] * token_stride, acc);
            }
          }
        }
        if (kC > 0) std::copy(row, row + C, o);
      }
    }
  });
}

template <typename scalar_t, int64_t kC>
void backward_impl(const Geometry& g, const scalar_t* grad_out, const scalar_t* value, const scalar_t* loc,
                   const scalar_t* attn, scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  const int64_t M = g.heads, C = kC > 0 ? kC : g.channels, L = g.levels, P = g.points;
  const int64_t token_stride = M * C;
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  // d value is a scatter: two queries may hit the same value row. Parallelising over (batch, head) makes every
  // thread own disjoint value rows (head m's C channels), so the scatter is race-free and, with a fixed query
  // order inside a chunk, deterministic for any thread count. Each (b, q, m) is visited exactly once, so the
  // location and attention gradients are plain writes.
  const int64_t LP = L * P;
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    Corners<scalar_t> corners[kBlock];
    int states[kBlock];
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      const scalar_t* v_bm = value + b * g.length * token_stride + m * C;
      scalar_t* gv_bm = grad_value + b * g.length * token_stride + m * C;
      // Zeroed here, not by a memset of the whole tensor beforehand: this chunk's rows are then still in cache
      // when the scatter below reads them back (the whole gradient is often larger than L2).
      for (int64_t t = 0; t < g.length; ++t) std::fill(gv_bm + t * token_stride, gv_bm + t * token_stride + C, scalar_t(0));
      for (int64_t q = 0; q < g.queries; ++q) {
        const int64_t bqm = (b * g.queries + q) * M + m;
        const scalar_t* go = grad_out + bqm * C;
        for (int64_t lp0 = 0; lp0 < LP; lp0 += kBlock) {
          const int64_t n = std::min(kBlock, LP - lp0);
          for (int64_t i = 0; i < n; ++i) {
            const int64_t l = (lp0 + i) / P, point = bqm * LP + lp0 + i;
            Corners<scalar_t>& c = corners[i];
            states[i] = corners_of(loc[2 * point], loc[2 * point + 1], g.height[l], g.width[l], g.start[l], c);
            if (states[i] > 0)
              for (int k = 0; k < 4; ++k)
                if (c.row[k] >= 0) {
                  prefetch_row<false>(v_bm + c.row[k] * token_stride, C);
                  prefetch_row<true>(gv_bm + c.row[k] * token_stride, C);
                }
          }
          for (int64_t i = 0; i < n; ++i) {
            const int64_t l = (lp0 + i) / P, point = bqm * LP + lp0 + i;
            const scalar_t w = static_cast<scalar_t>(g.width[l]), h = static_cast<scalar_t>(g.height[l]);
            const Corners<scalar_t>& c = corners[i];
            const scalar_t a = attn[point];
            const int state = states[i];
            if (state <= 0) {
              const scalar_t fill = state < 0 ? nan : scalar_t(0);
              grad_attn[point] = fill;
              grad_loc[2 * point] = fill;
              grad_loc[2 * point + 1] = fill;
              continue;
            }
            scalar_t dot[4] = {0, 0, 0, 0};  // <grad_out row, corner value row>; 0 in the zero padding
            for (int k = 0; k < 4; ++k) {
              if (c.row[k] < 0) continue;
              const int64_t offset = c.row[k] * token_stride;
              dot[k] = dot_and_axpy(C, go, v_bm + offset, a * c.weight[k], gv_bm + offset);
            }
            grad_attn[point] = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] +
                               c.weight[3] * dot[3];
            // Bilinear derivatives: d sample / d fx and d fy, then d pixel / d loc = size.
            const scalar_t d_fx = (scalar_t(1) - c.fy) * (dot[1] - dot[0]) + c.fy * (dot[3] - dot[2]);
            const scalar_t d_fy = (scalar_t(1) - c.fx) * (dot[2] - dot[0]) + c.fx * (dot[3] - dot[1]);
            grad_loc[2 * point] = a * d_fx * w;
            grad_loc[2 * point + 1] = a * d_fy * h;
          }
        }
      }
    }
  });
}

// Calls f(std::integral_constant<int64_t, C>) for the compiled channel counts, f(integral_constant<0>) otherwise.
template <typename F>
void with_channels(int64_t channels, F&& f) {
  switch (channels) {
    case 16: f(std::integral_constant<int64_t, 16>{}); break;
    case 32: f(std::integral_constant<int64_t, 32>{}); break;
    case 64: f(std::integral_constant<int64_t, 64>{}); break;
    default: f(std::integral_constant<int64_t, 0>{});
  }
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, at::IntArrayRef shapes, const at::Tensor& loc,
                                  const at::Tensor& attn) {
  const Geometry g = check_inputs(value, shapes, loc, attn);
  at::Tensor out = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    auto run = [&](auto channels) {
      forward_impl<scalar_t, decltype(channels)::value>(g, value.const_data_ptr<scalar_t>(),
                                                        loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
                                                        out.mutable_data_ptr<scalar_t>());
    };
    with_channels(g.channels, run);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(const at::Tensor& grad_out,
                                                                       const at::Tensor& value, at::IntArrayRef shapes,
                                                                       const at::Tensor& loc, const at::Tensor& attn) {
  const Geometry g = check_inputs(value, shapes, loc, attn);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type(), "grad_out: contiguous, same dtype");
  TORCH_CHECK(grad_out.numel() == g.batch * g.queries * g.heads * g.channels, "grad_out shape mismatch");
  at::Tensor grad_value = at::empty_like(value);  // zeroed chunk by chunk, then scattered into
  at::Tensor grad_loc = at::empty_like(loc);      // every element written
  at::Tensor grad_attn = at::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    auto run = [&](auto channels) {
      backward_impl<scalar_t, decltype(channels)::value>(
          g, grad_out.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
          attn.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<scalar_t>(),
          grad_loc.mutable_data_ptr<scalar_t>(), grad_attn.mutable_data_ptr<scalar_t>());
    };
    with_channels(g.channels, run);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

VA_LIBRARY(VA_NAMESPACE, m) {
  m.def("forward(Tensor value, int[] shapes, Tensor loc, Tensor attn) -> Tensor", &ms_deform_attn_forward);
  m.def("backward(Tensor grad_out, Tensor value, int[] shapes, Tensor loc, Tensor attn) -> (Tensor, Tensor, Tensor)",
        &ms_deform_attn_backward);
}
