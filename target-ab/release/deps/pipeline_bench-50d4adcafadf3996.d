/work/main/target-ab/release/deps/pipeline_bench-50d4adcafadf3996.d: bench/pipeline/src/main.rs

/work/main/target-ab/release/deps/pipeline_bench-50d4adcafadf3996: bench/pipeline/src/main.rs

bench/pipeline/src/main.rs:
