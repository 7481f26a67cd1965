//! Rotary position embedding on q/k of shape `[B, H, T, D]` ([`RopeLayout::Bhtd`]) or
//! `[B, T, H, D]` ([`RopeLayout::Bthd`]), with per-token positions (`[T]` shared by the batch,
//! or `[B, T]`: packed sequences restart at 0, a KV cache continues at an offset).
//!
//! For token `t` of sequence `b` at position `p = positions[b, t]` and the table of
//! [`RopeTable`] (`c_i = a·cos(p·f_i)`, `s_i = a·sin(p·f_i)`, `i < R/2`, `R` = rotary dim),
//! each head vector `x` (length `D`) is rotated pairwise, its last `D − R` entries passing
//! through unchanged:
//!
//! - [`RopeStyle::HalfSplit`] (rotate_half: Llama, Qwen2, Mistral), pairs `(i, i + R/2)`:
//!   `y_i = x_i c_i − x_{i+R/2} s_i`, `y_{i+R/2} = x_{i+R/2} c_i + x_i s_i`;
//! - [`RopeStyle::Interleaved`] (GPT-J, Candle's `rope_i`), pairs `(2i, 2i + 1)`:
//!   `y_{2i} = x_{2i} c_i − x_{2i+1} s_i`, `y_{2i+1} = x_{2i+1} c_i + x_{2i} s_i`.
//!
//! The map is `y = a·R(θ)·x` with `R(θ)` orthogonal, so the backward is the rotation by `−θ`
//! with the same table: `dx = a·R(−θ)·dy` (`s_i` negated); the pass-through part gets `dy`.
//! cos/sin are constants (no gradient). Rotating by `θ` then by `−θ` gives `a²·x` (`x` for
//! every kind but YaRN, whose `a` is its attention factor).
//!
//! One kernel, [`Rope`], serves both directions: inputs `(x, cos, sin, positions)`, output of
//! `x`'s shape (contiguous). `x` is read through its strides when its last dim is contiguous,
//! so `rope(q.transpose(1, 2), .., Bhtd, ..)` on the `[B, T, H, D]` projection output writes
//! contiguous `[B, H, T, D]` in one pass (no copy first). Math in f32 (f64 for f64); the table
//! is f32 in every case. Positions are checked against the table (a position `>= max_positions`
//! or negative is an error): on the CPU inside the kernel; on a GPU by a min/max reduction read
//! back once per positions tensor (a sync), and the kernel writes NaN for any row whose position
//! is out of range anyway (never an out-of-bounds read).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod table;

pub use table::{RopeConfig, RopeScaling, RopeTable};

use candle_core::{DType, Layout, Result, Tensor};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, Kernel};
use crate::validate::{self, fail};

/// Which entries form the rotated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// `(i, i + R/2)`: transformers' `rotate_half` (Llama, Qwen2, Mistral).
    HalfSplit,
    /// `(2i, 2i + 1)` (GPT-J, Candle's `rope_i`).
    Interleaved,
}

/// The order of the dims of q/k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// `[B, H, T, D]`.
    Bhtd,
    /// `[B, T, H, D]` (the projection output before the transpose).
    Bthd,
}

/// The kernel: rotation by `+θ` (`inverse = false`, the forward) or `−θ` (the backward).
/// `strided_x`: input 0 is read through its strides (its last dim is contiguous).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rope {
    pub name: &'static str,
    pub layout: RopeLayout,
    pub style: RopeStyle,
    pub rotary_dim: usize,
    pub inverse: bool,
    pub strided_x: bool,
}

impl Kernel for Rope {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "cos", "sin", "positions"]
    }
    fn strided(&self, i: usize) -> bool {
        i == 0 && self.strided_x
    }
    crate::seam::backends!(plain cpu::run, cuda::run);
}

/// Where the kernels find things, from the layout of `x` (rank 4, last dim contiguous).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub d: usize,
    pub rot: usize,
    /// Element strides of `x` over (b, h, t), and its start offset.
    pub sb: usize,
    pub sh: usize,
    pub st: usize,
    pub off: usize,
    /// Stride of the positions over b: 0 for `[T]`, `T` for `[B, T]`.
    pub pos_b: usize,
    /// Rows of the table.
    pub n_pos: usize,
}

