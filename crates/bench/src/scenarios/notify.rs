//! `notify`: the cost of notification sinks on the request path. The same
//! lifecycle load and approve latency are measured without sinks and with
//! three (a signed webhook to a live receiver with 16 deliveries in flight,
//! so that it keeps up, a syslog TCP receiver, and
//! a webhook whose port refuses every connection, so it retries all the
//! time), in interleaved rounds within one run. Each round runs both
//! servers at once: approvals alternate between them (paired samples of
//! the same moments), then each takes the lifecycle load alone. A
//! throughput window lasts until the live sinks have delivered what the
//! load produced, so a sink that falls behind under load still pays
//! for its deliveries inside the window. Last, the floor: the CPU of the
//! live webhook's POSTs alone (the same client, body and receiver, on
//! one thread), per lifecycle, against a lifecycle without sinks: what no
//! implementation of the sinks can save on this machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use breakglass_testkit::receiver::{Receiver, TcpSink};

use super::{Ctx, approve, create_body, created, expect_state, revoke};
use crate::server::{self, AUDITOR, Client, lead, requester};
use crate::stats::{Goal, Row, Samples, fmt_secs};

/// Concurrent clients of the throughput part.
const CLIENTS: usize = 16;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The sink whose port refuses every connection: it never catches up.
const DEAD: &str = "dead";

struct Figures {
    rate: f64,
    /// Approve latencies, in seconds.
    approve: Vec<f64>,
    /// The server's own CPU seconds per lifecycle in the throughput part
    /// (deliveries included; the receivers are other processes).
    cpu_per_lifecycle: f64,
    /// This process's CPU seconds per lifecycle in the same window: the
    /// load's clients, and the receivers when there are sinks.
    bench_cpu_per_lifecycle: f64,
    /// Events each sink had not delivered yet when the load stopped.
    lag: Vec<(String, u64)>,
    /// Seconds after the load until the live sinks had caught up.
    drain: f64,
    /// The whole window (load and catch-up), in seconds.
    secs: f64,
}

/// The longest wait for the sinks to catch up after the load.
const DRAIN_MAX_S: u64 = 120;

