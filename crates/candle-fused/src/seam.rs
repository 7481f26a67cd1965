//! The one seam every op goes through, forward and backward.
//!
//! An op is a set of **kernels**: plain structs of scalars (sizes, flags, eps, scale) that
//! implement [`Kernel`]. A backend receives the kernel, the [`KernelConfig`] and the op's input
//! storages with their layouts ([`Inputs`]) and returns its output storages; it never sees a
//! `Tensor`. Three functions connect kernels to Candle:
//!
//! - [`run`] executes a kernel on tensors **outside autograd** (any number of inputs and
//!   outputs, inputs made contiguous first) and returns the raw output storages;
//! - [`tensor`] wraps a storage as a plain tensor (no gradient);
//! - [`attach`] wraps a storage as an **autograd node**: gradients flow to the given parents
//!   through a backward closure (usually: [`run`] of the op's backward kernel).
//!
//! So an op's public function validates its arguments, `run`s its forward kernel, and
//! `attach`es each output that can carry a gradient; the op's standalone backward (for
//! explicit training loops) is the same function the closure calls. Multi-output forwards are
//! one kernel run whose outputs are attached as separate nodes (Candle sums the gradients that
//! reach a parent through several of them).
//!
//! Candle's custom ops take at most three inputs; [`attach`] handles more tracked parents by
//! packing all but the two largest into one flat, differentiable `cat` (small tensors such as
//! LoRA's `A`, `B` and bias), so no op has to work around the limit itself.

use std::sync::{Arc, Mutex};

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage};
use candle_core::{Device, Tensor};

use crate::config::KernelConfig;
use crate::validate::{err, fail};

mod inplace;
pub(crate) use inplace::{run_inplace, InplaceKernel};

/// One input of a kernel: its storage and layout, `None` when an optional input is absent.
pub(crate) type In<'a, S> = Option<(&'a S, &'a Layout)>;

/// The inputs a backend receives, in the kernel's order ([`Kernel::inputs`] names them).
pub(crate) struct Inputs<'a, S> {
    op: &'static str,
    names: &'static [&'static str],
    items: Vec<In<'a, S>>,
}

impl<'a, S> Inputs<'a, S> {
    /// Input `i` (an error naming it when it is absent).
    pub fn get(&self, i: usize) -> Result<(&'a S, &'a Layout)> {
        match self.items.get(i).copied().flatten() {
            Some(v) => Ok(v),
            None => Err(err(
                self.op,
                format!("internal: input {} was not given", self.name(i)),
            )),
        }
    }

    /// Optional input `i`.
    pub fn opt(&self, i: usize) -> In<'a, S> {
        self.items.get(i).copied().flatten()
    }

    /// The name of input `i` (for messages).
    pub fn name(&self, i: usize) -> &'static str {
        self.names.get(i).copied().unwrap_or("input")
    }

    /// The op name of the kernel (for messages).
    pub fn op(&self) -> &'static str {
        self.op
    }
}

/// A kernel: what one launch computes, as plain data. Backends get storages and layouts
/// (contiguous, on one device) and return their outputs in a fixed order.
pub(crate) trait Kernel {
    /// The public op name used in error messages (e.g. `"rms_norm_backward"`).
    fn name(&self) -> &'static str;
    /// The names of the inputs, in order.
    fn inputs(&self) -> &'static [&'static str];
    /// Whether input `i` is passed with its own strides (e.g. a broadcast mask read through
    /// stride 0) instead of being made contiguous first.
    fn strided(&self, _i: usize) -> bool {
        false
    }
    /// The CPU backend.
    fn cpu(&self, cfg: &KernelConfig, ins: &Inputs<CpuStorage>) -> Result<Vec<CpuStorage>>;
    /// The CUDA backend.
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        cfg: &KernelConfig,
        ins: &Inputs<candle_core::CudaStorage>,
    ) -> Result<Vec<candle_core::CudaStorage>>;
}

