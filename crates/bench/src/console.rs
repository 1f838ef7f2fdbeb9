//! The `console` benchmark: the web console's inbox rendered for an
//! approver while 1,000 requests are pending (p99 of the whole page,
//! measured at the client over loopback, against the API's list of the
//! same requests in the same run), and the inbox's page weight (HTML,
//! stylesheet and script; the replay page's player is not counted).

use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::json;

use crate::scenarios::Ctx;
use crate::server::{self, Client, lead, requester, token};
use crate::stats::{Goal, Row, Samples, fmt_secs};

const MS: f64 = 1e-3;
/// Pending requests in the store while the inbox is measured.
const PENDING: usize = 1000;
/// The inbox's render time target (p99).
const INBOX_P99_MAX_S: f64 = 50.0 * MS;
/// The page weight target, without the player.
const PAGE_WEIGHT_MAX: usize = 100 * 1024;

/// A browser-like client: one keep-alive connection, no redirects.
fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(std::time::Duration::from_secs(60)))
        .build();
    breakglass_notify::agent::agent(config)
}

/// GET `url` with `cookie`: status, Set-Cookie values, body.
fn get(a: &ureq::Agent, url: &str, cookie: &str) -> anyhow::Result<(u16, Vec<String>, String)> {
    let mut req = a.get(url);
    if !cookie.is_empty() {
        req = req.header("cookie", cookie);
    }
    let mut r = req.call().with_context(|| format!("GET {url}"))?;
    let set = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()?;
    Ok((r.status().as_u16(), set, body))
}

fn cookie_pair(set: &[String], name: &str) -> anyhow::Result<String> {
    set.iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
        .with_context(|| format!("no cookie {name}"))
}

fn csrf_of(page: &str) -> anyhow::Result<String> {
    let at = page
        .find("name=\"csrf\" value=\"")
        .context("no csrf field")?
        + 19;
    Ok(page.get(at..at + 64).context("short csrf")?.to_string())
}

/// Signs `who` in through the sign-in form; returns the session cookie.
fn sign_in(a: &ureq::Agent, base: &str, who: &str) -> anyhow::Result<String> {
    let (_, set, page) = get(a, &format!("{base}/signin"), "")?;
    let pre = cookie_pair(&set, "bg_signin")?;
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("csrf", &csrf_of(&page)?)
        .append_pair("token", &token(who))
        .append_pair("next", "/")
        .finish();
    let r = a
        .post(format!("{base}/signin"))
        .header("cookie", &pre)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(body)?;
    if r.status() != 303 {
        bail!("sign-in: expected 303, got {}", r.status());
    }
    let set: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    cookie_pair(&set, "bg_session")
}

impl Ctx {
    pub fn console(&mut self) -> anyhow::Result<()> {
        let setup = server::setup()?;
        let mut cfg = std::fs::read_to_string(&setup.config)?;
        cfg.push_str("\n[console]\nenabled = true\n");
        std::fs::write(&setup.config, cfg)?;
        let srv = self.start(&setup)?;
        let c = Client::new(&srv.url);
        let body = json!({
            "target": "prod-db",
            "role": "read",
            "duration": "15m",
            "reason": "INC-48213: replication lag on prod-db, need to read pg_stat_replication",
        });
        for i in 0..PENDING {
            let v = c
                .post(&requester(i), "/v1/requests", Some(&body))?
                .expect(201, "create request")?;
            if v["state"] != "pending" {
                bail!("expected a pending request, got {v}");
            }
        }
        let a = agent();
        let approver = lead(0);
        let session = sign_in(&a, &srv.url, &approver)?;
        let inbox = format!("{}/", srv.url);
        let (warm, n) = (20, self.n(300, 30));
        let mut page_lat = Vec::with_capacity(n);
        let mut api_lat = Vec::with_capacity(n);
        let mut html_len = 0;
        let mut rows = 0;
        for i in 0..warm + n {
            let t0 = Instant::now();
            let (status, _, html) = get(&a, &inbox, &session)?;
            let dt = t0.elapsed();
            if status != 200 {
                bail!("inbox: HTTP {status}");
            }
            // The same requests from the API, as a baseline of this run.
            let t1 = Instant::now();
            c.get(&approver, "/v1/requests?state=pending&limit=500")?
                .expect(200, "list")?;
            let dt_api = t1.elapsed();
            if i >= warm {
                page_lat.push(dt);
                api_lat.push(dt_api);
            }
            html_len = html.len();
            rows = html.matches("<li class=\"card").count();
        }
        let (_, _, css) = get(&a, &format!("{}/assets/console.css", srv.url), "")?;
        let (_, _, js) = get(&a, &format!("{}/assets/console.js", srv.url), "")?;
        srv.stop()?;
        let page = Samples::from_durations(&page_lat);
        let api = Samples::from_durations(&api_lat);
        self.rows.push(Row::target(
            format!("console inbox with {PENDING} pending requests, p99"),
            format!("{} (p50 {})", fmt_secs(page.p99()), fmt_secs(page.p50())),
            page.p99(),
            "<= 50 ms",
            Goal::AtMost(INBOX_P99_MAX_S),
            format!(
                "{}; GET /v1/requests?state=pending&limit=500 p99 {} in the same run",
                self.base.describe(page.p99()),
                fmt_secs(api.p99())
            ),
        ));
        let weight = html_len + css.len() + js.len();
        self.rows.push(Row::target(
            "console inbox page weight (HTML + CSS + JS, no player)",
            format!("{:.1} KB", weight as f64 / 1024.0),
            weight as f64,
            "<= 100 KB",
            Goal::AtMost(PAGE_WEIGHT_MAX as f64),
            format!(
                "HTML {:.1} KB ({rows} rows shown), CSS {:.1} KB, JS {:.1} KB, uncompressed",
                html_len as f64 / 1024.0,
                css.len() as f64 / 1024.0,
                js.len() as f64 / 1024.0
            ),
        ));
        self.notes.push(format!(
            "console: {n} sequential GET / as {approver} (an approver of all {PENDING} pending requests) on one keep-alive connection after {warm} warm-up, whole response read; the inbox reads every pending request it may see, orders them and renders the first rows"
        ));
        Ok(())
    }
}
