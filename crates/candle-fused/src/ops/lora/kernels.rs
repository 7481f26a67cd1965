//! The LoRA kernels as plain data (sizes, scale, which inputs are present, which gradients are
//! needed), the GEMM operand both backends describe their products with, and the padding of
//! the low-rank operands. No tensors and no backend code: `cpu.rs` and `cuda.rs` read these,
//! `mod.rs` connects them to the seam.

/// The sizes of one call. `r = 0`: no adapter (a plain linear, e.g. merged weights); `bias`
/// adds the ones/bias column; `base`: whether `W` is present (the dropout path runs the
/// adapter branch alone on the dropped-out input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub bias: bool,
    pub base: bool,
}

/// Padding unit (elements) of the low-rank operands: 8 elements are 16 bytes in f16/bf16 (and
/// 32/64 in f32/f64), so every row of `u_ext`/`B_ext` is aligned for cuBLAS's vectorised
/// kernels.
const PAD: usize = 8;

impl Dims {
    /// Columns of `u_ext` / `B_ext`: `r`, one for the bias, zeros up to a multiple of [`PAD`]
    /// (0 when there is neither an adapter nor a bias).
    pub fn kk(&self) -> usize {
        (self.r + usize::from(self.bias)).next_multiple_of(PAD)
    }
}

/// Which gradients the backward computes (decided in the forward from `track_op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Need {
    pub dx: bool,
    pub dw: bool,
    pub da: bool,
    pub db: bool,
    pub dbias: bool,
}

impl Need {
    /// `g = s·dy·B` is formed (for `dx` and `dA`).
    pub fn g(&self, d: &Dims) -> bool {
        d.r > 0 && (self.dx || self.da)
    }
    /// `dB_ext = dyᵀ·u_ext` is formed (for `dB` and `dbias`).
    pub fn db_ext(&self, d: &Dims) -> bool {
        d.kk() > 0 && (self.db || self.dbias)
    }
}

/// A row-major GEMM operand as both backends describe it: the logical matrix's element
/// `(i, j)` is stored at `ptr + i·ld + j`, or at `ptr + j·ld + i` when `t` (the operand is the
/// transpose of the stored rows). `P` is a host pointer (CPU) or a device address (CUDA).
#[derive(Clone, Copy)]
pub(crate) struct Mat<P> {
    pub ptr: P,
    pub ld: usize,
    pub t: bool,
}

impl<P> Mat<P> {
    /// Rows of length `ld` as stored.
    pub fn rows(ptr: P, ld: usize) -> Self {
        Self { ptr, ld, t: false }
    }
    /// The transpose of [`Mat::rows`].
    pub fn t(ptr: P, ld: usize) -> Self {
        Self { ptr, ld, t: true }
    }
}

/// Forward kernel: inputs `(x [M, K], w? [N, K], a? [r, K], b? [N, r], bias? [N])`, outputs
/// `y [M, N]` and, when `kk > 0`, `u_ext [M, kk]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraFwd {
    pub dims: Dims,
    pub scale: f64,
    pub name: &'static str,
}

/// `u_ext = [s·x·Aᵀ | 1 | 0..]` alone: inputs `(x, a)`, output `u_ext [M, kk]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraDown {
    pub dims: Dims,
    pub scale: f64,
    pub name: &'static str,
}

/// Backward kernel: inputs `(dy [M, N], x?, w?, a?, b?, u_ext?)` (each present when a needed
/// gradient uses it), outputs the gradients `need` asks for, in the order
/// `dx [M, K], dw [N, K], da [r, K], db [N, r], dbias [N]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraBwd {
    pub dims: Dims,
    pub scale: f64,
    pub need: Need,
    pub name: &'static str,
}
