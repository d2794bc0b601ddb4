//! `cargo run --release -p pipeline-bench [-- CONNECTIONS]`: figure 5 alone, without root or
//! the eBPF toolchain (the full benchmark, `cargo xtask bench`, prints it as well).

use pipeline_bench::Figure;

fn main() {
    let connections = match std::env::args().nth(1) {
        None => 1_000_000,
        Some(arg) => match arg.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("pipeline-bench: CONNECTIONS must be a positive integer, got `{arg}`");
                std::process::exit(2);
            }
        },
    };
    println!("== {}", pipeline_bench::TITLE);
    println!("   command: cargo run --release -p pipeline-bench -- {connections}");
    let figure = Figure::measure(connections);
    figure.print();
    println!(
        "   target >= 2 M events/s: {}",
        if figure.events_per_second() >= 2e6 {
            "MET"
        } else {
            "MISSED"
        }
    );
}
