use which::which;

/// Re-runs the build when bpf-linker changes, and fails early with a clear message when it
/// is missing (`cargo xtask setup` installs it).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!("bpf-linker not found in PATH: run `cargo xtask setup`"),
    }
}
