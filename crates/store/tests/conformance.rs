//! Conformance suite for the `Store` trait, run against a real `SqliteStore`
//! in a temporary directory and a real `PgStore` on a fresh database of a
//! throwaway PostgreSQL cluster (one cluster shared by the tests of this
//! binary while they run).
//!
//! Covers: create/get and duplicate ids; compare-and-set `apply` (a stale
//! version conflicts and changes nothing); the audit chain (consecutive
//! `seq` from 1, hash links, `head`); credentials and the per-request cap;
//! `list`, `open_requests` and `count_by_state` after transitions;
//! `request_events` and `audit` paging; checkpoints; `subscribe`; durability
//! across a reopen; racing `apply` calls on one request; a principal's
//! emergency requests and the create that is refused when they changed.
//!
//! Every behaviour is a function in [`suite`] over `&dyn Store` (or a store
//! factory), and each store runs it through its own thin `#[tokio::test]`
//! wrappers (`sqlite_*`, `pg_*`). Two `PgStore`s on one database are two
//! nodes: `pg_two_nodes_share_one_chain` checks that they write one chain
//! and see each other's events.

use std::path::Path;
use std::sync::Arc;

use breakglass_store::{PgStore, SqliteOptions, SqliteStore, Store as _};
use tempfile::TempDir;

mod suite {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use breakglass_core::audit::{
        AuditEvent, ChainVerifier, Checkpoint, GENESIS, canonical_json, chain_hash,
    };
    use breakglass_core::lifecycle::{self, Command, EventDraft, NewRequest, Transition};
    use breakglass_core::policy::{Decision, Obligations};
    use breakglass_core::token::token_hash;
    use breakglass_core::{Actor, Principal, Request, State, Timestamp};
    use breakglass_store::verify::Verifier;
    use breakglass_store::{
        Committed, CredentialRecord, ListQuery, PAGE_LEN_MAX, Store, StoreError, for_each_event,
    };

    /// The credential cap the suite asks the store to enforce.
    const LIMIT: u64 = 64;
    use ed25519_dalek::SigningKey;
    use serde_json::json;
    use tokio::sync::broadcast::error::TryRecvError;

    /// A fixed "now" for the whole suite; steps add a few milliseconds.
    const T0: Timestamp = Timestamp(1_750_000_000_000);
    const PENDING_TIMEOUT_S: u64 = 3_600;
    const GRANT_S: u64 = 900;
    const APPROVERS: &str = "sre-leads";
    /// How long a test waits for a broadcast event before failing.
    const RECV_TIMEOUT: Duration = Duration::from_secs(5);

    fn at(ms: i64) -> Timestamp {
        Timestamp(T0.0 + ms)
    }

    fn person(name: &str, group: &str) -> Principal {
        Principal::local(name, BTreeSet::from([group.to_string()]), false)
    }

    fn alice() -> Principal {
        person("alice", "oncall")
    }

    fn lead(n: usize) -> Principal {
        person(&format!("lead-{n}"), APPROVERS)
    }

    /// What the policy engine would decide for a permit needing `approvals`.
    fn decision(approvals: u32) -> Decision {
        Decision {
            allowed: true,
            governing: vec!["conformance".to_string()],
            obligations: Some(Obligations {
                approvals,
                approver_groups: BTreeSet::from([APPROVERS.to_string()]),
                max_duration_s: 3_600,
                tickets: Vec::new(),
                countersign_within_s: None,
                approver_fresh_auth_s: None,
                require_mfa: None,
                review_always: None,
            }),
            errors: Vec::new(),
        }
    }

    /// A new request by `who`; pending when `approvals > 0`, active otherwise.
    fn new_request(id: &str, who: &Principal, approvals: u32, now: Timestamp) -> Transition {
        let input = NewRequest {
            target: "prod-db".to_string(),
            role: "read".to_string(),
            duration_s: GRANT_S,
            reason: "conformance test".to_string(),
            ticket: None,
            emergency: false,
            drill: None,
        };
        lifecycle::create(
            &input,
            who,
            &decision(approvals),
            id.to_string(),
            now,
            PENDING_TIMEOUT_S,
        )
        .expect("lifecycle::create accepts the test request")
    }

    fn step(req: &Request, who: &Principal, cmd: Command, now: Timestamp) -> Transition {
        lifecycle::step(req, &Actor::Principal(who.clone()), &cmd, now)
            .expect("the lifecycle step is valid for the test request")
    }

    fn approve(req: &Request, who: &Principal, now: Timestamp) -> Transition {
        step(req, who, Command::Approve { comment: None }, now)
    }

    fn cancel(req: &Request, now: Timestamp) -> Transition {
        let requester = person(&req.requester, "oncall");
        step(req, &requester, Command::Cancel, now)
    }

    /// Creates a request through the store and returns it as stored.
    async fn create(store: &dyn Store, t: Transition, now: Timestamp) -> (Request, Committed) {
        let req = t.request.clone();
        let committed = store.create(t, now).await.expect("create succeeds");
        (req, committed)
    }

    async fn apply(store: &dyn Store, t: Transition, now: Timestamp) -> (Request, Committed) {
        let req = t.request.clone();
        let committed = store.apply(t, now).await.expect("apply succeeds");
        (req, committed)
    }

    async fn get(store: &dyn Store, id: &str) -> Request {
        store
            .get(id)
            .await
            .expect("get succeeds")
            .unwrap_or_else(|| panic!("request {id} exists"))
    }

    /// The whole audit log (the suite never writes a full page).
    async fn all_events(store: &dyn Store) -> Vec<AuditEvent> {
        let events = store.audit(0, PAGE_LEN_MAX).await.expect("audit succeeds");
        assert!(events.len() < PAGE_LEN_MAX as usize, "log fits one page");
        events
    }

