//! Output poisoning for tests (temporary home during the workspace move; becomes a field of the
//! kernel configuration).

use std::sync::atomic::{AtomicBool, Ordering};

static POISON: AtomicBool = AtomicBool::new(false);

/// When on, every kernel fills its output with NaN before computing.
pub fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed)
}

/// Is output poisoning on?
pub fn poison_enabled() -> bool {
    POISON.load(Ordering::Relaxed)
}
