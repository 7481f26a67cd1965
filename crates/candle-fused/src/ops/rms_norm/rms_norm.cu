// RMSNorm on the row engine (common.cuh): forward y = x·r⊙w with r = 1/sqrt(mean(x²) + eps),
// and the backward dx = r·(g − x·c) (+ dres) with g = dy⊙w, c = ⟨g, x⟩/(Σx² + D·eps), plus
// dw = Σ_rows dy⊙x·r. The backward also serves add+RMSNorm (dres = the gradient of the sum).
//
// When g is nearly parallel to x (always for D = 1) g − x·c cancels and plain f32 would leave
// only rounding noise: the backward sums exact product splits and joins them in f64, and
// forms g − x·c with c split into two floats (see RmsBwd).
// dw: each CTA walks its rows (persistent grid) and every thread accumulates dy⊙x·r for the
// columns it owns in f32 registers (the same columns for every row: at most COLS of them,
// which the launch plan guarantees), then writes one partial row per CTA; `dw_reduce` sums the
// partials in a fixed order (deterministic).
#include "common.cuh"

#include <type_traits>

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
  __device__ void init(int64_t, int) {}
  __device__ void finish(int64_t, int64_t, int) {}

  __device__ SumF partial(int64_t, int64_t, int n, T* const* s) const {
    const T* sx = s[0];
    float acc = 0.f;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const Pack<T, VEC> p = ld_pack<T, VEC>(sx + u * VEC);
#pragma unroll
      for (int e = 0; e < VEC; e++) acc = fmaf(ld(p.v[e]), ld(p.v[e]), acc);
    }
    return {acc};
  }
  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, SumF ss) const {
    const float r = rsqrtf(ss.v / (float)d + eps);
    T* o = y + row * d + lo;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const int j0 = u * VEC;
      Pack<T, VEC> a = ld_pack<T, VEC>(s[0] + j0), b;
      if (w) {
        Pack<T, VEC> wv = ldg_pack<T, VEC>(w + lo + j0);
#pragma unroll
        for (int e = 0; e < VEC; e++) b.v[e] = st<T>(ld(a.v[e]) * r * ld(wv.v[e]));
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e++) b.v[e] = st<T>(ld(a.v[e]) * r);
      }
      st_pack<T, VEC>(o + j0, b);
    }
  }
};

// VEC floats to (16-byte aligned when VEC is a multiple of 4) memory, as float4s when possible.
template <int VEC> __device__ __forceinline__ void store_f32(float* p, const float (&a)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; i += (VEC % 4 == 0 ? 4 : 1)) {
    if constexpr (VEC % 4 == 0) {
      *reinterpret_cast<float4*>(p + i) = make_float4(a[i], a[i + 1], a[i + 2], a[i + 3]);
    } else {
      p[i] = a[i];
    }
  }
}

