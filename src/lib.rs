//! Data-lifecycle workers for Bioloop: watch, register, inspect, archive, stage, validate and publish research datasets.

pub mod compute;
pub mod config;
pub mod model;
