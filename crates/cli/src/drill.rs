//! `breakglass drill run NAME [--load RATE --for D]` and `breakglass drill
//! report [--since 30d]`: run a drill now on the server and print each step
//! with its time, or print the history of drill runs.

use std::fmt::Write as _;

use breakglass_core::model::NAME_LEN_MAX;
use breakglass_server::drill::{DrillReport, DrillRun, LoadResult, LoadSpec, RunBody, Stats};

use crate::cmd::{Ctx, print_json, print_text};
use crate::exit::{Exit, Failure};

/// Runs drill `name` now; exit 0 when it passes.
pub fn run(ctx: &Ctx, name: &str, load: Option<(u32, String)>) -> anyhow::Result<Exit> {
    if name.is_empty()
        || name.len() > NAME_LEN_MAX
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@:-".contains(c))
    {
        return Err(Failure::usage(
            "bad_drill_name",
            format!("drill name {name:?}: use the name of a [[drills]] entry (letters, digits, . _ @ : -)"),
        )
        .into());
    }
    let body = RunBody {
        load: load.map(|(rate, for_)| LoadSpec { rate, for_ }),
    };
    let answer = ctx.client()?.drill_run(name, &body)?;
    if ctx.json() {
        print_json(&answer)?;
    } else {
        let mut out = String::new();
        match (&answer.baseline, &answer.load) {
            (Some(base), Some(load)) => {
                out.push_str(&side_by_side(base, &answer.run));
                out.push_str(&load_text(load));
            }
            _ => out.push_str(&run_text(&answer.run)),
        }
        print_text(&out)?;
    }
    if answer.run.passed() {
        Ok(Exit::Success)
    } else {
        Err(Failure::new(
            Exit::Error,
            "drill_failed",
            format!(
                "drill {} failed at step {}: {}",
                answer.run.drill,
                answer.run.failed_step.as_deref().unwrap_or("?"),
                answer.run.error.as_deref().unwrap_or("no reason given")
            ),
        )
        .into())
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"))
}

/// One run: each step with its time, then the figures.
pub fn run_text(r: &DrillRun) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "drill {}: {}{}",
        r.drill,
        r.result.to_uppercase(),
        r.request_id
            .as_deref()
            .map(|id| format!(" (request {id})"))
            .unwrap_or_default()
    );
    for s in &r.steps {
        let _ = writeln!(
            out,
            "  {:<12} {:>10.1} ms  {}",
            s.step,
            s.ms,
            if s.ok { "ok" } else { "FAILED" }
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "  error: {e}");
    }
    let _ = writeln!(
        out,
        "  time to access:          {}",
        opt_ms(r.time_to_access_ms)
    );
    let _ = writeln!(
        out,
        "  time to credentials:     {}",
        opt_ms(r.time_to_credentials_ms)
    );
    let _ = writeln!(
        out,
        "  time to first statement: {}",
        opt_ms(r.time_to_first_statement_ms)
    );
    let _ = writeln!(
        out,
        "  cut latency:             {}",
        opt_ms(r.cut_latency_ms)
    );
    out
}

/// The drill alone beside the drill under load.
fn side_by_side(alone: &DrillRun, loaded: &DrillRun) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "drill {}: alone {}, under load {}",
        loaded.drill,
        alone.result.to_uppercase(),
        loaded.result.to_uppercase()
    );
    let _ = writeln!(out, "  {:<24} {:>12} {:>12}", "", "alone", "under load");
    let step_ms = |r: &DrillRun, step: &str| r.steps.iter().find(|s| s.step == step).map(|s| s.ms);
    for step in breakglass_server::drill::STEPS {
        let _ = writeln!(
            out,
            "  {step:<24} {:>12} {:>12}",
            opt_ms(step_ms(alone, step)),
            opt_ms(step_ms(loaded, step))
        );
    }
    for (label, a, b) in [
        (
            "time to access",
            alone.time_to_access_ms,
            loaded.time_to_access_ms,
        ),
        (
            "time to credentials",
            alone.time_to_credentials_ms,
            loaded.time_to_credentials_ms,
        ),
        (
            "time to first statement",
            alone.time_to_first_statement_ms,
            loaded.time_to_first_statement_ms,
        ),
        ("cut latency", alone.cut_latency_ms, loaded.cut_latency_ms),
    ] {
        let _ = writeln!(out, "  {label:<24} {:>12} {:>12}", opt_ms(a), opt_ms(b));
    }
    for (label, r) in [("alone", alone), ("under load", loaded)] {
        if let Some(e) = &r.error {
            let _ = writeln!(out, "  error ({label}): {e}");
        }
    }
    out
}

fn stats_line(s: &Stats) -> String {
    format!(
        "{:<24} {:>6} {:>10.1} {:>10.1} {:>10.1}",
        s.name, s.count, s.p50_ms, s.p99_ms, s.max_ms
    )
}

fn load_text(l: &LoadResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "load: {} lifecycles/s for {}s: {} of {} completed, {} failed, {:.0}/s achieved in {:.1}s",
        l.rate, l.for_s, l.completed, l.planned, l.failed, l.achieved_per_s, l.elapsed_s
    );
    let _ = writeln!(
        out,
        "  {:<24} {:>6} {:>10} {:>10} {:>10}",
        "ms", "n", "p50", "p99", "max"
    );
    let _ = writeln!(out, "  {}", stats_line(&l.time_to_access));
    let _ = writeln!(out, "  {}", stats_line(&l.lifecycle));
    for e in &l.errors {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

/// Prints the report of the runs since `since`.
pub fn report(ctx: &Ctx, since: &str) -> anyhow::Result<Exit> {
    let r = ctx.client()?.drill_report(since)?;
    if ctx.json() {
        print_json(&r)?;
    } else {
        print_text(&report_text(&r))?;
    }
    Ok(Exit::Success)
}

pub fn report_text(r: &DrillReport) -> String {
    let mut out = String::new();
    if r.drills.is_empty() {
        let _ = writeln!(out, "No drill runs since {}.", r.since.to_rfc3339());
        return out;
    }
    for d in &r.drills {
        let _ = writeln!(
            out,
            "drill {}: {} runs since {}, {} passed ({:.1}%), last success {}",
            d.drill,
            d.runs,
            r.since.to_rfc3339(),
            d.passed,
            d.pass_rate * 100.0,
            d.last_success
                .map_or_else(|| "never".to_string(), |t| t.to_rfc3339())
        );
        let _ = writeln!(
            out,
            "  {:<24} {:>6} {:>10} {:>10} {:>10}",
            "ms", "n", "p50", "p99", "max"
        );
        for s in d.steps.iter().chain(d.figures.iter()) {
            let _ = writeln!(out, "  {}", stats_line(s));
        }
        for f in &d.failures {
            let _ = writeln!(
                out,
                "  FAILED {} at step {}: {}{}",
                f.at.to_rfc3339(),
                f.failed_step.as_deref().unwrap_or("?"),
                f.error.as_deref().unwrap_or("no reason given"),
                f.request_id
                    .as_deref()
                    .map(|id| format!(" (request {id})"))
                    .unwrap_or_default()
            );
        }
    }
    if r.truncated {
        out.push_str("(only the first runs were read; narrow --since)\n");
    }
    out
}