impl Geom {
    pub fn new(k: &Rope, xl: &Layout, pl: &Layout, cl: &Layout) -> Result<Self> {
        let (dims, st) = (xl.dims(), xl.stride());
        if dims.len() != 4 || st[3] != 1 {
            fail!(
                k.name,
                "internal: x must be rank 4 with a contiguous last dim (dims {dims:?}, strides {st:?})"
            )
        }
        let (d0, d1, d2, d) = (dims[0], dims[1], dims[2], dims[3]);
        let (b, h, t, sb, sh, stt) = match k.layout {
            RopeLayout::Bhtd => (d0, d1, d2, st[0], st[1], st[2]),
            RopeLayout::Bthd => (d0, d2, d1, st[0], st[2], st[1]),
        };
        Ok(Self {
            b,
            h,
            t,
            d,
            rot: k.rotary_dim,
            sb,
            sh,
            st: stt,
            off: xl.start_offset(),
            pos_b: if pl.dims().len() == 2 { t } else { 0 },
            n_pos: cl.dims()[0],
        })
    }

    /// Strides of the contiguous output over (b, h, t).
    #[cfg(feature = "cuda")]
    pub fn out_strides(&self, layout: RopeLayout) -> (usize, usize, usize) {
        let (h, t, d) = (self.h, self.t, self.d);
        match layout {
            RopeLayout::Bhtd => (h * t * d, t * d, d),
            RopeLayout::Bthd => (t * h * d, d, h * d),
        }
    }

    /// Rows (head vectors) of the output.
    pub fn rows(&self) -> usize {
        self.b * self.h * self.t
    }

    /// One past the largest element of `x` read.
    pub fn x_extent(&self) -> usize {
        if self.rows() == 0 {
            return self.off;
        }
        self.off + (self.b - 1) * self.sb + (self.h - 1) * self.sh + (self.t - 1) * self.st + self.d
    }
}

impl Rope {
    /// The kernel for `x` (read through its strides when its last dim is contiguous).
    fn of(
        name: &'static str,
        x: &Tensor,
        table: &RopeTable,
        layout: RopeLayout,
        style: RopeStyle,
        inverse: bool,
    ) -> Self {
        Self {
            name,
            layout,
            style,
            rotary_dim: table.config().rotary_dim,
            inverse,
            strided_x: x.stride()[3] == 1,
        }
    }

    /// Runs the kernel on `x` (non-contiguous last dims are copied first by the seam).
    fn run(
        &self,
        cfg: &KernelConfig,
        x: &Tensor,
        table: &RopeTable,
        positions: &Tensor,
    ) -> Result<candle_core::Storage> {
        let ins = [
            Some(x),
            Some(table.cos()),
            Some(table.sin()),
            Some(positions),
        ];
        let mut out = seam::run(self, cfg, &ins)?;
        if out.len() != 1 {
            fail!(
                self.name,
                "internal: the kernel returned {} outputs",
                out.len()
            )
        }
        Ok(out.remove(0))
    }
}

/// The arguments' checks (named `arg` in messages: `x` or `dy`): rank 4 float, the table's
/// head dim and device, positions of dtype u32/i64 and shape `[T]` or `[B, T]`; on a GPU
/// also the positions' range.
fn check(
    op: &str,
    arg: &str,
    x: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    layout: RopeLayout,
) -> Result<()> {
    validate::float_dtype(op, arg, x)?;
    let Ok((d0, d1, d2, d)) = x.dims4() else {
        fail!(
            op,
            "{arg} must have rank 4 ({layout:?}: {}), got shape {:?}",
            match layout {
                RopeLayout::Bhtd => "[B, H, T, D]",
                RopeLayout::Bthd => "[B, T, H, D]",
            },
            x.dims()
        )
    };
    let (b, t) = match layout {
        RopeLayout::Bhtd => (d0, d2),
        RopeLayout::Bthd => (d0, d1),
    };
    let c = table.config();
    if d != c.head_dim {
        fail!(
            op,
            "{arg} has head dim {d} (last dim of {:?}), expected {} (the table's head_dim)",
            x.dims(),
            c.head_dim
        )
    }
    if !table.cos().device().same_device(x.device()) {
        fail!(
            op,
            "the table is on device {:?}, expected {:?} (the device of {arg}); see RopeTable::to_device",
            table.cos().device().location(),
            x.device().location()
        )
    }
    match positions.dtype() {
        DType::U32 | DType::I64 => {}
        other => fail!(op, "positions has dtype {other:?}, expected u32 or i64"),
    }
    match positions.dims() {
        [n] if *n == t => {}
        [pb, n] if *pb == b && *n == t => {}
        other => fail!(
            op,
            "positions has shape {other:?}, expected [{t}] (shared by the batch) or [{b}, {t}] \
             (B and T of {arg} {:?}, {layout:?})",
            x.dims()
        ),
    }
    if !positions.device().same_device(x.device()) {
        fail!(
            op,
            "positions is on device {:?}, expected {:?} (the device of {arg})",
            positions.device().location(),
            x.device().location()
        )
    }
    if !x.device().is_cpu() && positions.elem_count() > 0 {
        check_range_on_device(op, table, positions)?;
    }
    Ok(())
}