    /// Asserts `events` is the chain from genesis: seq 1, 2, 3... and each
    /// hash computed over the previous one.
    fn assert_chain_from_genesis(events: &[AuditEvent]) {
        let mut verifier = ChainVerifier::new();
        let mut prev = GENESIS;
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1, "seq is consecutive from 1");
            let expected = chain_hash(
                &prev,
                e.seq,
                e.time,
                &e.actor,
                &e.action,
                e.request_id.as_deref(),
                &e.details,
            );
            assert_eq!(e.hash, expected, "event {} links to its predecessor", e.seq);
            verifier
                .push(e)
                .unwrap_or_else(|err| panic!("chain verifies: {err}"));
            prev = e.hash;
        }
    }

    fn seqs(events: &[AuditEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    fn credential(req: &Request, n: u64, now: Timestamp) -> (CredentialRecord, EventDraft) {
        let hash = token_hash(&format!("token-{}-{n}", req.id));
        let record = CredentialRecord {
            hash,
            request_id: req.id.clone(),
            principal: req.requester.clone(),
            target: req.target.clone(),
            role: req.role.clone(),
            expires_at: req.expires_at.expect("an active request has expires_at"),
            issued_at: now,
        };
        let event = EventDraft {
            actor: req.requester.clone(),
            action: "credentials.issued".to_string(),
            request_id: Some(req.id.clone()),
            details: json!({"target": req.target, "n": n}),
        };
        (record, event)
    }

    fn marker(n: u64) -> EventDraft {
        EventDraft {
            actor: "system".to_string(),
            action: "service.started".to_string(),
            request_id: None,
            details: json!({"n": n}),
        }
    }

    fn signing_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    /// (1) `create` then `get` returns the request; a second `create` of the
    /// same id is `Duplicate` and changes nothing.
    pub async fn create_then_get(store: &dyn Store) {
        assert_eq!(
            store.get("r-1").await.expect("get succeeds"),
            None,
            "nothing before create"
        );
        let t = new_request("r-1", &alice(), 1, at(0));
        let (req, committed) = create(store, t, at(0)).await;
        assert_eq!(req.state, State::Pending);
        assert_eq!(committed.len(), 1, "one request.created event");
        assert_eq!(committed[0].action, "request.created");
        assert_eq!(committed[0].request_id.as_deref(), Some("r-1"));
        assert_eq!(get(store, "r-1").await, req, "get returns what was created");
        assert_eq!(store.get("r-2").await.expect("get succeeds"), None);

        let log_before = all_events(store).await;
        let head_before = store.head();
        // Same id, different content: must not overwrite the first one.
        let again = new_request("r-1", &person("bob", "oncall"), 0, at(5));
        match store.create(again, at(5)).await {
            Err(StoreError::Duplicate(id)) => assert_eq!(id, "r-1"),
            other => panic!("expected Duplicate, got {other:?}"),
        }
        assert_eq!(get(store, "r-1").await, req, "the original is untouched");
        assert_eq!(all_events(store).await, log_before, "no event written");
        assert_eq!(store.head(), head_before, "head unchanged");
    }

    /// (2) `apply` is compare-and-set on the version: a transition computed
    /// from a stale version is `Conflict` and changes neither the request
    /// nor the audit log; a fresh one succeeds afterwards.
    pub async fn apply_is_compare_and_set(store: &dyn Store) {
        let (v1, _) = create(store, new_request("r-1", &alice(), 1, at(0)), at(0)).await;
        assert_eq!(v1.version, 1);
        let (v2, committed) = apply(store, approve(&v1, &lead(1), at(10)), at(10)).await;
        assert_eq!(v2.version, 2);
        assert_eq!(v2.state, State::Active);
        let actions: Vec<&str> = committed.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["request.approved", "request.activated"]);
        assert_eq!(get(store, "r-1").await, v2);

        let log_before = all_events(store).await;
        let head_before = store.head();
        // Computed from v1, which is no longer current.
        let stale = cancel(&v1, at(20));
        assert_eq!(stale.expected_version, 1);
        match store.apply(stale, at(20)).await {
            Err(StoreError::Conflict { id, expected }) => {
                assert_eq!(id, "r-1");
                assert_eq!(expected, 1);
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
        assert_eq!(
            get(store, "r-1").await,
            v2,
            "request unchanged by the conflict"
        );
        assert_eq!(
            all_events(store).await,
            log_before,
            "audit log unchanged by the conflict"
        );
        assert_eq!(store.head(), head_before, "head unchanged by the conflict");

        // A transition from the current version still goes through.
        let revoke = step(
            &v2,
            &alice(),
            Command::Revoke {
                reason: "done".to_string(),
            },
            at(30),
        );
        let (v3, committed) = apply(store, revoke, at(30)).await;
        assert_eq!(get(store, "r-1").await, v3);
        assert_eq!(v3.state, State::Revoked);
        assert_eq!(committed.len(), 1);
        assert_eq!(committed[0].seq, head_before.0 + 1, "seq continues");

        // A transition that does not move the version on by exactly one,
        // or a create that expects an existing version, is refused and
        // writes nothing.
        let log_before = all_events(store).await;
        let mut skewed = cancel(&v1, at(40));
        skewed.request.version = skewed.expected_version;
        assert!(
            matches!(
                store.apply(skewed, at(40)).await,
                Err(StoreError::Corrupt(_))
            ),
            "a transition that keeps the version is refused"
        );
        let mut not_new = new_request("r-2", &alice(), 1, at(50));
        not_new.expected_version = 7;
        assert!(
            matches!(
                store.create(not_new, at(50)).await,
                Err(StoreError::Corrupt(_))
            ),
            "a create that expects version 7 is refused"
        );
        assert_eq!(get(store, "r-1").await, v3);
        assert_eq!(store.get("r-2").await.expect("get succeeds"), None);
        assert_eq!(all_events(store).await, log_before);
    }

    /// (3) Events get consecutive `seq` from 1, each hash chains to the
    /// previous, what `audit` returns is what was committed, and `head` is
    /// the last event.
    pub async fn audit_chain_links(store: &dyn Store) {
        assert_eq!(store.head(), (0, GENESIS), "an empty store is at genesis");
        assert!(all_events(store).await.is_empty());

        let mut committed = Vec::new();
        let (a, c) = create(store, new_request("r-a", &alice(), 1, at(0)), at(0)).await;
        committed.extend(c);
        let (_, c) = create(store, new_request("r-b", &alice(), 0, at(1)), at(1)).await;
        committed.extend(c);
        let (_, c) = apply(store, approve(&a, &lead(1), at(2)), at(2)).await;
        committed.extend(c);
        committed.extend(
            store
                .append(vec![marker(1), marker(2)], at(3))
                .await
                .expect("append succeeds"),
        );
        // created(a), created+activated(b), approved+activated(a), 2 markers.
        assert_eq!(committed.len(), 7);

        let log = all_events(store).await;
        assert_eq!(log, committed, "audit returns exactly what was committed");
        assert_chain_from_genesis(&log);
        // The stored details are the canonical JSON of the draft's details.
        assert_eq!(log[5].details, canonical_json(&json!({"n": 1})));
        assert_eq!(log[5].request_id, None);
        assert_eq!(log[6].time, at(3), "events carry the commit's now");

        let last = log.last().expect("log is not empty");
        assert_eq!(
            store.head(),
            (last.seq, last.hash),
            "head is the last event"
        );

        let mut verifier = Verifier::new(Vec::new(), None);
        for e in &log {
            assert!(verifier.push(e), "Verifier accepts event {}", e.seq);
        }
        let v = verifier.finish();
        assert!(v.ok, "whole log verifies: {:?}", v.reason);
        assert_eq!(v.events, 7);
        assert_eq!(v.head_seq, last.seq);
        assert_eq!(v.head_hash, hex::encode(last.hash));
    }

    /// (4) A credential is retrievable by its hash; the request's
    /// `LIMIT + 1`th is `Limit` and writes nothing.
    pub async fn credentials_and_limit(store: &dyn Store) {
        let (req, _) = create(store, new_request("r-1", &alice(), 0, at(0)), at(0)).await;
        assert_eq!(req.state, State::Active);
        let (other, _) = create(store, new_request("r-2", &alice(), 0, at(1)), at(1)).await;

        let (first, event) = credential(&req, 0, at(10));
        let committed = store
            .issue_credential(first.clone(), event, LIMIT, at(10))
            .await
            .expect("issue_credential succeeds");
        assert_eq!(committed.len(), 1);
        assert_eq!(committed[0].action, "credentials.issued");
        assert_eq!(
            store
                .credential(first.hash)
                .await
                .expect("credential lookup succeeds"),
            Some(first.clone()),
            "credential round-trips by hash"
        );
        assert_eq!(
            store
                .credential(token_hash("never issued"))
                .await
                .expect("credential lookup succeeds"),
            None
        );

        for n in 1..LIMIT {
            let (record, event) = credential(&req, n, at(10 + n as i64));
            store
                .issue_credential(record, event, LIMIT, at(10 + n as i64))
                .await
                .unwrap_or_else(|e| panic!("credential {n} is within the cap: {e}"));
        }

        let log_before = all_events(store).await;
        let head_before = store.head();
        let (over, event) = credential(&req, LIMIT, at(100));
        match store
            .issue_credential(over.clone(), event, LIMIT, at(100))
            .await
        {
            Err(StoreError::Limit(msg)) => assert!(msg.contains("r-1"), "names the request: {msg}"),
            other => panic!("expected Limit, got {other:?}"),
        }
        let log_after = all_events(store).await;
        assert_eq!(
            log_after.len(),
            log_before.len(),
            "no audit event for Limit"
        );
        assert_eq!(log_after, log_before);
        assert_eq!(store.head(), head_before);
        assert_eq!(
            store
                .credential(over.hash)
                .await
                .expect("credential lookup succeeds"),
            None,
            "the refused credential was not stored"
        );
        let issued = store
            .request_events("r-1", PAGE_LEN_MAX)
            .await
            .expect("request_events succeeds")
            .iter()
            .filter(|e| e.action == "credentials.issued")
            .count();
        assert_eq!(issued as u64, LIMIT);

        // The cap is per request: another grant still gets credentials.
        let (record, event) = credential(&other, 0, at(200));
        store
            .issue_credential(record.clone(), event, LIMIT, at(200))
            .await
            .expect("another request is not capped");
        assert_eq!(
            store
                .credential(record.hash)
                .await
                .expect("credential lookup succeeds"),
            Some(record)
        );
    }

    /// (4b) The cap holds when many credentials are issued at once.
    pub async fn credential_limit_under_concurrency(store: Arc<dyn Store>) {
        let (req, _) = create(&*store, new_request("r-1", &alice(), 0, at(0)), at(0)).await;
        let extra = 6;
        let mut tasks = Vec::new();
        for n in 0..LIMIT + extra {
            let store = store.clone();
            let (record, event) = credential(&req, n, at(1));
            tasks.push(tokio::spawn(async move {
                store.issue_credential(record, event, LIMIT, at(1)).await
            }));
        }
        let (mut ok, mut limited) = (0u64, 0u64);
        for task in tasks {
            match task.await.expect("task does not panic") {
                Ok(_) => ok += 1,
                Err(StoreError::Limit(_)) => limited += 1,
                Err(e) => panic!("expected Ok or Limit, got {e}"),
            }
        }
        assert_eq!(ok, LIMIT);
        assert_eq!(limited, extra);
        let issued = store
            .request_events("r-1", PAGE_LEN_MAX)
            .await
            .expect("request_events succeeds")
            .iter()
            .filter(|e| e.action == "credentials.issued")
            .count();
        assert_eq!(issued as u64, LIMIT);
    }

    fn ids(reqs: &[Request]) -> Vec<&str> {
        reqs.iter().map(|r| r.id.as_str()).collect()
    }

    /// (5) `list`, `open_requests` and `count_by_state` follow transitions.
    /// `unreviewed_grants` (the review queue) and `requests_since` (the
    /// report's pages) after grants end and are triaged.
    pub async fn review_queries(store: &dyn Store) {
        let system = |req: &Request, cmd: Command, now: Timestamp| {
            lifecycle::step(req, &Actor::System, &cmd, now).expect("the system step is valid")
        };
        let alice = alice();
        // Three grants (no approval needed) and one pending request.
        let mut grants = Vec::new();
        for (i, id) in ["g-1", "g-2", "g-3"].into_iter().enumerate() {
            let now = at(i as i64);
            let (g, _) = create(store, new_request(id, &alice, 0, now), now).await;
            assert_eq!(g.state, State::Active);
            grants.push(g);
        }
        let (_, _) = create(store, new_request("p-1", &alice, 1, at(3)), at(3)).await;
        assert!(
            store
                .unreviewed_grants(None, 100)
                .await
                .expect("query")
                .is_empty(),
            "live grants and pending requests are not in the queue"
        );
        // All three end.
        let mut ended = Vec::new();
        for g in &grants {
            let t = step(
                g,
                &alice,
                Command::Revoke {
                    reason: "done".into(),
                },
                at(10),
            );
            ended.push(apply(store, t, at(10)).await.0);
        }
        let queue = store.unreviewed_grants(None, 100).await.expect("query");
        assert_eq!(ids(&queue), ["g-1", "g-2", "g-3"], "by id");
        let page = store
            .unreviewed_grants(Some("g-1".into()), 1)
            .await
            .expect("query");
        assert_eq!(ids(&page), ["g-2"], "after and limit");
        // g-1 closes as auto_ok, g-2 is queued for a person: only g-2 and
        // the untriaged g-3 stay in the queue.
        let triage = |flagged: Vec<String>| Command::Triage {
            flagged,
            findings: BTreeMap::from([("ddl".to_string(), 2)]),
            evidence: json!({}),
            due_at: at(100),
        };
        let (g1, _) = apply(store, system(&ended[0], triage(vec![]), at(20)), at(20)).await;
        assert!(g1.review.is_some());
        let (g2, _) = apply(
            store,
            system(
                &ended[1],
                triage(vec!["finding ddl (medium)".into()]),
                at(20),
            ),
            at(20),
        )
        .await;
        let queue = store.unreviewed_grants(None, 100).await.expect("query");
        assert_eq!(ids(&queue), ["g-2", "g-3"]);
        assert_eq!(queue[0], g2, "the stored request, findings included");
        assert_eq!(queue[0].review_findings.get("ddl"), Some(&2));
        // A person's review takes it out.
        let t = step(
            &g2,
            &lead(1),
            Command::Review {
                outcome: breakglass_core::ReviewOutcome::Ok,
                notes: "planned".into(),
            },
            at(30),
        );
        apply(store, t, at(30)).await;
        let queue = store.unreviewed_grants(None, 100).await.expect("query");
        assert_eq!(ids(&queue), ["g-3"]);

        // Reports read by creation time, in pages.
        let all = store.requests_since(at(0), None, 100).await.expect("query");
        assert_eq!(ids(&all), ["g-1", "g-2", "g-3", "p-1"]);
        let later = store.requests_since(at(2), None, 100).await.expect("query");
        assert_eq!(ids(&later), ["g-3", "p-1"], "created at or after since");
        let first = store.requests_since(at(0), None, 2).await.expect("query");
        assert_eq!(ids(&first), ["g-1", "g-2"]);
        let last = first.last().expect("a page");
        let next = store
            .requests_since(at(0), Some((last.created_at, last.id.clone())), 2)
            .await
            .expect("query");
        assert_eq!(
            ids(&next),
            ["g-3", "p-1"],
            "the next page starts after the key"
        );
    }

    pub async fn queries_reflect_states(store: &dyn Store) {
        let (a, _) = create(store, new_request("r-a", &alice(), 1, at(0)), at(0)).await;
        let (b, _) = create(store, new_request("r-b", &alice(), 1, at(1)), at(1)).await;
        let bob = person("bob", "oncall");
        let (c, _) = create(store, new_request("r-c", &bob, 1, at(2)), at(2)).await;
        // Before any transition all three are pending.
        let pending = store
            .list(ListQuery {
                state: Some(State::Pending),
                limit: 100,
                ..ListQuery::default()
            })
            .await
            .expect("list succeeds");
        assert_eq!(ids(&pending), ["r-c", "r-b", "r-a"], "newest first");

        let (b, _) = apply(store, approve(&b, &lead(1), at(10)), at(10)).await;
        let (c, _) = apply(store, cancel(&c, at(11)), at(11)).await;
        assert_eq!(b.state, State::Active);
        assert_eq!(c.state, State::Cancelled);

        let by_state = |state| ListQuery {
            state: Some(state),
            limit: 100,
            ..ListQuery::default()
        };
        let pending = store.list(by_state(State::Pending)).await.expect("list");
        assert_eq!(pending, vec![a.clone()]);
        let active = store.list(by_state(State::Active)).await.expect("list");
        assert_eq!(active, vec![b.clone()], "list returns the applied request");
        let cancelled = store.list(by_state(State::Cancelled)).await.expect("list");
        assert_eq!(cancelled, vec![c.clone()]);
        assert!(
            store
                .list(by_state(State::Expired))
                .await
                .expect("list")
                .is_empty()
        );

        let all = store
            .list(ListQuery {
                limit: 100,
                ..ListQuery::default()
            })
            .await
            .expect("list succeeds");
        assert_eq!(all, vec![c.clone(), b.clone(), a.clone()]);
        let by_alice = store
            .list(ListQuery {
                requester: Some("alice".to_string()),
                limit: 100,
                ..ListQuery::default()
            })
            .await
            .expect("list succeeds");
        assert_eq!(ids(&by_alice), ["r-b", "r-a"]);
        let first_page = store
            .list(ListQuery {
                limit: 2,
                ..ListQuery::default()
            })
            .await
            .expect("list succeeds");
        assert_eq!(ids(&first_page), ["r-c", "r-b"], "limit respected");
        let next_page = store
            .list(ListQuery {
                after: Some("r-b".to_string()),
                limit: 2,
                ..ListQuery::default()
            })
            .await
            .expect("list succeeds");
        assert_eq!(ids(&next_page), ["r-a"], "after is exclusive");
        let visible = |name: &str, groups: &[&str]| ListQuery {
            visible_to: Some((
                name.to_string(),
                groups.iter().map(|g| g.to_string()).collect(),
            )),
            limit: 100,
            ..ListQuery::default()
        };
        let to_bob = store.list(visible("bob", &[])).await.expect("list");
        assert_eq!(ids(&to_bob), ["r-c"], "own requests only");
        let to_lead = store
            .list(visible("lead-9", &[APPROVERS]))
            .await
            .expect("list");
        assert_eq!(ids(&to_lead), ["r-c", "r-b", "r-a"], "approvable requests");
        let to_stranger = store
            .list(visible("mallory", &["elsewhere"]))
            .await
            .expect("list");
        assert!(to_stranger.is_empty());

        let open = store.open_requests().await.expect("open_requests succeeds");
        let open_ids: BTreeSet<&str> = open.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            open_ids,
            BTreeSet::from(["r-a", "r-b"]),
            "pending and active have deadlines; cancelled does not"
        );
        for r in &open {
            let expected = if r.id == "r-a" { &a } else { &b };
            assert_eq!(r, expected, "open_requests returns the current request");
        }

        let counts: BTreeMap<&str, u64> = store
            .count_by_state()
            .await
            .expect("count_by_state succeeds")
            .into_iter()
            .map(|(s, n)| (s.as_str(), n))
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(
            counts,
            BTreeMap::from([("active", 1), ("cancelled", 1), ("pending", 1)])
        );
    }

    /// (6) `request_events` returns only that request's events, ascending;
    /// `audit(after, limit)` pages with `after` exclusive.
    pub async fn event_queries_and_paging(store: &dyn Store) {
        let (a, _) = create(store, new_request("r-a", &alice(), 1, at(0)), at(0)).await; // 1
        let (b, _) = create(store, new_request("r-b", &alice(), 1, at(1)), at(1)).await; // 2
        apply(store, approve(&a, &lead(1), at(2)), at(2)).await; // 3, 4
        store
            .append(vec![marker(1)], at(3))
            .await
            .expect("append succeeds"); // 5
        apply(store, cancel(&b, at(4)), at(4)).await; // 6

        let of_a = store
            .request_events("r-a", PAGE_LEN_MAX)
            .await
            .expect("request_events succeeds");
        assert_eq!(seqs(&of_a), [1, 3, 4]);
        assert!(of_a.iter().all(|e| e.request_id.as_deref() == Some("r-a")));
        let actions: Vec<&str> = of_a.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            ["request.created", "request.approved", "request.activated"]
        );
        let of_b = store
            .request_events("r-b", PAGE_LEN_MAX)
            .await
            .expect("request_events succeeds");
        assert_eq!(seqs(&of_b), [2, 6]);
        assert!(of_b.iter().all(|e| e.request_id.as_deref() == Some("r-b")));
        let first_two = store
            .request_events("r-a", 2)
            .await
            .expect("request_events succeeds");
        assert_eq!(seqs(&first_two), [1, 3], "limit respected, oldest first");
        assert!(
            store
                .request_events("r-none", PAGE_LEN_MAX)
                .await
                .expect("request_events succeeds")
                .is_empty()
        );

        let log = all_events(store).await;
        assert_eq!(seqs(&log), [1, 2, 3, 4, 5, 6]);
        for (after, limit, expected) in [
            (0, 2, vec![1, 2]),
            (2, 2, vec![3, 4]),
            (4, 2, vec![5, 6]),
            (6, 2, vec![]),
            (3, 100, vec![4, 5, 6]),
            (5, 1, vec![6]),
            (100, 10, vec![]),
        ] {
            let page = store.audit(after, limit).await.expect("audit succeeds");
            assert_eq!(seqs(&page), expected, "audit({after}, {limit})");
            let full: Vec<&AuditEvent> = log.iter().filter(|e| e.seq > after).collect();
            assert!(
                page.iter().zip(full).all(|(p, f)| p == f),
                "pages hold the same events as the full log"
            );
        }

        // Paging one event at a time walks the whole log exactly once.
        let mut walked = Vec::new();
        let mut after = 0;
        loop {
            let page = store.audit(after, 1).await.expect("audit succeeds");
            let Some(e) = page.last() else { break };
            assert_eq!(page.len(), 1);
            after = e.seq;
            walked.extend(page);
        }
        assert_eq!(walked, log);

        let mut seen = Vec::new();
        for_each_event(store, 2, |e| {
            seen.push(e.seq);
            seen.len() < 3
        })
        .await
        .expect("for_each_event succeeds");
        assert_eq!(seen, [3, 4, 5], "starts after 2, stops when told");
    }

    /// A one-time code step is used once per principal: a repeat, or an
    /// older step, is refused; principals are independent; of concurrent
    /// uses of one step (on `stores`, one or several nodes) exactly one
    /// wins.
    pub async fn one_time_codes_are_used_once(stores: &[&dyn Store]) {
        let store = stores[0];
        assert!(store.use_one_time_code("alice", 100).await.expect("use"));
        assert!(
            !store.use_one_time_code("alice", 100).await.expect("use"),
            "a replay"
        );
        assert!(
            !store.use_one_time_code("alice", 99).await.expect("use"),
            "an older code"
        );
        assert!(
            store.use_one_time_code("bob", 100).await.expect("use"),
            "another principal"
        );
        assert!(
            store.use_one_time_code("alice", 101).await.expect("use"),
            "the next code"
        );
        let races: Vec<_> = (0..16)
            .map(|i| stores[i % stores.len()].use_one_time_code("carol", 7))
            .collect();
        let won = futures_util::future::join_all(races)
            .await
            .into_iter()
            .filter(|r| *r.as_ref().expect("use"))
            .count();
        assert_eq!(won, 1, "exactly one concurrent use of a code wins");
    }

    /// A request's drill label is stored and read back, and lists keep
    /// drills apart from real use.
    pub async fn drill_labels_are_stored_and_filtered(store: &dyn Store) {
        let now = Timestamp::from_millis(1_000_000);
        let mut labelled = new_request("00000000-drill-0001", &alice(), 1, now);
        labelled.request.drill = Some("canary-read".to_string());
        let (req, _) = create(store, labelled, now).await;
        assert_eq!(req.drill.as_deref(), Some("canary-read"));
        let (real, _) = create(
            store,
            new_request("00000000-real-0002", &alice(), 1, now),
            now,
        )
        .await;
        let got = store.get(&req.id).await.expect("get").expect("stored");
        assert_eq!(got.drill.as_deref(), Some("canary-read"));
        // A transition keeps the label.
        let next = approve(&got, &lead(0), now);
        store.apply(next, now).await.expect("apply");
        let got = store.get(&req.id).await.expect("get").expect("stored");
        assert_eq!(
            (got.state, got.drill.as_deref()),
            (State::Active, Some("canary-read"))
        );
        let ids = |drill: Option<bool>| async move {
            store
                .list(ListQuery {
                    drill,
                    limit: 100,
                    ..ListQuery::default()
                })
                .await
                .expect("list")
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(Some(true)).await, vec![req.id.clone()]);
        assert_eq!(ids(Some(false)).await, vec![real.id.clone()]);
        assert_eq!(ids(None).await.len(), 2);
    }

    /// A drill's scheduled slot is claimed once: a repeat or an older slot
    /// is refused, drills are independent, and of concurrent claims of one
    /// slot (on `stores`, one or several nodes) exactly one wins.
    pub async fn drill_runs_are_claimed_once(stores: &[&dyn Store]) {
        let store = stores[0];
        assert!(store.claim_drill_run("canary", 5).await.expect("claim"));
        assert!(
            !store.claim_drill_run("canary", 5).await.expect("claim"),
            "again"
        );
        assert!(
            !store.claim_drill_run("canary", 4).await.expect("claim"),
            "older"
        );
        assert!(
            store.claim_drill_run("other", 5).await.expect("claim"),
            "another drill"
        );
        assert!(
            store.claim_drill_run("canary", 6).await.expect("claim"),
            "the next slot"
        );
        let races: Vec<_> = (0..16)
            .map(|i| stores[i % stores.len()].claim_drill_run("canary", 9))
            .collect();
        let won = futures_util::future::join_all(races)
            .await
            .into_iter()
            .filter(|r| *r.as_ref().expect("claim"))
            .count();
        assert_eq!(won, 1, "exactly one node runs a slot");
    }

    /// `drill_results` returns the `drill.completed` events from a time on,
    /// in `seq` order, and no other action's.
    pub async fn drill_results(store: &dyn Store) {
        let draft = |action: &str, n: u64| EventDraft {
            actor: "system".to_string(),
            action: action.to_string(),
            request_id: None,
            details: serde_json::json!({"n": n}),
        };
        for (t, n) in [(1_000, 1), (2_000, 2), (3_000, 3)] {
            store
                .append(
                    vec![draft("drill.completed", n), draft("drill.started", n)],
                    Timestamp::from_millis(t),
                )
                .await
                .expect("append");
        }
        let got = store
            .drill_results(Timestamp::from_millis(2_000), 100)
            .await
            .expect("drill_results");
        let ns: Vec<String> = got.iter().map(|e| e.details.clone()).collect();
        assert_eq!(ns, [r#"{"n":2}"#, r#"{"n":3}"#]);
        assert!(got.iter().all(|e| e.action == "drill.completed"));
        assert!(got[0].seq < got[1].seq);
        let one = store
            .drill_results(Timestamp::from_millis(0), 1)
            .await
            .expect("drill_results");
        assert_eq!(one.len(), 1, "the limit holds");
    }

    /// A notification sink's cursor is created, updated, never moved back
    /// (even by another node), and kept per sink.
    pub async fn notify_cursors_only_move_forward(stores: &[&dyn Store]) {
        use breakglass_store::NotifyCursor;
        let store = stores[0];
        assert!(store.notify_cursors().await.expect("read").is_empty());
        let at = |sink: &str, seq: u64, err: Option<&str>, failed: u64| NotifyCursor {
            sink: sink.into(),
            seq,
            updated_at: Timestamp(1_000 + seq as i64),
            last_error: err.map(String::from),
            failed,
        };
        store
            .set_notify_cursor(at("hook", 5, None, 0))
            .await
            .expect("set");
        store
            .set_notify_cursor(at("siem", 2, Some("HTTP 503"), 1))
            .await
            .expect("set");
        let other = stores[stores.len() - 1];
        other
            .set_notify_cursor(at("hook", 3, Some("timed out"), 0))
            .await
            .expect("a lower seq is not an error");
        let got = store.notify_cursors().await.expect("read");
        assert_eq!(
            got,
            vec![
                NotifyCursor {
                    sink: "hook".into(),
                    seq: 5,
                    updated_at: Timestamp(1_003),
                    last_error: Some("timed out".into()),
                    failed: 0,
                },
                at("siem", 2, Some("HTTP 503"), 1),
            ],
            "the seq stays, the error and time are updated"
        );
        other
            .set_notify_cursor(at("hook", 9, None, 0))
            .await
            .expect("set");
        assert_eq!(
            store.notify_cursors().await.expect("read")[0],
            at("hook", 9, None, 0)
        );
    }

    /// One node at a time holds a sink's delivery lease: it renews it, the
    /// other node is refused until it expires, then takes it over; a sink
    /// without a cursor has no lease; the cursor survives the leases.
    pub async fn notify_leases_are_held_by_one_node(stores: &[&dyn Store]) {
        use breakglass_store::NotifyCursor;
        let (a, b) = (stores[0], stores[stores.len() - 1]);
        let t = Timestamp;
        assert!(
            !a.lease_notify_sink("hook", "node-a", t(1_000), t(7_000))
                .await
                .expect("lease"),
            "no cursor, no lease"
        );
        a.set_notify_cursor(NotifyCursor {
            sink: "hook".into(),
            seq: 4,
            updated_at: t(1_000),
            last_error: None,
            failed: 0,
        })
        .await
        .expect("set");
        assert!(
            a.lease_notify_sink("hook", "node-a", t(1_000), t(7_000))
                .await
                .expect("lease")
        );
        assert!(
            !b.lease_notify_sink("hook", "node-b", t(2_000), t(8_000))
                .await
                .expect("lease"),
            "held by node-a"
        );
        assert!(
            a.lease_notify_sink("hook", "node-a", t(3_000), t(9_000))
                .await
                .expect("lease"),
            "the holder renews"
        );
        assert!(
            !b.lease_notify_sink("hook", "node-b", t(8_999), t(15_000))
                .await
                .expect("lease"),
            "not expired yet"
        );
        assert!(
            b.lease_notify_sink("hook", "node-b", t(9_001), t(15_000))
                .await
                .expect("lease"),
            "expired: taken over"
        );
        assert!(
            !a.lease_notify_sink("hook", "node-a", t(9_500), t(15_500))
                .await
                .expect("lease"),
            "the old holder lost it"
        );
        // Several nodes at once on a free lease: exactly one gets it.
        b.set_notify_cursor(NotifyCursor {
            sink: "siem".into(),
            seq: 1,
            updated_at: t(1_000),
            last_error: None,
            failed: 0,
        })
        .await
        .expect("set");
        let tries = (0..6).map(|i| {
            stores[i % stores.len()].lease_notify_sink(
                "siem",
                ["n0", "n1", "n2", "n3", "n4", "n5"][i],
                t(1_000),
                t(7_000),
            )
        });
        let won = futures_util::future::join_all(tries)
            .await
            .into_iter()
            .filter(|r| *r.as_ref().expect("lease"))
            .count();
        assert_eq!(won, 1);
        let cursors = a.notify_cursors().await.expect("read");
        assert_eq!(cursors.iter().map(|c| c.seq).collect::<Vec<_>>(), [4, 1]);
    }

    /// (7) `add_checkpoint` then `checkpoints` returns it, and the stored
    /// checkpoints verify against the log.
    pub async fn checkpoints_round_trip(store: &dyn Store) {
        assert!(
            store
                .checkpoints()
                .await
                .expect("checkpoints succeeds")
                .is_empty()
        );
        let key = signing_key();
        create(store, new_request("r-1", &alice(), 1, at(0)), at(0)).await;
        let (seq, hash) = store.head();
        let first = Checkpoint::sign(&key, seq, hash, at(1));
        store
            .add_checkpoint(first.clone())
            .await
            .expect("add_checkpoint succeeds");
        assert_eq!(
            store.checkpoints().await.expect("checkpoints succeeds"),
            vec![first.clone()]
        );

        store
            .append(vec![marker(1), marker(2)], at(2))
            .await
            .expect("append succeeds");
        let (seq, hash) = store.head();
        let second = Checkpoint::sign(&key, seq, hash, at(3));
        store
            .add_checkpoint(second.clone())
            .await
            .expect("add_checkpoint succeeds");
        // A second checkpoint at a checkpointed seq does not replace it.
        let again = Checkpoint::sign(&key, seq, hash, at(4));
        store
            .add_checkpoint(again)
            .await
            .expect("add_checkpoint succeeds");
        let stored = store.checkpoints().await.expect("checkpoints succeeds");
        assert_eq!(stored, vec![first, second], "ascending by seq, first kept");

        let mut verifier = Verifier::new(stored, Some(&key.verifying_key()));
        for e in all_events(store).await {
            assert!(verifier.push(&e), "Verifier accepts event {}", e.seq);
        }
        let v = verifier.finish();
        assert!(v.ok, "log and checkpoints verify: {:?}", v.reason);
        assert_eq!(v.checkpoints, 2);
    }

    async fn recv(rx: &mut tokio::sync::broadcast::Receiver<Arc<AuditEvent>>) -> AuditEvent {
        let e = tokio::time::timeout(RECV_TIMEOUT, rx.recv())
            .await
            .expect("an event arrives before the timeout")
            .expect("the channel is open and not lagging");
        (*e).clone()
    }

    /// (8) A subscriber receives committed events in order, and nothing for
    /// a write that failed.
    pub async fn subscribers_see_commits(store: &dyn Store) {
        let mut rx = store.subscribe();
        let (v1, mut committed) =
            create(store, new_request("r-1", &alice(), 1, at(0)), at(0)).await;
        let (_, c) = apply(store, approve(&v1, &lead(1), at(1)), at(1)).await;
        committed.extend(c);
        assert_eq!(committed.len(), 3);
        for want in &committed {
            assert_eq!(&recv(&mut rx).await, want);
        }

        // A conflicting write publishes nothing: the next event is the marker.
        let stale = cancel(&v1, at(2));
        assert!(matches!(
            store.apply(stale, at(2)).await,
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        let appended = store
            .append(vec![marker(1)], at(3))
            .await
            .expect("append succeeds");
        assert_eq!(recv(&mut rx).await, appended[0]);

        // A subscriber sees only what commits after it subscribed.
        let mut late = store.subscribe();
        let appended = store
            .append(vec![marker(2)], at(4))
            .await
            .expect("append succeeds");
        assert_eq!(recv(&mut late).await, appended[0]);
        assert_eq!(recv(&mut rx).await, appended[0]);
    }

    /// (9) Everything written survives dropping the store and opening it
    /// again, and the chain continues from the same head.
    pub async fn survives_reopen<S: Store>(open: impl Fn() -> S) {
        let key = signing_key();
        let store = open();
        let (v1, _) = create(&store, new_request("r-1", &alice(), 1, at(0)), at(0)).await;
        let (v2, _) = apply(&store, approve(&v1, &lead(1), at(1)), at(1)).await;
        let (pending, _) = create(&store, new_request("r-2", &alice(), 1, at(2)), at(2)).await;
        let (record, event) = credential(&v2, 0, at(3));
        store
            .issue_credential(record.clone(), event, LIMIT, at(3))
            .await
            .expect("issue_credential succeeds");
        let (seq, hash) = store.head();
        let cp = Checkpoint::sign(&key, seq, hash, at(4));
        store
            .add_checkpoint(cp.clone())
            .await
            .expect("add_checkpoint succeeds");
        let head = store.head();
        let log = all_events(&store).await;
        assert_eq!(log.len(), 5);
        drop(store);

        let store = open();
        assert_eq!(store.head(), head, "head reloaded");
        assert_eq!(all_events(&store).await, log, "log intact");
        assert_eq!(get(&store, "r-1").await, v2);
        assert_eq!(get(&store, "r-2").await, pending);
        assert_eq!(
            store
                .credential(record.hash)
                .await
                .expect("credential lookup succeeds"),
            Some(record)
        );
        assert_eq!(
            store.checkpoints().await.expect("checkpoints succeeds"),
            vec![cp.clone()]
        );
        let open_ids: BTreeSet<String> = store
            .open_requests()
            .await
            .expect("open_requests succeeds")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(open_ids, BTreeSet::from(["r-1".into(), "r-2".into()]));

        // Writing after the reopen continues the same chain.
        let (_, committed) = apply(&store, cancel(&pending, at(5)), at(5)).await;
        assert_eq!(committed[0].seq, head.0 + 1);
        let log = all_events(&store).await;
        assert_chain_from_genesis(&log);
        let mut verifier = Verifier::new(vec![cp], Some(&key.verifying_key()));
        for e in &log {
            assert!(verifier.push(e), "Verifier accepts event {}", e.seq);
        }
        let v = verifier.finish();
        assert!(v.ok, "log verifies after reopen: {:?}", v.reason);
    }

    /// (10) Many `apply` calls racing on one request from the same version:
    /// exactly one wins, the others are `Conflict`, and only the winner's
    /// events are in the log.
    pub async fn racing_applies(store: Arc<dyn Store>) {
        const RACERS: usize = 32;
        let (v1, _) = create(&*store, new_request("r-1", &alice(), 1, at(0)), at(0)).await;
        let mut tasks = Vec::new();
        for n in 0..RACERS {
            let store = store.clone();
            // Each racer is a different eligible approver of the same v1.
            let t = approve(&v1, &lead(n), at(1));
            tasks.push(tokio::spawn(async move {
                let who = lead(n).name;
                (who, store.apply(t, at(1)).await)
            }));
        }
        let mut winners = Vec::new();
        let mut conflicts = 0;
        for task in tasks {
            match task.await.expect("task does not panic") {
                (who, Ok(events)) => winners.push((who, events)),
                (_, Err(StoreError::Conflict { id, expected })) => {
                    assert_eq!((id.as_str(), expected), ("r-1", 1));
                    conflicts += 1;
                }
                (_, Err(e)) => panic!("expected Ok or Conflict, got {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one apply wins");
        assert_eq!(conflicts, RACERS - 1, "all others conflict");
        let (winner, events) = winners.pop().expect("one winner");

        let stored = get(&*store, "r-1").await;
        assert_eq!(stored.version, 2);
        assert_eq!(stored.state, State::Active);
        let approvers: Vec<&str> = stored.approvals.iter().map(|a| a.by.as_str()).collect();
        assert_eq!(approvers, [winner.as_str()], "only the winner's approval");
        let log = all_events(&*store).await;
        assert_eq!(
            log.len(),
            3,
            "created + the winner's approved and activated"
        );
        assert_eq!(&log[1..], &events[..]);
        assert_eq!(log[1].actor, winner);
        assert_chain_from_genesis(&log);
    }

    /// A self-activating emergency request by `who`.
    fn new_emergency(id: &str, who: &Principal, now: Timestamp) -> Transition {
        let input = NewRequest {
            target: "prod-db".to_string(),
            role: "read".to_string(),
            duration_s: GRANT_S,
            reason: "conformance emergency".to_string(),
            ticket: None,
            emergency: true,
            drill: None,
        };
        lifecycle::create(
            &input,
            who,
            &decision(0),
            id.to_string(),
            now,
            PENDING_TIMEOUT_S,
        )
        .expect("lifecycle::create accepts the test emergency")
    }

    async fn emergency_ids(store: &dyn Store, who: &str) -> Vec<(String, u64)> {
        store
            .emergency_requests(who)
            .await
            .expect("emergency_requests succeeds")
            .into_iter()
            .map(|r| (r.id, r.version))
            .collect()
    }

    /// (11) `emergency_requests` returns a principal's open or unreviewed
    /// emergency requests, oldest first; `create_emergency` commits only
    /// while they are what the caller saw, and a refused one leaves no trace.
    pub async fn emergency_requests_guard_create(store: &dyn Store) {
        create(store, new_request("r-0", &alice(), 1, at(0)), at(0)).await;
        assert!(emergency_ids(store, "alice").await.is_empty());
        store
            .create_emergency(new_emergency("e-1", &alice(), at(1)), Vec::new(), at(1))
            .await
            .expect("the first emergency request commits");
        assert_eq!(
            emergency_ids(store, "alice").await,
            [("e-1".to_string(), 1)]
        );
        let head = store.head();
        // A caller that decided on an empty list is stale now.
        match store
            .create_emergency(new_emergency("e-2", &alice(), at(2)), Vec::new(), at(2))
            .await
        {
            Err(StoreError::Conflict { .. }) => {}
            other => panic!("expected Conflict, got {other:?}"),
        }
        assert_eq!(store.head(), head, "a refused create writes no event");
        assert!(store.get("e-2").await.expect("get").is_none());
        // Someone else's emergency requests are not alice's.
        store
            .create_emergency(new_emergency("e-bob", &lead(0), at(3)), Vec::new(), at(3))
            .await
            .expect("another principal is not blocked by alice's list");
        let e1 = get(store, "e-1").await;
        store
            .create_emergency(
                new_emergency("e-2", &alice(), at(4)),
                vec![("e-1".to_string(), e1.version)],
                at(4),
            )
            .await
            .expect("a create that saw the current list commits");
        assert_eq!(
            emergency_ids(store, "alice").await,
            [("e-1".to_string(), 1), ("e-2".to_string(), 1)]
        );
        // Ended but not reviewed: still listed, with its new version; once
        // reviewed it no longer bears on anything.
        let released = step(
            &e1,
            &alice(),
            Command::Revoke {
                reason: "done".into(),
            },
            at(5),
        );
        let (e1, _) = apply(store, released, at(5)).await;
        assert_eq!(
            emergency_ids(store, "alice").await,
            [("e-1".to_string(), 2), ("e-2".to_string(), 1)]
        );
        let review = step(
            &e1,
            &lead(1),
            Command::Review {
                outcome: breakglass_core::ReviewOutcome::Ok,
                notes: "fine".into(),
            },
            at(6),
        );
        apply(store, review, at(6)).await;
        assert_eq!(
            emergency_ids(store, "alice").await,
            [("e-2".to_string(), 1)]
        );
    }

    /// (12) Many emergency requests of one principal, each decided on the
    /// same (empty) list, race: exactly one commits.
    pub async fn racing_emergency_creates(store: Arc<dyn Store>) {
        const RACERS: usize = 16;
        let mut tasks = Vec::new();
        for n in 0..RACERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let t = new_emergency(&format!("e-{n}"), &alice(), at(1));
                store.create_emergency(t, Vec::new(), at(1)).await
            }));
        }
        let mut won = 0;
        for task in tasks {
            match task.await.expect("task does not panic") {
                Ok(_) => won += 1,
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => panic!("expected Ok or Conflict, got {e}"),
            }
        }
        assert_eq!(won, 1, "exactly one concurrent emergency request commits");
        assert_eq!(emergency_ids(&*store, "alice").await.len(), 1);
    }

    /// (13) Two stores on one shared database (two nodes): their writes form
    /// one chain with contiguous `seq`, each one's feed delivers the other's
    /// events in order, and a compare-and-set lost to the other node is a
    /// `Conflict`.
    pub async fn two_nodes_share_one_chain(a: Arc<dyn Store>, b: Arc<dyn Store>) {
        let mut feed_a = a.subscribe();
        let mut feed_b = b.subscribe();
        let (v1, mut committed) = create(&*a, new_request("r-1", &alice(), 1, at(0)), at(0)).await;
        // Node B sees node A's request and approves it.
        let seen = get(&*b, "r-1").await;
        assert_eq!(seen, v1);
        let (_, c) = apply(&*b, approve(&seen, &lead(1), at(1)), at(1)).await;
        committed.extend(c);
        // Node A still holds version 1: its cancel loses to B's approval.
        assert!(matches!(
            a.apply(cancel(&v1, at(2)), at(2)).await,
            Err(StoreError::Conflict { .. })
        ));
        // Concurrent appends from both nodes interleave into one chain.
        let mut writers = Vec::new();
        for (i, store) in [a.clone(), b.clone()].into_iter().enumerate() {
            writers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for n in 0..20u64 {
                    out.extend(
                        store
                            .append(vec![marker(i as u64 * 100 + n)], at(3))
                            .await
                            .expect("append succeeds"),
                    );
                }
                out
            }));
        }
        for w in writers {
            committed.extend(w.await.expect("writer task"));
        }
        committed.sort_by_key(|e| e.seq);
        let log = all_events(&*a).await;
        assert_eq!(log, committed, "both nodes' events, one chain");
        assert_chain_from_genesis(&log);
        assert_eq!(all_events(&*b).await, log);
        for want in &log {
            assert_eq!(&recv(&mut feed_a).await, want, "node A's feed");
            assert_eq!(&recv(&mut feed_b).await, want, "node B's feed");
        }
        let last = log.last().expect("log is not empty");
        for store in [&a, &b] {
            assert_eq!(store.head(), (last.seq, last.hash), "head follows the feed");
        }
        // A checkpoint each: both keys' checkpoints at one seq are kept.
        let (ka, kb) = (signing_key(), SigningKey::from_bytes(&[9; 32]));
        let cpa = Checkpoint::sign(&ka, last.seq, last.hash, at(4));
        let cpb = Checkpoint::sign(&kb, last.seq, last.hash, at(4));
        a.add_checkpoint(cpa.clone())
            .await
            .expect("checkpoint of A");
        b.add_checkpoint(cpb.clone())
            .await
            .expect("checkpoint of B");
        let stored = a.checkpoints().await.expect("checkpoints");
        assert_eq!(stored.len(), 2, "one checkpoint per key at the same seq");
        assert!(stored.contains(&cpa) && stored.contains(&cpb));
        let mut verifier = Verifier::with_keys(stored, [&ka.verifying_key(), &kb.verifying_key()]);
        for e in &log {
            assert!(verifier.push(e));
        }
        let v = verifier.finish();
        assert!(
            v.ok,
            "the shared chain verifies with both keys: {:?}",
            v.reason
        );
    }
}

