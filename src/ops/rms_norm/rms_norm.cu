// RMSNorm on the row engine (common.cuh): forward y = x·r⊙w with r = 1/sqrt(mean(x²) + eps),
// and the backward dx = r·(g − x·c) (+ dres) with g = dy⊙w, c = ⟨g, x⟩/(Σx² + D·eps), plus
// dw = Σ_rows dy⊙x·r. The backward also serves add+RMSNorm (dres = the gradient of the sum).
//
// The backward reduces Σx² and ⟨g, x⟩ in f64 and forms g − x·c in f64: when g is nearly
// parallel to x (always for D = 1) the difference cancels and f32 would leave rounding noise.
// dw: each CTA accumulates its rows' dy⊙x·r for its column slice in f32 shared memory and
// writes one partial row; `dw_reduce` sums the partials in a fixed order (deterministic).
#include "common.cuh"

using namespace cf;

template <typename T, int VEC> struct RmsFwd {
  using Red = SumF;
  static constexpr int NIN = 1;
  const T* __restrict__ x;
  const T* __restrict__ w;  // nullptr: no weight
  T* __restrict__ y;
  float eps;
  int64_t d;

  __device__ void begin_row(int64_t) {}
  __device__ const T* input(int, int64_t row) const { return x + row * d; }
  __device__ int stage_len(int64_t, int64_t, int n) const { return n; }
  __device__ void init(int64_t, int, unsigned char*) {}
  __device__ void finish(int64_t, int64_t, int) {}

  __device__ SumF partial(int64_t, int64_t, int n, T* const* s) const {
    float acc = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = ld(s[0][j]);
      acc = fmaf(v, v, acc);
    }
    return {acc};
  }
  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, SumF ss) const {
    const float r = rsqrtf(ss.v / (float)d + eps);
    T* o = y + row * d + lo;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const int j0 = u * VEC;
      Pack<T, VEC> a = *reinterpret_cast<const Pack<T, VEC>*>(s[0] + j0), b;
      if (w) {
        Pack<T, VEC> wv = *reinterpret_cast<const Pack<T, VEC>*>(w + lo + j0);
#pragma unroll
        for (int e = 0; e < VEC; e++) b.v[e] = st<T>(ld(a.v[e]) * r * ld(wv.v[e]));
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e++) b.v[e] = st<T>(ld(a.v[e]) * r);
      }
      *reinterpret_cast<Pack<T, VEC>*>(o + j0) = b;
    }
  }
};

template <typename T, int VEC> struct RmsBwd {
  using Red = Sum2D;
  static constexpr int NIN = 2;
  const T* __restrict__ x;
  const T* __restrict__ dy;
  const T* __restrict__ dres;  // nullptr: none (plain RMSNorm)
  const T* __restrict__ w;     // nullptr: no weight (then no dw)
  T* __restrict__ dx;
  float* __restrict__ part;    // [clusters, d] partial dw, nullptr without weight
  double eps;
  int64_t d;
  float* dws = nullptr;        // this CTA's dw slice (shared memory)

  __device__ void begin_row(int64_t) {}
  __device__ const T* input(int k, int64_t row) const { return (k == 0 ? x : dy) + row * d; }
  __device__ int stage_len(int64_t, int64_t, int n) const { return n; }
  __device__ void init(int64_t, int n, unsigned char* extra) {
    if (!w) return;
    dws = reinterpret_cast<float*>(extra);
    for (int j = threadIdx.x; j < n; j += blockDim.x) dws[j] = 0.f;
  }
  __device__ void finish(int64_t cluster, int64_t lo, int n) {
    if (!w) return;
    for (int j = threadIdx.x; j < n; j += blockDim.x) part[cluster * d + lo + j] = dws[j];
  }
  __device__ __forceinline__ float g(T dyv, int64_t col) const {
    return w ? ld(dyv) * ld(w[col]) : ld(dyv);
  }

  __device__ Sum2D partial(int64_t, int64_t lo, int n, T* const* s) const {
    double ss = 0.0, dot = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const double xv = ld(s[0][j]);
      ss = fma(xv, xv, ss);
      dot = fma((double)g(s[1][j], lo + j), xv, dot);
    }
    return {ss, dot};
  }
  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, Sum2D red) const {
    const double r = 1.0 / sqrt(red.a / (double)d + eps);
    const double c = red.b / (red.a + (double)d * eps);
    const float rf = (float)r;
    T* o = dx + row * d + lo;
    const T* dr = dres ? dres + row * d + lo : nullptr;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const int j0 = u * VEC;
      Pack<T, VEC> xa = *reinterpret_cast<const Pack<T, VEC>*>(s[0] + j0);
      Pack<T, VEC> ga = *reinterpret_cast<const Pack<T, VEC>*>(s[1] + j0), out, ra;
      if (dr) ra = *reinterpret_cast<const Pack<T, VEC>*>(dr + j0);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float xv = ld(xa.v[e]);
        const float gv = g(ga.v[e], lo + j0 + e);
        float v = (float)(r * ((double)gv - (double)xv * c));
        if (dr) v += ld(ra.v[e]);
        out.v[e] = st<T>(v);
        if (w) dws[j0 + e] = fmaf(ld(ga.v[e]) * xv, rf, dws[j0 + e]);
      }
      *reinterpret_cast<Pack<T, VEC>*>(o + j0) = out;
    }
  }
};

#define RMS_KERNELS_V(NAME, T, V)                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                          \
      rms_fwd_##NAME##_v##V(const T* x, const T* w, T* y, Geom g, float eps) {                 \
    RmsFwd<T, V> op{x, w, y, eps, g.d};                                                        \
    run_rows<T, V>(g, op);                                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(1024)                                          \
      rms_bwd_##NAME##_v##V(const T* x, const T* dy, const T* dres, const T* w, T* dx,         \
                            float* part, Geom g, double eps) {                                 \
    RmsBwd<T, V> op{x, dy, dres, w, dx, part, eps, g.d};                                       \
    run_rows<T, V>(g, op);                                                                     \
  }

#define RMS_KERNELS(NAME, T, V)                                                                \
  RMS_KERNELS_V(NAME, T, V)                                                                    \
  RMS_KERNELS_V(NAME, T, 1)                                                                    \
  extern "C" __global__ void dw_reduce_##NAME(const float* part, int64_t g, int64_t d, T* dw) { \
    reduce_partials<T>(part, g, d, dw);                                                        \
  }

CF_FOR_DTYPES(RMS_KERNELS)