/// The positions' min and max against the table, on the device (one read-back: a sync),
/// skipped when this positions tensor is among the last [`table::CHECKED_IDS`] checked against
/// this table (tensor ids are never reused).
fn check_range_on_device(op: &str, table: &RopeTable, positions: &Tensor) -> Result<()> {
    let mut seen = table.checked.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(&positions.id()) {
        return Ok(());
    }
    let p = positions.flatten_all()?;
    let ends = Tensor::stack(&[p.min(0)?, p.max(0)?], 0)?.to_dtype(DType::I64)?;
    let v = ends.to_vec1::<i64>()?;
    let n = table.config().max_positions as i64;
    if v[0] < 0 {
        fail!(op, "positions hold a negative value ({})", v[0])
    }
    if v[1] >= n {
        fail!(
            op,
            "positions hold {} but the table has positions 0..={} (max_positions {n}); build a \
             larger RopeTable",
            v[1],
            n - 1
        )
    }
    if seen.len() == table::CHECKED_IDS {
        seen.pop_front();
    }
    seen.push_back(positions.id());
    Ok(())
}

impl Kernels {
    /// [`rope`] with this handle's configuration.
    pub fn rope(
        &self,
        x: &Tensor,
        table: &RopeTable,
        positions: &Tensor,
        layout: RopeLayout,
        style: RopeStyle,
    ) -> Result<Tensor> {
        const OP: &str = "rope";
        check(OP, "x", x, table, positions, layout)?;
        if x.elem_count() == 0 {
            return Tensor::zeros(x.shape(), x.dtype(), x.device());
        }
        let cfg = self.config;
        let y = Rope::of(OP, x, table, layout, style, false).run(&cfg, x, table, positions)?;
        let (tab, pos) = (table.clone(), positions.clone());
        seam::attach(OP, y, x.shape().clone(), &[x], move |_, dy| {
            let k = Rope::of(OP, dy, &tab, layout, style, true);
            Ok(vec![Some(seam::tensor(
                k.run(&cfg, dy, &tab, &pos)?,
                dy.shape().clone(),
            ))])
        })
    }

    /// [`rope_backward`] with this handle's configuration.
    pub fn rope_backward(
        &self,
        dy: &Tensor,
        table: &RopeTable,
        positions: &Tensor,
        layout: RopeLayout,
        style: RopeStyle,
    ) -> Result<Tensor> {
        const OP: &str = "rope_backward";
        check(OP, "dy", dy, table, positions, layout)?;
        if dy.elem_count() == 0 {
            return Tensor::zeros(dy.shape(), dy.dtype(), dy.device());
        }
        let k = Rope::of(OP, dy, table, layout, style, true);
        Ok(seam::tensor(
            k.run(&self.config, dy, table, positions)?,
            dy.shape().clone(),
        ))
    }
}

/// RoPE on `x` (`[B, H, T, D]` or `[B, T, H, D]` per `layout`) at `positions` (u32 or i64,
/// `[T]` or `[B, T]`), differentiable in `x`. Returns `x`'s shape and dtype (contiguous).
pub fn rope(
    x: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> Result<Tensor> {
    Kernels::default().rope(x, table, positions, layout, style)
}

/// The RoPE backward on its own: `dx = a·R(−θ)·dy` (the rotation by the negated angles; the
/// pass-through dims copy `dy`). The same kernel the autograd closure of [`rope`] runs.
pub fn rope_backward(
    dy: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    layout: RopeLayout,
    style: RopeStyle,
) -> Result<Tensor> {
    Kernels::default().rope_backward(dy, table, positions, layout, style)
}
