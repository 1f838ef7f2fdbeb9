//! Drills end to end: a real `breakglass serve` with a `[[drills]]` entry,
//! a real PostgreSQL canary behind the real gateway, and the real CLI
//! (`drill run`, `drill report`). Each test has its own cluster (one test
//! stops it) and its own server; both are stopped by pid when dropped.

mod gateway_support;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use breakglass_testkit::{AuthMethod, PgCluster};
use gateway_support::{BIN, Out, free_port, poll, run};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const POLICY: &str = r#"
@id("canary")
@approvals("1")
@approvers("drill-approvers")
@max_duration("10m")
permit (principal in Group::"canary-users", action == Action::"request", resource in TargetGroup::"canaries");
"#;

const UP_USER: &str = "bg_drill";
const UP_PASSWORD: &str = "drill upstream pw";

fn token(name: &str) -> String {
    format!("bgt_drill_{name}_0123456789abcdef")
}

fn canary() -> PgCluster {
    let pg = PgCluster::start().expect("start PostgreSQL");
    pg.create_role(UP_USER, UP_PASSWORD, AuthMethod::Scram)
        .expect("create role");
    pg.create_db("app", "postgres").expect("create database");
    pg
}

struct Opts {
    every: &'static str,
    /// Leave the approver out of `[[principals]]` (removed from the config).
    approver_removed: bool,
}

/// A `breakglass serve` child with one drill; killed by pid on drop.
struct Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    agent: ureq::Agent,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    fn start(pg: &PgCluster, opts: Opts) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let gw = free_port();
        std::fs::write(dir.path().join("policy.cedar"), POLICY).expect("policy");
        std::fs::write(
            dir.path().join("approver.token"),
            format!("{}\n", token("drill-approver")),
        )
        .expect("approver token file");
        let mut cfg = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\nadmin_groups = [\"security\"]\n\n\
             [policy]\nfile = \"policy.cedar\"\n\n\
             [audit]\ncheckpoint_interval = \"1s\"\n\n\
             [gateway.postgres]\nlisten = \"127.0.0.1:{gw}\"\n\n"
        );
        let mut principals = vec![("drill-bot", "canary-users"), ("admin", "security")];
        if !opts.approver_removed {
            principals.push(("drill-approver", "drill-approvers"));
        }
        for (name, group) in principals {
            cfg.push_str(&format!(
                "[[principals]]\nname = \"{name}\"\ngroups = [\"{group}\"]\ntoken_sha256 = \"{}\"\n\n",
                hex::encode(Sha256::digest(token(name).as_bytes()))
            ));
        }
        cfg.push_str(&format!(
            "[[targets]]\nname = \"canary-db\"\nkind = \"postgres\"\ngroups = [\"canaries\"]\n\
             upstream = \"postgres://127.0.0.1:{}/app\"\n\
             [targets.roles.read]\nuser = \"{UP_USER}\"\npassword_env = \"BG_DRILL_PW\"\n\n\
             [[drills]]\nname = \"canary-read\"\nevery = \"{}\"\ntarget = \"canary-db\"\nrole = \"read\"\n\
             duration = \"2m\"\nmode = \"normal\"\nstep_timeout = \"5s\"\n\
             requester = {{ principal = \"drill-bot\", token_env = \"DRILL_BOT_TOKEN\" }}\n\
             approvers = [{{ principal = \"drill-approver\", token_file = \"approver.token\" }}]\n",
            pg.port, opts.every
        ));
        std::fs::write(dir.path().join("config.toml"), cfg).expect("config");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.path().join("config.toml"))
            .env_remove("BREAKGLASS_URL")
            .env_remove("BREAKGLASS_TOKEN")
            .env("BREAKGLASS_LOG", "info")
            .env("NO_COLOR", "1")
            .env("BG_DRILL_PW", UP_PASSWORD)
            .env("DRILL_BOT_TOKEN", token("drill-bot"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("server.stderr")).expect("stderr file"))
            .spawn()
            .expect("spawn breakglass serve");
        let mut s = Server {
            dir,
            port,
            child: Some(child),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .proxy(None)
                .build()
                .into(),
        };
        let ready = poll(Duration::from_secs(20), || {
            if let Some(c) = s.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("breakglass exited ({st}):\n{}", s.stderr());
            }
            matches!(s.call("GET", None, "/readyz", None), (200, _)).then_some(())
        });
        assert!(ready.is_some(), "not ready:\n{}", s.stderr());
        s
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.stderr")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn call(
        &self,
        method: &str,
        who: Option<&str>,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let uri = format!("{}{path}", self.url());
        let auth = who.map(|w| format!("Bearer {}", token(w)));
        let resp = if method == "GET" {
            let mut r = self.agent.get(&uri);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        } else {
            let mut r = self
                .agent
                .post(&uri)
                .header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            match body {
                Some(b) => r.send(b.to_string()),
                None => r.send_empty(),
            }
        };
        let Ok(mut resp) = resp else {
            return (0, Value::Null);
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Every audit event with this action.
    fn events(&self, action: &str) -> Vec<Value> {
        let (st, page) = self.call("GET", Some("admin"), "/v1/audit?limit=10000", None);
        assert_eq!(st, 200, "{page}");
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect()
    }

    fn metrics(&self) -> String {
        let (st, v) = self.call("GET", None, "/metrics", None);
        assert_eq!(st, 200);
        v.as_str().expect("metrics text").to_string()
    }

    /// The CLI against this server, as `who`.
    fn cli(&self, who: &str, args: &[&str]) -> Out {
        run(Command::new(BIN)
            .args(args)
            .env("BREAKGLASS_URL", self.url())
            .env("BREAKGLASS_TOKEN", token(who))
            .env("NO_COLOR", "1")
            .env("HOME", self.dir.path()))
    }
}

