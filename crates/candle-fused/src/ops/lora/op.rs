//! The Candle custom ops behind [`super::lora_linear`]: sizes, which gradients to compute, the
//! down-projection, the forward and the backward ops, and their backend dispatch.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;

/// The sizes of one call. `r` may be 0 internally (base linear only, e.g. merged weights);
/// `bias` adds the ones/bias column; `base` says whether `W` is present (the dropout path runs
/// the adapter branch alone on the dropped-out input).
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
/// 32/64 in f32/f64), so every row of `u_ext`/`B_ext` and the start of `B_ext` are aligned for
/// cuBLAS's vectorised kernels.
pub(crate) const PAD: usize = 8;

impl Dims {
    /// Columns of `u_ext` / `B_ext`: `r`, one for the bias, zeros up to a multiple of [`PAD`].
    pub fn kk(&self) -> usize {
        (self.r + usize::from(self.bias)).next_multiple_of(PAD)
    }

    /// Elements of the packed `A` part (`r·K` padded with zeros to a multiple of [`PAD`]).
    pub fn a_len(&self) -> usize {
        (self.r * self.k).next_multiple_of(PAD)
    }

    /// Elements of the packed adapter `[A (a_len) | B_ext (N·kk)]`.
    pub fn adapter_len(&self) -> usize {
        self.a_len() + self.n * self.kk()
    }
}

/// Which gradients the backward computes (decided in the forward from `track_op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Need {
    pub dx: bool,
    pub dw: bool,
    pub da: bool,
    pub db: bool,
}

impl Need {
    fn adapter(&self) -> bool {
        self.da || self.db
    }

    /// Elements of the backward's packed output `[dx | dW | dA | dB_ext]`.
    pub fn out_len(&self, d: &Dims) -> usize {
        usize::from(self.dx) * d.m * d.k
            + usize::from(self.dw) * d.n * d.k
            + usize::from(self.adapter()) * d.adapter_len()
    }
}

/// `u_ext = [s·x·Aᵀ | 1]` (`M × kk`): `(x, A) -> u_ext`, no gradient.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoraDown {
    pub dims: Dims,
    pub scale: f64,
}

/// The forward op: `(x, W, adapter)` (CustomOp3), or `(x, adapter)` without `W`, or `(x, W)`
/// when there is neither adapter nor bias (CustomOp2; `dims.base` tells which).
#[derive(Debug, Clone)]
pub(crate) struct LoraFwd {
    pub dims: Dims,
    pub scale: f64,
    pub need: Need,
    /// `u_ext`, when `kk > 0`.
    pub u: Option<Tensor>,
}

/// The backward op: `(dy, x, W)` (CustomOp3) or `(dy, x)` (CustomOp2, no base weight),
/// returning the flat `[dx | dW | dA | dB_ext]` of the parts in `need`.
#[derive(Debug, Clone)]
pub(crate) struct LoraBwd {
    pub dims: Dims,
    pub scale: f64,
    pub need: Need,
    pub adapter: Option<Tensor>,
    pub u: Option<Tensor>,
}

impl CustomOp2 for LoraDown {
    fn name(&self) -> &'static str {
        "candle-fused-lora-down"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::down(&self.dims, self.scale, (xs, xl), (a_s, al))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::down(&self.dims, self.scale, (xs, xl), (a_s, al))
    }
}

impl LoraFwd {
    /// `(dx, dW, d_adapter)` as the need flags ask, from one no-grad [`LoraBwd`] launch (the
    /// autograd backward, and [`super::lora_linear_backward`]).
    pub(super) fn backward(
        &self,
        x: &Tensor,
        w: Option<&Tensor>,
        adapter: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let need = self.need;
        if need.out_len(&d) == 0 {
            return Ok((None, None, None));
        }
        let bwd = LoraBwd {
            dims: d,
            scale: self.scale,
            need,
            adapter: adapter.cloned(),
            u: self.u.clone(),
        };
        let dy = dy.contiguous()?;
        let flat = match w {
            Some(w) => dy.apply_op3_no_bwd(x, w, &bwd)?,
            None => dy.apply_op2_no_bwd(x, &bwd)?,
        };
        let mut off = 0;
        let mut take = |on: bool, len: usize, dims: &[usize]| -> Result<Option<Tensor>> {
            if !on {
                return Ok(None);
            }
            let t = flat.narrow(0, off, len)?.reshape(dims)?;
            off += len;
            Ok(Some(t))
        };
        let dx = take(need.dx, d.m * d.k, &[d.m, d.k])?;
        let dw = take(need.dw, d.n * d.k, &[d.n, d.k])?;
        let da = take(need.adapter(), d.adapter_len(), &[d.adapter_len()])?;
        Ok((dx, dw, da))
    }
}

/// `(x, W, adapter)`.
impl CustomOp3 for LoraFwd {
    fn name(&self) -> &'static str {
        "candle-fused-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ads: &CpuStorage,
        adl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::forward(self, (xs, xl), Some((ws, wl)), Some((ads, adl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        ads: &candle_core::CudaStorage,
        adl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, (xs, xl), Some((ws, wl)), Some((ads, adl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        adapter: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, Some(w), Some(adapter), dy)
    }
}

/// `(x, adapter)` when `!dims.base`, `(x, W)` when `dims.base` (no adapter, no bias).
impl CustomOp2 for LoraFwd {
    fn name(&self) -> &'static str {
        "candle-fused-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.dims.base {
            cpu::forward(self, (xs, xl), Some((s2, l2)), None)
        } else {
            cpu::forward(self, (xs, xl), None, Some((s2, l2)))
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.dims.base {
            cuda::forward(self, (xs, xl), Some((s2, l2)), None)
        } else {
            cuda::forward(self, (xs, xl), None, Some((s2, l2)))
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        t2: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.dims.base {
            let (dx, dw, _) = self.backward(x, Some(t2), None, dy)?;
            Ok((dx, dw))
        } else {
            let (dx, _, da) = self.backward(x, None, Some(t2), dy)?;
            Ok((dx, da))
        }
    }
}

/// `(dy, x, W)`.
impl CustomOp3 for LoraBwd {
    fn name(&self) -> &'static str {
        "candle-fused-lora-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::backward(self, (gs, gl), (xs, xl), Some((ws, wl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self, (gs, gl), (xs, xl), Some((ws, wl)))
    }
}

/// `(dy, x)`, no base weight.
impl CustomOp2 for LoraBwd {
    fn name(&self) -> &'static str {
        "candle-fused-lora-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::backward(self, (gs, gl), (xs, xl), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self, (gs, gl), (xs, xl), None)
    }
}
