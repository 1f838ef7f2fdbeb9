//! `breakglass-bench`: measures the real release `breakglass` binary against
//! the performance targets of DESIGN §8 and prints each figure with its
//! target, the ratio figure/target, and the figure in terms of physical
//! baselines (fsync, loopback round trip, durable commit) measured in the
//! same run.
//!
//! Run it with `cargo xtask bench` (builds in release, then runs
//! `target/release/breakglass-bench --breakglass target/release/breakglass`).
//! Every server it starts is a child process on a free loopback port in a
//! temp dir, and is stopped by its pid when its benchmark ends.

mod baseline;
mod console;
mod cpu;
mod drills;
mod evidence;
mod gateway;
mod nodes;
mod review;
mod scenarios;
mod seed;
mod server;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use breakglass_core::Timestamp;

use crate::stats::{Row, fmt_secs};

const USAGE: &str = "usage: breakglass-bench [--breakglass PATH] [--quick] [--only NAME[,NAME...]]

  --breakglass PATH  the breakglass binary to measure (default: next to this one)
  --quick            much smaller counts: a smoke run of about a minute
  --only NAMES       run only these benchmarks (the baselines always run):
                     access, approve, lifecycles, expiry, expiry-burst,
                     audit-verify, memory, startup, gateway, nodes, evidence,
                     drills, review, notify,
                     console, ssh
";

/// Other processes may use at most this share of the CPUs before a
/// benchmark starts (waited for, bounded).
const QUIET_SHARE: f64 = 0.10;

/// A benchmark during which other processes used more than this share of
/// the CPUs counts as disturbed.
const DISTURBED_SHARE: f64 = 0.15;
/// Attempts at a short benchmark that keeps being disturbed.
const ATTEMPTS: usize = 3;
/// The short benchmarks, worth running again when disturbed.
const RETRIED: [&str; 4] = ["access", "approve", "lifecycles", "startup"];

/// One run of a benchmark: others' CPU share, its result, rows and notes.
type Attempt = (f64, anyhow::Result<()>, Vec<Row>, Vec<String>);

pub const BENCHMARKS: [&str; 16] = [
    "access",
    "approve",
    "lifecycles",
    "expiry",
    "expiry-burst",
    "audit-verify",
    "memory",
    "startup",
    "gateway",
    "nodes",
    "evidence",
    "drills",
    "review",
    "notify",
    "console",
    "ssh",
];

#[derive(Debug)]
struct Args {
    breakglass: PathBuf,
    quick: bool,
    only: Option<Vec<String>>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut breakglass = None;
    let mut quick = false;
    let mut only = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--quick" => quick = true,
            "--breakglass" => {
                breakglass = Some(PathBuf::from(
                    it.next().context("--breakglass needs a path")?,
                ));
            }
            "--only" => {
                let names: Vec<String> = it
                    .next()
                    .context("--only needs a name")?
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                for n in &names {
                    if !BENCHMARKS.contains(&n.as_str()) {
                        bail!(
                            "--only: unknown benchmark {n:?} (known: {})",
                            BENCHMARKS.join(", ")
                        );
                    }
                }
                only.get_or_insert_with(Vec::new).extend(names);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let breakglass = match breakglass {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no parent dir of this binary")?
            .join("breakglass"),
    };
    if !breakglass.is_file() {
        bail!(
            "{} does not exist: build it first (cargo build --release -p breakglass) or pass --breakglass PATH",
            breakglass.display()
        );
    }
    Ok(Some(Args {
        breakglass,
        quick,
        only,
    }))
}

/// nproc, CPU model, kernel, memory: the machine the figures belong to.
fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(
            || "unknown".into(),
            |kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0),
        );
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        ("nproc".into(), nproc.to_string()),
        ("cpu".into(), model),
        ("kernel".into(), kernel),
        ("memory".into(), mem),
    ]
}

