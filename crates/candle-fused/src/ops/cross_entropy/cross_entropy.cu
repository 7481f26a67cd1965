// Cross-entropy on the row engine (common.cuh), forward and backward side by side (math in
// mod.rs). Each row stages its logits once; one (max, Σexp, Σz, Σ_{j≠t} exp) reduction per
// row combined across threads, blocks and the cluster; then
//   ce_fwd:   the row's loss and stats (lse, Σ_{j≠t} p_j) (one thread, from the staged target);
//   ce_fused: the loss and the gradient, written from the staged row (y may be x: in place);
//   ce_bwd:   the gradient from the saved stats, elementwise (one read, one write, no staging);
// The target's gradient is ε(V−1)/V − Σ_{j≠t} p_j + 2λ·lse·p_t (no p_t − 1 cancellation) and
// the loss (m − z_t) + ln s + ε(z_t − Σz/V) + λ·lse² (exactly 0 for V = 1 or p_t = 1).
//   ce_sum:   the scaled sum of the row losses, f64, one block, fixed order (deterministic).
// Ignored rows (target -1) are never read; their gradient is zero and their loss 0.
#include "common.cuh"

using namespace cf;

constexpr float LOG2E = 1.4426950408889634f;
// The forward's and the backward's loops over global memory load one 16-byte pack per thread,
// then use it: four in flight ran the forward at 63% of copy against 68% with one, the backward
// at 45% with either (H200, NOTES.md 2026-12-03).

// The row constants (cuda.rs: CeParams).
struct CeParams {
  float cap, inv_cap;  // soft-capping c and 1/c; cap = 0: none
  float eps, eps_v;    // ε and ε/V
  float eps_t;         // ε·(V − 1)/V
  float zl;            // λ of the z-loss λ·lse²
  float scale;         // gradient scale
};

// tanh(y) and sech²(y) = 1 − tanh²(y): with e = exp(−2|y|), tanh|y| = (1 − e)/(1 + e) (its odd
// Taylor polynomial below |y| = 0.3, where 1 − e cancels) and sech² = 4e/(1 + e)², which never
// cancels.
__device__ __forceinline__ void tanh_sech2(float y, float& t, float& s2) {
  const float a = fabsf(y);
  const float e = fast_exp2(-2.f * LOG2E * a);
  const float den = 1.f + e;
  float th;
  if (a < 0.3f) {
    const float y2 = a * a;
    th = a * (1.f + y2 * (-1.f / 3.f + y2 * (2.f / 15.f + y2 * (-17.f / 315.f + y2 * (62.f / 2835.f)))));
  } else {
    th = (1.f - e) / den;
  }
  t = copysignf(th, y);
  s2 = 4.f * e / (den * den);
}

// (max m, Σ exp(z − m), Σ z, Σ_{j≠t} exp(z − m)) of a row, combined online.
struct MaxSumZ {
  float m, s, z, o;
  static __device__ __forceinline__ MaxSumZ identity() { return {-INFINITY, 0.f, 0.f, 0.f}; }
  static __device__ __forceinline__ MaxSumZ combine(MaxSumZ a, MaxSumZ b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, a.s + b.s, a.z + b.z, a.o + b.o};
    const float ea = fast_exp2((a.m - m) * LOG2E), eb = fast_exp2((b.m - m) * LOG2E);
    return {m, a.s * ea + b.s * eb, a.z + b.z, a.o * ea + b.o * eb};
  }
  static __device__ __forceinline__ MaxSumZ shfl(MaxSumZ a, int o) {
    return {__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o),
            __shfl_xor_sync(0xffffffffu, a.z, o), __shfl_xor_sync(0xffffffffu, a.o, o)};
  }
};

// The (capped) logit. CAP: soft-capping on (p.cap > 0); the loops are built once for each, so
// no element pays for the test.
template <bool CAP> __device__ __forceinline__ float capz(float v, const CeParams& p) {
  if constexpr (CAP) {
    float th, s2;
    tanh_sech2(v * p.inv_cap, th, s2);
    return p.cap * th;
  }
  return v;
}
__device__ __forceinline__ float capz(float v, const CeParams& p) {
  return p.cap > 0.f ? capz<true>(v, p) : capz<false>(v, p);
}

