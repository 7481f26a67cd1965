// Softmax over the last dim on the row engine (common.cuh): forward with scale, broadcast
// additive mask, causal masking with KV offset, and the backward dx = scale·y⊙(dy − ⟨dy, y⟩).
//
// Forward: one staged read of x, one (max, Σexp) reduction combined online across threads,
// blocks and the cluster, one write of y; each thread keeps its exponentials in registers
// between the reduction and the write. Causal rows stage and compute only their visible columns.
#include "common.cuh"

using namespace cf;

// Where the mask value of (row, col) is: start + Σ idx_k·strides[k] + col·col_stride, idx_k the
// row's index in the leading dims (innermost last). The host merges dims that can be merged and
// drops outer dims of stride 0, so the usual [S, T] mask broadcast over [B, H] costs one division.
struct MaskGeom {
  int64_t nd;
  int64_t dims[6];
  int64_t strides[6];
  int64_t col_stride;
  int64_t start;
};

constexpr float LOG2E = 1.4426950408889634f;

// MASK: the kernel reads an additive mask (when `mask` is not null); CAUSAL: it applies the
// causal mask (when `causal` is set). Three builds: plain, causal-only and masked (both).
// CACHE: a thread keeps the exponentials of its first IT packs in f32 registers between the
// reduction and the write (one ex2 per element, shared memory read once), or (false) every
// sweep re-reads shared memory and recomputes. cuda.rs picks it (registers vs occupancy).
template <typename T, int VEC, bool MASK, bool CAUSAL, bool CACHE> struct SoftmaxFwd {
  static constexpr bool MASKED = MASK || CAUSAL;
  using Red = MaxSum;
  static constexpr int NIN = 1;
  const T* __restrict__ x;
  const T* __restrict__ mask;  // nullptr: no mask
  T* __restrict__ y;
  MaskGeom mg;
  float scale;
  int causal, zero_masked;
  int64_t s_rows, d;
  int64_t vis = 0, moff = 0;  // of the current row
  bool mask_vec = false;       // the current mask row can be read in 16-byte packs
  // Packs per thread kept in registers between `partial` and `output` (cuda.rs plans about
  // 4 packs per thread), and this thread's max over the row's slice.
  static constexpr int IT = CACHE ? 4 : 0;
  float z[CACHE ? IT : 1][VEC];
  float mt = -INFINITY;

  __device__ void begin_row(int64_t row) {
    if (!MASKED) return;
    vis = visible(row);
    if (!MASK) return;
    moff = mask ? mask_offset(row) : 0;
    mask_vec = mask && mg.col_stride == 1 && ((uintptr_t)(mask + moff) % 16) == 0;
  }
  __device__ const T* input(int, int64_t row) const { return x + row * d; }
  __device__ void init(int64_t, int) {}
  __device__ void finish(int64_t, int64_t, int) {}

  // Columns 0..visible(row) are seen; the rest are hidden by the causal mask.
  __device__ int64_t visible(int64_t row) const {
    if (!CAUSAL || !causal) return d;
    const int64_t v = row % s_rows + d - s_rows + 1;
    return v < 0 ? 0 : (v > d ? d : v);
  }
  __device__ int stage_len(int64_t row, int64_t lo, int n) const {
    if (!CAUSAL || !causal) return n;
    int64_t v = visible(row) - lo;
    v = v < 0 ? 0 : (v > n ? n : v);
    v = (v + VEC - 1) / VEC * VEC;
    return (int)(v > n ? n : v);
  }
  __device__ int64_t mask_offset(int64_t row) const {
    int64_t off = mg.start;
#pragma unroll
    for (int k = 5; k >= 0; k--) {  // constant indices keep mg in registers
      if (k < mg.nd) {
        off += (row % mg.dims[k]) * mg.strides[k];
        row /= mg.dims[k];
      }
    }
    return off;
  }
  // The logits of the VEC columns starting at `col0` (absolute index in the row). The mask
  // pack is one 16-byte read-only load when the mask row is contiguous and aligned.
  __device__ __forceinline__ void logits(const Pack<T, VEC>& xv, int64_t col0, float (&zz)[VEC]) const {
#pragma unroll
    for (int e = 0; e < VEC; e++) zz[e] = scale * ld(xv.v[e]);
    if (!MASKED) return;
    if (MASK && mask) {
      const T* mp = mask + moff + col0 * mg.col_stride;
      if (VEC > 1 && mask_vec) {
        const Pack<T, VEC> mv = ldg_pack<T, VEC>(mp);
#pragma unroll
        for (int e = 0; e < VEC; e++) zz[e] += ld(mv.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e++) zz[e] += ld(mp[e * mg.col_stride]);
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; e++)
      if (col0 + e >= vis) zz[e] = -INFINITY;
  }

  // Per thread: the max of its logits, then the sum of their exponentials. The thread's first
  // IT packs (u = threadIdx.x + it·blockDim.x) are read from shared memory once and kept in
  // registers (CACHE); the other packs are re-read from shared memory in every sweep. Causal
  // rows skip their hidden packs.
  __device__ __forceinline__ bool seen(int u, int nu, int64_t vend) const {
    if constexpr (!CAUSAL && !CACHE) return u < nu;  // (with CACHE: more registers, measured slower)
    return u < nu && (int64_t)u * VEC < vend;
  }
  __device__ MaxSum partial(int64_t, int64_t lo, int n, T* const* s) {
    const T* sx = s[0];
    const int nu = n / VEC;
    const int64_t vend = CAUSAL ? vis - lo : (int64_t)n;  // columns of the slice that are seen
    float m = -INFINITY;
#pragma unroll
    for (int it = 0; it < IT; it++) {
      const int u = threadIdx.x + it * blockDim.x;
      float zz[VEC];
      if (seen(u, nu, vend)) {
        logits(ld_pack<T, VEC>(sx + u * VEC), lo + u * VEC, zz);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e++) zz[e] = -INFINITY;
      }
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        m = fmaxf(m, zz[e]);
        z[it][e] = zz[e];
      }
    }
    for (int u = threadIdx.x + IT * blockDim.x; seen(u, nu, vend); u += blockDim.x) {
      float zz[VEC];
      logits(ld_pack<T, VEC>(sx + u * VEC), lo + u * VEC, zz);
#pragma unroll
      for (int e = 0; e < VEC; e++) m = fmaxf(m, zz[e]);
    }
    float sum = 0.f;
    if (m == -INFINITY) {
      // No finite logit: this thread's columns are all masked, unless a NaN (skipped by fmaxf)
      // hides in them, which makes the row NaN as in the reference.
#pragma unroll
      for (int it = 0; it < IT; it++)
#pragma unroll
        for (int e = 0; e < VEC; e++) {
          if (isnan(z[it][e])) m = NAN;
          z[it][e] = 0.f;
        }
      for (int u = threadIdx.x + IT * blockDim.x; seen(u, nu, vend); u += blockDim.x) {
        float zz[VEC];
        logits(ld_pack<T, VEC>(sx + u * VEC), lo + u * VEC, zz);
#pragma unroll
        for (int e = 0; e < VEC; e++)
          if (isnan(zz[e])) m = NAN;
      }
    } else {
      const float ml = m * LOG2E;
#pragma unroll
      for (int it = 0; it < IT; it++)
#pragma unroll
        for (int e = 0; e < VEC; e++) {
          z[it][e] = fast_exp2(fmaf(z[it][e], LOG2E, -ml));
          sum += z[it][e];
        }
      for (int u = threadIdx.x + IT * blockDim.x; seen(u, nu, vend); u += blockDim.x) {
        float zz[VEC];
        logits(ld_pack<T, VEC>(sx + u * VEC), lo + u * VEC, zz);
#pragma unroll
        for (int e = 0; e < VEC; e++) sum += fast_exp2(fmaf(zz[e], LOG2E, -ml));
      }
    }
    mt = m;
    return {m, sum};
  }

  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, MaxSum r) const {
    const bool dead = r.m == -INFINITY;  // every column masked
    const float fill = zero_masked ? 0.f : NAN;
    const float ml = r.m * LOG2E, inv = 1.f / r.s;
    // Cached exponentials are relative to this thread's max: rescale them to the row's.
    const float f = CACHE && !dead ? fast_exp2((mt - r.m) * LOG2E) * inv : 0.f;
    const int nu = n / VEC;
    const int64_t vend = CAUSAL ? vis - lo : (int64_t)n;
    T* yr = y + row * d + lo;
    const T* sx = s[0];
#pragma unroll
    for (int it = 0; it < IT; it++) {
      const int u = threadIdx.x + it * blockDim.x;
      if (u < nu) {
        Pack<T, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; e++) o.v[e] = st<T>(dead ? fill : z[it][e] * f);
        st_pack<T, VEC>(yr + u * VEC, o);
      }
    }
    for (int u = threadIdx.x + IT * blockDim.x; u < nu; u += blockDim.x) {
      Pack<T, VEC> o;
      if (!CAUSAL || seen(u, nu, vend)) {
        float zz[VEC];
        logits(ld_pack<T, VEC>(sx + u * VEC), lo + u * VEC, zz);
#pragma unroll
        for (int e = 0; e < VEC; e++) o.v[e] = st<T>(dead ? fill : fast_exp2(fmaf(zz[e], LOG2E, -ml)) * inv);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e++) o.v[e] = st<T>(dead ? fill : 0.f);
      }
      st_pack<T, VEC>(yr + u * VEC, o);
    }
  }
};

