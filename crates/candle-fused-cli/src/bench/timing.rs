//! Timing: a few warm-up repetitions, then N timed ones, and the MEDIAN.
//!
//! * CPU: wall clock (`Instant`) around each call; Candle's CPU ops are eager, so the result
//!   is materialised when the call returns.
//! * CUDA: the device is synchronised before every repetition; the time is taken by two CUDA
//!   events recorded on Candle's stream around the call, and the device is synchronised again
//!   after it (so an asynchronous error surfaces in the repetition that caused it).
//!
//! Whatever a timed call returns is dropped only after the clock stops, so freeing the outputs
//! is never timed. Work done in a `setup` closure (see [`Timer::time_with_setup`]) is not timed
//! either: that is how the autograd backward of a graph is timed alone.
//!
//! The copy bandwidth of the device ([`copy_bandwidth`]) is measured with the same timer:
//! bytes read + bytes written of one large copy, median of the repetitions.

use std::time::Instant;

use candle_core::{Device, Result};

/// How many repetitions a measurement gets: `warmup` untimed ones, then as many timed ones as
/// fit in `target_s` seconds (from the warm-up's speed), clamped to `[min_reps, max_reps]`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub warmup: usize,
    pub min_reps: usize,
    pub max_reps: usize,
    pub target_s: f64,
    /// Calls per sample: 1 times each call alone (the device synchronised before it, so on a
    /// GPU the host's work before the launch is inside the clock); `n > 1` issues `n` calls
    /// back to back between the events and divides, so the host's work overlaps the previous
    /// kernels (what a training step sees) and short kernels are timed at their own speed.
    pub stream: usize,
}

impl Budget {
    /// The bench's budget for a device (CUDA gets more repetitions: they are cheap).
    pub fn new(device: &Device, quick: bool) -> Self {
        match (device.is_cpu(), quick) {
            (true, true) => Budget {
                warmup: 1,
                min_reps: 3,
                max_reps: 20,
                target_s: 0.1,
                stream: 1,
            },
            (true, false) => Budget {
                warmup: 1,
                min_reps: 4,
                max_reps: 40,
                target_s: 0.25,
                stream: 1,
            },
            (false, true) => Budget {
                warmup: 3,
                min_reps: 10,
                max_reps: 50,
                target_s: 0.1,
                stream: 1,
            },
            (false, false) => Budget {
                warmup: 5,
                min_reps: 10,
                max_reps: 200,
                target_s: 0.25,
                stream: 1,
            },
        }
    }
}

/// The result of one measurement, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median_us: f64,
    pub min_us: f64,
    pub reps: usize,
    /// CUDA: the host's time to issue one call (wall clock from the first call to the last
    /// one's return, before the device is waited for), median over the samples. When it is
    /// not below `median_us`, the device waited for the host: the row is host-bound.
    pub host_us: Option<f64>,
}

