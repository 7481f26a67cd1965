//! Seeded random inputs for the tests, the property tests, `candle-fused check`, the bench and
//! the probe.
//!
//! Each run draws a fresh seed, so the data stays fresh from run to run; setting
//! `CANDLE_FUSED_SEED=<n>` ([`SEED_VAR`]) reruns with the seed a failure printed. The seed is
//! printed with every failure: the first use of the seed installs a panic hook that writes it
//! (and the rerun command) before the panic message, and `check`/the bench print it in their
//! summaries.
//!
//! Draws come from named streams ([`Rng::stream`]): the stream `name` of seed `s` is the same
//! sequence in every run with seed `s`, however many other streams drew before. The free
//! helpers ([`crate::testing::randn`] and friends) draw from the calling thread's stream,
//! named after the thread; libtest names each test's thread after the test, so a test's inputs
//! depend only on the seed and the test (run it alone with the printed seed to see them again;
//! with `RUST_TEST_THREADS=1` tests share the main thread's stream, so rerun the same set of
//! tests).

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng as _, RngCore, SeedableRng};
use rand_distr::StandardNormal;

/// The environment variable that fixes the seed of a run.
pub const SEED_VAR: &str = "CANDLE_FUSED_SEED";

static SEED: OnceLock<u64> = OnceLock::new();

/// The seed `CANDLE_FUSED_SEED` asks for (`Ok(None)` when unset), or why its value is not one.
pub fn seed_from_env() -> std::result::Result<Option<u64>, String> {
    match std::env::var(SEED_VAR) {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{SEED_VAR}={v:?} is not a seed (an unsigned 64-bit integer)")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{SEED_VAR}: {e}")),
    }
}

/// Fixes the run's seed: `CANDLE_FUSED_SEED` when set, else a fresh one; installs the panic
/// hook that prints it. Later calls return the same seed. An invalid `CANDLE_FUSED_SEED` is an
/// error (the CLI reports it; [`run_seed`] panics with it).
pub fn init() -> std::result::Result<u64, String> {
    if let Some(&s) = SEED.get() {
        return Ok(s);
    }
    let seed = seed_from_env()?.unwrap_or_else(rand::random);
    let mut installed = false;
    let s = *SEED.get_or_init(|| {
        installed = true;
        seed
    });
    if installed {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            eprintln!("candle-fused: random inputs from seed {s}; rerun with {SEED_VAR}={s}");
            prev(info);
        }));
    }
    Ok(s)
}

/// The run's seed (see [`init`]).
pub fn run_seed() -> u64 {
    init().unwrap_or_else(|e| panic!("{e}"))
}

/// A seed from `seed` and a stream name (FNV-1a of the name, mixed with the seed).
fn mix(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ seed.rotate_left(32)
}

/// A seeded generator of random tensors (ChaCha12 through `rand`'s `StdRng`).
pub struct Rng(StdRng);

impl Rng {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// The stream `name` of the run's seed.
    pub fn stream(name: &str) -> Self {
        Self::new(mix(run_seed(), name))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        self.0.sample(StandardNormal)
    }

    /// `shape` filled by `one()` on the host (f64), moved to `dt` on `dev`.
    fn host(
        &mut self,
        shape: &[usize],
        dt: DType,
        dev: &Device,
        mut one: impl FnMut(&mut Self) -> f64,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| one(self)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(dev)
    }

    /// `shape` drawn on `dev`: by `on_device` with the device generator seeded from this
    /// stream (CUDA), or by `one()` in f32 on the CPU (Candle's CPU generator cannot be seeded).
    fn device(
        &mut self,
        shape: &[usize],
        dt: DType,
        dev: &Device,
        mut one: impl FnMut(&mut Self) -> f64,
        on_device: impl FnOnce(&Device) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if dev.is_cpu() {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| one(self) as f32).collect();
            return Tensor::from_vec(v, shape, dev)?.to_dtype(dt);
        }
        dev.set_seed(self.next_u64())?;
        on_device(dev)?.to_dtype(dt)
    }

    /// `N(0, std²)` values of `shape`, drawn on the host and moved to `dt` on `dev` (so a seed
    /// gives the same inputs on every device).
    pub fn randn(&mut self, shape: &[usize], std: f64, dt: DType, dev: &Device) -> Result<Tensor> {
        self.host(shape, dt, dev, |r| std * r.normal())
    }

    /// Uniform values in `[lo, hi)`, as [`Rng::randn`].
    pub fn rand(
        &mut self,
        shape: &[usize],
        lo: f64,
        hi: f64,
        dt: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.host(shape, dt, dev, |r| lo + (hi - lo) * r.uniform())
    }

    /// An additive mask: `N(0, 1)` values, each hidden (`-inf`) with probability `p_hide`.
    pub fn mask(
        &mut self,
        shape: &[usize],
        p_hide: f64,
        dt: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.host(shape, dt, dev, |r| {
            if r.uniform() < p_hide {
                f64::NEG_INFINITY
            } else {
                r.normal()
            }
        })
    }

    /// `N(0, std²)` values drawn on `dev` itself (for inputs too large to draw on the host,
    /// e.g. the bench's): the device generator seeded from this stream on CUDA, this stream in
    /// f32 on the CPU.
    pub fn randn_on(
        &mut self,
        shape: &[usize],
        std: f64,
        dt: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.device(
            shape,
            dt,
            dev,
            |r| std * r.normal(),
            |d| Tensor::randn(0f32, std as f32, shape, d),
        )
    }

    /// Uniform values in `[lo, hi)`, as [`Rng::randn_on`].
    pub fn rand_on(
        &mut self,
        shape: &[usize],
        lo: f64,
        hi: f64,
        dt: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.device(
            shape,
            dt,
            dev,
            |r| lo + (hi - lo) * r.uniform(),
            |d| Tensor::rand(lo as f32, hi as f32, shape, d),
        )
    }
}

thread_local! {
    static THREAD: RefCell<Option<Rng>> = const { RefCell::new(None) };
}

/// Runs `f` with the calling thread's stream (named after the thread; see the module doc).
pub fn with_thread_rng<R>(f: impl FnOnce(&mut Rng) -> R) -> R {
    THREAD.with(|t| {
        let mut t = t.borrow_mut();
        let rng = t.get_or_insert_with(|| {
            let name = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            Rng::stream(&name)
        });
        f(rng)
    })
}
