//! CUDA launch glue (work in progress on main).
