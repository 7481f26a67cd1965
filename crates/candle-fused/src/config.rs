//! Kernel configuration: typed tuning knobs per op and backend, plus output poisoning for
//! tests. Nothing in the library reads environment variables or global switches: a
//! [`KernelConfig`] is passed explicitly through [`Kernels`] (the free functions in
//! [`crate::ops`] and the prelude use [`KernelConfig::default`]), and it travels with the
//! autograd graph, so a backward runs with the configuration of its forward.
//!
//! `Auto` values resolve at launch time from the device (e.g. the GPU architecture); the
//! probe and the bench sweep the alternatives with [`KernelConfig::candidates`].

/// How every kernel of one [`Kernels`] handle is built and launched.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KernelConfig {
    /// Fill every kernel output with NaN (CPU) or 0xFF bytes (CUDA; NaN in every float dtype)
    /// before the kernel runs, so an element a kernel fails to write shows up. For tests.
    pub poison: bool,
    /// CPU kernels.
    pub cpu: CpuConfig,
    /// CUDA kernels.
    pub cuda: CudaConfig,
}

/// CPU work sizing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuConfig {
    /// Problems of fewer elements run on the calling thread (waking the pool costs more).
    pub serial_below: usize,
    /// Elements one parallel task covers at least (keeps rayon's overhead small).
    pub task_elems: usize,
    /// f16/bf16 GEMMs (LoRA) widen blocks of about this many elements of their row operands
    /// to f32 at a time.
    pub half_gemm_block: usize,
    /// The instruction set of the vector math ([`SimdLevel::Auto`]: the best this CPU has).
    /// Forcing a level the CPU lacks is an error naming the op, never undefined behaviour.
    pub simd: SimdLevel,
    /// Threads of the `gemm` crate's matmuls (`crate::ops::matmul`); 0: all of rayon's.
    pub gemm_threads: usize,
    /// `M = 1` products (f32, bf16) through the GEMV that streams the weight once, instead of
    /// the GEMM (measured faster for decode shapes; see BENCHMARKS.md).
    pub gemv: bool,
    /// f32 products (`ops::matmul`, the LoRA kernels; bf16/f16 after widening) with a side of
    /// at most this many elements (the LoRA rank, a few rows) run on the crate's own SIMD
    /// micro-kernels instead of the `gemm` crate; 0 turns them off.
    pub skinny_gemm_max: usize,
}

/// The instruction set the CPU kernels' vector math runs on, detected at run time (the binary
/// stays portable: no `target-cpu=native`). Tests force each level the machine has, so the
/// fallbacks of a CPU without AVX-512 run on every CI machine too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum SimdLevel {
    /// The best level this CPU supports: AVX-512 (F/BW/CD/DQ/VL), else AVX2+FMA on x86-64;
    /// NEON on aarch64; else scalar.
    #[default]
    Auto,
    /// x86-64 AVX-512 F/BW/CD/DQ/VL (x86-64-v4); f32 to bf16 through AVX-512 BF16
    /// (`vcvtneps2bf16`) when the CPU also has it.
    Avx512,
    /// x86-64 AVX2 + FMA + F16C (x86-64-v3).
    Avx2,
    /// aarch64 NEON (what `pulp` detects there).
    Neon,
    /// One lane at a time, no vector instructions (what any CPU runs).
    Scalar,
}

impl Default for CpuConfig {
    fn default() -> Self {
        Self {
            serial_below: 1 << 18,
            task_elems: 1 << 15,
            half_gemm_block: 1 << 20,
            simd: SimdLevel::Auto,
            gemm_threads: 0,
            gemv: true,
            skinny_gemm_max: 32,
        }
    }
}

/// CUDA kernel builds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CudaConfig {
    /// Softmax forward (plain, causal, masked).
    pub softmax_fwd: SoftmaxFwdConfig,
    /// RMSNorm and add+RMSNorm backward.
    pub rms_norm_bwd: RmsNormBwdConfig,
    /// RoPE forward and backward.
    pub rope: RopeKernelConfig,
}

/// How many heads one thread of the RoPE kernel rotates with one load of its token's table
/// entries (the table is f32: for bf16 as many bytes per pair as the pair itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadsPerThread {
    /// Up to 8, fewer while that leaves under 1024 threads per SM, at least 2 when there are
    /// two heads.
    #[default]
    Auto,
    /// This many (1, 2, 4, 8 or 16; at most the number of heads).
    Fixed(u8),
}

/// How many 256-thread CTAs of the RoPE kernel the compiler must fit on one SM
/// (`__launch_bounds__(256, n)`: a register cap of 65536 / (256·n) per thread). On an H200
/// (2026-12-02, `bench --op rope --stream 8`, one call per configuration): the unbounded build
/// uses 70 registers (37.5% occupancy) and takes 23.3 µs for bf16 [1, 32, 4096, 128]; `Ctas4`
/// 56 registers, 50%, 21.7 µs (70% → 75% of copy; Qwen's [4, 14, 2048, 64] 53% → 57%; f32 and
/// interleaved unchanged). A 6-CTA build (40 registers, 75%) took 29.6 µs (ncu: 44 cycles per
/// issued instruction against 25) and was dropped (NOTES.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeOccupancy {
    /// No bound: the compiler's choice.
    Unbounded,
    /// 4 CTAs per SM: at most 64 registers per thread (50% occupancy). The default.
    #[default]
    Ctas4,
}

