/work/main/target-ab/release/deps/tracer_common-465da2031e7519f7.d: tracer-common/src/lib.rs tracer-common/src/protocol.rs

/work/main/target-ab/release/deps/libtracer_common-465da2031e7519f7.rlib: tracer-common/src/lib.rs tracer-common/src/protocol.rs

/work/main/target-ab/release/deps/libtracer_common-465da2031e7519f7.rmeta: tracer-common/src/lib.rs tracer-common/src/protocol.rs

tracer-common/src/lib.rs:
tracer-common/src/protocol.rs:
