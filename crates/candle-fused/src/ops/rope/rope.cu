// RoPE, forward (rotation by +θ) and backward (by −θ: sign = −1), one kernel per dtype,
// vector width, style and position type. See ops/rope/mod.rs for the math.
//
// Mapping: threadIdx.x is a unit of a head vector (a pack of VEC elements: for the half-split
// style one pack of each half, i.e. pairs (i, i + R/2); interleaved: VEC/2 adjacent pairs;
// past the rotary dims: a pack copied), threadIdx.y a token, blockIdx.x a block of tokens,
// blockIdx.y a group of `hpt` heads, blockIdx.z the batch (grid-stride). Each thread loads
// its token's position and table entries once and applies them to its `hpt` heads, so the
// f32 table (as many bytes per pair as a bf16 pair itself) is read once per `hpt` heads.
// x is read through its strides (b, h, t; the last dim contiguous), y written contiguous.
// A position outside the table (the host checks them first) makes that row NaN: never an
// out-of-bounds read.
#include "common.cuh"

using namespace cf;

struct RopeGeom {
  int64_t b, h, t, d;  // batch, heads, tokens, head dim
  int64_t half;        // rotary dim / 2
  int64_t sb, sh, st;  // element strides of x over (b, h, t)
  int64_t ob, oh, ot;  // of y
  int64_t pos_b;       // stride of the positions over b (0: [T])
  int64_t n_pos;       // rows of the table
  int64_t rot_units;   // units of a head vector that rotate (the rest copy)
  int64_t hpt;         // heads per thread
  float sign;          // +1 forward, -1 backward
};

// N consecutive f32 of the table (16- or 8-byte loads when N allows; the planner checks the
// alignment).
template <int N> __device__ __forceinline__ void ld_tab(const float* __restrict__ p, float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p + i));
      v[i] = q.x, v[i + 1] = q.y, v[i + 2] = q.z, v[i + 3] = q.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float2 q = __ldg(reinterpret_cast<const float2*>(p + i));
      v[i] = q.x, v[i + 1] = q.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; i++) v[i] = __ldg(p + i);
  }
}

// N elements: one pack access in the vectorized builds (aligned), element by element in the
// scalar ones (any alignment).
template <typename T, int N, bool VEC> __device__ __forceinline__ Pack<T, N> ld_n(const T* p) {
  if constexpr (VEC) {
    return ld_pack<T, N>(p);
  } else {
    Pack<T, N> r;
#pragma unroll
    for (int e = 0; e < N; e++) r.v[e] = p[e];
    return r;
  }
}
template <typename T, int N, bool VEC> __device__ __forceinline__ void st_n(T* p, const Pack<T, N>& v) {
  if constexpr (VEC) {
    st_pack<T, N>(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < N; e++) p[e] = v.v[e];
  }
}

template <typename T, int VEC> __device__ __forceinline__ Pack<T, VEC> nan_pack() {
  Pack<T, VEC> r;
#pragma unroll
  for (int e = 0; e < VEC; e++) r.v[e] = st<T>(__int_as_float(0x7fc00000));
  return r;
}

