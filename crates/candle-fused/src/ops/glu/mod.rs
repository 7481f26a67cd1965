//! Gated linear units of the transformer MLP: `y = act(gate) ⊙ up`, with
//! [`GluKind::SwiGlu`] (`act = silu`, Llama/Qwen2/Mistral) or [`GluKind::GeGluTanh`]
//! (`act = gelu_tanh`, Gemma's `gelu_pytorch_tanh`). Two tensors of the same shape, or the
//! packed `[.., 2I]` gate_up projection output (first half gate, second half up).
//!
//! Both activations are `act(g) = g·σ(z(g))` with `σ` the logistic function:
//! silu `z = g`; gelu_tanh `z = 2k(g + c·g³)`, `k = sqrt(2/π)`, `c = 0.044715` (since
//! `(1 + tanh(u))/2 = σ(2u)`). With `s = σ(z)`:
//! `act'(g) = s + g·s·(1 − s)·z'(g)`, `z' = 1` (silu) or `2k(1 + 3c·g²)`, and the backward is
//! `dgate = dy ⊙ up ⊙ act'(gate)`, `dup = dy ⊙ act(gate)`. `σ` and `1 − σ` are both formed
//! from `e^{−|z|}` (no cancellation, no overflow).
//!
//! Kernels: [`GluFwd`] `(gate, up?) -> y` and [`GluBwd`] `(gate, up?, dy) -> (dgate, dup)`;
//! `up` is absent in the packed layout, whose backward writes `[dgate | dup]` row by row into
//! one `[.., 2I]` buffer (the gradient of `gate_up`, no concatenation). Math in f32 (f64 for
//! f64), one pass over memory.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{Result, Shape, Tensor, D};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, Kernel};
use crate::validate::{self, fail};

/// The activation of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GluKind {
    /// `silu(gate) ⊙ up`.
    SwiGlu,
    /// `gelu_tanh(gate) ⊙ up` (the tanh approximation of GELU).
    GeGluTanh,
}

/// Forward kernel: `(gate, up)` or `(gate_up, None)` when `packed`; output `y`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GluFwd {
    pub name: &'static str,
    pub kind: GluKind,
    pub packed: bool,
}

/// Backward kernel: `(gate, up, dy)` or `(gate_up, None, dy)`; outputs `(dgate, dup)`, or
/// `d gate_up` when `packed`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GluBwd {
    pub name: &'static str,
    pub kind: GluKind,
    pub packed: bool,
}

impl Kernel for GluFwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        if self.packed {
            &["gate_up"]
        } else {
            &["gate", "up"]
        }
    }
    crate::seam::backends!(plain cpu::forward, cuda::forward);
}

impl Kernel for GluBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        if self.packed {
            &["gate_up", "up", "dy"]
        } else {
            &["gate", "up", "dy"]
        }
    }
    crate::seam::backends!(plain cpu::backward, cuda::backward);
}

/// `gate` and `up`: rank >= 1, float, the same shape, dtype and device.
fn check_pair(op: &str, gate: &Tensor, up: &Tensor) -> Result<()> {
    validate::rank_ge1(op, "gate", gate)?;
    validate::float_dtype(op, "gate", gate)?;
    if up.dtype() != gate.dtype() {
        fail!(
            op,
            "up has dtype {:?}, expected {:?} (the dtype of gate)",
            up.dtype(),
            gate.dtype()
        )
    }
    if !up.device().same_device(gate.device()) {
        fail!(
            op,
            "up is on device {:?}, expected {:?} (the device of gate)",
            up.device().location(),
            gate.device().location()
        )
    }
    validate::shape_eq(op, "up", up, gate.dims(), "the shape of gate")
}

/// `gate_up`: rank >= 1, float, an even last dim; returns the shape of `y` (`[.., I]`).
fn check_packed(op: &str, gate_up: &Tensor) -> Result<Shape> {
    validate::rank_ge1(op, "gate_up", gate_up)?;
    validate::float_dtype(op, "gate_up", gate_up)?;
    let n = gate_up.dim(D::Minus1)?;
    if n % 2 != 0 {
        fail!(
            op,
            "gate_up has shape {:?}: its last dim must be even (2·I: gate then up)",
            gate_up.dims()
        )
    }
    let mut dims = gate_up.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n / 2;
    Ok(dims.into())
}

/// `dy` against the forward's output shape and the dtype/device of `like`.
fn check_dy(op: &str, dy: &Tensor, like: &Tensor, y_shape: &Shape) -> Result<()> {
    if dy.dtype() != like.dtype() {
        fail!(
            op,
            "dy has dtype {:?}, expected {:?}",
            dy.dtype(),
            like.dtype()
        )
    }
    if !dy.device().same_device(like.device()) {
        fail!(
            op,
            "dy is on device {:?}, expected {:?}",
            dy.device().location(),
            like.device().location()
        )
    }
    validate::shape_eq(op, "dy", dy, y_shape.dims(), "the shape of the output")
}