fn print_table(rows: &[Row]) {
    let head = [
        "benchmark",
        "figure",
        "target",
        "ratio",
        "ok",
        "vs baselines",
        "others' CPU",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.what.clone(),
                r.figure.clone(),
                r.target.clone(),
                r.ratio().map_or_else(String::new, |x| format!("{x:.2}")),
                match r.met() {
                    Some(true) => "yes".into(),
                    Some(false) => "MISS".into(),
                    None => String::new(),
                },
                r.note.clone(),
                r.others
                    .map_or_else(String::new, |o| format!("{:.0}%", 100.0 * o)),
            ]
        })
        .collect();
    let mut width = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            width[i] = width[i].max(v.chars().count());
        }
    }
    let line = |c: &[String]| {
        let parts: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = width[i]))
            .collect();
        println!("| {} |", parts.join(" | ").trim_end());
    };
    line(&head.map(String::from));
    let sep: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", sep.join("-|-"));
    for c in &cells {
        line(c);
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    println!("# breakglass benchmarks");
    println!();
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let version = std::process::Command::new(&args.breakglass)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("binary:  {} ({version})", args.breakglass.display());
    println!(
        "date:    {}",
        Timestamp(breakglass_server::app::now().millis()).to_rfc3339()
    );
    for (k, v) in machine() {
        println!("{k:<8} {v}");
    }
    println!(
        "mode:    {}",
        if args.quick {
            "--quick (smoke run: small counts, figures are indicative only)"
        } else {
            "full"
        }
    );
    println!();

    let mut ctx = scenarios::Ctx::new(args.breakglass.clone(), args.quick)?;
    // Other processes on the machine skew every figure: wait (bounded) for
    // a quiet moment before each benchmark, and record their share.
    // A --quick smoke run neither waits nor repeats.
    let quiet_max = Duration::from_secs(120);
    // Returns the benchmark's result and the share of the CPUs other
    // processes used meanwhile.
    let measured = |ctx: &mut scenarios::Ctx,
                    f: &mut dyn FnMut(&mut scenarios::Ctx) -> anyhow::Result<()>|
     -> (anyhow::Result<()>, f64) {
        if !args.quick {
            cpu::wait_quiet(QUIET_SHARE, quiet_max);
        }
        let first_row = ctx.rows.len();
        let a = cpu::snap();
        let res = f(ctx);
        let u = cpu::between(a, cpu::snap(), 0.0);
        for r in &mut ctx.rows[first_row..] {
            r.others.get_or_insert(u.others);
        }
        if u.steal > 0.05 {
            ctx.notes.push(format!(
                "the hypervisor stole {:.0}% of the CPUs during a benchmark",
                100.0 * u.steal
            ));
        }
        (res, u.others)
    };
    eprintln!("== baselines");
    measured(&mut ctx, &mut |c| c.baselines()).0?;
    let selected = |name: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == name))
    };
    let mut failures = Vec::new();
    for name in BENCHMARKS {
        if !selected(name) {
            continue;
        }
        eprintln!("== {name}");
        let t = Instant::now();
        let (rows, notes) = (ctx.rows.len(), ctx.notes.len());
        // Short benchmarks disturbed by other processes run again (at most
        // ATTEMPTS times); the least disturbed attempt is kept.
        let attempts = if RETRIED.contains(&name) && !args.quick {
            ATTEMPTS
        } else {
            1
        };
        let mut best: Option<Attempt> = None;
        for attempt in 1..=attempts {
            let (res, others) = measured(&mut ctx, &mut |c| match name {
                "access" => c.access(),
                "approve" => c.approve(),
                "lifecycles" => c.lifecycles(),
                "expiry" => c.expiry(false),
                "expiry-burst" => c.expiry(true),
                "audit-verify" => c.audit_verify(),
                "memory" => c.memory(),
                "startup" => c.startup(),
                "gateway" => c.gateway(),
                "nodes" => c.nodes(),
                "evidence" => c.evidence(),
                "drills" => c.drills(),
                "review" => c.review(),
                "notify" => c.notify(),
                "console" => c.console(),
                "ssh" => c.ssh(),
                _ => Ok(()),
            });
            let new_rows = ctx.rows.split_off(rows);
            let new_notes = ctx.notes.split_off(notes);
            if best.as_ref().is_none_or(|b| others < b.0) {
                best = Some((others, res, new_rows, new_notes));
            }
            if others <= DISTURBED_SHARE || attempt == attempts {
                break;
            }
            eprintln!(
                "   other processes used {:.0}% of the CPUs meanwhile: running it again",
                100.0 * others
            );
        }
        if let Some((_, res, new_rows, new_notes)) = best {
            ctx.rows.extend(new_rows);
            ctx.notes.extend(new_notes);
            if let Err(e) = res {
                eprintln!("!! {name} failed: {e:#}");
                failures.push(format!("{name}: {e:#}"));
                ctx.rows.push(Row::info(name, "FAILED", format!("{e:#}")));
            }
        }
        eprintln!("   ({})", fmt_secs(t.elapsed().as_secs_f64()));
    }
    if let Some(n) = ctx.seed_note.take() {
        ctx.notes.push(n);
    }
    println!("## Results");
    println!();
    print_table(&ctx.rows);
    println!();
    if !ctx.notes.is_empty() {
        println!("## Details");
        println!();
        for n in &ctx.notes {
            println!("- {n}");
        }
        println!();
    }
    let missed: Vec<&Row> = ctx.rows.iter().filter(|r| r.met() == Some(false)).collect();
    println!(
        "{} targets met, {} missed, {} benchmarks failed; total time {}",
        ctx.rows.iter().filter(|r| r.met() == Some(true)).count(),
        missed.len(),
        failures.len(),
        fmt_secs(started.elapsed().as_secs_f64())
    );
    Ok(failures.is_empty())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("breakglass-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("breakglass-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
