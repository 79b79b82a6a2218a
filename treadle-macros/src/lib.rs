//! Procedural macros for treadle. Use them through the `treadle` crate.
