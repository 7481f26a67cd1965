// Residual add + RMSNorm forward on the row engine (common.cuh): stages x and residual once,
// forms s = x + residual in f32, reduces Σs², and writes both sum = s and normed = s·r⊙w
// (normed from the f32 s, before it is rounded). The backward is rms_norm.cu's rms_bwd with
// dres = the gradient of sum.
#include "common.cuh"

using namespace cf;

template <typename T, int VEC> struct AddRmsFwd {
  using Red = SumF;
  static constexpr int NIN = 2;
  const T* __restrict__ x;
  const T* __restrict__ res;
  const T* __restrict__ w;
  T* __restrict__ normed;
  T* __restrict__ sum;
  float eps;
  int64_t d;

  __device__ void begin_row(int64_t) {}
  __device__ const T* input(int k, int64_t row) const { return (k == 0 ? x : res) + row * d; }
  __device__ int stage_len(int64_t, int64_t, int n) const { return n; }
  __device__ void init(int64_t, int) {}
  __device__ void finish(int64_t, int64_t, int) {}

  __device__ SumF partial(int64_t, int64_t, int n, T* const* s) const {
    const T* a = s[0];
    const T* b = s[1];
    float acc = 0.f;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const Pack<T, VEC> pa = ld_pack<T, VEC>(a + u * VEC), pb = ld_pack<T, VEC>(b + u * VEC);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float v = ld(pa.v[e]) + ld(pb.v[e]);
        acc = fmaf(v, v, acc);
      }
    }
    return {acc};
  }
  __device__ void output(int64_t row, int64_t lo, int n, T* const* s, SumF ss) const {
    const float r = rsqrtf(ss.v / (float)d + eps);
    T* on = normed + row * d + lo;
    T* os = sum + row * d + lo;
    for (int u = threadIdx.x; u < n / VEC; u += blockDim.x) {
      const int j0 = u * VEC;
      Pack<T, VEC> a = ld_pack<T, VEC>(s[0] + j0);
      Pack<T, VEC> b = ld_pack<T, VEC>(s[1] + j0);
      Pack<T, VEC> wv = ldg_pack<T, VEC>(w + lo + j0), pn, ps;
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float v = ld(a.v[e]) + ld(b.v[e]);
        ps.v[e] = st<T>(v);
        pn.v[e] = st<T>(v * r * ld(wv.v[e]));
      }
      st_pack<T, VEC>(os + j0, ps);
      st_pack<T, VEC>(on + j0, pn);
    }
  }
};

#define ADD_RMS_KERNELS_V(NAME, T, V)                                                         \
  extern "C" __global__ void __launch_bounds__(1024) add_rms_fwd_##NAME##_v##V(               \
      const T* x, const T* res, const T* w, T* normed, T* sum, Geom g, float eps) {           \
    AddRmsFwd<T, V> op{x, res, w, normed, sum, eps, g.d};                                     \
    run_rows<T, V>(g, op);                                                                    \
  }

#define ADD_RMS_KERNELS(NAME, T, V) \
  ADD_RMS_KERNELS_V(NAME, T, V)     \
  ADD_RMS_KERNELS_V(NAME, T, 1)

CF_FOR_DTYPES(ADD_RMS_KERNELS)