/// The backward kernel on two tensors: `(dgate, dup)`.
fn backward_pair(
    cfg: &KernelConfig,
    name: &'static str,
    kind: GluKind,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let k = GluBwd {
        name,
        kind,
        packed: false,
    };
    let mut out = seam::run(&k, cfg, &[Some(gate), Some(up), Some(dy)])?.into_iter();
    match (out.next(), out.next()) {
        (Some(dg), Some(du)) => Ok((
            seam::tensor(dg, gate.shape().clone()),
            seam::tensor(du, gate.shape().clone()),
        )),
        _ => fail!(name, "internal: the backward did not return dgate and dup"),
    }
}

/// The backward kernel on the packed layout: `d gate_up`.
fn backward_packed(
    cfg: &KernelConfig,
    name: &'static str,
    kind: GluKind,
    gate_up: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    let k = GluBwd {
        name,
        kind,
        packed: true,
    };
    seam::run1(
        &k,
        cfg,
        &[Some(gate_up), None, Some(dy)],
        gate_up.shape().clone(),
    )
}

impl Kernels {
    /// [`glu`] with this handle's configuration.
    pub fn glu(&self, kind: GluKind, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        const OP: &str = "glu";
        check_pair(OP, gate, up)?;
        if gate.elem_count() == 0 {
            return gate.zeros_like();
        }
        let cfg = self.config;
        let k = GluFwd {
            name: OP,
            kind,
            packed: false,
        };
        let y = seam::run(&k, &cfg, &[Some(gate), Some(up)])?.remove(0);
        let (g, u) = (gate.detach(), up.detach());
        seam::attach(OP, y, gate.shape().clone(), &[gate, up], move |_, dy| {
            let (dg, du) = backward_pair(&cfg, OP, kind, &g, &u, dy)?;
            Ok(vec![Some(dg), Some(du)])
        })
    }

    /// [`glu_packed`] with this handle's configuration.
    pub fn glu_packed(&self, kind: GluKind, gate_up: &Tensor) -> Result<Tensor> {
        const OP: &str = "glu_packed";
        let shape = check_packed(OP, gate_up)?;
        if gate_up.elem_count() == 0 {
            return Tensor::zeros(shape, gate_up.dtype(), gate_up.device());
        }
        let cfg = self.config;
        let k = GluFwd {
            name: OP,
            kind,
            packed: true,
        };
        let y = seam::run(&k, &cfg, &[Some(gate_up)])?.remove(0);
        let gu = gate_up.detach();
        seam::attach(OP, y, shape, &[gate_up], move |_, dy| {
            Ok(vec![Some(backward_packed(&cfg, OP, kind, &gu, dy)?)])
        })
    }

    /// [`swiglu`] with this handle's configuration.
    pub fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.glu(GluKind::SwiGlu, gate, up)
    }

    /// [`glu_backward`] with this handle's configuration.
    pub fn glu_backward(
        &self,
        kind: GluKind,
        gate: &Tensor,
        up: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "glu_backward";
        check_pair(OP, gate, up)?;
        check_dy(OP, dy, gate, gate.shape())?;
        if gate.elem_count() == 0 {
            return Ok((gate.zeros_like()?, up.zeros_like()?));
        }
        backward_pair(&self.config, OP, kind, gate, up, dy)
    }

    /// [`glu_packed_backward`] with this handle's configuration.
    pub fn glu_packed_backward(
        &self,
        kind: GluKind,
        gate_up: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "glu_packed_backward";
        let shape = check_packed(OP, gate_up)?;
        check_dy(OP, dy, gate_up, &shape)?;
        if gate_up.elem_count() == 0 {
            return gate_up.zeros_like();
        }
        backward_packed(&self.config, OP, kind, gate_up, dy)
    }
}

/// `act(gate) ⊙ up` (`gate` and `up` of the same shape), differentiable in both.
pub fn glu(kind: GluKind, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Kernels::default().glu(kind, gate, up)
}

/// The packed layout: `gate_up [.., 2I]` (first half gate, second half up) to `[.., I]`,
/// differentiable in `gate_up` (its gradient is one `[.., 2I]` buffer).
pub fn glu_packed(kind: GluKind, gate_up: &Tensor) -> Result<Tensor> {
    Kernels::default().glu_packed(kind, gate_up)
}

/// `silu(gate) ⊙ up` (= [`glu`] with [`GluKind::SwiGlu`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Kernels::default().swiglu(gate, up)
}

/// The GLU backward on its own: from `gate`, `up` and the output gradient `dy`, returns
/// `(dgate, dup)`. The same kernel the autograd closure of [`glu`] runs.
pub fn glu_backward(
    kind: GluKind,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    Kernels::default().glu_backward(kind, gate, up, dy)
}

/// The packed GLU backward on its own: `d gate_up` (`[.., 2I]`: `dgate` then `dup` per row).
pub fn glu_packed_backward(kind: GluKind, gate_up: &Tensor, dy: &Tensor) -> Result<Tensor> {
    Kernels::default().glu_packed_backward(kind, gate_up, dy)
}
