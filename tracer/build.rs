//! Builds the kernel programs (`tracer-ebpf`) for the BPF target and leaves the object in
//! OUT_DIR, where `probes.rs` embeds it. Uses the stable toolchain with RUSTC_BOOTSTRAP for
//! `-Z build-std=core`, so no nightly toolchain is needed.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tracer-ebpf");
    // SAFETY: build scripts are single-threaded; aya-build reads this from our environment.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: root.to_str().expect("utf-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