// Where the target's column lies in a slice of n columns starting at lo: its pack (-1: not in
// this slice) and its element in that pack. The loops test the pack index once per pack.
struct TargetPos {
  int u, e;
  template <int VEC> static __device__ __forceinline__ TargetPos of(int64_t t, int64_t lo, int n) {
    const int64_t tl = t - lo;
    if (t < 0 || tl < 0 || tl >= n) return {-1, 0};
    return {(int)(tl / VEC), (int)(tl % VEC)};
  }
};

// A pack's (Σ exp, Σ_{j≠t} exp) added into (sum, other): exp2(z·log2e − mb) per element, one
// FFMA and one MUFU each; the target's exclusion costs only in the pack that holds it.
// The target's pack recomputes its exps rather than keeping them live (registers: two CTAs of
// 1024 threads per SM need at most 32 per thread).
template <int VEC>
__device__ __forceinline__ void add_exps(const float (&z)[VEC], float mb, bool has_t, int te, float& sum,
                                         float& other) {
  float ps = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; e++) ps += fast_exp2(fmaf(z[e], LOG2E, -mb));
  sum += ps;
  if (!has_t) {
    other += ps;
  } else {
    float po = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; e++)
      if (e != te) po += fast_exp2(fmaf(z[e], LOG2E, -mb));
    other += po;
  }
}

// A row's gradient constants: p_j = exp2((z_j − m)·log2e − l2s); for j ≠ t the gradient is
// p_j·k − off, for the target (eps_t − other + 2λ·lse·p_t)·scale; times sech² with capping.
struct GradRow {
  float m, l2s, lse, k, off, other, scale;
  float c;  // m·log2e + l2s: p_j = exp2(z_j·log2e − c)
  int t;
  __device__ __forceinline__ GradRow(float m_, float l2s_, float other_, int t_, float scale_, const CeParams& p)
      : m(m_), l2s(l2s_), lse(m_ + l2s_ / LOG2E), other(other_), scale(scale_), t(t_) {
    k = (1.f + 2.f * p.zl * lse) * scale;
    off = p.eps_v * scale;
    c = m * LOG2E + l2s;
  }
  // The gradient of one pack (te: the target's element when has_t), already scaled.
  template <bool CAP, typename T, int VEC>
  __device__ __forceinline__ Pack<T, VEC> pack(const Pack<T, VEC>& a, bool has_t, int te, const CeParams& p) const {
    Pack<T, VEC> b;
    // (z, sech²(x/c), p) of element e; recomputed for the target rather than kept live.
    auto prob = [&](int e, float& s2) {
      float z = ld(a.v[e]);
      s2 = 1.f;
      if constexpr (CAP) {
        float th;
        tanh_sech2(z * p.inv_cap, th, s2);
        z = p.cap * th;
      }
      return fast_exp2(fmaf(z, LOG2E, -c));
    };
#pragma unroll
    for (int e = 0; e < VEC; e++) {
      float s2;
      float g = fmaf(prob(e, s2), k, -off);
      if constexpr (CAP) g *= s2;
      b.v[e] = st<T>(g);
    }
    if (has_t) {
#pragma unroll
      for (int e = 0; e < VEC; e++)
        if (e == te) {
          float s2;
          const float pe = prob(e, s2);
          b.v[e] = st<T>((p.eps_t - other + 2.f * p.zl * lse * pe) * scale * s2);
        }
    }
    return b;
  }
};

// GRAD = false: the forward (row loss and lse); true: the fused loss + gradient into y (which
// may alias x: each CTA writes only the slice it staged, after the row's reduction).
template <typename T, int VEC, bool GRAD> struct CeRow {
  using Red = MaxSumZ;
  // The forward reads its slice once from global (online max/sum: nothing to keep for a
  // second pass, so no staging, no shared-memory slice: any row length runs on one CTA); the
  // fused gradient stages it (read once, written once from shared memory).
  static constexpr int NIN = GRAD ? 1 : 0;
  const T* x;
  const int* __restrict__ tgt;
  T* y;                          // GRAD only
  float* __restrict__ row_loss;  // [rows]
  float* __restrict__ stats;     // [rows, 2] (lse, Σ_{j≠t} p_j), forward only (nullptr otherwise)
  CeParams p;
  int64_t d;
  int t = -1;  // the current row's target

  __device__ __forceinline__ void begin_row(int64_t row) { t = tgt[row]; }
  __device__ __forceinline__ const T* input(int, int64_t row) const { return x + row * d; }
  __device__ __forceinline__ int stage_len(int64_t row, int64_t, int n) const { return tgt[row] < 0 ? 0 : n; }
  __device__ __forceinline__ void init(int64_t, int) {}
  __device__ __forceinline__ void finish(int64_t, int64_t, int) {}

  // The row's partial, online: one pass over the slice, the running max rescaling the running
  // sums when it grows. The forward reads its slice from global memory (nothing to keep for a
  // second pass); the fused gradient reads it from the staged copy (one pass over shared
  // memory here, one more for the gradient; a max pass, then a sums pass, made it three).
  // An all -inf slice gives (-inf, 0, Σz, 0); a NaN poisons it (found through Σz, which any NaN
  // makes NaN; so does +inf with -inf, where exp gives NaN).
  __device__ MaxSumZ partial(int64_t row, int64_t lo, int n, T* const* s) const {
    if (t < 0) return MaxSumZ::identity();
    if constexpr (GRAD)
      return p.cap > 0.f ? online<true, true>(s[0], lo, n) : online<false, true>(s[0], lo, n);
    const T* sx = x + row * d + lo;
    return p.cap > 0.f ? online<true, false>(sx, lo, n) : online<false, false>(sx, lo, n);
  }
  // STAGED: `sx` is the staged slice in shared memory (else the row in global memory).
  template <bool CAP, bool STAGED> __device__ MaxSumZ online(const T* sx, int64_t lo, int n) const {
    const int nu = n / VEC;
    const TargetPos tp = TargetPos::of<VEC>(t, lo, n);
    float m = -INFINITY, sum = 0.f, zs = 0.f, other = 0.f;
    const int bs = blockDim.x;
    // One pack folded into the running (m, sum, zs, other).
    auto fold = [&](const Pack<T, VEC>& a, int u) {
      float z[VEC];
      float pm = -INFINITY, pz = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        z[e] = capz<CAP>(ld(a.v[e]), p);
        pm = fmaxf(pm, z[e]);
        pz += z[e];
      }
      zs += pz;
      if (pm > m) {
        const float r = fast_exp2((m - pm) * LOG2E);  // m = -inf: 0
        sum *= r;
        other *= r;
        m = pm;
      }
      if (m != -INFINITY) add_exps<VEC>(z, m * LOG2E, u == tp.u, tp.e, sum, other);
    };
    for (int u = threadIdx.x; u < nu; u += bs)
      fold(STAGED ? ld_pack<T, VEC>(sx + u * VEC) : ldg_pack<T, VEC>(sx + u * VEC), u);
    if (isnan(zs)) return MaxSumZ{NAN, NAN, NAN, NAN};
    return {m, sum, zs, other};
  }

  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, MaxSumZ r) const {
    const int nu = n / VEC;
    if (t < 0) {
      if (GRAD) {
        Pack<T, VEC> zero;
#pragma unroll
        for (int e = 0; e < VEC; e++) zero.v[e] = st<T>(0.f);
        T* o = y + row * d + lo;
        for (int u = threadIdx.x; u < nu; u += blockDim.x) st_pack<T, VEC>(o + u * VEC, zero);
      }
      if (lo == 0 && threadIdx.x == 0) {
        row_loss[row] = 0.f;
        if (stats) stats[2 * row] = stats[2 * row + 1] = 0.f;
      }
      return;
    }
    const float l2s = log2f(r.s), ls = l2s / LOG2E, lse = r.m + ls, other = r.o / r.s;
    // The CTA holding the target's column writes the row's loss from its staged logit.
    if (threadIdx.x == 0 && t >= lo && t < lo + n) {
      const float zt = capz(ld(GRAD ? s[0][t - lo] : x[row * d + t]), p);
      float l = (r.m - zt) + ls + p.zl * lse * lse;
      if (p.eps != 0.f) l += p.eps * zt - p.eps_v * r.z;
      row_loss[row] = l;
      if (stats) {
        stats[2 * row] = lse;
        stats[2 * row + 1] = other;
      }
    }
    if constexpr (GRAD) {
      const GradRow gr(r.m, l2s, other, t, p.scale, p);
      if (p.cap > 0.f)
        write_grad<true>(gr, row, lo, n, s[0]);
      else
        write_grad<false>(gr, row, lo, n, s[0]);
    }
  }
  template <bool CAP>
  __device__ void write_grad(const GradRow& gr, int64_t row, int64_t lo, int n, const T* sx) const {
    const int nu = n / VEC;
    const TargetPos tp = TargetPos::of<VEC>(t, lo, n);
    T* o = y + row * d + lo;
    for (int u = threadIdx.x; u < nu; u += blockDim.x) {
      const Pack<T, VEC> a = ld_pack<T, VEC>(sx + u * VEC);
      st_pack<T, VEC>(o + u * VEC, gr.pack<CAP>(a, u == tp.u, tp.e, p));
    }
  }
};

