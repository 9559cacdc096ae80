//! ferry-engine: executes a plan's `TaskGraph` for real — weights read from disk,
//! copied through budgeted memory arenas, layers computed on a backend — and records
//! a measured `Trace` of the same type the simulator predicts.
//!
//! Must never: guess a duration or hold memory outside its arenas' budgets.
//!
//! Status: not built yet (issue "Engine"); the crate exists so the workspace layout
//! matches ARCHITECTURE.md.
