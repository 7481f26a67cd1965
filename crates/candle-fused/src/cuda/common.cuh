// Shared device code of every candle-fused kernel: dtype conversion, 16-byte packs, cp.async
// staging, warp/block/cluster reductions, and the row engine that all row ops run on.
//
// The row engine: a row of length D is split into `csize` slices (csize = cluster size, 1 for
// rows that fit one block's shared memory, up to 16 for long rows). Each CTA stages its slice of
// the op's input rows into shared memory with cp.async (16-byte copies when aligned), so HBM is
// read once; the op's per-thread partial reduction runs over the staged slice, is combined
// across the block (warp shuffles, then shared memory) and across the cluster (distributed shared
// memory, fixed rank order, so every CTA of the cluster gets the bit-identical total); then the op
// writes its outputs from the staged slice. Clusters walk the rows grid-stride, so any number of
// rows works with a bounded grid.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define CF_CLUSTERS 1
#endif

namespace cf {

// ------------------------------------------------------------------------------------------
// dtypes
template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <typename T> __device__ __forceinline__ float ld(T v) { return Num<T>::to(v); }
template <typename T> __device__ __forceinline__ T st(float v) { return Num<T>::from(v); }

// VEC consecutive elements, loaded and stored as one access (16 bytes when VEC·sizeof(T) = 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Packs moved as one 16-byte access: the bf16/f16 element types are classes, and a plain
// struct copy of them may be split into VEC 2-byte accesses, so go through uint4.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> ld_pack(const T* p) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    Pack<T, VEC> r;
    memcpy(&r, &v, 16);
    return r;
  } else {
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
}
__device__ __forceinline__ uint32_t raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t raw_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t raw_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Stores a pack to global memory: one st.global.v4 for 16-byte packs (written out in PTX:
// nvcc was seen splitting the struct store into 2- and 4-byte stores).
template <typename T, int VEC>
__device__ __forceinline__ void st_pack(T* p, const Pack<T, VEC>& v) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint32_t w[4];
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; i++) w[i] = raw_bits(v.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; i++) w[i] = raw_bits(v.v[2 * i]) | (raw_bits(v.v[2 * i + 1]) << 16);
    }
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                 "r"(w[3])
                 : "memory");
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = v;
  }
}

// A pack from read-only global memory (weights, masks): one 16-byte __ldg when the pack is
// 16 bytes.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> ldg_pack(const T* __restrict__ p) {
  Pack<T, VEC> r;
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&r, &v, 16);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; e++) r.v[e] = p[e];
  }
  return r;
}

// 2^x in one MUFU instruction (flushes results below 2^-126 to 0: negligible next to the
// softmax's largest term, which is 1).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ------------------------------------------------------------------------------------------
// staging: global -> shared
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until every committed group has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Copies n elements (a multiple of VEC) from global g to shared s, block-strided.
// The 16-byte path walks 32-bit shared and 64-bit global addresses by increments (a few
// instructions per copy instead of re-deriving both addresses from the index).
template <typename T, int VEC>
__device__ __forceinline__ void stage(T* s, const T* __restrict__ g, int n) {
  if (VEC * sizeof(T) == 16) {
    const int nv = n / VEC, step = blockDim.x * 16;
    unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s)) + threadIdx.x * 16;
    const char* ga = reinterpret_cast<const char*>(g) + threadIdx.x * 16;
    for (int v = threadIdx.x; v < nv; v += blockDim.x, sa += step, ga += step)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(ga));
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = g[i];
  }
}

// ------------------------------------------------------------------------------------------
// reductions. A reduction type R provides identity(), combine(a, b) and shfl(r, offset).
struct SumF {
  float v;
  static __device__ __forceinline__ SumF identity() { return {0.f}; }
  static __device__ __forceinline__ SumF combine(SumF a, SumF b) { return {a.v + b.v}; }
  static __device__ __forceinline__ SumF shfl(SumF a, int o) {
    return {__shfl_xor_sync(0xffffffffu, a.v, o)};
  }
};

// Two sums in f64 (RMSNorm backward: Σx² and Σ g·x, where cancellation needs the precision).
struct Sum2D {
  double a, b;
  static __device__ __forceinline__ Sum2D identity() { return {0.0, 0.0}; }
  static __device__ __forceinline__ Sum2D combine(Sum2D x, Sum2D y) { return {x.a + y.a, x.b + y.b}; }
  static __device__ __forceinline__ Sum2D shfl(Sum2D x, int o) {
    return {__shfl_xor_sync(0xffffffffu, x.a, o), __shfl_xor_sync(0xffffffffu, x.b, o)};
  }
};

// Softmax's (max, Σ exp(z - max)) pair, combined online.
struct MaxSum {
  float m, s;
  static __device__ __forceinline__ MaxSum identity() { return {-INFINITY, 0.f}; }
  static __device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    if (isnan(a.m) || isnan(b.m)) return {NAN, NAN};  // a NaN logit poisons the row
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, a.s + b.s};
    return {m, a.s * fast_exp2((a.m - m) * 1.4426950408889634f) +
                   b.s * fast_exp2((b.m - m) * 1.4426950408889634f)};
  }
  static __device__ __forceinline__ MaxSum shfl(MaxSum a, int o) {
    return {__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
  }
};