// COLS: columns of the dw accumulator one thread keeps in registers. Two builds: COLS = 16 with
// up to 1024 threads (at most 64 registers per thread) and COLS = 32 with up to 512 threads;
// cuda.rs picks one (`Owned`), both cap a CTA's slice at 16384 columns.
template <typename T, int VEC, int COLS> struct RmsBwd {
  using Red = Sum2D;
  static constexpr int NIN = 2;
  // Packs a thread owns: u = threadIdx.x + it·blockDim.x for it < IT.
  static constexpr int IT = COLS / VEC;
  const T* __restrict__ x;
  const T* __restrict__ dy;
  const T* __restrict__ dres;  // nullptr: none (plain RMSNorm)
  const T* __restrict__ w;     // nullptr: no weight (then no dw)
  T* __restrict__ dx;
  float* __restrict__ part;    // [clusters, d] partial dw, nullptr without weight
  double eps;
  int64_t d;
  float acc[IT][VEC];          // this thread's dw columns (registers: indexed by unrolled loops)

  __device__ __forceinline__ void begin_row(int64_t) {}
  __device__ __forceinline__ const T* input(int k, int64_t row) const { return (k == 0 ? x : dy) + row * d; }
  __device__ __forceinline__ int stage_len(int64_t, int64_t, int n) const { return n; }
  __device__ __forceinline__ void init(int64_t, int n) {
    // The plan keeps a slice within IT packs per thread; anything else would drop columns.
    if (n / VEC > IT * (int)blockDim.x) __trap();
    if (!w) return;
#pragma unroll
    for (int it = 0; it < IT; it++)
#pragma unroll
      for (int e = 0; e < VEC; e++) acc[it][e] = 0.f;
  }
  __device__ __forceinline__ void finish(int64_t cluster, int64_t lo, int n) {
    if (!w) return;
#pragma unroll
    for (int it = 0; it < IT; it++) {
      const int u = threadIdx.x + it * blockDim.x;
      if (u < n / VEC) store_f32<VEC>(part + cluster * d + lo + u * VEC, acc[it]);
    }
  }
  __device__ __forceinline__ Pack<T, VEC> weights(int64_t lo, int u) const {
    return ldg_pack<T, VEC>(w + lo + u * VEC);
  }

  // Σx² and Σ g·x with g = dy·w. Each product is split exactly (p + e = a·b, e by FMA) and the
  // parts summed separately, then joined in f64: exact for one element, and the usual f32
  // summation error otherwise.
  __device__ Sum2D partial(int64_t, int64_t lo, int n, T* const* s) const {
    const T* sx = s[0];
    const T* sg = s[1];
    float ss = 0.f, ss_e = 0.f, dt = 0.f, dt_e = 0.f;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const Pack<T, VEC> px = ld_pack<T, VEC>(sx + u * VEC), pg = ld_pack<T, VEC>(sg + u * VEC);
      Pack<T, VEC> pw;
      if (w) pw = weights(lo, u);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float xv = ld(px.v[e]);
        const float gv = w ? ld(pg.v[e]) * ld(pw.v[e]) : ld(pg.v[e]);
        const float p = xv * xv, q = gv * xv;
        ss += p;
        dt += q;
        // bf16 products (8-bit significands: x², dy·w·x) and f16 squares are exact in f32.
        if constexpr (sizeof(T) == 4) ss_e += fmaf(xv, xv, -p);
        if constexpr (!std::is_same_v<T, __nv_bfloat16>) dt_e += fmaf(gv, xv, -q);
      }
    }
    return {(double)ss + (double)ss_e, (double)dt + (double)dt_e};
  }

  // dx = r·(g − x·c) (+ dres): c is split into two floats so g − x·c keeps its precision when
  // it cancels (two FMAs, each rounding once relative to the small result).
  __device__ __forceinline__ void output(int64_t row, int64_t lo, int n, T* const* s, Sum2D red) {
    const double rd = 1.0 / sqrt(red.a / (double)d + eps);
    const double c = red.b / (red.a + (double)d * eps);
    const float r = (float)rd, c_hi = (float)c, c_lo = (float)(c - (double)c_hi);
    T* o = dx + row * d + lo;
    const T* dr = dres ? dres + row * d + lo : nullptr;
    const T* sx = s[0];
    const T* sg = s[1];
#pragma unroll
    for (int it = 0; it < IT; it++) {
      const int u = threadIdx.x + it * blockDim.x;
      if (u < n / VEC) {
        const Pack<T, VEC> px = ld_pack<T, VEC>(sx + u * VEC), pg = ld_pack<T, VEC>(sg + u * VEC);
        Pack<T, VEC> pw, pr, out;
        if (w) pw = weights(lo, u);
        if (dr) pr = ld_pack<T, VEC>(dr + u * VEC);
#pragma unroll
        for (int e = 0; e < VEC; e++) {
          const float xv = ld(px.v[e]), dyv = ld(pg.v[e]);
          const float gv = w ? dyv * ld(pw.v[e]) : dyv;
          float v = fmaf(-xv, c_lo, fmaf(-xv, c_hi, gv)) * r;
          if (dr) v += ld(pr.v[e]);
          out.v[e] = st<T>(v);
          if (w) acc[it][e] = fmaf(dyv * xv, r, acc[it][e]);
        }
        st_pack<T, VEC>(o + u * VEC, out);
      }
    }
  }
};

#define RMS_BWD_KERNEL(NAME, T, V, COLS, THREADS)                                              \
  extern "C" __global__ void __launch_bounds__(THREADS)                                       \
      rms_bwd##COLS##_##NAME##_v##V(const T* x, const T* dy, const T* dres, const T* w, T* dx, \
                                    float* part, Geom g, double eps) {                         \
    RmsBwd<T, V, COLS> op{x, dy, dres, w, dx, part, eps, g.d};                                 \
    run_rows<T, V>(g, op);                                                                     \
  }

#define RMS_KERNELS_V(NAME, T, V)                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                          \
      rms_fwd_##NAME##_v##V(const T* x, const T* w, T* y, Geom g, float eps) {                 \
    RmsFwd<T, V> op{x, w, y, eps, g.d};                                                        \
    run_rows<T, V>(g, op);                                                                     \
  }                                                                                            \
  RMS_BWD_KERNEL(NAME, T, V, 16, 1024)                                                         \
  RMS_BWD_KERNEL(NAME, T, V, 32, 512)

#define RMS_KERNELS(NAME, T, V)                                                                \
  RMS_KERNELS_V(NAME, T, V)                                                                    \
  RMS_KERNELS_V(NAME, T, 1)                                                                    \
  extern "C" __global__ void dw_reduce_##NAME(const float* part, int64_t g, int64_t d, T* dw) { \
    reduce_partials<T>(part, g, d, dw);                                                        \
  }

CF_FOR_DTYPES(RMS_KERNELS)
