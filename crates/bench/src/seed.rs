//! Fills a data dir directly through the store, without the HTTP API: a long
//! audit log for `audit verify`, many stored requests for the memory and
//! start-up figures. The server opens the result as if it had written it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use breakglass_core::lifecycle::{self, Command, NewRequest};
use breakglass_core::policy::{Action, Decision, PolicyEngine, PolicyInput};
use breakglass_core::{Actor, EventDraft, Principal, Timestamp};
use breakglass_server::app::now;
use breakglass_server::{checkpoint, keys};
use breakglass_store::{SqliteOptions, SqliteStore, Store};
use serde_json::json;
use tokio::task::JoinSet;

use crate::server::{LEADS, POLICY, REQUESTERS, lead, requester};

/// A UUIDv7-shaped id, ordered by `ms` then `n`.
pub fn uuidish(ms: i64, n: u64) -> String {
    let ms = ms as u64;
    format!(
        "{:08x}-{:04x}-7{:03x}-8{:03x}-{:012x}",
        (ms >> 16) as u32,
        ms & 0xffff,
        (n >> 12) & 0xfff,
        n & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

const REASONS: [&str; 4] = [
    "INC-48213: replication lag on prod-db, need to read pg_stat_replication and the slow query log",
    "INC-48214: customer data export stuck; inspect job table and locks",
    "INC-48220: checkout latency p99 regression after deploy 2024.11.3, compare query plans",
    "INC-48231: disk filling on primary, find and vacuum the bloated tables",
];

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The audit events of one request's lifecycle, with the details the
/// service writes for them.
fn lifecycle_events(i: u64, t: Timestamp) -> Vec<EventDraft> {
    let id = uuidish(t.millis(), i);
    let who = requester(i as usize);
    let approver = lead(i as usize);
    let expires = t.plus_secs(20 + 1800).to_rfc3339();
    let reason = REASONS[(i % 4) as usize];
    let ev = |actor: &str, action: &str, details: serde_json::Value| EventDraft {
        actor: actor.to_string(),
        action: action.to_string(),
        request_id: Some(id.clone()),
        details,
    };
    vec![
        ev(
            &who,
            "request.created",
            json!({
                "target": "prod-db", "role": "read", "duration_s": 1800, "reason": reason,
                "ticket": null, "emergency": false, "policy": "read",
                "approvals_required": 1, "approver_groups": ["sre-leads"],
            }),
        ),
        ev(
            &approver,
            "request.approved",
            json!({"comment": "ok, go ahead", "approvals": 1, "approvals_required": 1}),
        ),
        ev(
            &approver,
            "request.activated",
            json!({"expires_at": expires, "duration_s": 1800, "emergency": false}),
        ),
        ev(
            &who,
            "credentials.issued",
            json!({
                "target": "prod-db", "role": "read", "expires_at": expires,
                "token_sha256_prefix": format!("{:012x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16),
            }),
        ),
        ev(
            &who,
            "request.revoked",
            json!({"reason": "done, lag resolved", "end_reason": "released"}),
        ),
    ]
}

/// What `audit_log` built.
pub struct AuditSeed {
    pub events: u64,
    pub checkpoints: u64,
    pub took: Duration,
    pub db_bytes: u64,
}

/// Appends `events` audit events in batches of 1,000, signing a checkpoint
/// every 50,000 events and at the end, into `data_dir` (created with its
/// signing key).
pub fn audit_log(data_dir: &Path, events: u64) -> anyhow::Result<AuditSeed> {
    const BATCH: u64 = 1000;
    const IN_FLIGHT: usize = 4;
    const CHECKPOINT_EVERY: u64 = 50_000;
    let t0 = Instant::now();
    let key = keys::load_or_create(data_dir)?;
    let witnesses = witnesses(data_dir)?;
    let db = data_dir.join("breakglass.db");
    let store = SqliteStore::open(&db, SqliteOptions::default())?;
    let mut checkpoints = 0;
    runtime()?.block_on(async {
        let start = now().millis() - 3_600_000;
        let mut set: JoinSet<anyhow::Result<()>> = JoinSet::new();
        let mut last_cp = 0;
        let mut next_cp = CHECKPOINT_EVERY;
        let mut made = 0u64;
        let mut request = 0u64;
        while made < events {
            let mut batch = Vec::with_capacity(BATCH as usize);
            while (batch.len() as u64) < BATCH.min(events - made) {
                let t = Timestamp(start + (request as i64));
                for e in lifecycle_events(request, t) {
                    if (batch.len() as u64) < BATCH.min(events - made) {
                        batch.push(e);
                    }
                }
                request += 1;
            }
            made += batch.len() as u64;
            let s = store.clone();
            let at = Timestamp(start + made as i64 / 100);
            set.spawn(async move {
                s.append(batch, at).await?;
                Ok(())
            });
            while set.len() >= IN_FLIGHT {
                if let Some(r) = set.join_next().await {
                    r??;
                }
            }
            if made >= next_cp {
                // A running server signs the head every few seconds.
                while let Some(r) = set.join_next().await {
                    r??;
                }
                last_cp = checkpoint::checkpoint_once(&store, &key, &witnesses, last_cp).await?;
                checkpoints += 1;
                next_cp += CHECKPOINT_EVERY;
            }
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        if store.head().0 != last_cp {
            checkpoint::checkpoint_once(&store, &key, &witnesses, last_cp).await?;
            checkpoints += 1;
        }
        anyhow::Ok(())
    })?;
    let head = store.head().0;
    drop(store);
    let db_bytes = dir_bytes(data_dir);
    Ok(AuditSeed {
        events: head,
        checkpoints,
        took: t0.elapsed(),
        db_bytes,
    })
}

/// Total size of the files directly in `dir`.
/// The default checkpoint witness of `data_dir`, as the server keeps it.
fn witnesses(data_dir: &Path) -> anyhow::Result<Vec<Box<dyn checkpoint::Witness>>> {
    let file = breakglass_server::config::default_witness_file(data_dir)
        .context("no default checkpoint witness beside the data dir")?;
    checkpoint::prepare_witness_dir(&file)?;
    Ok(vec![Box::new(checkpoint::FileWitness { path: file })])
}

pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// What `requests` stored.
pub struct RequestSeed {
    pub requests: u64,
    pub pending: u64,
    pub events: u64,
    pub took: Duration,
}

fn principal(name: &str, group: &str) -> Principal {
    Principal::local(name, BTreeSet::from([group.to_string()]), false)
}

/// Stores `n` requests the way the service would have, mostly ended: 1 in
/// 100 pending (1-approval), the others half expired 0-approval grants and
/// half approved-then-released 1-approval grants, created over the last
/// hours, each ended grant triaged as the automated review would (1 in 40
/// queued for a person with a `ddl` finding, the rest `auto_ok`). Signs a
/// checkpoint at the end, as a running server would have.
pub fn requests(data_dir: &Path, n: u64) -> anyhow::Result<RequestSeed> {
    const IN_FLIGHT: usize = 1024;
    let t0 = Instant::now();
    let key = keys::load_or_create(data_dir)?;
    let witnesses = witnesses(data_dir)?;
    let store = SqliteStore::open(&data_dir.join("breakglass.db"), SqliteOptions::default())?;
    let engine = PolicyEngine::load(POLICY, "policy.cedar").context("bench policy")?;
    let oncall = vec!["oncall".to_string()];
    let decide = |who: &str, target: &str, group: &str| -> Decision {
        engine.evaluate(&PolicyInput {
            principal: who,
            principal_groups: &oncall,
            kind: breakglass_core::PrincipalKind::Local,
            authn: &breakglass_core::model::LOCAL_AUTHN,
            target,
            target_groups: &[group.to_string()],
            action: Action::Request,
            role: "read",
            duration_s: 900,
            reason: "seed",
            ticket: None,
            now: now(),
        })
    };
    let mut drill = Vec::new();
    let mut read = Vec::new();
    for i in 0..REQUESTERS {
        drill.push(Arc::new(decide(&requester(i), "drill-db", "drills")));
        read.push(Arc::new(decide(&requester(i), "prod-db", "production")));
    }
    let leads: Vec<Principal> = (0..LEADS)
        .map(|i| principal(&lead(i), "sre-leads"))
        .collect();
    let rt = runtime()?;
    let real_now = now().millis();
    let start = real_now - 4 * 3_600_000;
    let step_ms = (3 * 3_600_000 / n.max(1)) as i64;
    let mut pending = 0;
    rt.block_on(async {
        let mut set: JoinSet<anyhow::Result<()>> = JoinSet::new();
        for i in 0..n {
            let who = principal(&requester(i as usize), "oncall");
            let kind = i % 100;
            let created = if kind == 0 {
                pending += 1;
                Timestamp(real_now - (n - i) as i64 / 10)
            } else {
                Timestamp(start + i as i64 * step_ms)
            };
            let (target, decision) = if kind % 2 == 1 {
                ("drill-db", drill[i as usize % REQUESTERS].clone())
            } else {
                ("prod-db", read[i as usize % REQUESTERS].clone())
            };
            let input = NewRequest {
                target: target.to_string(),
                role: "read".into(),
                duration_s: 900,
                reason: REASONS[(i % 4) as usize].to_string(),
                ticket: None,
                emergency: false,
                drill: None,
            };
            let approver = leads[i as usize % LEADS].clone();
            let s = store.clone();
            set.spawn(async move {
                let id = uuidish(created.millis(), i);
                let t = lifecycle::create(&input, &who, &decision, id, created, 1800)?;
                let mut req = t.request.clone();
                s.create(t, created).await?;
                if kind == 0 {
                    return Ok(());
                }
                let mut steps = Vec::new();
                if kind % 2 == 1 {
                    let at = Timestamp(created.millis() + 900_000 + 3);
                    steps.push((Actor::System, Command::Tick, at));
                } else {
                    steps.push((
                        Actor::Principal(approver),
                        Command::Approve {
                            comment: Some("ok".into()),
                        },
                        Timestamp(created.millis() + 20_000),
                    ));
                    steps.push((
                        Actor::Principal(who),
                        Command::Revoke {
                            reason: "done".into(),
                        },
                        Timestamp(created.millis() + 600_000),
                    ));
                }
                // The automated review a running server does after the
                // grant ended: most close as auto_ok, 1 in 20 of the
                // released ones is queued for a person with a finding.
                let ended = steps.last().map_or(created, |s| s.2);
                let flagged = kind % 2 == 0 && i % 20 == 0;
                steps.push((
                    Actor::System,
                    Command::Triage {
                        flagged: if flagged {
                            vec!["finding ddl (medium)".into()]
                        } else {
                            Vec::new()
                        },
                        findings: if flagged {
                            [("ddl".to_string(), 1)].into()
                        } else {
                            Default::default()
                        },
                        evidence: serde_json::json!({"sessions": 0}),
                        due_at: Timestamp(ended.millis() + 86_400_000),
                    },
                    Timestamp(ended.millis() + 1_000),
                ));
                for (actor, cmd, at) in steps {
                    let t = lifecycle::step(&req, &actor, &cmd, at)?;
                    req = t.request.clone();
                    s.apply(t, at).await?;
                }
                Ok(())
            });
            while set.len() >= IN_FLIGHT {
                if let Some(r) = set.join_next().await {
                    r??;
                }
            }
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        checkpoint::checkpoint_once(&store, &key, &witnesses, 0).await?;
        anyhow::Ok(())
    })?;
    let events = store.head().0;
    drop(store);
    Ok(RequestSeed {
        requests: n,
        pending,
        events,
        took: t0.elapsed(),
    })
}