/// The `cpu` and `cuda` methods of a [`Kernel`] impl: `backends!(cpu::forward, cuda::forward)`
/// runs the backend function `cpu::forward::<T>(self, cfg, ins)` (or the CUDA one) with `T`
/// the element type of input 0 (the CPU's f32, f64, f16, bf16; CUDA's f32, f16, bf16, with the
/// same clear error for any other dtype from every op).
macro_rules! backends {
    ($($cpu:ident)::+, $($cuda:ident)::+) => {
        fn cpu(
            &self,
            cfg: &$crate::config::KernelConfig,
            ins: &$crate::seam::Inputs<candle_core::CpuStorage>,
        ) -> candle_core::Result<Vec<candle_core::CpuStorage>> {
            use candle_core::backend::BackendStorage;
            let (s, _) = ins.get(0)?;
            $crate::cpu::dispatch!(ins.op(), s.dtype(), |T| $($cpu)::+::<T>(self, cfg, ins))
        }
        #[cfg(feature = "cuda")]
        fn cuda(
            &self,
            cfg: &$crate::config::KernelConfig,
            ins: &$crate::seam::Inputs<candle_core::CudaStorage>,
        ) -> candle_core::Result<Vec<candle_core::CudaStorage>> {
            use candle_core::backend::BackendStorage;
            let (s, _) = ins.get(0)?;
            $crate::cuda::dispatch!(ins.op(), s.dtype(), |T| $($cuda)::+::<T>(self, cfg, ins))
        }
    };
    // Backends that dispatch on the dtype themselves: `fn(&Kernel, &KernelConfig, &Inputs)`.
    (plain $($cpu:ident)::+, $($cuda:ident)::+) => {
        fn cpu(
            &self,
            cfg: &$crate::config::KernelConfig,
            ins: &$crate::seam::Inputs<candle_core::CpuStorage>,
        ) -> candle_core::Result<Vec<candle_core::CpuStorage>> {
            $($cpu)::+(self, cfg, ins)
        }
        #[cfg(feature = "cuda")]
        fn cuda(
            &self,
            cfg: &$crate::config::KernelConfig,
            ins: &$crate::seam::Inputs<candle_core::CudaStorage>,
        ) -> candle_core::Result<Vec<candle_core::CudaStorage>> {
            $($cuda)::+(self, cfg, ins)
        }
    };
    // In-place kernels (`seam::inplace::InPlaceKernel`): the destination comes first.
    (in_place $($cpu:ident)::+, $($cuda:ident)::+) => {
        fn cpu(
            &self,
            cfg: &$crate::config::KernelConfig,
            dst: (&mut candle_core::CpuStorage, &candle_core::Layout),
            ins: &$crate::seam::Inputs<candle_core::CpuStorage>,
        ) -> candle_core::Result<Vec<candle_core::CpuStorage>> {
            $($cpu)::+(self, cfg, dst, ins)
        }
        #[cfg(feature = "cuda")]
        fn cuda(
            &self,
            cfg: &$crate::config::KernelConfig,
            dst: (&mut candle_core::CudaStorage, &candle_core::Layout),
            ins: &$crate::seam::Inputs<candle_core::CudaStorage>,
        ) -> candle_core::Result<Vec<candle_core::CudaStorage>> {
            $($cuda)::+(self, cfg, dst, ins)
        }
    };
}
pub(crate) use backends;

/// The error for a device without kernels (Metal, or CUDA without the `cuda` feature).
pub(crate) fn unsupported(op: &str, device: &Device) -> candle_core::Error {
    err(
        op,
        format!(
            "no kernel for device {:?} (built without its feature?)",
            device.location()
        ),
    )
}

