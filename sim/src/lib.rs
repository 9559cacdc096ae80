//! ferry-sim: predicts how a plan runs. `cost` turns a `Profile` into task costs
//! (`dequant`: what quantized weights add),
//! `des` replays a `TaskGraph` on modelled resources and memory pools, `predict`
//! lowers a plan and simulates it (extrapolating long generations), `tune`
//! searches the plan space.
//!
//! Must never: touch a file or the clock; the same input always gives the same trace.

pub mod calibration;
pub mod cost;
pub mod dequant;
pub mod des;
pub mod engines;
pub mod predict;
pub mod tune;

pub use des::{simulate, SimError, SimOutput};
pub use predict::{
    interval, interval_basis, interval_of_prediction, interval_run_by, predict, predict_run_by, Extrapolation,
    Interval, Prediction,
};

use ferry_core::{Classify, ErrorKind};

impl Classify for des::SimError {
    fn kind(&self) -> ErrorKind {
        match self {
            des::SimError::DoesNotFit(e) => e.kind(),
            // The plan's memory cannot hold what its schedule keeps in flight, or it
            // names more devices than the simulator holds: the user's plan to change.
            des::SimError::Deadlock { .. } | des::SimError::TooManyResources(_) => ErrorKind::Usage,
        }
    }
}

impl Classify for tune::TuneError {
    fn kind(&self) -> ErrorKind {
        match self {
            // No plan fits the budget the user gave: theirs to change.
            tune::TuneError::Impossible(_) => ErrorKind::Usage,
            tune::TuneError::Sim(e) => e.kind(),
        }
    }
}
