//! The tracer's pure parts: decoding the kernel's records into typed events (`decode`), the
//! stall and leak detectors (`detectors`), and the run settings' defaults and limits
//! (`settings`).
//!
//! Nothing here loads eBPF, spawns tasks or touches files: it depends on no aya, no tokio and
//! has no build script, so `cargo test -p tracer-core` (and fuzzing) needs no bpf-linker.

pub mod decode;
pub mod detectors;
pub mod settings;