// ⟨dy, y⟩ is summed from exact product splits (p + e = y·dy) and joined in f64, and dy − ⟨dy, y⟩
// is formed against its two-float split: on nearly one-hot rows dy_j ≈ ⟨dy, y⟩ and plain f32
// would leave only rounding noise in the difference.
template <typename T, int VEC> struct SoftmaxBwd {
  using Red = Sum2D;
  static constexpr int NIN = 2;
  const T* __restrict__ y;
  const T* __restrict__ dy;
  T* __restrict__ dx;
  float scale;
  int64_t d;

  __device__ void begin_row(int64_t) {}
  __device__ const T* input(int k, int64_t row) const { return (k == 0 ? y : dy) + row * d; }
  __device__ void init(int64_t, int) {}
  __device__ void finish(int64_t, int64_t, int) {}
  __device__ int stage_len(int64_t, int64_t, int n) const { return n; }

  __device__ Sum2D partial(int64_t, int64_t, int n, T* const* s) const {
    const T* a = s[0];
    const T* b = s[1];
    // acc + comp carries the sum with (almost) twice f32's precision: each product is split
    // exactly (p + fma residual) and each addition's rounding error recovered (TwoSum).
    float acc = 0.f, comp = 0.f;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const Pack<T, VEC> pa = ld_pack<T, VEC>(a + u * VEC), pb = ld_pack<T, VEC>(b + u * VEC);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float ya = ld(pa.v[e]), ga = ld(pb.v[e]);
        const float p = ya * ga;
        const float t = acc + p, bp = t - acc;
        comp += ((acc - (t - bp)) + (p - bp)) + fmaf(ya, ga, -p);
        acc = t;
      }
    }
    return {(double)acc + (double)comp, 0.0};
  }
  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, Sum2D red) const {
    const float dot_hi = (float)red.a, dot_lo = (float)(red.a - (double)dot_hi);
    T* o = dx + row * d + lo;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const int j0 = u * VEC;
      Pack<T, VEC> a = ld_pack<T, VEC>(s[0] + j0);
      Pack<T, VEC> b = ld_pack<T, VEC>(s[1] + j0), r;
#pragma unroll
      for (int e = 0; e < VEC; e++) r.v[e] = st<T>(scale * ld(a.v[e]) * ((ld(b.v[e]) - dot_hi) - dot_lo));
      st_pack<T, VEC>(o + j0, r);
    }
  }
};