/// Runs `k` on `inputs` outside autograd (`None`: an absent optional input). Inputs must share
/// one device (an error names the first that does not); non-contiguous ones are copied first,
/// except those the kernel reads through their strides ([`Kernel::strided`]). Returns the
/// kernel's outputs in order.
pub(crate) fn run<K: Kernel>(
    k: &K,
    cfg: &KernelConfig,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Storage>> {
    let op = k.name();
    let names = k.inputs();
    let Some(first) = inputs.iter().flatten().next() else {
        fail!(op, "internal: a kernel needs at least one input")
    };
    let dev = first.device().clone();
    let mut owned: Vec<Option<Tensor>> = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.iter().enumerate() {
        owned.push(match t {
            Some(t) => {
                if !t.device().same_device(&dev) {
                    fail!(
                        op,
                        "{} is on device {:?}, expected {:?} (the device of {})",
                        names.get(i).copied().unwrap_or("input"),
                        t.device().location(),
                        dev.location(),
                        names.first().copied().unwrap_or("the first input")
                    )
                }
                Some(if k.strided(i) {
                    (*t).clone()
                } else {
                    t.contiguous()?
                })
            }
            None => None,
        });
    }
    let guards: Vec<_> = owned
        .iter()
        .map(|t| t.as_ref().map(|t| t.storage_and_layout()))
        .collect();
    match &dev {
        Device::Cpu => {
            let mut items = Vec::with_capacity(guards.len());
            for g in &guards {
                items.push(match g {
                    Some((s, l)) => match &**s {
                        Storage::Cpu(c) => Some((c, *l)),
                        _ => fail!(op, "internal: a storage is not on the CPU"),
                    },
                    None => None,
                });
            }
            let ins = Inputs { op, names, items };
            Ok(k.cpu(cfg, &ins)?.into_iter().map(Storage::Cpu).collect())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let mut items = Vec::with_capacity(guards.len());
            for g in &guards {
                items.push(match g {
                    Some((s, l)) => match &**s {
                        Storage::Cuda(c) => Some((c, *l)),
                        _ => fail!(op, "internal: a storage is not on the CUDA device"),
                    },
                    None => None,
                });
            }
            let ins = Inputs { op, names, items };
            Ok(k.cuda(cfg, &ins)?.into_iter().map(Storage::Cuda).collect())
        }
        other => Err(unsupported(op, other)),
    }
}

/// [`run`] for a kernel with one output, wrapped as a plain tensor of `shape`.
pub(crate) fn run1<K: Kernel>(
    k: &K,
    cfg: &KernelConfig,
    inputs: &[Option<&Tensor>],
    shape: impl Into<Shape>,
) -> Result<Tensor> {
    let mut out = run(k, cfg, inputs)?;
    if out.len() != 1 {
        fail!(
            k.name(),
            "internal: the kernel returned {} outputs, expected 1",
            out.len()
        )
    }
    Ok(tensor(out.remove(0), shape))
}

/// A fresh contiguous tensor over `storage`, outside the autograd graph.
pub(crate) fn tensor(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The gradients a backward closure returns: one per parent, in the parents' order (`None`:
/// no gradient for that parent).
pub(crate) type Grads = Vec<Option<Tensor>>;

type Backward = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Grads> + Send + Sync>;

/// `storage` (of `shape`) as an autograd node named `name`: `backward(out, grad)` maps the
/// gradient `grad` of this output `out` to one gradient per parent (`None` where it has none). Parents that are not
/// tracked are left out of the graph and whatever the closure returns for them is dropped (a
/// closure may check `track_op` of what it captured to skip that work); when no parent is
/// tracked the result is a plain tensor and `backward` is never called.
pub(crate) fn attach(
    name: &'static str,
    storage: Storage,
    shape: impl Into<Shape>,
    parents: &[&Tensor],
    backward: impl Fn(&Tensor, &Tensor) -> Result<Grads> + Send + Sync + 'static,
) -> Result<Tensor> {
    let shape = shape.into();
    let tracked: Vec<usize> = (0..parents.len())
        .filter(|&i| parents[i].track_op())
        .collect();
    if tracked.is_empty() {
        return Ok(tensor(storage, shape));
    }
    let backward: Backward = Arc::new(backward);
    // Up to three tracked parents are the node's own arguments; beyond that, all but the two
    // largest are packed into one flat differentiable cat (its backward splits the gradient).
    let (direct, packed): (Vec<usize>, Vec<usize>) = if tracked.len() <= 3 {
        (tracked, Vec::new())
    } else {
        let mut by_size = tracked.clone();
        by_size.sort_by_key(|&i| std::cmp::Reverse(parents[i].elem_count()));
        let mut direct = by_size[..2].to_vec();
        direct.sort();
        let packed: Vec<usize> = tracked
            .into_iter()
            .filter(|i| !direct.contains(i))
            .collect();
        (direct, packed)
    };
    let node = Node {
        name,
        out: Mutex::new(Some(storage)),
        shape,
        n_parents: parents.len(),
        direct: direct.clone(),
        packed: packed
            .iter()
            .map(|&i| (i, parents[i].shape().clone()))
            .collect(),
        backward,
    };
    let mut args: Vec<Tensor> = direct.iter().map(|&i| parents[i].clone()).collect();
    if !packed.is_empty() {
        let flat: Vec<Tensor> = packed
            .iter()
            .map(|&i| parents[i].flatten_all())
            .collect::<Result<_>>()?;
        args.push(Tensor::cat(&flat, 0)?);
    }
    match args.as_slice() {
        [a] => a.apply_op1_arc(Arc::new(Box::new(node))),
        [a, b] => a.apply_op2_arc(b, Arc::new(Box::new(node))),
        [a, b, c] => a.apply_op3_arc(b, c, Arc::new(Box::new(node))),
        _ => fail!(name, "internal: {} node arguments", args.len()),
    }
}

/// The graph node behind [`attach`]: its forward hands over the storage computed beforehand
/// (once; Candle calls it exactly once, inside `apply_op`), its backward calls the closure.
struct Node {
    name: &'static str,
    out: Mutex<Option<Storage>>,
    shape: Shape,
    n_parents: usize,
    /// Parent indices of the node's direct arguments.
    direct: Vec<usize>,
    /// Parents packed into the last argument (index, shape), in order.
    packed: Vec<(usize, Shape)>,
    backward: Backward,
}

impl Node {
    fn take(&self) -> Result<Storage> {
        let mut guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .take()
            .ok_or_else(|| err(self.name, "internal: the node's output was taken twice"))
    }

    fn take_cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            Storage::Cpu(s) => Ok((s, self.shape.clone())),
            _ => fail!(self.name, "internal: the output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn take_cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.take()? {
            Storage::Cuda(s) => Ok((s, self.shape.clone())),
            _ => fail!(self.name, "internal: the output is not on the CUDA device"),
        }
    }

    /// The gradients of the node's arguments from the closure's per-parent gradients.
    fn grads(&self, res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut g = (self.backward)(res, grad)?;
        if g.len() != self.n_parents {
            fail!(
                self.name,
                "internal: the backward returned {} gradients for {} inputs",
                g.len(),
                self.n_parents
            )
        }
        let mut out: Vec<Option<Tensor>> = self.direct.iter().map(|&i| g[i].take()).collect();
        if !self.packed.is_empty() {
            let mut parts = Vec::with_capacity(self.packed.len());
            for (i, shape) in &self.packed {
                parts.push(match g[*i].take() {
                    Some(t) => t.flatten_all()?,
                    None => Tensor::zeros(shape.elem_count(), res.dtype(), res.device())?,
                });
            }
            out.push(Some(Tensor::cat(&parts, 0)?));
        }
        Ok(out)
    }
}

/// The `CustomOp1/2/3` impls of [`Node`]: each forward hands over the stored output, each
/// backward maps the closure's gradients onto the node's arguments.
macro_rules! node_op {
    ($op:ident, [$($s:ident $l:ident),+], [$($a:ident),+], $ret:ty, |$g:ident| $grads:expr) => {
        impl $op for Node {
            fn name(&self) -> &'static str {
                self.name
            }

            fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
                let _ = ($($s, $l),+);
                self.take_cpu()
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &Layout),+
            ) -> Result<(candle_core::CudaStorage, Shape)> {
                let _ = ($($s, $l),+);
                self.take_cuda()
            }

            fn bwd(&self, $($a: &Tensor),+, res: &Tensor, grad: &Tensor) -> Result<$ret> {
                let _ = ($($a),+);
                let mut $g = self.grads(res, grad)?.into_iter();
                Ok($grads)
            }
        }
    };
}

node_op!(CustomOp1, [s1 l1], [a1], Option<Tensor>, |g| g.next().flatten());
node_op!(
    CustomOp2,
    [s1 l1, s2 l2],
    [a1, a2],
    (Option<Tensor>, Option<Tensor>),
    |g| (g.next().flatten(), g.next().flatten())
);
node_op!(
    CustomOp3,
    [s1 l1, s2 l2, s3 l3],
    [a1, a2, a3],
    (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    |g| (g.next().flatten(), g.next().flatten(), g.next().flatten())
);
