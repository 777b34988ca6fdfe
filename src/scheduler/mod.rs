//! The scheduler: decides when each job runs (`schedule`, pure) and runs them on time
//! (`runtime`), one run of a job at a time, with only one scheduler firing among those that
//! share a store.

pub mod runtime;
pub mod schedule;
