//! ferry-profiler: microbenchmarks of a backend's disk reads, copies and kernels,
//! written as a measured `Profile`.
//!
//! Must never: invent a number; every figure it writes was measured on this machine.
//!
//! Status: not built yet (issue "Profiler and validation").
