//! The integration tests, one crate so that lapin, mongodb and axum are linked once: each module
//! covers one part of the system (run one with `cargo test --test it watch::`).

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod amqp_broker;
mod aux_tasks;
mod bad_input;
mod capacity;
mod cli;
mod common;
mod control;
mod data_safety;
mod deployment;
mod doctor;
mod durability;
mod engine;
mod fixity;
mod hsi_archive;
mod http_registry;
mod interop;
mod jobs;
mod lifecycle;
mod metrics;
mod migrate;
mod mongo_store;
mod ops_commands;
mod postgres_profile;
mod register;
mod registry_contract;
mod scheduler;
mod scheduler_process;
mod sql_queue;
mod status;
mod store_contract;
mod upload_manifest;
mod uploads;
mod watch;
