//! Drills under load: a real drill (request, approval, credentials, a
//! session through the gateway to a throwaway PostgreSQL, revoke and cut,
//! recording and chain) run alone, then while the server's built-in load
//! generator drives 500 drill-labelled lifecycles per second, in the same
//! run. The target (DESIGN §8): time to access p99 <= 10 ms under that load.

use std::time::Instant;

use anyhow::{Context, bail};
use breakglass_testkit::{AuthMethod, PgCluster};
use serde_json::{Value, json};

use crate::scenarios::Ctx;
use crate::server::{self, AUDITOR, Client, POLICY, Server, lead, requester, token};
use crate::stats::{Goal, Row, Samples, fmt_secs};

const MS: f64 = 1e-3;
/// The load the target is stated at.
const LOAD_RATE: u32 = 500;
const CANARY_USER: &str = "bg_canary";
const CANARY_PASSWORD: &str = "canary-bench-pw";

const CANARY_POLICY: &str = r#"
@id("canary")
@approvals("1")
@approvers("sre-leads")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"canaries");
"#;

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl Ctx {
    pub fn drills(&mut self) -> anyhow::Result<()> {
        let pg = PgCluster::start()?;
        pg.create_role(CANARY_USER, CANARY_PASSWORD, AuthMethod::Scram)?;
        pg.create_db("app", "postgres")?;
        let setup = server::setup()?;
        let dir = setup.dir.path();
        std::fs::write(
            dir.join("policy.cedar"),
            format!("{POLICY}\n{CANARY_POLICY}"),
        )?;
        std::fs::write(dir.join("canary.pw"), CANARY_PASSWORD)?;
        std::fs::write(dir.join("drill-bot.token"), token(&requester(0)))?;
        std::fs::write(dir.join("drill-approver.token"), token(&lead(0)))?;
        let gw = server::free_port()?;
        let mut cfg = std::fs::read_to_string(&setup.config)?;
        cfg.push_str(&format!(
            "\n[[targets]]\nname = \"canary-db\"\nkind = \"postgres\"\ngroups = [\"canaries\"]\n\
             upstream = \"postgres://127.0.0.1:{}/app\"\n\
             [targets.roles.read]\nuser = \"{CANARY_USER}\"\npassword_file = \"canary.pw\"\n\n\
             [[drills]]\nname = \"canary\"\nevery = \"30d\"\ntarget = \"canary-db\"\nrole = \"read\"\n\
             duration = \"10m\"\nstep_timeout = \"10s\"\n\
             requester = {{ principal = \"{}\", token_file = \"drill-bot.token\" }}\n\
             approvers = [{{ principal = \"{}\", token_file = \"drill-approver.token\" }}]\n\n\
             [gateway.postgres]\nlisten = \"{gw}\"\n",
            pg.port,
            requester(0),
            lead(0)
        ));
        std::fs::write(&setup.config, cfg)?;
        let srv = Server::start(&self.bin, &setup)?;
        let c = Client::new(&setup.url());

        // The drill alone, several times.
        let alone_runs = if self.quick { 5 } else { 20 };
        let mut alone = Vec::new();
        let mut cut = Vec::new();
        let mut first = Vec::new();
        for _ in 0..alone_runs {
            let a = c
                .post(AUDITOR, "/v1/drills/canary/run", None)?
                .expect(200, "drill run")?;
            let run = &a["run"];
            if run["result"] != "pass" {
                bail!("the drill failed alone: {run}\n{}", srv.log_tail());
            }
            alone.push(f(run, "time_to_access_ms").context("time to access")? * MS);
            cut.push(f(run, "cut_latency_ms").context("cut latency")? * MS);
            first.push(f(run, "time_to_first_statement_ms").context("first statement")? * MS);
        }
        let alone = Samples::from_secs(alone);
        let cut = Samples::from_secs(cut);
        let first = Samples::from_secs(first);

        // The same drill under load, in the same run.
        let secs = if self.quick { 3 } else { 10 };
        let t0 = Instant::now();
        let a = c
            .post(
                AUDITOR,
                "/v1/drills/canary/run",
                Some(&json!({"load": {"rate": LOAD_RATE, "for": format!("{secs}s")}})),
            )?
            .expect(200, "drill run under load")?;
        let wall = t0.elapsed();
        let load = &a["load"];
        let run = &a["run"];
        if run["result"] != "pass" {
            bail!("the drill failed under load: {run}\n{}", srv.log_tail());
        }
        let tta = &load["time_to_access"];
        let p99 = f(tta, "p99_ms").context("load p99")? * MS;
        let p50 = f(tta, "p50_ms").context("load p50")? * MS;
        let completed = load["completed"].as_u64().unwrap_or(0);
        let failed = load["failed"].as_u64().unwrap_or(0);
        let achieved = f(load, "achieved_per_s").unwrap_or(0.0);
        let base_tta = f(&a["baseline"], "time_to_access_ms").unwrap_or(0.0) * MS;
        let run_tta = f(run, "time_to_access_ms").unwrap_or(0.0) * MS;
        self.rows.push(Row::target(
            format!("drills: time to access under {LOAD_RATE} lifecycles/s (load lifecycles), p99"),
            format!("{} (p50 {}, n {completed})", fmt_secs(p99), fmt_secs(p50)),
            p99,
            "<= 10 ms",
            Goal::AtMost(10.0 * MS),
            format!(
                "{:.1}x the drill alone (p99 {})",
                if alone.p99() > 0.0 {
                    p99 / alone.p99()
                } else {
                    0.0
                },
                fmt_secs(alone.p99())
            ),
        ));
        self.rows.push(Row::target(
            format!("drills: load achieved (asked {LOAD_RATE}/s for {secs} s)"),
            format!("{achieved:.0}/s, {completed} done, {failed} failed"),
            achieved,
            format!(">= {} /s", LOAD_RATE * 9 / 10),
            Goal::AtLeast(f64::from(LOAD_RATE) * 0.9),
            String::new(),
        ));
        self.rows.push(Row::info(
            "drills: the drill's time to access, alone vs under load",
            format!(
                "alone p50 {} p99 {} (n {}); baseline {}; under load {}",
                fmt_secs(alone.p50()),
                fmt_secs(alone.p99()),
                alone.len(),
                fmt_secs(base_tta),
                fmt_secs(run_tta)
            ),
            String::new(),
        ));
        self.rows.push(Row::info(
            "drills: first statement through the gateway / cut latency (alone)",
            format!(
                "p50 {} / p50 {} p99 {}",
                fmt_secs(first.p50()),
                fmt_secs(cut.p50()),
                fmt_secs(cut.p99())
            ),
            format!(
                "under load: {} / {}",
                fmt_secs(f(run, "time_to_first_statement_ms").unwrap_or(0.0) * MS),
                fmt_secs(f(run, "cut_latency_ms").unwrap_or(0.0) * MS)
            ),
        ));
        self.notes.push(format!(
            "drills: the load run took {:.1} s of wall time for {secs} s of load",
            wall.as_secs_f64()
        ));
        drop(srv);
        drop(pg);
        Ok(())
    }
}
