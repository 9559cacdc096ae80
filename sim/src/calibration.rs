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

/// How the interval of a prediction from `profile` was found, in a sentence; `None`
/// when it has none.
pub fn interval_basis(profile: &Profile) -> Option<String> {
    if let Some(drift) = &profile.drift {
        return Some(format!(
            "interval: every resource at the slowest and at the fastest rate this profile's runs achieved ({})",
            drift.basis
        ));
    }
    applies_to(profile).then(|| {
        let (low, high) = DATASHEET_PUBLISHED_OVER_PREDICTED;
        format!(
            "interval: real systems' published speeds ran {:.0}–{:.0} % below Ferry's datasheet predictions for \
             their own policies (configs/calibration/); `ferry profile` on this machine gives a measured one",
            (1.0 - high) * 100.0,
            (1.0 - low) * 100.0
        )
    })
}
