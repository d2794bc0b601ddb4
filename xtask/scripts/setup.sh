#!/usr/bin/env bash
# Installs everything the build and the root tests need on a fresh Debian 12 machine.
# Idempotent: each step checks first, so a second run costs a few seconds.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: installing system packages needs root (run as root or via sudo)" >&2
        exit 1
    fi
}

# Debian packages: real servers and peer tools for the tests, LLVM 22 for bpf-linker.
PKGS=(postgresql pgbouncer libbpf-tools bpftool prometheus python3-psycopg2
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 libcap2-bin strace openssl
      openjdk-17-jdk-headless libpostgresql-jdbc-java
      # tmux: the root tests drive and read `tracer top` in a real terminal.
      tmux
      # The VM tier (cargo xtask vm-test): qemu, and what virtme-ng needs in the guest.
      qemu-system-x86 kmod busybox-static)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_root
    echo "setup: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The postgresql package starts a cluster on 5432; the tests run their own.
fi

# rust-src: the eBPF crate is built with -Z build-std=core.
if ! rustup component list --installed --toolchain stable 2>/dev/null | grep -q '^rust-src'; then
    echo "setup: rustup component add rust-src" >&2
    rustup component add rust-src --toolchain stable
fi

# bpf-linker 0.13 against Debian's LLVM 22 (matches the LLVM inside rustc 1.95).
if ! command -v bpf-linker >/dev/null 2>&1; then
    echo "setup: cargo install bpf-linker (about a minute)" >&2
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22
fi
echo "setup: ok" >&2
