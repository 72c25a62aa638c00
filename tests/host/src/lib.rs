//! Host-side checks of what gracevm builds, with independent parsers (dtc, iasl).