/// RoPE kernel build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RopeKernelConfig {
    /// See [`HeadsPerThread`].
    pub heads_per_thread: HeadsPerThread,
    /// See [`RopeOccupancy`] (used when a CTA has at most 256 threads, i.e. head dims up to
    /// 256·VEC elements; larger heads take the unbounded build).
    pub occupancy: RopeOccupancy,
}

/// Whether the softmax forward keeps each thread's exponentials in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegisterCache {
    /// Cached when a CTA's slice has at most 8192 elements and 16 KiB (measured best on an
    /// H200: longer slices cost occupancy, 33–36% slower at [8192, 32768] bf16 and
    /// [1024, 262144] f32; [16384, 8192] f32 13% slower cached).
    #[default]
    Auto,
    /// Always cached.
    On,
    /// Never cached (shared memory re-read in each sweep).
    Off,
}

/// Softmax forward kernel build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SoftmaxFwdConfig {
    /// See [`RegisterCache`].
    pub register_cache: RegisterCache,
}

/// Columns of the weight gradient one thread of the RMSNorm backward accumulates in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DwColumns {
    /// 32 on every architecture measured so far (H200: 8% faster in sum than 16).
    #[default]
    Auto,
    /// 16 columns per thread, up to 1024 threads per CTA.
    C16,
    /// 32 columns per thread, up to 512 threads per CTA.
    C32,
}

/// RMSNorm / add+RMSNorm backward kernel build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RmsNormBwdConfig {
    /// See [`DwColumns`].
    pub dw_columns: DwColumns,
}

impl KernelConfig {
    /// The default with output poisoning on (what the tests and `candle-fused check` use).
    pub fn poisoned() -> Self {
        Self {
            poison: true,
            ..Self::default()
        }
    }

    /// Every non-default kernel build next to the default, named, for sweeps (the probe and
    /// the bench time each and record the name beside the timing).
    pub fn candidates() -> Vec<(&'static str, KernelConfig)> {
        let d = KernelConfig::default();
        let with_cache = |c| KernelConfig {
            cuda: CudaConfig {
                softmax_fwd: SoftmaxFwdConfig { register_cache: c },
                ..d.cuda
            },
            ..d
        };
        let with_cols = |c| KernelConfig {
            cuda: CudaConfig {
                rms_norm_bwd: RmsNormBwdConfig { dw_columns: c },
                ..d.cuda
            },
            ..d
        };
        let with_hpt = |n| KernelConfig {
            cuda: CudaConfig {
                rope: RopeKernelConfig {
                    heads_per_thread: HeadsPerThread::Fixed(n),
                    ..d.cuda.rope
                },
                ..d.cuda
            },
            ..d
        };
        let with_occ = |o| KernelConfig {
            cuda: CudaConfig {
                rope: RopeKernelConfig {
                    occupancy: o,
                    ..d.cuda.rope
                },
                ..d.cuda
            },
            ..d
        };
        let with_skinny = |n| KernelConfig {
            cpu: CpuConfig {
                skinny_gemm_max: n,
                ..d.cpu
            },
            ..d
        };
        vec![
            ("default", d),
            ("skinny-off", with_skinny(0)),
            ("skinny-16", with_skinny(16)),
            ("skinny-64", with_skinny(64)),
            ("softmax-cache-on", with_cache(RegisterCache::On)),
            ("softmax-cache-off", with_cache(RegisterCache::Off)),
            ("rms-bwd-cols16", with_cols(DwColumns::C16)),
            ("rms-bwd-cols32", with_cols(DwColumns::C32)),
            ("rope-hpt2", with_hpt(2)),
            ("rope-hpt4", with_hpt(4)),
            ("rope-hpt8", with_hpt(8)),
            ("rope-hpt16", with_hpt(16)),
            ("rope-unbounded", with_occ(RopeOccupancy::Unbounded)),
            ("rope-ctas4", with_occ(RopeOccupancy::Ctas4)),
        ]
    }
}

/// The fused ops with an explicit [`KernelConfig`]. Every op of [`crate::ops`] is a method
/// here with the same arguments; the free functions are `Kernels::default().<op>(..)`.
///
/// ```
/// use candle_fused::{KernelConfig, Kernels};
/// let k = Kernels::new(KernelConfig::poisoned());
/// let x = candle_core::Tensor::randn(0f32, 1., (4, 64), &candle_core::Device::Cpu)?;
/// let y = k.softmax_last_dim(&x)?;
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Kernels {
    /// The configuration every kernel launched through this handle uses.
    pub config: KernelConfig,
}

impl Kernels {
    /// A handle with `config`.
    pub fn new(config: KernelConfig) -> Self {
        Self { config }
    }
}