// One row of the gradient from the saved lse, the block's threads over its packs.
template <bool CAP, typename T, int VEC>
__device__ __forceinline__ void ce_bwd_row(const GradRow& gr, const T* __restrict__ xr, T* __restrict__ o,
                                           int64_t nu, int t, const CeParams& p) {
  const int64_t tu = t / VEC;
  const int te = t % VEC;
  for (int64_t u = threadIdx.x; u < nu; u += blockDim.x)
    st_pack<T, VEC>(o + u * VEC, gr.pack<CAP>(ldg_pack<T, VEC>(xr + u * VEC), u == tu, te, p));
}

// The gradient from the saved lse: blocks walk the rows (grid-stride), threads a row's packs.
template <typename T, int VEC>
__device__ void ce_bwd_body(const T* __restrict__ x, const int* __restrict__ tgt, const float* __restrict__ stats,
                            const float* __restrict__ dloss, T* __restrict__ y, int64_t rows, int64_t d,
                            CeParams p) {
  const float gsc = p.scale * (dloss ? dloss[0] : 1.f);
  const int64_t nu = d / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int t = tgt[row];
    T* o = y + row * d;
    const T* xr = x + row * d;
    if (t < 0) {
      Pack<T, VEC> zero;
#pragma unroll
      for (int e = 0; e < VEC; e++) zero.v[e] = st<T>(0.f);
      for (int64_t u = threadIdx.x; u < nu; u += blockDim.x) st_pack<T, VEC>(o + u * VEC, zero);
      continue;
    }
    // p_j = exp(z_j − lse): m = lse, ln s = 0.
    const GradRow gr(stats[2 * row], 0.f, stats[2 * row + 1], t, gsc, p);
    if (p.cap > 0.f)
      ce_bwd_row<true, T, VEC>(gr, xr, o, nu, t, p);
    else
      ce_bwd_row<false, T, VEC>(gr, xr, o, nu, t, p);
  }
}

// out[0] = scale · Σ rows[i], summed in f64 in a fixed order. One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    ce_sum(const float* __restrict__ rows, int64_t n, double scale, float* __restrict__ out) {
  __shared__ double sh[1024];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += (double)rows[i];
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = (float)(sh[0] * scale);
}

#define CE_KERNELS_V(NAME, T, V)                                                                      \
  extern "C" __global__ void __launch_bounds__(1024, 2)                                              \
      ce_fwd_##NAME##_v##V(const T* x, const int* tgt, float* row_loss, float* stats, Geom g, CeParams p) { \
    CeRow<T, V, false> op{x, tgt, nullptr, row_loss, stats, p, g.d};                                  \
    run_rows<T, V>(g, op);                                                                            \
  }                                                                                                   \
  extern "C" __global__ void ce_bwd_##NAME##_v##V(const T* x, const int* tgt, const float* stats,     \
                                                  const float* dloss, T* y, int64_t rows, int64_t d,  \
                                                  CeParams p) {                                       \
    ce_bwd_body<T, V>(x, tgt, stats, dloss, y, rows, d, p);                                           \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(1024, 2)                                              \
      ce_fused_##NAME##_v##V(const T* x, const int* tgt, T* y, float* row_loss, Geom g, CeParams p) { \
    CeRow<T, V, true> op{x, tgt, y, row_loss, nullptr, p, g.d};                                       \
    run_rows<T, V>(g, op);                                                                            \
  }

#define CE_KERNELS(NAME, T, V) \
  CE_KERNELS_V(NAME, T, V)     \
  CE_KERNELS_V(NAME, T, 1)

CF_FOR_DTYPES(CE_KERNELS)
