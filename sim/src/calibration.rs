//! What the calibration set (`configs/calibration/`, BENCHMARKS.md "Calibration
//! against published measurements") says about predictions from datasheet figures:
//! how far the speeds real systems published fell from what Ferry predicted for
//! their own policies on their own hardware. A datasheet prediction has no measured
//! spread to rest an interval on; this is the spread it has been seen to have.

use ferry_core::profile::Profile;

/// Published ÷ predicted tokens/s over the calibration set's gated rows: the lowest
/// and the highest (every row so far ran slower than predicted, by 5.8 to 55.8 %).
/// `sim/tests/calibration.rs` fails when the rows say otherwise, so a change to the
/// rows or to the datasheet figures updates this with them.
pub const DATASHEET_PUBLISHED_OVER_PREDICTED: (f64, f64) = (0.642, 0.945);

/// The calibration set's rows: GPUs on their datasheet figures. A profile measured by
/// `ferry profile` carries its own spread (`Profile::drift`), and a datasheet profile
/// of the cpu device was not calibrated by them.
pub fn applies_to(profile: &Profile) -> bool {
    !profile.is_measured() && profile.device_name != "cpu"
}
