/work/main/target-ab/release/deps/pipeline_bench-746585130f42950b.d: bench/pipeline/src/lib.rs

/work/main/target-ab/release/deps/libpipeline_bench-746585130f42950b.rlib: bench/pipeline/src/lib.rs

/work/main/target-ab/release/deps/libpipeline_bench-746585130f42950b.rmeta: bench/pipeline/src/lib.rs

bench/pipeline/src/lib.rs:
