//! ferry-reports: plots and written reports from traces, sweeps and validations.
//!
//! Must never: compute a metric of its own; it draws what `ferry-core` computed.
//!
//! Status: not built yet (issue "Tuner" adds the plots).
