//! Workflows: their definitions, the status derived from task results, the engine that runs
//! steps, and the worker loop that feeds it.

pub mod definitions;
pub mod engine;
pub mod status;
pub mod worker;
