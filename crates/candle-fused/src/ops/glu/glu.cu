// GLU forward y = act(g)·u and backward dg = dy·u·act'(g), du = dy·act(g), with
// act(g) = g·σ(z(g)): silu z = g; gelu_tanh z = 2k(g + c·g³) (see ops/glu/mod.rs).
//
// Rows of `cols` elements: gate row r at g + r·gs, up at u + r·us, and so on (two tensors are
// one row of all elements; the packed [.., 2I] layout has rows of I with gs = us = 2I and
// u = g + I, and its backward writes dg/du into the two halves of one [.., 2I] buffer).
// threadIdx.x/blockIdx.x: a pack of VEC columns; threadIdx.y/blockIdx.y: rows, grid-stride.
// One pass: every input read once, every output written once, math in f32.
#include "common.cuh"

using namespace cf;

struct GluGeom {
  int64_t rows, cols;
  int64_t gs, us, ys;  // row strides (elements) of gate, up, and y / dy
  int64_t dgs, dus;    // of dgate and dup (backward)
};

// (σ(a), 1 − σ(a)) from e^{−|a|}: no cancellation, no overflow; NaN stays NaN.
__device__ __forceinline__ void sig2(float a, float& s, float& om) {
  const float e = __expf(-fabsf(a));
  const float r = 1.f / (1.f + e);
  const float er = e * r;
  const bool pos = a >= 0.f;
  s = pos ? r : er;
  om = pos ? er : r;
}

// s = σ(z(g)), om = 1 − s, dz = z'(g).
template <int GELU> __device__ __forceinline__ void gate(float g, float& s, float& om, float& dz) {
  if constexpr (GELU) {
    constexpr float K2 = 1.5957691216057308f;   // 2·sqrt(2/π)
    constexpr float K2C = 0.0713548162726009f;  // 2·sqrt(2/π)·0.044715
    const float g2 = g * g;
    sig2(g * fmaf(K2C, g2, K2), s, om);
    dz = fmaf(3.f * K2C, g2, K2);
  } else {
    sig2(g, s, om);
    dz = 1.f;
  }
}

template <typename T, int VEC, int GELU>
__device__ void glu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, const GluGeom geo) {
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c >= geo.cols) return;
  for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < geo.rows;
       r += (int64_t)gridDim.y * blockDim.y) {
    const Pack<T, VEC> gp = ld_pack<T, VEC>(g + r * geo.gs + c), up = ld_pack<T, VEC>(u + r * geo.us + c);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
      float s, om, dz;
      const float gv = ld(gp.v[e]);
      gate<GELU>(gv, s, om, dz);
      o.v[e] = st<T>(gv * s * ld(up.v[e]));
    }
    st_pack<T, VEC>(y + r * geo.ys + c, o);
  }
}

template <typename T, int VEC, int GELU>
__device__ void glu_bwd(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dy,
                        T* __restrict__ dg, T* __restrict__ du, const GluGeom geo) {
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c >= geo.cols) return;
  for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < geo.rows;
       r += (int64_t)gridDim.y * blockDim.y) {
    const Pack<T, VEC> gp = ld_pack<T, VEC>(g + r * geo.gs + c), up = ld_pack<T, VEC>(u + r * geo.us + c),
                       dp = ld_pack<T, VEC>(dy + r * geo.ys + c);
    Pack<T, VEC> a, b;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
      float s, om, dz;
      const float gv = ld(gp.v[e]), uv = ld(up.v[e]), d = ld(dp.v[e]);
      gate<GELU>(gv, s, om, dz);
      // g·s·(1 − s) first: 0 for saturated gates even where z' is large.
      a.v[e] = st<T>(d * uv * (s + gv * s * om * dz));
      b.v[e] = st<T>(d * gv * s);
    }
    st_pack<T, VEC>(dg + r * geo.dgs + c, a);
    st_pack<T, VEC>(du + r * geo.dus + c, b);
  }
}

#define GLU_KERNELS_K(NAME, T, V, GELU, KNAME)                                                    \
  extern "C" __global__ void glu_fwd_##KNAME##_##NAME##_v##V(const T* g, const T* u, T* y,       \
                                                             GluGeom geo) {                       \
    glu_fwd<T, V, GELU>(g, u, y, geo);                                                           \
  }                                                                                              \
  extern "C" __global__ void glu_bwd_##KNAME##_##NAME##_v##V(const T* g, const T* u, const T* dy, \
                                                             T* dg, T* du, GluGeom geo) {         \
    glu_bwd<T, V, GELU>(g, u, dy, dg, du, geo);                                                  \
  }

#define GLU_KERNELS_V(NAME, T, V)       \
  GLU_KERNELS_K(NAME, T, V, 0, silu)    \
  GLU_KERNELS_K(NAME, T, V, 1, gelu)

#define GLU_KERNELS(NAME, T, V) \
  GLU_KERNELS_V(NAME, T, V)     \
  GLU_KERNELS_V(NAME, T, 1)

CF_FOR_DTYPES(GLU_KERNELS)
