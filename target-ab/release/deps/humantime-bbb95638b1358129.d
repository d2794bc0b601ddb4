/work/main/target-ab/release/deps/humantime-bbb95638b1358129.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/date.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/duration.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/wrapper.rs

/work/main/target-ab/release/deps/libhumantime-bbb95638b1358129.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/date.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/duration.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/wrapper.rs

/work/main/target-ab/release/deps/libhumantime-bbb95638b1358129.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/date.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/duration.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/wrapper.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/date.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/duration.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/humantime-2.4.0/src/wrapper.rs:
