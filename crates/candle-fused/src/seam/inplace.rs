//! In-place kernels: a kernel that overwrites its first input (e.g. the cross-entropy chunk of
//! the fused linear cross-entropy, which turns logits into their gradient in the same pass, or a
//! dW accumulator). It goes through Candle's `inplace_op2`/`inplace_op3`, which lock the
//! destination for writing and refuse sources that share its storage.

use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use super::{In, Inputs};
use crate::config::KernelConfig;
use crate::validate::fail;

/// A kernel that updates `dst` in place and may return further outputs.
pub(crate) trait InplaceKernel {
    /// The public op name used in error messages.
    fn name(&self) -> &'static str;
    /// The names of `dst` and then of the other inputs, in order.
    fn inputs(&self) -> &'static [&'static str];
    /// The CPU backend: `dst` (contiguous) is updated in place.
    fn cpu(
        &self,
        cfg: &KernelConfig,
        dst: (&mut CpuStorage, &Layout),
        ins: &Inputs<CpuStorage>,
    ) -> Result<Vec<CpuStorage>>;
    /// The CUDA backend.
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        cfg: &KernelConfig,
        dst: (&mut candle_core::CudaStorage, &Layout),
        ins: &Inputs<candle_core::CudaStorage>,
    ) -> Result<Vec<candle_core::CudaStorage>>;
}

/// Runs `k` on `dst` in place (it must be contiguous and own its storage alone among the
/// operands) with one or two further `inputs` (made contiguous, on `dst`'s device). Returns
/// the kernel's further outputs.
pub(crate) fn run_inplace<K: InplaceKernel>(
    k: &K,
    cfg: &KernelConfig,
    dst: &Tensor,
    inputs: &[&Tensor],
) -> Result<Vec<Storage>> {
    let op = k.name();
    let names = k.inputs();
    if !dst.is_contiguous() {
        fail!(op, "internal: the in-place destination must be contiguous")
    }
    let mut owned = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.iter().enumerate() {
        if !t.device().same_device(dst.device()) {
            fail!(
                op,
                "{} is on device {:?}, expected {:?} (the device of {})",
                names.get(i + 1).copied().unwrap_or("input"),
                t.device().location(),
                dst.device().location(),
                names.first().copied().unwrap_or("the destination")
            )
        }
        owned.push(t.contiguous()?);
    }
    let adapter = InplaceNode {
        k,
        cfg,
        names: names.get(1..).unwrap_or(&[]),
        outs: Mutex::new(Vec::new()),
    };
    match owned.as_slice() {
        [a] => dst.inplace_op2(a, &adapter)?,
        [a, b] => dst.inplace_op3(a, b, &adapter)?,
        _ => fail!(op, "internal: {} in-place inputs", owned.len()),
    }
    let outs = adapter.outs.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(outs)
}

/// Adapts an [`InplaceKernel`] to Candle's in-place op traits; collects the further outputs.
struct InplaceNode<'a, K> {
    k: &'a K,
    cfg: &'a KernelConfig,
    names: &'static [&'static str],
    outs: Mutex<Vec<Storage>>,
}

impl<K: InplaceKernel> InplaceNode<'_, K> {
    fn keep(&self, outs: Vec<Storage>) {
        *self.outs.lock().unwrap_or_else(|e| e.into_inner()) = outs;
    }

    fn cpu_run(
        &self,
        dst: (&mut CpuStorage, &Layout),
        items: Vec<In<'_, CpuStorage>>,
    ) -> Result<()> {
        let ins = Inputs {
            op: self.k.name(),
            names: self.names,
            items,
        };
        let outs = self.k.cpu(self.cfg, dst, &ins)?;
        self.keep(outs.into_iter().map(Storage::Cpu).collect());
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_run(
        &self,
        dst: (&mut candle_core::CudaStorage, &Layout),
        items: Vec<In<'_, candle_core::CudaStorage>>,
    ) -> Result<()> {
        let ins = Inputs {
            op: self.k.name(),
            names: self.names,
            items,
        };
        let outs = self.k.cuda(self.cfg, dst, &ins)?;
        self.keep(outs.into_iter().map(Storage::Cuda).collect());
        Ok(())
    }
}

impl<K: InplaceKernel> candle_core::InplaceOp2 for InplaceNode<'_, K> {
    fn name(&self) -> &'static str {
        self.k.name()
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        self.cpu_run((s1, l1), vec![Some((s2, l2))])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        self.cuda_run((s1, l1), vec![Some((s2, l2))])
    }
}

impl<K: InplaceKernel> candle_core::InplaceOp3 for InplaceNode<'_, K> {
    fn name(&self) -> &'static str {
        self.k.name()
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        self.cpu_run((s1, l1), vec![Some((s2, l2)), Some((s3, l3))])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        self.cuda_run((s1, l1), vec![Some((s2, l2)), Some((s3, l3))])
    }
}
