//! Builds the kernel programs (`tracer-ebpf`) for the BPF target and leaves the object in
//! OUT_DIR, where `kernel/probes.rs` embeds it. Uses the stable toolchain with RUSTC_BOOTSTRAP for
//! `-Z build-std=core`, so no nightly toolchain is needed; `TRACER_EBPF_TOOLCHAIN` names
//! another rustup toolchain (container images often have only a versioned one).
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tracer-ebpf");
    // SAFETY: build scripts are single-threaded; aya-build reads this from our environment.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    println!("cargo:rerun-if-env-changed=TRACER_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("TRACER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: root.to_str().expect("utf-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
