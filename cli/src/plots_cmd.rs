//! Plots for `ferry tune --plots` (drawn by ferry-reports).

use std::path::Path;

use anyhow::Result;
use ferry_sim::tune::{KnobSpace, TuneRequest, TuneResult};

pub fn tune_plots(
    _dir: &Path,
    _request: &TuneRequest,
    _space: &KnobSpace,
    _result: &TuneResult,
    _force: bool,
) -> Result<()> {
    anyhow::bail!("plots are not drawn yet")
}
