//! tracer: an eBPF connection tracer and leak detector for PostgreSQL clients.
//!
//! The modules follow the data, in pipeline order: `kernel` (load and attach the kernel
//! programs, decode their records) -> `daemon` (the ring reader, start-up seeding, the tick,
//! the state kept across restarts) -> `model` (the connection table, detectors, pairings) ->
//! `host` (owners, containers, socket tables and process titles the probes cannot see) ->
//! `export` (events, metrics, the live table). `config` turns flags and the TOML file into the
//! daemon's settings; `cmd` holds the other commands (`check`, `list`, `top`).

pub mod cmd;
pub mod config;
pub mod daemon;
pub mod export;
pub mod host;
pub mod kernel;
pub mod model;