/// The Merkle tree over the log, checked against the core's reference
/// (`Frontier` over the committed events) on every store.
mod tree_suite {
    use std::sync::Arc;

    use breakglass_core::Timestamp;
    use breakglass_core::lifecycle::EventDraft;
    use breakglass_core::merkle::{self, Frontier};
    use breakglass_store::tree::{consistency_proof, inclusion_proof, leaf_of, tree_root};
    use breakglass_store::{Store, StoreError, for_each_event};
    use serde_json::json;

    fn marker(n: u64) -> EventDraft {
        EventDraft {
            actor: "system".into(),
            action: "test.marker".into(),
            request_id: Some(format!("r-{}", n % 3)),
            details: json!({ "n": n }),
        }
    }

    async fn log(store: &dyn Store) -> Vec<breakglass_core::audit::AuditEvent> {
        let mut out = Vec::new();
        for_each_event(store, 0, |e| {
            out.push(e.clone());
            true
        })
        .await
        .expect("the log reads");
        out
    }

    /// The roots of every prefix of the log, by the core's reference.
    pub async fn reference_roots(store: &dyn Store) -> Vec<[u8; 32]> {
        let mut f = Frontier::new();
        let mut roots = vec![f.root()];
        for e in log(store).await {
            f.push(&leaf_of(&e));
            roots.push(f.root());
        }
        roots
    }

