//! Several nodes: two release `breakglass serve` processes sharing a
//! throwaway PostgreSQL database, with calls spread over both. Measures
//! full lifecycles per second (64 clients), time to access, and expiry
//! lateness after one node is killed with `kill -9`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::scenarios::Ctx;
use crate::server::{self, Client, Server, Setup, lead, requester};
use crate::stats::{Goal, Row, Samples, fmt_secs};

const MS: f64 = 1e-3;

fn body(target: &str, duration: &str) -> Value {
    json!({"target": target, "role": "read", "duration": duration, "reason": "INC-48213: nodes benchmark"})
}

fn id_of(v: &Value) -> anyhow::Result<String> {
    Ok(v["id"].as_str().context("no id")?.to_string())
}

/// Two node setups on one fresh database, each trusting both keys.
fn node_setups(url: &str) -> anyhow::Result<Vec<Setup>> {
    let setups = vec![server::setup()?, server::setup()?];
    let mut keys = Vec::new();
    for s in &setups {
        let key = breakglass_server::keys::load_or_create(&s.data_dir())?;
        keys.push(format!(
            "\"{}\"",
            breakglass_core::audit::key_id(&key.verifying_key())
        ));
    }
    for s in &setups {
        std::fs::write(s.dir.path().join("database.url"), url)?;
        let text = std::fs::read_to_string(&s.config)?;
        let text = text.replacen(
            "data_dir = \"data\"\n",
            "data_dir = \"data\"\ndatabase_url_file = \"database.url\"\n",
            1,
        );
        let text = format!("{text}\n[audit]\nverify_keys = [{}]\n", keys.join(", "));
        std::fs::write(&s.config, text)?;
    }
    Ok(setups)
}

impl Ctx {
    pub fn nodes(&mut self) -> anyhow::Result<()> {
        let pg = breakglass_testkit::PgCluster::start()?;
        let url = breakglass_testkit::fresh_database(&pg)?;
        let setups = node_setups(&url)?;
        let mut servers = Vec::new();
        for s in &setups {
            servers.push(Server::start(&self.bin, s)?);
        }
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();

        // Time to access, alternating nodes: request on one, credentials on
        // the other.
        let n = if self.quick { 50 } else { 300 };
        let mut access = Vec::new();
        let clients: Vec<Client> = urls.iter().map(|u| Client::new(u)).collect();
        for i in 0..n + 20 {
            let (a, b) = (&clients[i % 2], &clients[(i + 1) % 2]);
            let who = requester(0);
            let t0 = Instant::now();
            let v = a
                .post(&who, "/v1/requests", Some(&body("drill-db", "1h")))?
                .expect(201, "create")?;
            let id = id_of(&v)?;
            b.post(&who, &format!("/v1/requests/{id}/credentials"), None)?
                .expect(200, "credentials")?;
            if i >= 20 {
                access.push(t0.elapsed());
            }
            a.post(
                &who,
                &format!("/v1/requests/{id}/revoke"),
                Some(&json!({"reason": "done"})),
            )?
            .expect(200, "revoke")?;
        }
        let access = Samples::from_durations(&access);
        self.rows.push(Row::target(
            "several nodes: time to access, request and credentials on different nodes, p99",
            format!(
                "{} (p50 {})",
                fmt_secs(access.p99()),
                fmt_secs(access.p50())
            ),
            access.p99(),
            "<= 15 ms",
            Goal::AtMost(15.0 * MS),
            String::new(),
        ));

        // Full lifecycles from 64 clients, each step on the other node.
        const CLIENTS: usize = 64;
        let window = Duration::from_secs(if self.quick { 3 } else { 10 });
        let stop = Arc::new(AtomicBool::new(false));
        let barrier = Arc::new(Barrier::new(CLIENTS + 1));
        let mut handles = Vec::new();
        for t in 0..CLIENTS {
            let (stop, barrier, urls) = (stop.clone(), barrier.clone(), urls.clone());
            handles.push(std::thread::spawn(move || -> (usize, Vec<String>) {
                let c: Vec<Client> = urls.iter().map(|u| Client::new(u)).collect();
                let (who, approver) = (requester(t), lead(t));
                let mut done = 0;
                let mut errors = Vec::new();
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let one = || -> anyhow::Result<()> {
                        let v = c[t % 2]
                            .post(&who, "/v1/requests", Some(&body("prod-db", "15m")))?
                            .expect(201, "create")?;
                        let id = id_of(&v)?;
                        c[(t + 1) % 2]
                            .post(&approver, &format!("/v1/requests/{id}/approve"), None)?
                            .expect(200, "approve")?;
                        c[t % 2]
                            .post(&who, &format!("/v1/requests/{id}/credentials"), None)?
                            .expect(200, "credentials")?;
                        c[(t + 1) % 2]
                            .post(
                                &who,
                                &format!("/v1/requests/{id}/revoke"),
                                Some(&json!({"reason": "done"})),
                            )?
                            .expect(200, "revoke")?;
                        Ok(())
                    };
                    match one() {
                        Ok(()) => done += 1,
                        Err(e) => {
                            errors.push(format!("{e:#}"));
                            if errors.len() > 100 {
                                break;
                            }
                        }
                    }
                }
                (done, errors)
            }));
        }
        barrier.wait();
        let t0 = Instant::now();
        std::thread::sleep(window);
        stop.store(true, Ordering::Relaxed);
        let mut count = 0;
        let mut errors = Vec::new();
        for h in handles {
            let (d, e) = h.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
            count += d;
            errors.extend(e);
        }
        let secs = t0.elapsed().as_secs_f64();
        let rate = count as f64 / secs;
        self.rows.push(Row::target(
            "several nodes: full lifecycles, 64 clients over 2 nodes",
            format!("{rate:.0} /s"),
            rate,
            ">= 500 /s",
            Goal::AtLeast(500.0),
            format!("{} errors", errors.len()),
        ));

