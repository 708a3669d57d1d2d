//! `p2pbench`: the numbers behind every speed claim of p2pchat. Scenarios
//! run against real `p2pnode` processes on 127.0.0.1; `--json` prints one
//! line per result. docs/BENCHMARKS.md records what this machine measured.

mod client;
mod compare;
mod failover;
mod fanout;
mod history;
mod members;
mod nodes;
mod report;
mod torture;

use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use serde_json::json;

use report::{percentiles, Report};

#[derive(Parser)]
#[command(
    name = "p2pbench",
    version,
    about = "Benchmarks for p2pchat: fan-out, membership, failover, plugins"
)]
struct Args {
    /// One JSON object per result instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Smaller runs (under a minute for `all`).
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// One fan-out load: widths, message size, messages per run.
#[derive(clap::Args)]
struct Load {
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    members: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per run (default 500000, --quick 50000).
    #[arg(long)]
    messages: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Deliveries/s and latency percentiles, 1 coordinator → N members.
    Fanout {
        #[command(flatten)]
        load: Load,
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Use a coordinator already running at ADDR (e.g. under a profiler;
        /// start it with --history 0 --events none) instead of starting one.
        #[arg(long)]
        connect: Option<String>,
        /// The chat key of the node given with --connect (without it, the
        /// node must run --insecure).
        #[arg(long, requires = "connect")]
        key_file: Option<std::path::PathBuf>,
    },
    /// Joins of many members: view completion time, RSS per member, broadcast rate.
    Members {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Coordinator SIGKILL and SIGSTOP in a 5-node cluster: time until chat flows again.
    Failover {
        /// Repetitions per signal (default 10, --quick 3).
        #[arg(long)]
        reps: Option<usize>,
    },
    /// Fan-out with no plugins and with echo, moderation and logger, same run.
    Plugins {
        #[arg(long, value_delimiter = ',', default_value = "10,50")]
        members: Vec<usize>,
    },
    /// Seeded faults against real processes (SIGKILL, SIGSTOP/SIGCONT,
    /// restarts, network partitions, one-way cuts, CPU hogs) while every node is typed into; checks every
    /// node's delivered history and prints violations by category.
    Torture {
        #[command(flatten)]
        plan: torture::Plan,
    },
    /// One-publisher fan-out against nats-server and redis-server (started
    /// here if installed: apt-get install nats-server redis-server), and
    /// p2pnode keyed and --insecure, interleaved; not part of `all`.
    Compare {
        #[command(flatten)]
        load: Load,
    },
    /// Every scenario with its defaults.
    All,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Same as p2pnode; the brokers' subscribers share this process.
    p2p_proto::net::keep_buffers_in_heap();
    let args = Args::parse();
    let report = Report { json: args.json };
    let result = match args.cmd {
        Cmd::Fanout {
            load:
                Load {
                    members,
                    size,
                    messages,
                },
            publishers,
            connect: Some(addr),
            key_file,
        } => {
            let m = messages.unwrap_or(200_000);
            let key = match key_file.map(|f| p2p_proto::secure::read_key_file(&f)).transpose() {
                Ok(k) => k.map(std::sync::Arc::new),
                Err(e) => {
                    eprintln!("p2pbench: {e}");
                    std::process::exit(2);
                }
            };
            for n in members {
                match fanout::throughput(&addr, &key, n, size, m, publishers).await {
                    Ok(t) => println!(
                        "fanout N={n} against {addr}: {:.0} deliveries/s",
                        t.deliveries_per_s
                    ),
                    Err(e) => eprintln!("p2pbench: {e:#}"),
                }
            }
            Ok(())
        }
        Cmd::Fanout {
            load:
                Load {
                    members,
                    size,
                    messages,
                },
            publishers,
            connect: None,
            ..
        } => {
            fanout_cmd(
                &report,
                &members,
                size,
                messages.unwrap_or(if args.quick { 50_000 } else { 500_000 }),
                publishers,
                args.quick,
            )
            .await
        }
        Cmd::Members { count } => members_cmd(&report, count, args.quick).await,
        Cmd::Compare {
            load:
                Load {
                    members,
                    size,
                    messages,
                },
        } => {
            let m = messages.unwrap_or(if args.quick { 50_000 } else { 500_000 });
            compare_cmd(&report, &members, size, m, args.quick).await
        }
        Cmd::Failover { reps } => {
            failover_cmd(&report, reps.unwrap_or(if args.quick { 3 } else { 10 })).await
        }
        Cmd::Plugins { members } => plugins_cmd(&report, &members, args.quick).await,
        Cmd::Torture { plan } => torture_cmd(&report, plan).await,
        Cmd::All => all(&report, args.quick).await,
    };
    nodes::remove_bench_key();
    if let Err(e) = result {
        eprintln!("p2pbench: {e:#}");
        std::process::exit(1);
    }
}

async fn torture_cmd(report: &Report, plan: torture::Plan) -> anyhow::Result<()> {
    let out = torture::run(plan.clone()).await?;
    if report.json {
        println!("{}", out.to_json(&plan));
    } else {
        let v = out.verdict.to_json();
        let pct = |s: &[f64]| {
            let mut s = s.to_vec();
            let p = percentiles(&mut s);
            format!(
                "n={} p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                s.len(),
                p.p50,
                p.p99,
                p.max
            )
        };
        println!(
            "torture seed {} ({} nodes, heartbeat {} ms, {} hogs): {} kills, {} stops, {} partitions, {} one-way cuts, {} restarts, {} messages in {:.0} s",
            plan.seed,
            plan.nodes,
            plan.heartbeat_ms,
            plan.hogs,
            out.kills,
            out.stops,
            out.partitions,
            out.one_way,
            out.restarts,
            out.messages,
            out.secs
        );
        println!(
            "  failover after SIGKILL of the coordinator: {}",
            pct(&out.crash_ms)
        );
        println!(
            "  failover after SIGSTOP of the coordinator: {}",
            pct(&out.hang_ms)
        );
        for (k, n) in v["violations"].as_object().into_iter().flatten() {
            println!("  {k:<17} {n}");
        }
        for e in &out.verdict.examples {
            println!("  e.g. {e}");
        }
    }
    if out.verdict.total() > 0 {
        anyhow::bail!("{} violation(s) with seed {}", out.verdict.total(), plan.seed);
    }
    Ok(())
}

async fn all(report: &Report, quick: bool) -> anyhow::Result<()> {
    let m = if quick { 50_000 } else { 500_000 };
    fanout_cmd(report, &[1, 10, 50], 64, m, 1, quick).await?;
    plugins_cmd(report, &[10, 50], quick).await?;
    members_cmd(report, 1000, quick).await?;
    failover_cmd(report, if quick { 3 } else { 10 }).await
}

/// Throughput runs per figure (the median is reported): this machine is a
/// VM whose neighbours make single runs swing by ±30%.
fn reps(quick: bool) -> usize {
    if quick {
        1
    } else {
        3
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn throughput_median(
    extra: &[String],
    n: usize,
    size: usize,
    m: u64,
    p: usize,
    runs: usize,
) -> anyhow::Result<fanout::Throughput> {
    let (mut d, mut pubs, mut secs, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let coord = fanout::coordinator(extra).await?;
        let before = coord.cpu_ns();
        let t = fanout::throughput(&coord.addr, &coord.key, n, size, m, p).await?;
        let used = coord.cpu_ns().saturating_sub(before);
        if extra.iter().any(|a| a == "--plugin") {
            check_plugins_active(&coord.addr, &coord.key, m).await?;
        }
        d.push(t.deliveries_per_s);
        pubs.push(t.publishes_per_s);
        secs.push(t.seconds);
        cpu.push(used as f64 / 1000.0 / m as f64);
    }
    Ok(fanout::Throughput {
        deliveries_per_s: median(d),
        publishes_per_s: median(pubs),
        seconds: median(secs),
        cpu_us_per_msg: median(cpu),
    })
}

/// Fails unless every plugin of the coordinator is active and was called
/// for every message it asked to hear (a quarantined or refused bot would
/// fake a fast run).
async fn check_plugins_active(addr: &str, key: &nodes::Key, messages: u64) -> anyhow::Result<()> {
    let status =
        p2p_ctl::check::coordinator_request(addr, &p2p_proto::Frame::StatusRequest { log: false }, key)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the coordinator's plugin status: {e}"))?;
    let p2p_proto::Frame::Status { plugins, .. } = status else {
        anyhow::bail!("unexpected answer to a status request");
    };
    for p in &plugins {
        // A bot that hears only commands (echo: `!echo `) is not called
        // for the benchmark's plain messages.
        if p.state != p2p_proto::PluginState::Active || (p.calls < messages && p.hears.is_empty()) {
            anyhow::bail!(
                "plugin {} is {:?} after {} calls ({}); the measurement would be meaningless",
                p.name,
                p.state,
                p.calls,
                p.error.clone().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The fixed load at which the node's own cost of the key is compared
/// (messages per second from one publisher).
const PACED_RATE: u64 = 40_000;

/// `compare`: every target at every width, rounds interleaved.
async fn compare_cmd(
    report: &Report,
    members: &[usize],
    size: usize,
    m: u64,
    quick: bool,
) -> anyhow::Result<()> {
    let mut brokers = Vec::new();
    for b in [compare::Broker::Nats, compare::Broker::Redis] {
        match compare::start(b).await? {
            Some(r) => brokers.push(r),
            None => eprintln!(
                "p2pbench: {} is not installed; comparing without it (apt-get install {})",
                b.name(),
                b.name()
            ),
        }
    }
    let insecure = ["--insecure".to_string()];
    for &n in members {
        let mut results: Vec<(String, Vec<f64>)> = brokers
            .iter()
            .map(|b| (b.broker.name().to_string(), Vec::new()))
            .collect();
        results.push(("p2pnode".into(), Vec::new()));
        results.push(("p2pnode --insecure".into(), Vec::new()));
        for _ in 0..reps(quick) {
            for (i, b) in brokers.iter().enumerate() {
                results[i]
                    .1
                    .push(compare::throughput(b.broker, &b.addr, n, size, m).await?);
            }
            for (args, k) in [(&[][..], 2), (&insecure[..], 1)] {
                let coord = fanout::coordinator(args).await?;
                let t = fanout::throughput(&coord.addr, &coord.key, n, size, m, 1).await?;
                let at = results.len() - k;
                results[at].1.push(t.deliveries_per_s);
            }
        }
        let medians: Vec<(String, f64)> = results.into_iter().map(|(name, v)| (name, median(v))).collect();
        let best_broker = medians[..brokers.len()]
            .iter()
            .map(|(_, v)| *v)
            .fold(0.0, f64::max);
        let ratio = |v: f64| {
            if best_broker > 0.0 {
                v / best_broker
            } else {
                f64::NAN
            }
        };
        let line: Vec<String> = medians
            .iter()
            .map(|(name, v)| format!("{name} {:.2} M", v / 1e6))
            .collect();
        let (keyed, plain) = (medians[medians.len() - 2].1, medians[medians.len() - 1].1);
        // Latency, one message at a time, after the throughput rounds: in
        // each round every target takes `per_round` samples, the order
        // turning by one each round, and each target's samples are pooled.
        // A slow phase of the machine (they come and go within seconds on
        // a VM) then falls on every target alike, and the p99 rests on
        // `count` samples rather than on one stretch of time per target.
        let (rounds, per_round) = if quick { (1, 300) } else { (5, 1000) };
        let count = rounds * per_round;
        let targets = brokers.len() + 2;
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets];
        for round in 0..rounds as usize {
            for t in (0..targets).map(|i| (i + round) % targets) {
                let taken = if let Some(b) = brokers.get(t) {
                    compare::one_at_a_time(b.broker, &b.addr, n, size, per_round).await?
                } else {
                    let args = if t == brokers.len() {
                        &[][..]
                    } else {
                        &insecure[..]
                    };
                    let coord = fanout::coordinator(args).await?;
                    fanout::one_at_a_time(&coord.addr, &coord.key, n, size, per_round).await?
                };
                samples[t].extend(taken);
            }
        }
        let names = brokers
            .iter()
            .map(|b| b.broker.name())
            .chain(["p2pnode", "p2pnode --insecure"]);
        let lat: Vec<(String, report::Pct)> = names
            .zip(samples)
            .map(|(name, mut s)| (name.to_string(), report::percentiles(&mut s)))
            .collect();
        let best_p99 = lat[..brokers.len()]
            .iter()
            .map(|(_, p)| p.p99)
            .fold(f64::INFINITY, f64::min);
        report.emit(
            "compare",
            json!({"members": n, "size": size, "messages": m, "runs": reps(quick)}),
            json!({"deliveries_per_s": medians.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                   "p2pnode_over_best_broker": ratio(keyed), "insecure_over_best_broker": ratio(plain),
                   "latency_one_at_a_time_us": lat.iter().map(|(k, p)| (k.clone(), json!({"p50": p.p50, "p99": p.p99, "p999": p.p999, "max": p.max}))).collect::<serde_json::Map<_, _>>(),
                   "latency_samples": count}),
            format!(
                "compare N={n:<3} S={size}: {} | p2pnode / best broker {:.2}x (--insecure {:.2}x)\n        latency one at a time ({count}): {} | p2pnode p99 / best broker p99 {:.2}x",
                line.join(", "),
                ratio(keyed),
                ratio(plain),
                lat.iter()
                    .map(|(name, p)| format!("{name} p50 {:.0} p99 {:.0} µs", p.p50, p.p99))
                    .collect::<Vec<_>>()
                    .join(", "),
                lat[lat.len() - 2].1.p99 / best_p99
            ),
        );
    }
    Ok(())
}

async fn fanout_cmd(
    report: &Report,
    members: &[usize],
    size: usize,
    m: u64,
    p: usize,
    quick: bool,
) -> anyhow::Result<()> {
    let insecure = vec!["--insecure".to_string()];
    for &n in members {
        // Keyed (the default) and plaintext, interleaved so drift in the
        // machine hits both alike.
        let (mut keyed, mut plain, mut cpu_k, mut cpu_p) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut publishes = Vec::new();
        for _ in 0..reps(quick) {
            let k = throughput_median(&[], n, size, m, p, 1).await?;
            let q = throughput_median(&insecure, n, size, m, p, 1).await?;
            keyed.push(k.deliveries_per_s);
            publishes.push(k.publishes_per_s);
            cpu_k.push(k.cpu_us_per_msg);
            plain.push(q.deliveries_per_s);
            cpu_p.push(q.cpu_us_per_msg);
        }
        let (t, t_plain) = (median(keyed), median(plain));
        let (c, c_plain) = (median(cpu_k), median(cpu_p));
        let ratio = t / t_plain;
        // The node's own cost of the key, at one load both keep up with.
        let paced_count = if quick { 50_000 } else { 200_000 };
        let (mut node_k, mut node_p) = (Vec::new(), Vec::new());
        for _ in 0..reps(quick) {
            for (args, out) in [(&[][..], &mut node_k), (&insecure[..], &mut node_p)] {
                let coord = fanout::coordinator(args).await?;
                let before = coord.cpu_ns();
                fanout::paced(&coord.addr, &coord.key, n, size, paced_count, PACED_RATE).await?;
                out.push(coord.cpu_ns().saturating_sub(before) as f64 / 1000.0 / paced_count as f64);
            }
        }
        let (nk, np) = (median(node_k), median(node_p));
        let count = if quick { 500 } else { 2000 };
        let coord = fanout::coordinator(&[]).await?;
        let lat = fanout::latency(&coord.addr, &coord.key, n, size, count, 1000).await?;
        drop(coord);
        let coord = fanout::coordinator(&insecure).await?;
        let lat_plain = fanout::latency(&coord.addr, &coord.key, n, size, count, 1000).await?;
        report.emit(
            "fanout",
            json!({"members": n, "size": size, "messages": m, "publishers": p, "runs": reps(quick), "latency_messages": count, "latency_rate": 1000}),
            json!({"deliveries_per_s": t, "publishes_per_s": median(publishes),
                   "coordinator_cpu_us_per_msg": c,
                   "latency_us": {"p50": lat.p50, "p99": lat.p99, "p999": lat.p999, "max": lat.max},
                   "insecure": {"deliveries_per_s": t_plain, "coordinator_cpu_us_per_msg": c_plain,
                                "latency_us": {"p50": lat_plain.p50, "p99": lat_plain.p99, "p999": lat_plain.p999, "max": lat_plain.max}},
                   "keyed_over_insecure": ratio,
                   "paced": {"rate": PACED_RATE, "messages": paced_count, "coordinator_cpu_us_per_msg": nk,
                             "insecure_coordinator_cpu_us_per_msg": np, "insecure_over_keyed_cost": np / nk}}),
            format!(
                "fanout  N={n:<4} S={size} P={p}: {t:>12.0} deliveries/s keyed, {t_plain:>12.0} --insecure ({ratio:.2}x); coordinator {c:.2} vs {c_plain:.2} µs/msg\n        at {PACED_RATE} msg/s the coordinator spends {nk:.2} µs/msg keyed, {np:.2} --insecure ({:.2}x) | latency p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs (insecure p50 {:.0} p99 {:.0})",
                np / nk, lat.p50, lat.p99, lat.p999, lat_plain.p50, lat_plain.p99
            ),
        );
    }
    Ok(())
}

async fn plugins_cmd(report: &Report, members: &[usize], quick: bool) -> anyhow::Result<()> {
    let m = if quick { 50_000 } else { 500_000 };
    let dir = std::env::temp_dir().join(format!("p2pbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let transcript = dir.join("transcript.jsonl");
    let with: Vec<String> = vec![
        "--data-dir".into(),
        dir.display().to_string(),
        "--plugin".into(),
        "echo".into(),
        "--plugin".into(),
        // Each bot at the defaults a user gets: moderation with one banned
        // word, the logger flushing every batch.
        r#"moderation:{"banned":["spam"]}"#.into(),
        "--plugin".into(),
        r#"logger:{"path":"transcript.jsonl"}"#.into(),
    ];
    // Five pairs, not three: the figure is a difference of two medians,
    // and on a VM one slow run in three moves it by several points.
    let pairs = if quick { 1 } else { 5 };
    for &n in members {
        // Interleaved pairs, so drift in the machine hits both sides alike.
        let (mut without, mut withp, mut cpu0, mut cpu1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..pairs {
            let a = throughput_median(&[], n, 64, m, 1, 1).await?;
            let b = throughput_median(&with, n, 64, m, 1, 1).await?;
            without.push(a.deliveries_per_s);
            withp.push(b.deliveries_per_s);
            cpu0.push(a.cpu_us_per_msg);
            cpu1.push(b.cpu_us_per_msg);
            let _ = std::fs::remove_file(&transcript);
        }
        let (base, bots) = (median(without), median(withp));
        let (c0, c1) = (median(cpu0), median(cpu1));
        let cost = 100.0 * (1.0 - bots / base);
        let cpu_cost = 100.0 * (c1 / c0 - 1.0);
        report.emit(
            "plugins",
            json!({"members": n, "size": 64, "messages": m, "runs": pairs, "plugins": ["echo", "moderation", "logger"], "logger_flush": "every"}),
            json!({"without_deliveries_per_s": base, "with_deliveries_per_s": bots, "cost_percent": cost,
                   "without_cpu_us_per_msg": c0, "with_cpu_us_per_msg": c1, "cpu_cost_percent": cpu_cost}),
            format!("plugins N={n:<4}: {base:>12.0} deliveries/s without, {bots:>12.0} with echo+moderation+logger ({cost:.1}% fewer); coordinator CPU {c0:.2} → {c1:.2} µs/message ({cpu_cost:+.1}%)"),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn members_cmd(report: &Report, count: usize, quick: bool) -> anyhow::Result<()> {
    let messages = if quick { 200 } else { 1000 };
    let r = members::run(count, messages).await?;
    let hs = members::handshake_cost(if quick { 200 } else { 1000 }).await?;
    report.emit(
        "handshake",
        json!({"connections": hs.connections}),
        json!({"keyed_us": hs.keyed_us, "insecure_us": hs.insecure_us, "handshake_us": hs.keyed_us - hs.insecure_us}),
        format!(
            "handshake: connect + one status round trip {:.0} µs keyed, {:.0} µs --insecure: the key handshake costs {:.0} µs per connection",
            hs.keyed_us, hs.insecure_us, hs.keyed_us - hs.insecure_us
        ),
    );
    report.emit(
        "members",
        json!({"members": count, "broadcast_messages": messages, "size": 64}),
        json!({"joins_per_s": r.joins_per_s, "view_complete_s": r.view_complete_s,
               "rss_before_kib": r.rss_before_kib, "rss_after_kib": r.rss_after_kib,
               "rss_per_member_kib": r.rss_per_member_kib, "deliveries_per_s": r.deliveries_per_s}),
        format!(
            "members N={count}: {:.0} joins/s, every view complete after {:.2} s, coordinator RSS {} → {} KiB ({:.1} KiB/member), broadcast {:.0} deliveries/s",
            r.joins_per_s, r.view_complete_s, r.rss_before_kib, r.rss_after_kib, r.rss_per_member_kib, r.deliveries_per_s
        ),
    );
    Ok(())
}

async fn failover_cmd(report: &Report, reps: usize) -> anyhow::Result<()> {
    for (signal, name) in [(Signal::SIGKILL, "sigkill"), (Signal::SIGSTOP, "sigstop")] {
        let mut r = failover::run(reps, signal, 100).await?;
        let p = percentiles(&mut r.samples_ms);
        report.emit(
            "failover",
            json!({"signal": name, "nodes": 5, "reps": reps, "heartbeat_ms": 100}),
            json!({"ms": {"p50": p.p50, "p99": p.p99, "max": p.max}, "no_loss_no_duplicates": true}),
            format!(
                "failover {name:<7} x{reps}: kill → chat flowing on every survivor p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (no loss, no duplicates)",
                p.p50, p.p99, p.max
            ),
        );
    }
    Ok(())
}
