//! ferry-sim: predicts how a plan runs. `cost` turns a `Profile` into task costs,
//! `des` replays a `TaskGraph` on modelled resources and memory pools, `predict`
//! lowers a plan and simulates it (extrapolating long generations), `tune`
//! searches the plan space.
//!
//! Must never: touch a file or the clock; the same input always gives the same trace.

pub mod cost;
pub mod des;
pub mod predict;
pub mod tune;

pub use des::{simulate, SimError, SimOutput};
pub use predict::{predict, Extrapolation, Prediction};