        // Expiry lateness with one node killed: grants made on both nodes,
        // then node B is killed; node A must end them all.
        let grants = if self.quick { 100 } else { 400 };
        let mut expiring = Vec::new();
        for i in 0..grants {
            let v = clients[i % 2]
                .post(
                    &requester(i % 8),
                    "/v1/requests",
                    Some(&body("drill-db", "4s")),
                )?
                .expect(201, "create")?;
            expiring.push(id_of(&v)?);
        }
        servers[1].kill9();
        std::thread::sleep(Duration::from_secs(6));
        let mut late = Vec::new();
        for id in &expiring {
            let v = clients[0]
                .get(server::AUDITOR, &format!("/v1/requests/{id}"))?
                .expect(200, "get")?;
            if v["state"] != "expired" {
                bail!("request {id} did not expire on the surviving node: {v}");
            }
            let at = |k: &str| -> anyhow::Result<i64> {
                Ok(
                    breakglass_core::Timestamp::parse_rfc3339(v[k].as_str().context("time")?)
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .millis(),
                )
            };
            late.push((at("ended_at")? - at("expires_at")?) as f64 * MS);
        }
        let late = Samples::from_secs(late);
        self.rows.push(Row::target(
            "several nodes: expiry lateness with one node killed, p99",
            format!("{} (max {})", fmt_secs(late.p99()), fmt_secs(late.max())),
            late.p99(),
            "<= 250 ms",
            Goal::AtMost(250.0 * MS),
            String::new(),
        ));
        self.notes.push(format!(
            "nodes: 2 nodes on one PostgreSQL on the same machine; access {n} sequential iterations; lifecycles {count} in {secs:.1} s ({} errors{}); expiry: {grants} grants of 4 s made on both nodes, node B killed with kill -9, read back from node A. The cross-node session cut is measured by the test `nodes::two_nodes_start_together_and_a_revoke_on_one_cuts_a_session_on_the_other`, not here.",
            errors.len(),
            errors.first().map_or_else(String::new, |e| format!(", first: {e}"))
        ));
        drop(servers);
        drop(pg);
        Ok(())
    }
}