// STYLE 0: half-split, 1: interleaved. P: uint32_t or int64_t positions.
template <typename T, int VEC, int STYLE, typename P>
__device__ void rope(const T* __restrict__ x, const float* __restrict__ cos_t,
                     const float* __restrict__ sin_t, const P* __restrict__ pos, T* __restrict__ y,
                     const RopeGeom g) {
  // Interleaved: a unit holds PAIRS adjacent pairs (at least one, in the scalar build).
  constexpr int PAIRS = STYLE == 0 ? VEC : (VEC >= 2 ? VEC / 2 : 1);
  constexpr int EL = STYLE == 0 ? VEC : 2 * PAIRS;  // elements of one load of a rotating unit
  constexpr bool V = VEC > 1;
  const int64_t u = threadIdx.x;
  const int64_t t = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (t >= g.t) return;
  const int64_t h0 = (int64_t)blockIdx.y * g.hpt;
  const int64_t h1 = min(h0 + g.hpt, g.h);
  for (int64_t b = blockIdx.z; b < g.b; b += gridDim.z) {
    const int64_t p = (int64_t)pos[b * g.pos_b + t];
    const bool ok = p >= 0 && p < g.n_pos;
    const T* xb = x + b * g.sb + t * g.st;
    T* yb = y + b * g.ob + t * g.ot;
    // No branch on the position before the loads of x: they do not wait for the positions ->
    // table chain (two dependent memory latencies). An out-of-range row reads table row 0 and
    // turns its results into NaN through NaN table entries.
    if (u < g.rot_units) {
      const int64_t i = u * EL;                                 // first element of the unit
      const int64_t k = STYLE == 0 ? u * VEC : u * PAIRS;       // first table entry
      float c[PAIRS] = {}, s[PAIRS] = {};
      if (g.n_pos > 0) {
        const int64_t pr = ok ? p : 0;
        ld_tab<PAIRS>(cos_t + pr * g.half + k, c);
        ld_tab<PAIRS>(sin_t + pr * g.half + k, s);
      }
      const float nan = __int_as_float(0x7fc00000);
#pragma unroll
      for (int e = 0; e < PAIRS; e++) {
        c[e] = ok ? c[e] : nan;
        s[e] = ok ? s[e] * g.sign : nan;
      }
#pragma unroll 4
      for (int64_t h = h0; h < h1; h++) {
        const T* xr = xb + h * g.sh;
        T* yr = yb + h * g.oh;
        if constexpr (STYLE == 0) {
          const Pack<T, VEC> a = ld_n<T, VEC, V>(xr + i), bb = ld_n<T, VEC, V>(xr + i + g.half);
          Pack<T, VEC> o1, o2;
#pragma unroll
          for (int e = 0; e < VEC; e++) {
            const float x1 = ld(a.v[e]), x2 = ld(bb.v[e]);
            o1.v[e] = st<T>(x1 * c[e] - x2 * s[e]);
            o2.v[e] = st<T>(x2 * c[e] + x1 * s[e]);
          }
          st_n<T, VEC, V>(yr + i, o1);
          st_n<T, VEC, V>(yr + i + g.half, o2);
        } else {
          const Pack<T, EL> a = ld_n<T, EL, V>(xr + i);
          Pack<T, EL> o;
#pragma unroll
          for (int e = 0; e < PAIRS; e++) {
            const float x0 = ld(a.v[2 * e]), x1 = ld(a.v[2 * e + 1]);
            o.v[2 * e] = st<T>(x0 * c[e] - x1 * s[e]);
            o.v[2 * e + 1] = st<T>(x1 * c[e] + x0 * s[e]);
          }
          st_n<T, EL, V>(yr + i, o);
        }
      }
    } else {
      // Past the rotary dims: copied (NaN for an out-of-range position).
      const int64_t j = 2 * g.half + (u - g.rot_units) * VEC;
#pragma unroll 4
      for (int64_t h = h0; h < h1; h++) {
        Pack<T, VEC> a = ld_n<T, VEC, V>(xb + h * g.sh + j);
        if (!ok) a = nan_pack<T, VEC>();
        st_n<T, VEC, V>(yb + h * g.oh + j, a);
      }
    }
  }
}

// One entry point of the rope template: SUF names the build, BOUNDS its launch bounds.
#define ROPE_ENTRY(NAME, T, V, STYLE, SNAME, P, PNAME, SUF, BOUNDS)                            \
  extern "C" __global__ void BOUNDS rope_##SNAME##_##PNAME##_##NAME##_v##V##SUF(               \
      const T* x, const float* c, const float* s, const P* pos, T* y, RopeGeom g) {             \
    rope<T, V, STYLE, P>(x, c, s, pos, y, g);                                                   \
  }

// Each kernel in two builds (RopeOccupancy of config.rs): unbounded, and `_c4` with
// __launch_bounds__(256, 4): at most 64 registers per thread.
#define ROPE_BOUNDS_C4 __launch_bounds__(256, 4)
#define ROPE_KERNEL(NAME, T, V, STYLE, SNAME, P, PNAME)            \
  ROPE_ENTRY(NAME, T, V, STYLE, SNAME, P, PNAME, , )               \
  ROPE_ENTRY(NAME, T, V, STYLE, SNAME, P, PNAME, _c4, ROPE_BOUNDS_C4)

#define ROPE_KERNELS_V(NAME, T, V)                          \
  ROPE_KERNEL(NAME, T, V, 0, half, uint32_t, u32)           \
  ROPE_KERNEL(NAME, T, V, 0, half, int64_t, i64)            \
  ROPE_KERNEL(NAME, T, V, 1, inter, uint32_t, u32)          \
  ROPE_KERNEL(NAME, T, V, 1, inter, int64_t, i64)

#define ROPE_KERNELS(NAME, T, V) \
  ROPE_KERNELS_V(NAME, T, V)     \
  ROPE_KERNELS_V(NAME, T, 1)

CF_FOR_DTYPES(ROPE_KERNELS)