    /// Checks the stored tree against the log: the root at every size,
    /// every inclusion proof at the head, and consistency proofs from every
    /// size to the head.
    pub async fn tree_matches_the_log(store: &dyn Store) {
        let events = log(store).await;
        let roots = reference_roots(store).await;
        let n = events.len() as u64;
        assert_eq!(store.head().0, n);
        for size in 0..=n {
            assert_eq!(
                tree_root(store, size).await.expect("root"),
                roots[size as usize],
                "root of the first {size} events"
            );
        }
        for e in &events {
            let proof = inclusion_proof(store, e.seq, n).await.expect("proof");
            let leaf = merkle::leaf_hash(&leaf_of(e));
            assert_eq!(
                merkle::verify_inclusion(e.seq - 1, n, &leaf, &proof, &roots[n as usize]),
                Ok(()),
                "inclusion of seq {}",
                e.seq
            );
        }
        for old in 0..=n {
            let proof = consistency_proof(store, old, n).await.expect("proof");
            assert_eq!(
                merkle::verify_consistency(
                    old,
                    n,
                    &roots[old as usize],
                    &roots[n as usize],
                    &proof
                ),
                Ok(()),
                "consistency {old} -> {n}"
            );
        }
        // Beyond the log there is no tree, and no proof.
        assert!(matches!(
            tree_root(store, n + 1).await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(inclusion_proof(store, n + 2, n + 2).await.is_err());
        assert!(inclusion_proof(store, 0, n).await.is_err());
        assert!(consistency_proof(store, n + 1, n).await.is_err());
    }

    /// (14) The tree grows with every commit, in batches of concurrent
    /// writers too, and a job that fails inside a batch adds no node.
    pub async fn tree_grows_with_the_log(store: Arc<dyn Store>) {
        let t = Timestamp(1_750_000_000_000);
        tree_matches_the_log(&*store).await;
        store.append(vec![marker(1)], t).await.expect("append");
        tree_matches_the_log(&*store).await;
        store
            .append((2..7).map(marker).collect(), t)
            .await
            .expect("append");
        tree_matches_the_log(&*store).await;
        // Concurrent writers share batches; failing jobs sit among them (an
        // apply of an unknown request fails inside its savepoint).
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..10u64 {
                    store
                        .append(vec![marker(100 * w + n), marker(100 * w + n + 50)], t)
                        .await
                        .expect("append");
                    let _ = store
                        .issue_credential(
                            breakglass_store::CredentialRecord {
                                hash: [n as u8; 32],
                                request_id: format!("missing-{w}-{n}"),
                                principal: "alice".into(),
                                target: "db".into(),
                                role: "ro".into(),
                                expires_at: t,
                                issued_at: t,
                            },
                            marker(n),
                            0,
                            t,
                        )
                        .await;
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
        tree_matches_the_log(&*store).await;
    }
}

/// A fresh `SqliteStore` in its own temporary directory, with production
/// options (durable).
struct Fresh {
    store: SqliteStore,
    // Dropped after the store.
    _dir: TempDir,
}

fn open_at(dir: &Path) -> SqliteStore {
    SqliteStore::open(&dir.join("breakglass.db"), SqliteOptions::default())
        .expect("the SQLite store opens")
}

fn fresh() -> Fresh {
    let dir = tempfile::tempdir().expect("a temporary directory");
    Fresh {
        store: open_at(dir.path()),
        _dir: dir,
    }
}

#[tokio::test]
async fn sqlite_create_then_get() {
    suite::create_then_get(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_one_time_codes_are_used_once() {
    suite::one_time_codes_are_used_once(&[&fresh().store]).await;
}

#[tokio::test]
async fn sqlite_drill_labels_are_stored_and_filtered() {
    suite::drill_labels_are_stored_and_filtered(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_drill_runs_are_claimed_once() {
    suite::drill_runs_are_claimed_once(&[&fresh().store]).await;
}

#[tokio::test]
async fn sqlite_drill_results() {
    suite::drill_results(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_notify_cursors_only_move_forward() {
    suite::notify_cursors_only_move_forward(&[&fresh().store]).await;
}

#[tokio::test]
async fn sqlite_notify_leases_are_held_by_one_node() {
    suite::notify_leases_are_held_by_one_node(&[&fresh().store]).await;
}

#[tokio::test]
async fn sqlite_apply_is_compare_and_set() {
    suite::apply_is_compare_and_set(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_audit_chain_links() {
    suite::audit_chain_links(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_credentials_and_limit() {
    suite::credentials_and_limit(&fresh().store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_credential_limit_under_concurrency() {
    let f = fresh();
    suite::credential_limit_under_concurrency(Arc::new(f.store.clone())).await;
}

#[tokio::test]
async fn sqlite_queries_reflect_states() {
    suite::queries_reflect_states(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_review_queries() {
    suite::review_queries(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_event_queries_and_paging() {
    suite::event_queries_and_paging(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_checkpoints_round_trip() {
    suite::checkpoints_round_trip(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_subscribers_see_commits() {
    suite::subscribers_see_commits(&fresh().store).await;
}

#[tokio::test]
async fn sqlite_survives_reopen() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    suite::survives_reopen(|| open_at(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_applies() {
    let f = fresh();
    suite::racing_applies(Arc::new(f.store.clone())).await;
}

#[tokio::test]
async fn sqlite_emergency_requests_guard_create() {
    suite::emergency_requests_guard_create(&fresh().store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_emergency_creates() {
    let f = fresh();
    suite::racing_emergency_creates(Arc::new(f.store.clone())).await;
}

/// A `PgStore` on a fresh database of the shared cluster. The cluster lives
/// as long as the longest-running test that holds it.
struct FreshPg {
    store: PgStore,
    url: String,
    _pg: Arc<breakglass_testkit::PgCluster>,
}

async fn fresh_pg() -> FreshPg {
    let pg = breakglass_testkit::shared_cluster().expect("a PostgreSQL cluster starts");
    let url = breakglass_testkit::fresh_database(&pg).expect("a fresh database");
    FreshPg {
        store: PgStore::open(&url)
            .await
            .expect("the PostgreSQL store opens"),
        url,
        _pg: pg,
    }
}

#[tokio::test]
async fn pg_one_time_codes_are_used_once_across_nodes() {
    let f = fresh_pg().await;
    let other = PgStore::open(&f.url).await.expect("a second node opens");
    suite::one_time_codes_are_used_once(&[&f.store, &other]).await;
}

#[tokio::test]
async fn pg_drill_labels_are_stored_and_filtered() {
    suite::drill_labels_are_stored_and_filtered(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_drill_runs_are_claimed_once_across_nodes() {
    let f = fresh_pg().await;
    let other = PgStore::open(&f.url).await.expect("a second node opens");
    suite::drill_runs_are_claimed_once(&[&f.store, &other]).await;
}

#[tokio::test]
async fn pg_drill_results() {
    suite::drill_results(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_notify_cursors_only_move_forward_across_nodes() {
    let f = fresh_pg().await;
    let other = PgStore::open(&f.url).await.expect("a second node opens");
    suite::notify_cursors_only_move_forward(&[&f.store, &other]).await;
}

#[tokio::test]
async fn pg_notify_leases_are_held_by_one_node_across_nodes() {
    let f = fresh_pg().await;
    let other = PgStore::open(&f.url).await.expect("a second node opens");
    suite::notify_leases_are_held_by_one_node(&[&f.store, &other]).await;
}

#[tokio::test]
async fn pg_create_then_get() {
    suite::create_then_get(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_apply_is_compare_and_set() {
    suite::apply_is_compare_and_set(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_audit_chain_links() {
    suite::audit_chain_links(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_credentials_and_limit() {
    suite::credentials_and_limit(&fresh_pg().await.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_credential_limit_under_concurrency() {
    let f = fresh_pg().await;
    suite::credential_limit_under_concurrency(Arc::new(f.store.clone())).await;
}

#[tokio::test]
async fn pg_queries_reflect_states() {
    suite::queries_reflect_states(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_review_queries() {
    suite::review_queries(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_event_queries_and_paging() {
    suite::event_queries_and_paging(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_checkpoints_round_trip() {
    suite::checkpoints_round_trip(&fresh_pg().await.store).await;
}

#[tokio::test]
async fn pg_subscribers_see_commits() {
    suite::subscribers_see_commits(&fresh_pg().await.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_survives_reopen() {
    let f = fresh_pg().await;
    let url = f.url.clone();
    drop(f.store);
    suite::survives_reopen(|| {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(PgStore::open(&url))
                .expect("the PostgreSQL store opens again")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_racing_applies() {
    let f = fresh_pg().await;
    suite::racing_applies(Arc::new(f.store.clone())).await;
}

#[tokio::test]
async fn pg_emergency_requests_guard_create() {
    suite::emergency_requests_guard_create(&fresh_pg().await.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_racing_emergency_creates() {
    let f = fresh_pg().await;
    suite::racing_emergency_creates(Arc::new(f.store.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_two_nodes_share_one_chain() {
    let f = fresh_pg().await;
    let b = PgStore::open(&f.url).await.expect("a second node opens");
    suite::two_nodes_share_one_chain(Arc::new(f.store.clone()), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_nodes_starting_together_migrate_once() {
    let pg = breakglass_testkit::shared_cluster().expect("a PostgreSQL cluster starts");
    let url = breakglass_testkit::fresh_database(&pg).expect("a fresh database");
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(
            o.await
                .expect("task")
                .expect("every node opens the same empty database"),
        );
    }
    let version = pg
        .psql(
            url.rsplit('/').next().expect("db name"),
            "SELECT version FROM schema_version",
        )
        .expect("schema_version");
    assert_eq!(
        version.trim(),
        breakglass_store::postgres::PG_SCHEMA_VERSION.to_string()
    );
}

#[tokio::test]
async fn pg_a_newer_schema_is_refused_naming_both_versions() {
    let f = fresh_pg().await;
    let db = f.url.rsplit('/').next().expect("db name").to_string();
    f._pg
        .psql(&db, "UPDATE schema_version SET version = 999")
        .expect("bump the schema version");
    let err = PgStore::open(&f.url)
        .await
        .err()
        .expect("a newer schema is refused");
    let msg = err.to_string();
    let ours = breakglass_store::postgres::PG_SCHEMA_VERSION;
    assert!(
        msg.contains("999") && msg.contains(&format!("({ours})")),
        "{msg}"
    );
}

/// `sslmode=verify-full&sslrootcert=PATH`: every connection of the store
/// (pool, feed, migrations) is encrypted and the server's certificate is
/// verified; a certificate from another CA is refused at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_tls_is_encrypted_and_verified() {
    let pg = breakglass_testkit::shared_cluster().expect("a PostgreSQL cluster starts");
    let certs = tempfile::tempdir().expect("a temporary directory");
    breakglass_testkit::make_test_ca(certs.path(), "IP:127.0.0.1,DNS:localhost");
    pg.enable_tls(&certs.path().join("srv.pem"), &certs.path().join("srv.key"))
        .expect("TLS on");
    let url = breakglass_testkit::fresh_database(&pg).expect("a fresh database");
    let db = url.rsplit('/').next().expect("a database name").to_string();
    let sep = if url.contains('?') { '&' } else { '?' };
    let with_ca = |ca: &Path| {
        format!(
            "{url}{sep}sslmode=verify-full&sslrootcert={}",
            ca.join("ca.pem").display()
        )
    };

    let store = PgStore::open(&with_ca(certs.path()))
        .await
        .expect("the store opens over TLS");
    suite::create_then_get(&store).await;
    let plain = pg
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = '{db}' AND a.application_name = 'breakglass' AND NOT s.ssl"
            ),
        )
        .expect("psql");
    let encrypted = pg
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = '{db}' AND a.application_name = 'breakglass' AND s.ssl"
            ),
        )
        .expect("psql");
    assert_eq!(plain.trim(), "0", "a connection of the store is in clear");
    assert!(
        encrypted.trim().parse::<u32>().expect("a count") >= 2,
        "the pool and the feed connection are encrypted: {encrypted}"
    );
    drop(store);

    let other = tempfile::tempdir().expect("a temporary directory");
    breakglass_testkit::make_test_ca(other.path(), "IP:127.0.0.1,DNS:localhost");
    let refused = match PgStore::open(&with_ca(other.path())).await {
        Ok(_) => panic!("a certificate from another CA was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.to_lowercase().contains("certificate"),
        "the refusal names the certificate: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tree_grows_with_the_log() {
    let f = fresh();
    tree_suite::tree_grows_with_the_log(Arc::new(f.store.clone())).await;
}

/// A database written before the tree existed (its nodes gone, as after
/// the migration that adds the table) gets its tree at open.
#[tokio::test]
async fn sqlite_tree_is_built_for_an_older_log_at_open() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    {
        let store = open_at(dir.path());
        tree_suite::tree_grows_with_the_log(Arc::new(store)).await;
    }
    let conn = rusqlite::Connection::open(dir.path().join("breakglass.db")).expect("opens");
    conn.execute("DELETE FROM merkle_nodes", [])
        .expect("nodes removed");
    drop(conn);
    let store = open_at(dir.path());
    tree_suite::tree_matches_the_log(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_tree_grows_with_the_log() {
    let f = fresh_pg().await;
    tree_suite::tree_grows_with_the_log(Arc::new(f.store.clone())).await;
}

/// Two nodes writing one log build one tree: each node reads the same
/// roots and proofs, whichever wrote the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_two_nodes_grow_one_tree() {
    let f = fresh_pg().await;
    let other = PgStore::open(&f.url).await.expect("a second node opens");
    let (a, b): (
        Arc<dyn breakglass_store::Store>,
        Arc<dyn breakglass_store::Store>,
    ) = (Arc::new(f.store.clone()), Arc::new(other.clone()));
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                for n in 0..15u64 {
                    let drafts = (0..=n % 3)
                        .map(|k| breakglass_core::lifecycle::EventDraft {
                            actor: format!("node-{i}"),
                            action: "test.marker".into(),
                            request_id: None,
                            details: serde_json::json!({ "n": n, "k": k }),
                        })
                        .collect();
                    s.append(drafts, breakglass_core::Timestamp(1_750_000_000_000))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while a.head() != b.head() {
        assert!(
            std::time::Instant::now() < deadline,
            "both nodes see the same head"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Two nodes, 15 appends each of 1, 2 or 3 events (5 of each).
    assert_eq!(a.head().0, 2 * 5 * (1 + 2 + 3));
    tree_suite::tree_matches_the_log(&*a).await;
    tree_suite::tree_matches_the_log(&*b).await;
}

/// A log written before the tree existed, or partly by a node of an older
/// release (the head moved, the tree did not): the next open builds the
/// missing part, and so does the next commit of a running node.
#[tokio::test]
async fn pg_tree_is_built_for_an_older_log() {
    let f = fresh_pg().await;
    tree_suite::tree_grows_with_the_log(Arc::new(f.store.clone())).await;
    let (client, conn) = tokio_postgres::connect(&f.url, tokio_postgres::NoTls)
        .await
        .expect("connects");
    let driver = tokio::spawn(conn);
    let forget =
        "DELETE FROM merkle_nodes; UPDATE chain_head SET tree = decode('0000000000000000', 'hex')";
    client.batch_execute(forget).await.expect("tree forgotten");
    let reopened = PgStore::open(&f.url).await.expect("reopens");
    tree_suite::tree_matches_the_log(&reopened).await;
    // While running: the next commit catches up before it appends.
    client.batch_execute(forget).await.expect("tree forgotten");
    reopened
        .append(
            vec![breakglass_core::lifecycle::EventDraft {
                actor: "system".into(),
                action: "test.marker".into(),
                request_id: None,
                details: serde_json::json!({}),
            }],
            breakglass_core::Timestamp(1_750_000_000_000),
        )
        .await
        .expect("append");
    tree_suite::tree_matches_the_log(&reopened).await;
    drop(client);
    driver.abort();
}
