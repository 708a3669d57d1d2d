//! `cargo xtask bench [--quick] [--json]`: release-build the node, the bots
//! and `p2pbench`, then run every scenario. Results are printed and also
//! written as JSON lines to target/bench-results.jsonl.

use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::util::{cargo, project_root, run as run_cmd};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    eprintln!("building release binaries (p2pnode, p2pbench, the bots)…");
    let mut build = cargo();
    build.args(["build", "--release", "--quiet"]);
    for p in [
        "p2p-node",
        "p2p-bench",
        "p2p-plugin-echo",
        "p2p-plugin-moderation",
        "p2p-plugin-logger",
    ] {
        build.args(["-p", p]);
    }
    run_cmd(&mut build)?;
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().any(|a| a == "--json");
    let bench = crate::util::release_bin("p2pbench")?;
    let mut cmd = Command::new(&bench);
    cmd.arg("all").arg("--json");
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .current_dir(project_root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", bench.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = crate::util::target_dir()?.join("bench-results.jsonl");
    std::fs::write(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    for line in text.lines() {
        if json {
            println!("{line}");
        } else {
            println!("{}", summary(line));
        }
    }
    if !out.status.success() {
        bail!("p2pbench failed ({})", out.status);
    }
    eprintln!("results also in {}", path.display());
    Ok(())
}

/// One readable line per JSON result.
fn summary(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let (p, f) = (&v["params"], &v["figures"]);
    let n = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    match v["scenario"].as_str().unwrap_or("") {
        "fanout" => format!(
            "fanout   N={:<4} S={} P={}: {:>6.2} M deliveries/s, {:>7.0} publishes/s, coordinator {:.2} µs CPU/message; latency p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
            p["members"], p["size"], p["publishers"], n(&f["deliveries_per_s"]) / 1e6, n(&f["publishes_per_s"]), n(&f["coordinator_cpu_us_per_msg"]),
            n(&f["latency_us"]["p50"]), n(&f["latency_us"]["p99"]), n(&f["latency_us"]["p999"]), n(&f["latency_us"]["max"])
        ),
        "plugins" => format!(
            "plugins  N={:<4}: {:.2} M deliveries/s without bots, {:.2} M with echo+moderation+logger ({:.1}% fewer); coordinator CPU {:.2} → {:.2} µs/message ({:+.1}%)",
            p["members"], n(&f["without_deliveries_per_s"]) / 1e6, n(&f["with_deliveries_per_s"]) / 1e6, n(&f["cost_percent"]),
            n(&f["without_cpu_us_per_msg"]), n(&f["with_cpu_us_per_msg"]), n(&f["cpu_cost_percent"])
        ),
        "members" => format!(
            "members  N={}: {:.0} joins/s, views complete in {:.2} s, {:.1} KiB coordinator RSS per member, {:.2} M deliveries/s",
            p["members"], n(&f["joins_per_s"]), n(&f["view_complete_s"]), n(&f["rss_per_member_kib"]), n(&f["deliveries_per_s"]) / 1e6
        ),
        "handshake" => format!(
            "handshake x{}: connect + one status round trip {:.0} µs keyed, {:.0} µs --insecure (the key exchange: {:.0} µs)",
            p["connections"], n(&f["keyed_us"]), n(&f["insecure_us"]), n(&f["handshake_us"])
        ),
        "failover" => format!(
            "failover {:<7} x{}: chat flowing again after p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; no loss, no duplicates",
            p["signal"].as_str().unwrap_or(""), p["reps"], n(&f["ms"]["p50"]), n(&f["ms"]["p99"]), n(&f["ms"]["max"])
        ),
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::summary;

    /// Every scenario `p2pbench all` reports reads as a sentence, not as
    /// the JSON line it came from.
    #[test]
    fn every_scenario_has_a_readable_line() {
        let lines = [
            r#"{"scenario":"fanout","params":{"members":1,"size":64,"publishers":1},"figures":{"deliveries_per_s":1.2e6,"latency_us":{"p50":90}}}"#,
            r#"{"scenario":"plugins","params":{"members":10},"figures":{"cost_percent":10.2}}"#,
            r#"{"scenario":"handshake","params":{"connections":1000},"figures":{"keyed_us":547.7,"insecure_us":418.3,"handshake_us":129.4}}"#,
            r#"{"scenario":"members","params":{"members":1000},"figures":{"rss_per_member_kib":9.2}}"#,
            r#"{"scenario":"failover","params":{"signal":"sigkill","reps":10},"figures":{"ms":{"p50":4.3}}}"#,
        ];
        for line in lines {
            let s = summary(line);
            assert!(!s.starts_with('{'), "printed as JSON: {s}");
        }
        let hs = summary(lines[2]);
        assert!(
            hs.contains("548 µs keyed") && hs.contains("418 µs --insecure") && hs.contains("129 µs"),
            "{hs}"
        );
    }
}