fn median_of(mut s: Vec<f64>) -> f64 {
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

impl Stats {
    fn from_samples(s: Vec<(f64, Option<f64>)>) -> Self {
        let host: Option<Vec<f64>> = s.iter().map(|x| x.1).collect();
        let dev: Vec<f64> = s.iter().map(|x| x.0).collect();
        Stats {
            min_us: dev.iter().copied().fold(f64::INFINITY, f64::min),
            reps: dev.len(),
            median_us: median_of(dev),
            host_us: host.filter(|h| !h.is_empty()).map(median_of),
        }
    }
}

/// Times closures on one device (see the module doc).
pub struct Timer {
    device: Device,
    budget: Budget,
    #[cfg(feature = "cuda")]
    events: Option<cuda::Events>,
}

impl Timer {
    pub fn new(device: &Device, budget: Budget) -> Result<Self> {
        Ok(Timer {
            device: device.clone(),
            budget,
            #[cfg(feature = "cuda")]
            events: if device.is_cuda() {
                Some(cuda::Events::new(device)?)
            } else {
                None
            },
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Times `f(i)`, where `i` counts the repetitions (warm-up included): use it to rotate
    /// among input sets.
    pub fn time<R>(&self, f: impl FnMut(usize) -> Result<R>) -> Result<Stats> {
        self.time_with_setup(Ok, f)
    }

    /// Times `f(setup(i))`; `setup` runs before the clock starts (and before the device is
    /// synchronised), so only `f` is measured.
    pub fn time_with_setup<S, R>(
        &self,
        mut setup: impl FnMut(usize) -> Result<S>,
        mut f: impl FnMut(S) -> Result<R>,
    ) -> Result<Stats> {
        let mut i = 0;
        let n = self.budget.stream.max(1);
        // The setups of one sample (untimed), then its calls.
        let mut sample = |i: &mut usize| -> Result<(f64, Option<f64>)> {
            let ss = (0..n)
                .map(|_| {
                    *i += 1;
                    setup(*i - 1)
                })
                .collect::<Result<Vec<S>>>()?;
            self.once(ss, &mut f)
        };
        let mut warm = f64::INFINITY;
        for _ in 0..self.budget.warmup.max(1) {
            warm = warm.min(sample(&mut i)?.0);
        }
        let fit = (self.budget.target_s * 1e6 / (warm * n as f64).max(1e-3)) as usize;
        let reps = fit.clamp(self.budget.min_reps, self.budget.max_reps);
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            samples.push(sample(&mut i)?);
        }
        Ok(Stats::from_samples(samples))
    }

    /// One sample: the calls on `ss` back to back, in microseconds per call (CUDA: also the
    /// host's time per call to issue them).
    fn once<S, R>(
        &self,
        ss: Vec<S>,
        f: &mut impl FnMut(S) -> Result<R>,
    ) -> Result<(f64, Option<f64>)> {
        let n = ss.len().max(1) as f64;
        self.device.synchronize()?;
        #[cfg(feature = "cuda")]
        if let Some(ev) = &self.events {
            ev.start()?;
            let h0 = Instant::now();
            let r = ss.into_iter().map(&mut *f).collect::<Result<Vec<R>>>()?;
            let host = h0.elapsed().as_secs_f64() * 1e6 / n;
            ev.stop()?;
            let us = ev.elapsed_us()? / n;
            self.device.synchronize()?;
            drop(r);
            return Ok((us, Some(host)));
        }
        let t0 = Instant::now();
        let r = ss.into_iter().map(&mut *f).collect::<Result<Vec<R>>>()?;
        self.device.synchronize()?;
        let us = t0.elapsed().as_secs_f64() * 1e6 / n;
        drop(r);
        Ok((us, None))
    }
}

/// The measured copy bandwidth: a copy of `bytes` bytes moves `2·bytes` (read + write).
#[derive(Debug, Clone, Copy)]
pub struct CopyBandwidth {
    pub bytes: usize,
    pub gbps: f64,
    pub stats: Stats,
}

/// Measures the device's copy bandwidth with one large copy of `bytes` bytes between two
/// preallocated buffers (CPU: a parallel `copy_from_slice` over all rayon threads; CUDA: a
/// device-to-device `cuMemcpyDtoD` on Candle's stream). GB/s = 2·bytes / median time.
pub fn copy_bandwidth(timer: &Timer, bytes: usize) -> Result<CopyBandwidth> {
    let stats = match timer.device() {
        Device::Cpu => {
            use rayon::prelude::*;
            // A non-constant pattern, and both buffers touched before timing (no page faults).
            let src: Vec<u8> = (0..bytes).map(|i| (i * 131 + (i >> 12)) as u8).collect();
            let mut dst = vec![1u8; bytes];
            const CHUNK: usize = 1 << 20;
            timer.time(|_| {
                dst.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                Ok(())
            })?
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::copy(timer, bytes)?,
        d => candle_core::bail!("copy bandwidth: unsupported device {d:?}"),
    };
    Ok(CopyBandwidth {
        bytes,
        gbps: 2.0 * bytes as f64 / (stats.median_us * 1e3),
        stats,
    })
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream};
    use candle_core::{Device, Result};

    use super::{Stats, Timer};

    fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("candle-fused bench: CUDA driver error: {e:?}"))
    }

    /// A pair of timing events on Candle's stream of the device.
    pub(super) struct Events {
        stream: Arc<CudaStream>,
        start: CudaEvent,
        stop: CudaEvent,
    }

    impl Events {
        pub(super) fn new(device: &Device) -> Result<Self> {
            let stream = device.as_cuda_device()?.cuda_stream();
            let ctx = stream.context().clone();
            // Every implementation (ours, Candle's, the copy) is timed without the cost of
            // mapping fresh memory for its output at each repetition (which starts with a
            // synchronisation).
            candle_fused_train::keep_freed_device_memory(device)?;
            let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
            Ok(Events {
                start: ctx.new_event(flags).map_err(err)?,
                stop: ctx.new_event(flags).map_err(err)?,
                stream,
            })
        }
        pub(super) fn start(&self) -> Result<()> {
            self.start.record(&self.stream).map_err(err)
        }
        pub(super) fn stop(&self) -> Result<()> {
            self.stop.record(&self.stream).map_err(err)
        }
        pub(super) fn elapsed_us(&self) -> Result<f64> {
            Ok(self.start.elapsed_ms(&self.stop).map_err(err)? as f64 * 1e3)
        }
    }

    /// Device-to-device copy of `bytes` bytes between two preallocated buffers.
    pub(super) fn copy(timer: &Timer, bytes: usize) -> Result<Stats> {
        let stream = timer.device().as_cuda_device()?.cuda_stream();
        let pattern: Vec<u8> = (0..bytes).map(|i| (i * 131 + (i >> 12)) as u8).collect();
        let src = stream.clone_htod(&pattern).map_err(err)?;
        drop(pattern);
        let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(err)?;
        timer.time(|_| stream.memcpy_dtod(&src, &mut dst).map_err(err))
    }

    /// The GPU's name.
    pub(super) fn name(device: &Device) -> Result<String> {
        device
            .as_cuda_device()?
            .cuda_stream()
            .context()
            .name()
            .map_err(err)
    }
}

/// A human-readable name of the device: the GPU's name, or the CPU model and thread count.
pub fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::name(device).unwrap_or_else(|e| format!("cuda (name: {e})")),
        _ => {
            let model = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split(':').nth(1))
                        .map(|m| m.trim().to_string())
                })
                .unwrap_or_else(|| std::env::consts::ARCH.to_string());
            format!("{model} ({} threads)", rayon::current_num_threads())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stream: n` runs n setups and n calls per sample, in order, and reports per-call time.
    #[test]
    fn stream_mode_runs_n_calls_per_sample() {
        let budget = Budget {
            warmup: 2,
            min_reps: 3,
            max_reps: 3,
            target_s: 0.0,
            stream: 4,
        };
        let timer = Timer::new(&Device::Cpu, budget).unwrap();
        let mut setups = Vec::new();
        let mut calls = Vec::new();
        let stats = timer
            .time_with_setup(
                |i| {
                    setups.push(i);
                    Ok(i)
                },
                |i| {
                    calls.push(i);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    Ok(())
                },
            )
            .unwrap();
        let want: Vec<usize> = (0..(2 + 3) * 4).collect();
        assert_eq!(setups, want);
        assert_eq!(calls, want);
        assert_eq!(stats.reps, 3);
        // Per call (a 1 ms sleep each, room for overshoot), not per sample of 4 calls (>= 4 ms).
        assert!(
            stats.median_us >= 1000.0 && stats.median_us < 3000.0,
            "{stats:?}"
        );
    }
}