impl Ctx {
    pub fn notify(&mut self) -> anyhow::Result<()> {
        let live = Receiver::start(|_| true);
        let siem = TcpSink::start();
        // Nothing listens here: every attempt is a refused connection.
        let dead = server::free_port()?;
        let sinks = format!(
            "\n[[notify]]\nname = \"live\"\nkind = \"webhook\"\nurl = \"{}\"\nsecret_file = \"hook.secret\"\nmax_in_flight = 16\n\
             \n[[notify]]\nname = \"siem\"\nkind = \"syslog\"\naddress = \"{}\"\n\
             \n[[notify]]\nname = \"{DEAD}\"\nkind = \"webhook\"\nurl = \"http://{dead}/hook\"\nsecret_file = \"hook.secret\"\ntimeout = \"2s\"\n",
            live.url("/hook"),
            siem.addr
        );
        let rounds = self.n(3, 1);
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (a, b) = self.notify_round(&sinks, round % 2 == 1)?;
            without.push(a);
            with.push(b);
        }
        let rate = |f: &[Figures]| f.iter().map(|x| x.rate).sum::<f64>() / f.len() as f64;
        let p99 = |f: &[Figures]| {
            let all: Vec<f64> = f.iter().flat_map(|x| x.approve.iter().copied()).collect();
            Samples::from_secs(all).p99()
        };
        let (r0, r1) = (rate(&without), rate(&with));
        let (p0, p1) = (p99(&without), p99(&with));
        self.rows.push(Row::target(
            "notify: lifecycle throughput, 3 sinks (1 dead) vs none",
            format!("{r1:.0}/s vs {r0:.0}/s ({:.0}%)", 100.0 * r1 / r0.max(1e-9)),
            r1 / r0.max(1e-9),
            ">= 90%",
            Goal::AtLeast(0.9),
            format!(
                "{CLIENTS} clients, {rounds} interleaved rounds each; each window runs until the live sinks have delivered what its load produced"
            ),
        ));
        self.rows.push(Row::target(
            "notify: approve p99, 3 sinks (1 dead) vs none",
            format!(
                "{} vs {} ({:.0}%)",
                fmt_secs(p1),
                fmt_secs(p0),
                100.0 * p1 / p0.max(1e-9)
            ),
            p1 / p0.max(1e-9),
            "<= 110%",
            Goal::AtMost(1.1),
            "sequential approvals of pending requests, alternating between the two servers"
                .to_string(),
        ));
        let cpu =
            |f: &[Figures]| f.iter().map(|x| x.cpu_per_lifecycle).sum::<f64>() / f.len() as f64;
        let (c0, c1) = (cpu(&without), cpu(&with));
        self.rows.push(Row::info(
            "notify: the server's CPU per lifecycle, 3 sinks (1 dead) vs none",
            format!(
                "{} vs {} ({:.0}%)",
                fmt_secs(c1),
                fmt_secs(c0),
                100.0 * c1 / c0.max(1e-12)
            ),
            "utime + stime of the server process over the throughput window, per lifecycle: what the sinks cost the node itself, without the receivers' share of the two cores",
        ));
        let got = live.deliveries();
        self.notes.push(format!(
            "notify: the live webhook received {} deliveries, the syslog receiver {} bytes; the dead sink retried throughout",
            got.len(),
            siem.bytes().len()
        ));
        // The floor: what the same POSTs cost with nothing of breakglass
        // around them, measured here on the same receiver. The approvals'
        // lifecycles (created and activated, never revoked) count too, so
        // POSTs per lifecycle, and the floor, are if anything understated.
        let lifecycles: f64 = with.iter().map(|f| f.rate * f.secs).sum::<f64>()
            + with.iter().map(|f| f.approve.len() as f64).sum::<f64>();
        let per_lifecycle = got.len() as f64 / lifecycles.max(1.0);
        let body = got.last().map(|d| d.body.clone()).unwrap_or_default();
        let (post, receive) = post_cpu(&live, &body, self.n(20_000, 4_000))?;
        let floor = per_lifecycle * post;
        self.rows.push(Row::info(
            "notify: floor, the live webhook's POSTs alone vs a lifecycle without sinks",
            format!(
                "{per_lifecycle:.2} POSTs × {} = {} per lifecycle ({:.0}% of {}); CPU ratio ceiling {:.0}%",
                fmt_secs(post),
                fmt_secs(floor),
                100.0 * floor / c0.max(1e-12),
                fmt_secs(c0),
                100.0 * c0 / (c0 + floor).max(1e-12)
            ),
            format!(
                "CPU of one thread POSTing the same {} B signed body with the same HTTP client (16 in flight, kept connections) to the same receiver; the ceiling is the server's CPU ratio if everything else of the sinks were free",
                body.len()
            ),
        ));
        // On this machine the load and the receivers share the server's
        // cores, so throughput follows the machine's CPU per lifecycle.
        let bench = |f: &[Figures]| {
            f.iter().map(|x| x.bench_cpu_per_lifecycle).sum::<f64>() / f.len() as f64
        };
        let whole = c0 + bench(&without);
        let least = per_lifecycle * (post + receive);
        self.rows.push(Row::info(
            "notify: throughput ceiling on this machine, the POSTs and their receiving alone",
            format!(
                "{:.0}% ({} of POST and receiver per lifecycle on top of {})",
                100.0 * whole / (whole + least).max(1e-12),
                fmt_secs(least),
                fmt_secs(whole)
            ),
            format!(
                "the machine's CPU per lifecycle without sinks (server {} + load clients {}) against the same plus the floor's POSTs and the receiver's CPU for them ({} per POST); the load is CPU-bound, so no implementation of the sinks can do better here",
                fmt_secs(c0),
                fmt_secs(bench(&without)),
                fmt_secs(receive)
            ),
        ));
        let lags: Vec<String> = with
            .iter()
            .map(|f| {
                f.lag
                    .iter()
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        self.notes.push(format!(
            "notify: events not yet delivered when each round's load stopped (per sink): {}",
            lags.join("; ")
        ));
        let drains: Vec<String> = with.iter().map(|f| format!("{:.2} s", f.drain)).collect();
        self.notes.push(format!(
            "notify: time after each round's load until the live sinks had caught up (counted in the throughput window): {}",
            drains.join(", ")
        ));
        Ok(())
    }

    /// Two servers at once, one without sinks and one with `sinks`
    /// appended to its config: approve latency measured on both in turn
    /// (each approval on one is followed by one on the other, so both see
    /// the same moments of the shared machine and its hypervisor), then
    /// lifecycle throughput on each alone, the other idle.
    /// `sinks_first`: the server with sinks has its throughput measured
    /// first (rounds alternate).
    fn notify_round(&self, sinks: &str, sinks_first: bool) -> anyhow::Result<(Figures, Figures)> {
        let bare = server::setup()?;
        let sinked = server::setup()?;
        std::fs::write(sinked.dir.path().join("hook.secret"), SECRET)?;
        let mut text = std::fs::read_to_string(&sinked.config)?;
        text.push_str(sinks);
        std::fs::write(&sinked.config, text)?;
        let servers = [self.start(&bare)?, self.start(&sinked)?];
        let clients = [Client::new(&servers[0].url), Client::new(&servers[1].url)];
        let body = create_body("prod-db", "15m");
        let n = self.n(300, 40);
        let mut lat = [Vec::with_capacity(n), Vec::with_capacity(n)];
        for i in 0..n {
            // Alternate which goes first, so neither always follows the other.
            for k in [i % 2, 1 - i % 2] {
                let c = &clients[k];
                let id = created(c, &requester(i), &body, "pending")?;
                let t0 = Instant::now();
                let v = approve(c, &lead(i), &id)?;
                lat[k].push(t0.elapsed().as_secs_f64());
                expect_state(&v, "active", "approve")?;
            }
        }
        let [l0, l1] = lat;
        let [s0, s1] = servers;
        if sinks_first {
            let b = throughput(self.quick, s1, l1)?;
            Ok((throughput(self.quick, s0, l0)?, b))
        } else {
            let a = throughput(self.quick, s0, l0)?;
            Ok((a, throughput(self.quick, s1, l1)?))
        }
    }
}

/// Lifecycle throughput of `srv` with [`CLIENTS`] clients; stops it.
fn throughput(quick: bool, srv: server::Server, latencies: Vec<f64>) -> anyhow::Result<Figures> {
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let mut handles = Vec::new();
    for t in 0..CLIENTS {
        let (stop, barrier, url) = (stop.clone(), barrier.clone(), srv.url.clone());
        handles.push(std::thread::spawn(move || -> anyhow::Result<usize> {
            let c = Client::new(&url);
            let body = create_body("prod-db", "15m");
            let mut done = 0;
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let id = created(&c, &requester(t), &body, "pending")?;
                let v = approve(&c, &lead(t), &id)?;
                expect_state(&v, "active", "approve")?;
                revoke(&c, &requester(t), &id)?;
                done += 1;
            }
            Ok(done)
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    let cpu0 = srv.cpu_secs();
    let own0 = own_cpu();
    std::thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    let mut count = 0;
    for h in handles {
        count += h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let client = Client::new(&srv.url);
    let lag = sink_lag(&client)?;
    // The window ends when the live sinks have delivered what the load
    // produced: a sink that fell behind still owes that work, so its cost
    // counts (the dead sink never catches up and is left out).
    let drain_deadline = Instant::now() + Duration::from_secs(DRAIN_MAX_S);
    while sink_lag(&client)?
        .iter()
        .any(|(name, n)| name != DEAD && *n > 0)
    {
        if Instant::now() > drain_deadline {
            anyhow::bail!("the sinks did not catch up within {DRAIN_MAX_S} s of the load");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = srv.cpu_secs() - cpu0;
    let own = own_cpu() - own0;
    srv.stop()?;
    Ok(Figures {
        rate: count as f64 / secs,
        approve: latencies,
        cpu_per_lifecycle: cpu / (count.max(1) as f64),
        bench_cpu_per_lifecycle: own / (count.max(1) as f64),
        drain: secs - load_secs,
        lag,
        secs,
    })
}

/// Each sink's lag (`GET /v1/notify/status`): events committed and not
/// yet delivered or given up.
fn sink_lag(c: &Client) -> anyhow::Result<Vec<(String, u64)>> {
    let v = c
        .get(AUDITOR, "/v1/notify/status")?
        .expect(200, "notify status")?;
    Ok(v["sinks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("?").to_string(),
                        s["lag"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// CPU seconds per POST of `body` to `to`, signed as a sink signs it, with
/// the sinks' HTTP client and 16 POSTs in flight: all of it on one thread
/// (a current-thread runtime), whose CPU time (kernel included: on
/// loopback, sending also runs the receiving side of TCP) is read from
/// `/proc/thread-self/stat`; and the receiver's CPU seconds per POST (the
/// rest of this process meanwhile).
fn post_cpu(to: &Receiver, body: &[u8], n: usize) -> anyhow::Result<(f64, f64)> {
    use breakglass_notify::deliver::HttpSender;
    use breakglass_notify::{Attempt, sign};
    use futures_util::stream::{FuturesUnordered, StreamExt};
    const IN_FLIGHT: usize = 16;
    let key = sign::webhook_key(SECRET)?;
    let url = to.url("/hook");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sender = HttpSender::new(Duration::from_secs(10));
    let post = |i: usize| {
        let (sender, url, key) = (&sender, &url, &key);
        async move {
            let id = format!("floor{i}");
            let ts = 1_700_000_000;
            let headers = [
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.to_string()),
                (
                    "webhook-signature",
                    sign::webhook_signature(key, &id, ts, body),
                ),
            ];
            sender.post(url, &headers, body).await
        }
    };
    let run = |count: usize| -> anyhow::Result<()> {
        rt.block_on(async {
            let mut pending = FuturesUnordered::new();
            let mut next = 0;
            while next < count || !pending.is_empty() {
                while next < count && pending.len() < IN_FLIGHT {
                    pending.push(post(next));
                    next += 1;
                }
                if let Some(a) = pending.next().await
                    && !matches!(a, Attempt::Delivered { .. })
                {
                    anyhow::bail!("a floor POST failed: {a:?}");
                }
            }
            Ok(())
        })
    };
    // Warm: connections opened, buffers grown.
    run(n / 10)?;
    let cpu = || server::cpu_secs_of("/proc/thread-self/stat");
    let (c0, p0) = (cpu(), own_cpu());
    run(n)?;
    let (c1, p1) = (cpu(), own_cpu());
    // The rest of this process is the receiver's threads (the load's
    // clients have stopped).
    Ok((
        (c1 - c0) / n as f64,
        ((p1 - p0) - (c1 - c0)).max(0.0) / n as f64,
    ))
}

/// This process's CPU seconds so far (all threads).
fn own_cpu() -> f64 {
    server::cpu_secs_of("/proc/self/stat")
}
