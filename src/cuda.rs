//! Shared CUDA launch helpers (work in progress on main).
