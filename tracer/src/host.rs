//! What the host says outside the probes: its socket tables (`sockdiag`, `discovery`:
//! connections open before start-up), processes and their containers (`process`, `owners`),
//! Postgres's process titles (`proc_title`), and what of a command line may be shown
//! (`redact`, pure, in `tracer-core`). Knows nothing of the connection table.

pub mod discovery;
pub mod owners;
pub mod proc_title;
pub mod process;
pub use tracer_core::redact;
pub mod sockdiag;
pub mod unix_pairs;