fn details(e: &Value) -> Value {
    // The audit API returns details as a JSON object.
    match &e["details"] {
        Value::String(s) => serde_json::from_str(s).expect("details JSON"),
        v => v.clone(),
    }
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_scheduled_drill_passes_writes_its_events_and_metrics_and_is_labelled() {
    let pg = canary();
    let s = Server::start(
        &pg,
        Opts {
            every: "2s",
            approver_removed: false,
        },
    );
    let done = poll(Duration::from_secs(20), || {
        s.events("drill.completed").into_iter().next()
    })
    .unwrap_or_else(|| panic!("no scheduled drill completed:\n{}", s.stderr()));
    let d = details(&done);
    assert_eq!(d["result"], "pass", "{d}\n{}", s.stderr());
    assert_eq!(d["trigger"], "schedule");
    assert_eq!(d["drill"], "canary-read");
    let steps: Vec<&str> = d["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_str().expect("step"))
        .collect();
    assert_eq!(
        steps,
        [
            "request",
            "approval",
            "credentials",
            "session",
            "revoke",
            "recording",
            "chain"
        ]
    );
    for f in [
        "time_to_access_ms",
        "time_to_credentials_ms",
        "time_to_first_statement_ms",
        "cut_latency_ms",
        "session_ms",
    ] {
        let v = d[f]
            .as_f64()
            .unwrap_or_else(|| panic!("{f} missing in {d}"));
        assert!(v > 0.0 && v < 5000.0, "{f} = {v}");
    }
    assert!(d["time_to_access_ms"].as_f64() <= d["time_to_first_statement_ms"].as_f64());
    let started = s.events("drill.started");
    assert!(
        started
            .iter()
            .any(|e| e["seq"].as_u64() < done["seq"].as_u64()),
        "no drill.started before drill.completed"
    );

    // The drill's request went the whole lifecycle and carries the label.
    let id = d["request_id"].as_str().expect("request id");
    assert_eq!(done["request_id"], id);
    let (st, req) = s.call("GET", Some("admin"), &format!("/v1/requests/{id}"), None);
    assert_eq!(st, 200);
    assert_eq!(req["drill"], "canary-read");
    assert_eq!(req["state"], "revoked");
    assert_eq!(req["approvals"][0]["by"], "drill-approver");
    let created = s
        .events("request.created")
        .into_iter()
        .find(|e| e["request_id"] == id)
        .expect("created event");
    assert_eq!(details(&created)["drill"], "canary-read");
    let ids = |q: &str| -> Vec<String> {
        let (st, v) = s.call("GET", Some("admin"), &format!("/v1/requests{q}"), None);
        assert_eq!(st, 200, "{v}");
        v["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_string())
            .collect()
    };
    assert!(ids("?drill=true").contains(&id.to_string()));
    assert!(!ids("?drill=false").contains(&id.to_string()));
    let show = s.cli("admin", &["show", id]);
    show.ok();
    assert!(
        show.stdout
            .contains("canary-read (an exercise, not real use)"),
        "{}",
        show.stdout
    );

    // Metrics: the figures per drill and step, and the last success.
    let m = s.metrics();
    let last = metric(
        &m,
        "breakglass_drill_last_success_timestamp_seconds{drill=\"canary-read\"}",
    )
    .unwrap_or_else(|| panic!("no last success in\n{m}"));
    assert!((last - done_time_s(&done)).abs() < 1.0, "{last}");
    for step in ["request", "approval", "session", "chain"] {
        let n = metric(
            &m,
            &format!("breakglass_drill_step_duration_seconds_count{{drill=\"canary-read\",step=\"{step}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {step} histogram in\n{m}"));
        assert!(n >= 1.0);
    }
    assert!(
        metric(
            &m,
            "breakglass_drill_figure_seconds_count{drill=\"canary-read\",figure=\"time_to_access\"}"
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert!(
        metric(
            &m,
            "breakglass_drill_runs_total{drill=\"canary-read\",result=\"pass\"}"
        )
        .is_some_and(|n| n >= 1.0)
    );

    // Scheduled runs keep coming, one per period.
    let two = poll(Duration::from_secs(10), || {
        (s.events("drill.completed").len() >= 2).then_some(())
    });
    assert!(two.is_some(), "no second scheduled run:\n{}", s.stderr());
}

fn done_time_s(e: &Value) -> f64 {
    let t = e["time"].as_str().expect("time");
    breakglass_core::Timestamp::parse_rfc3339(t)
        .expect("rfc3339")
        .millis() as f64
        / 1e3
}

#[test]
fn only_the_drill_requester_may_label_a_request_as_a_drill() {
    let pg = canary();
    let s = Server::start(
        &pg,
        Opts {
            every: "1h",
            approver_removed: false,
        },
    );
    let body = |drill: &str, target: &str| json!({"target": target, "role": "read", "duration": "1m", "reason": "x", "drill": drill});
    // Someone else labelling real use as a drill.
    let (st, v) = s.call(
        "POST",
        Some("drill-approver"),
        "/v1/requests",
        Some(body("canary-read", "canary-db")),
    );
    assert_eq!(
        (st, v["code"].as_str()),
        (403, Some("drill_label_refused")),
        "{v}"
    );
    assert!(
        v["detail"]
            .as_str()
            .expect("detail")
            .contains("would hide real use"),
        "{v}"
    );
    // An unknown drill.
    let (st, v) = s.call(
        "POST",
        Some("drill-bot"),
        "/v1/requests",
        Some(body("nope", "canary-db")),
    );
    assert_eq!(
        (st, v["code"].as_str()),
        (403, Some("drill_label_refused")),
        "{v}"
    );
    // Nothing was stored by the refusals.
    let (_, list) = s.call("GET", Some("admin"), "/v1/requests", None);
    assert_eq!(list["requests"].as_array().map(Vec::len), Some(0), "{list}");
    // The drill's requester may, for the drill's target.
    let (st, v) = s.call(
        "POST",
        Some("drill-bot"),
        "/v1/requests",
        Some(body("canary-read", "canary-db")),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["drill"], "canary-read");
    // Only admins run drills or read their report.
    let (st, v) = s.call(
        "POST",
        Some("drill-bot"),
        "/v1/drills/canary-read/run",
        None,
    );
    assert_eq!((st, v["code"].as_str()), (403, Some("admin_only")), "{v}");
    let (st, _) = s.call("GET", Some("drill-bot"), "/v1/drills/report", None);
    assert_eq!(st, 403);
    let (st, v) = s.call("POST", Some("admin"), "/v1/drills/nope/run", None);
    assert_eq!(
        (st, v["code"].as_str()),
        (404, Some("unknown_drill")),
        "{v}"
    );
}

#[test]
fn a_drill_with_its_database_stopped_fails_at_the_session_step_and_the_report_aggregates() {
    let mut pg = canary();
    let s = Server::start(
        &pg,
        Opts {
            every: "1h",
            approver_removed: false,
        },
    );
    let out = s.cli("admin", &["drill", "run", "canary-read"]);
    out.ok();
    for step in [
        "request",
        "approval",
        "credentials",
        "session",
        "revoke",
        "recording",
        "chain",
    ] {
        assert!(
            out.stdout.contains(step),
            "{step} missing in\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("drill canary-read: PASS"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("time to access:"), "{}", out.stdout);

    pg.stop_server().expect("stop the canary database");
    let out = s.cli("admin", &["drill", "run", "canary-read"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stdout.contains("drill canary-read: FAIL"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("drill canary-read failed at step session"),
        "{}",
        out.stderr
    );
    let failed = s.events("drill.completed");
    let d = details(failed.last().expect("completed"));
    assert_eq!(
        (d["result"].as_str(), d["failed_step"].as_str()),
        (Some("fail"), Some("session")),
        "{d}"
    );
    assert!(
        d["error"].as_str().expect("error").contains("session"),
        "{d}"
    );
    // The failed drill's grant did not stay live.
    let id = d["request_id"].as_str().expect("request id");
    let (_, req) = s.call("GET", Some("admin"), &format!("/v1/requests/{id}"), None);
    assert_eq!(req["state"], "revoked", "{req}");

    // The report: two runs, one pass, the failure with its step; steps
    // the failed run completed count twice, later ones once.
    let out = s.cli(
        "admin",
        &["--output", "json", "drill", "report", "--since", "1d"],
    );
    out.ok();
    let r: Value = serde_json::from_str(&out.stdout).expect("report JSON");
    let d = &r["drills"][0];
    assert_eq!(d["drill"], "canary-read");
    assert_eq!(
        (d["runs"].as_u64(), d["passed"].as_u64()),
        (Some(2), Some(1)),
        "{d}"
    );
    assert_eq!(d["pass_rate"].as_f64(), Some(0.5));
    let count = |step: &str| {
        d["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .find(|s| s["name"] == step)
            .and_then(|s| s["count"].as_u64())
    };
    assert_eq!(count("credentials"), Some(2));
    assert_eq!(count("session"), Some(1));
    assert_eq!(count("chain"), Some(1));
    assert_eq!(d["failures"].as_array().map(Vec::len), Some(1));
    assert_eq!(d["failures"][0]["failed_step"], "session");
    let out = s.cli("admin", &["drill", "report"]);
    out.ok();
    assert!(out.stdout.contains("2 runs"), "{}", out.stdout);
    assert!(out.stdout.contains("50.0%"), "{}", out.stdout);
    assert!(out.stdout.contains("FAILED"), "{}", out.stdout);
    assert!(out.stdout.contains("at step session"), "{}", out.stdout);
    let m = s.metrics();
    assert!(
        metric(
            &m,
            "breakglass_drill_runs_total{drill=\"canary-read\",result=\"fail\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
}

#[test]
fn a_drill_whose_approver_was_removed_fails_at_the_approval_step() {
    let pg = canary();
    let s = Server::start(
        &pg,
        Opts {
            every: "1h",
            approver_removed: true,
        },
    );
    let out = s.cli("admin", &["drill", "run", "canary-read"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.contains("failed at step approval"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("drill-approver"), "{}", out.stderr);
    let d = details(s.events("drill.completed").last().expect("completed"));
    assert_eq!(d["failed_step"], "approval", "{d}");
    // The pending request did not stay behind.
    let id = d["request_id"].as_str().expect("request id");
    let (_, req) = s.call("GET", Some("admin"), &format!("/v1/requests/{id}"), None);
    assert_eq!(req["state"], "cancelled", "{req}\n{}", s.stderr());
    assert!(
        s.stderr().contains("will fail at its approval step"),
        "{}",
        s.stderr()
    );
}

#[test]
fn load_runs_bounded_in_count_and_time_beside_a_run_without_load() {
    let pg = canary();
    let s = Server::start(
        &pg,
        Opts {
            every: "1h",
            approver_removed: false,
        },
    );
    let started = Instant::now();
    let out = s.cli(
        "admin",
        &[
            "--output",
            "json",
            "drill",
            "run",
            "canary-read",
            "--load",
            "40",
            "--for",
            "2s",
        ],
    );
    let elapsed = started.elapsed();
    out.ok();
    let a: Value = serde_json::from_str(&out.stdout).expect("answer JSON");
    assert_eq!(a["baseline"]["result"], "pass", "{a}");
    assert_eq!(a["run"]["result"], "pass", "{a}");
    assert_eq!(a["run"]["trigger"], "load");
    let load = &a["load"];
    assert_eq!(load["planned"].as_u64(), Some(80), "{load}");
    assert_eq!(load["completed"].as_u64(), Some(80), "{load}");
    assert_eq!(load["failed"].as_u64(), Some(0), "{load}");
    assert_eq!(load["time_to_access"]["count"].as_u64(), Some(80));
    // Bounded in time: the load's 2 s plus one step timeout at most.
    assert!(
        load["elapsed_s"].as_f64().is_some_and(|e| e < 7.0),
        "{load}"
    );
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    // Every synthetic lifecycle is labelled and ended.
    let mut n = 0;
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/requests?drill=true&limit=500&after={a}"),
            None => "/v1/requests?drill=true&limit=500".to_string(),
        };
        let (_, v) = s.call("GET", Some("admin"), &q, None);
        let reqs = v["requests"].as_array().expect("requests").clone();
        for r in &reqs {
            assert_eq!(r["drill"], "canary-read");
            assert_eq!(r["state"], "revoked", "{r}");
        }
        n += reqs.len();
        match v["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(n, 80 + 2, "80 load lifecycles and the two drill runs");

    // Over the bounds: refused with the reason, nothing run.
    let out = s.cli(
        "admin",
        &[
            "drill",
            "run",
            "canary-read",
            "--load",
            "5000",
            "--for",
            "2s",
        ],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("load.rate"), "{}", out.stderr);
    let out = s.cli(
        "admin",
        &["drill", "run", "canary-read", "--load", "10", "--for", "1h"],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("load.for"), "{}", out.stderr);
    let out = s.cli("admin", &["drill", "run", "canary-read", "--load", "10"]);
    assert_eq!(out.code, 2, "--load without --for is a usage error");
    assert_eq!(s.events("drill.completed").len(), 2);
}
