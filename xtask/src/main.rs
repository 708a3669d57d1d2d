//! Repository automation: `cargo xtask <task>`. This file only dispatches.

mod bench;
mod ci;
mod demo;
mod torture;
mod util;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(&args[1..]),
        Some("ci") => ci::run(),
        Some("bench") => bench::run(&args[1..]),
        Some("torture") => torture::run(&args[1..]),
        other => {
            let help = matches!(other, Some("-h" | "--help" | "help"));
            if let (Some(task), false) = (other, help) {
                eprintln!("xtask: no task named {task:?}\n");
            }
            let usage = "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 demo [-f FILE]   build release binaries and run `p2pctl demo` on cluster.example.yaml\n  \
                 bench [--quick] [--json]   build release binaries and run every p2pbench scenario\n  \
                 torture [--seed N] [...]   seeded kills, hangs, restarts, partitions and CPU hogs against real nodes, checked\n  \
                 ci               run .ci/run (fmt, clippy, tests)";
            if help {
                println!("{usage}");
                std::process::exit(0);
            }
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