template <typename R> __device__ __forceinline__ R warp_reduce(R r) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) r = R::combine(r, R::shfl(r, o));
  return r;
}

// Block-wide reduction; every thread gets the total. `scratch` holds 33 R's in shared memory.
template <typename R> __device__ __forceinline__ R block_reduce(R r, R* scratch) {
  r = warp_reduce(r);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (nw == 1) return r;
  if (lane == 0) scratch[wid] = r;
  __syncthreads();
  if (wid == 0) {
    R t = lane < nw ? scratch[lane] : R::identity();
    t = warp_reduce(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  return scratch[32];
}

// Cluster-wide combination of the per-CTA totals `r`: CTA k publishes into its slot, after a
// cluster barrier every warp reads the csize slots (lane k reads rank k) and reduces them in a
// fixed tree, so all CTAs get the same bits. Slots alternate by row parity so a CTA may publish
// the next row's total while slower CTAs still read this one.
template <typename R>
__device__ __forceinline__ R cluster_combine(R r, R* slots, int parity, int csize) {
#ifdef CF_CLUSTERS
  if (csize == 1) return r;
  namespace cg = cooperative_groups;
  cg::cluster_group cl = cg::this_cluster();
  if (threadIdx.x == 0) slots[parity] = r;
  cl.sync();
  const int lane = threadIdx.x & 31;
  R t = R::identity();
  if (lane < csize) t = *cl.map_shared_rank(slots + parity, lane);
  return warp_reduce(t);
#else
  return r;
#endif
}

__device__ __forceinline__ void cluster_sync_all(int csize) {
#ifdef CF_CLUSTERS
  if (csize > 1) cooperative_groups::this_cluster().sync();
#endif
}

// ------------------------------------------------------------------------------------------
// the row engine

// Launch geometry, identical for every row op.
struct Geom {
  int64_t rows;   // number of rows
  int64_t d;      // row length
  int64_t chunk;  // elements per CTA slice (a multiple of VEC)
  int64_t csize;  // CTAs per row (cluster size)
};

__host__ __device__ __forceinline__ int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Runs `op` over every row. Op provides:
//   using Red;  static constexpr int NIN;               (reduction type, staged input rows;
//                                                        0: nothing staged, the op reads global)
//   void begin_row(int64_t row)                         (per-row setup, e.g. mask offsets)
//   const T* input(int k, int64_t row) const;           (row base of staged input k)
//   int stage_len(int64_t row, int64_t lo, int n) const (elements of the slice to stage, <= n)
//   Red partial(int64_t row, int64_t lo, int n, T* const* s) const
//   void output(int64_t row, int64_t lo, int n, T* const* s, Red total)
//   void init(int64_t lo, int n) / finish(int64_t cluster, int64_t lo, int n)
// Shared memory: NIN staged slices, then 35 Red (block scratch + 2 cluster slots).
template <typename T, int VEC, typename Op> __device__ void run_rows(const Geom g, Op& op) {
  extern __shared__ __align__(16) unsigned char smem[];
  using Red = typename Op::Red;
  const int64_t slice_bytes = align16(g.chunk * (int64_t)sizeof(T));
  Red* scratch = reinterpret_cast<Red*>(smem + Op::NIN * slice_bytes);

  const int csize = (int)g.csize;
  const int rank = (int)(blockIdx.x % csize);
  const int64_t cid = blockIdx.x / csize, ncl = gridDim.x / csize;
  const int64_t lo = rank * g.chunk;
  const int n = (int)max((int64_t)0, min(g.chunk, g.d - lo));
  T* s[Op::NIN > 0 ? Op::NIN : 1] = {};
#pragma unroll
  for (int k = 0; k < Op::NIN; k++) s[k] = reinterpret_cast<T*>(smem + k * slice_bytes);
  op.init(lo, n);
  int parity = 0;
  for (int64_t row = cid; row < g.rows; row += ncl) {
    if constexpr (Op::NIN > 0) {
      const int nl = op.stage_len(row, lo, n);
#pragma unroll
      for (int k = 0; k < Op::NIN; k++) stage<T, VEC>(s[k], op.input(k, row) + lo, nl);
      cp_async_commit();
      cp_async_wait_all();
      __syncthreads();
    }
    op.begin_row(row);
    Red r = op.partial(row, lo, n, s);
    r = block_reduce(r, scratch);
    r = cluster_combine(r, scratch + 33, parity, csize);
    parity ^= 1;
    op.output(row, lo, n, s, r);
    __syncthreads();
  }
  cluster_sync_all(csize);
  op.finish(cid, lo, n);
}

// Sums `g` per-CTA partial rows [g, d] (fp32) over g in a fixed order into out[d] (deterministic).
template <typename T>
__device__ void reduce_partials(const float* __restrict__ part, int64_t g, int64_t d, T* __restrict__ out) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < d; j += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < g; k++) acc += part[k * d + j];
    out[j] = st<T>(acc);
  }
}

}  // namespace cf

// Calls MACRO(name, T, VEC) for f32, f16 and bf16 with the 16-byte vector width of the dtype;
// each op's MACRO defines its `extern "C"` entry points (vectorized and scalar variants).
#define CF_FOR_DTYPES(MACRO) \
  MACRO(f32, float, 4)       \
  MACRO(f16, __half, 8)      \
  MACRO(bf16, __nv_bfloat16, 8)
