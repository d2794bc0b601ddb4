/work/main/target-ab/release/deps/tracer_core-526be3a4e999c10d.d: tracer-core/src/lib.rs tracer-core/src/conn_table.rs tracer-core/src/decode.rs tracer-core/src/detectors.rs tracer-core/src/events.rs tracer-core/src/owner.rs tracer-core/src/pooler.rs tracer-core/src/redact.rs tracer-core/src/settings.rs

/work/main/target-ab/release/deps/libtracer_core-526be3a4e999c10d.rlib: tracer-core/src/lib.rs tracer-core/src/conn_table.rs tracer-core/src/decode.rs tracer-core/src/detectors.rs tracer-core/src/events.rs tracer-core/src/owner.rs tracer-core/src/pooler.rs tracer-core/src/redact.rs tracer-core/src/settings.rs

/work/main/target-ab/release/deps/libtracer_core-526be3a4e999c10d.rmeta: tracer-core/src/lib.rs tracer-core/src/conn_table.rs tracer-core/src/decode.rs tracer-core/src/detectors.rs tracer-core/src/events.rs tracer-core/src/owner.rs tracer-core/src/pooler.rs tracer-core/src/redact.rs tracer-core/src/settings.rs

tracer-core/src/lib.rs:
tracer-core/src/conn_table.rs:
tracer-core/src/decode.rs:
tracer-core/src/detectors.rs:
tracer-core/src/events.rs:
tracer-core/src/owner.rs:
tracer-core/src/pooler.rs:
tracer-core/src/redact.rs:
tracer-core/src/settings.rs:
