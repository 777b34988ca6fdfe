//! `workers`: the data-lifecycle workers of Bioloop. They watch instrument drop directories,
//! register new datasets, wait until the data stops changing, inspect it (sizes and per-file
//! MD5), bundle it into a tar archive, archive the bundle, stage it back, validate the staged
//! copy and publish download links.
//!
//! The code map, in reading order (see README.md, "Architecture"):
//! - `cli`, `commands`: parse the command line, load the configuration, build the app, call
//!   one core function, print. No business rules.
//! - `config`: files and environment to validated `Settings`, every problem reported at once.
//! - `app`: builds the backends from the settings; the only place that chooses them.
//! - `registry`, `store`, `broker`, `archive`: the four seams, one trait each, one file per
//!   backend. The SQL backends are written once against `sql` (SQLite or PostgreSQL); `sqlite`
//!   is the embedded database file the default backends share.
//! - `workflow`: definitions, derived status, the engine that runs one step to a recorded end,
//!   and the worker loop.
//! - `control`: remote control of workers (Celery's pidbox commands: ping, revoke, shutdown,
//!   inspect), over RabbitMQ or the embedded database.
//! - `steps`: one file per step, each a function over a `StepContext`.
//! - `jobs`: `watch` and `register`.
//! - `compute`: the rayon pool, MD5, tar writing, safe extraction and tree walks; the only
//!   code that touches rayon.
//! - `cancel`: the cancellation token every long piece of work checks.
//! - `metrics`: the Prometheus metrics every part records into, and their HTTP endpoint.
//! - `names`: the job and task names, a leaf module every layer may use.
//! - `model`, `identity`, `progress`, `ui`: shared types, this process's identity, progress
//!   counters and terminal output.

pub mod app;
pub mod archive;
pub mod broker;
pub mod cancel;
pub mod cli;
pub mod commands;
pub mod compute;
pub mod config;
pub mod control;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod fixity;
pub mod identity;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod names;
pub mod progress;
pub mod registry;
pub mod scheduler;
pub mod sql;
pub mod sqlite;
pub mod steps;
pub mod store;
pub mod ui;
pub mod workflow;
