//! ferry-sim: predicts how a plan runs. `cost` turns a `Profile` into task durations,
//! `des` replays a `TaskGraph` on modelled resources and memory pools, `tune`
//! searches the plan space.
//!
//! Must never: touch a file or the clock; the same input always gives the same trace.
