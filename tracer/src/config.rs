//! Option values of `tracer run`: their defaults (here), the parsers shared by flags and the
//! TOML file (`values`), the file loader (`file`, `--config FILE`), the Unix-socket glob
//! matcher (`glob`), and the command line (`cli`).
//!
//! Every parser returns a short reason; the caller (clap for flags, [`load`] for the file)
//! puts it on one line together with the option and the bad value.

pub mod cli;
mod file;
mod glob;
mod values;

pub use file::*;
pub use glob::*;
pub use values::*;

pub use tracer_core::settings::*;

// The tests (`use super::*`) name these types alongside the defaults.
#[cfg(test)]
use std::{net::SocketAddr, time::Duration};

#[cfg(test)]
mod tests;
