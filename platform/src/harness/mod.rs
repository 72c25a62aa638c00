//! The test harness: run guests in test mode and judge what they report.

pub mod console;
pub mod kcidb;
pub mod ktap;
pub mod report;