#define SOFTMAX_FWD_KERNEL(KIND, TAG, NAME, T, V, MASK, CAUSAL, CACHE)                           \
  extern "C" __global__ void __launch_bounds__(1024)                                            \
      KIND##_fwd##TAG##_##NAME##_v##V(const T* x, const T* mask, T* y, Geom g, MaskGeom mg,      \
                                      float scale, int causal, int zero_masked, int64_t s_rows) { \
    SoftmaxFwd<T, V, MASK, CAUSAL, CACHE> op{x, mask, y, mg, scale, causal, zero_masked, s_rows, g.d}; \
    run_rows<T, V>(g, op);                                                                       \
  }

// Forward builds: {softmax, causal_softmax, masked_softmax}_fwd{"", c}: without and with the
// register cache.
#define SOFTMAX_KERNELS_V(NAME, T, V)                                                            \
  SOFTMAX_FWD_KERNEL(softmax, , NAME, T, V, false, false, false)                                 \
  SOFTMAX_FWD_KERNEL(softmax, c, NAME, T, V, false, false, true)                                 \
  SOFTMAX_FWD_KERNEL(causal_softmax, , NAME, T, V, false, true, false)                           \
  SOFTMAX_FWD_KERNEL(causal_softmax, c, NAME, T, V, false, true, true)                           \
  SOFTMAX_FWD_KERNEL(masked_softmax, , NAME, T, V, true, true, false)                            \
  SOFTMAX_FWD_KERNEL(masked_softmax, c, NAME, T, V, true, true, true)                            \
  extern "C" __global__ void __launch_bounds__(1024)                                            \
      softmax_bwd_##NAME##_v##V(const T* y, const T* dy, T* dx, Geom g, float scale) {           \
    SoftmaxBwd<T, V> op{y, dy, dx, scale, g.d};                                                  \
    run_rows<T, V>(g, op);                                                                       \
  }

#define SOFTMAX_KERNELS(NAME, T, V) \
  SOFTMAX_KERNELS_V(NAME, T, V)     \
  SOFTMAX_KERNELS_V(NAME, T, 1)

CF_FOR_DTYPES(SOFTMAX_KERNELS)
