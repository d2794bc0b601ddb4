//! The kernel side, from user space: what the running kernel offers (`btf`), loading and
//! attaching the programs and reading their maps (`probes`, `map_batch`), the privileges
//! they need (`privileges`), and the records they send (`decode`).

pub mod btf;
pub use tracer_core::decode;
mod map_batch;
pub mod privileges;
pub mod probes;
