// The web console in real headless Chromium, driven by playwright-core:
// sign-in with a token, a request and its approval in two browser
// contexts, the countdown, a refused self-approval, refused CSRF tokens,
// credentials and a psql session through the gateway, its replay, an
// admin's revoke, sign-out, and the pages without JavaScript.
//
// Input (argv[2], JSON): base, tokens {requester, approver, admin},
// target, role, artefacts (screenshot dir), chromium, chromium_args.
// Prints one JSON line with what it saw; any failed check throws.
import { readFileSync } from "node:fs";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { chromium } from "playwright-core";

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const base = input.base;
const seen = {};

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

function psql(conn, token, sqls) {
  const args = ["-X", "-v", "ON_ERROR_STOP=0", "-h", conn.host, "-p", String(conn.port), "-U", conn.user, "-d", conn.db];
  for (const s of sqls) args.push("-c", s);
  return new Promise((resolve) => {
    execFile("/usr/bin/psql", args, { env: { ...process.env, PGPASSWORD: token, PGCONNECT_TIMEOUT: "10" }, timeout: 30000 },
      (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout, stderr }));
  });
}

async function signIn(browser, token, opts = {}) {
  const context = await browser.newContext({ viewport: opts.viewport || { width: 1100, height: 900 }, javaScriptEnabled: opts.js !== false });
  const page = await context.newPage();
  const resp = await page.goto(base + "/");
  check(page.url().startsWith(base + "/signin"), "an unsigned visitor is sent to /signin, got " + page.url());
  const headers = resp.headers();
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(base + "/"), page.click("button[type=submit]")]);
  check((await page.textContent("h1")).trim() === "Inbox", "the inbox after signing in");
  return { context, page, headers };
}

async function csrfOf(page) {
  return page.getAttribute("input[name=csrf]", "value");
}

async function api(method, path, token, body) {
  const r = await fetch(base + path, {
    method,
    headers: { authorization: "Bearer " + token, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
}

const browser = await chromium.launch({ executablePath: input.chromium, args: input.chromium_args, headless: true });
try {
  // Sign-in with a token; the sign-in page's headers.
  const alice = await signIn(browser, input.tokens.requester);
  const csp = alice.headers["content-security-policy"] || "";
  check(csp.includes("script-src 'self'") && !csp.includes("unsafe-inline"), "strict CSP without inline script: " + csp);
  check(alice.headers["x-frame-options"] === "DENY", "X-Frame-Options DENY");
  const cookies = await alice.context.cookies();
  const session = cookies.find((c) => c.name === "bg_session");
  check(session && session.httpOnly && session.sameSite === "Lax", "session cookie HttpOnly, SameSite=Lax: " + JSON.stringify(cookies));
  seen.cookie = { httpOnly: session.httpOnly, sameSite: session.sameSite, secure: session.secure };

  // New request: only what the policy offers.
  await alice.page.goto(base + "/requests/new");
  const choices = await alice.page.$$eval("input[name=choice]", (els) => els.map((e) => e.value));
  seen.choices = choices;
  const want = input.target + " " + input.role;
  check(choices.includes(want), "the form offers " + want + ": " + choices);
  await alice.page.check(`input[name=choice][value="${want}"]`);
  await alice.page.fill("#duration", "10m");
  await alice.page.fill("#reason", "console test: disk full on primary");
  await Promise.all([alice.page.waitForURL(/\/requests\/[0-9a-f-]+$/), alice.page.click("form.card button[type=submit]")]);
  const id = alice.page.url().split("/").pop();
  seen.request_id = id;
  check((await alice.page.textContent("dd.state")).trim() === "pending", "the new request is pending");

  // A refused self-approval: the console answers with the API's message.
  const fromApi = await api("POST", `/v1/requests/${id}/approve`, input.tokens.requester, {});
  check(fromApi.status === 403, "the API refuses self-approval");
  const self = await alice.context.request.post(`${base}/requests/${id}/decide`, {
    form: { csrf: await csrfOf(alice.page), decision: "approve", comment: "" }, maxRedirects: 0,
  });
  const selfText = await self.text();
  check(self.status() === 403, "the console refuses self-approval with 403, got " + self.status());
  check(selfText.includes(fromApi.body.detail.replace(/&/g, "&amp;").replace(/</g, "&lt;")) || selfText.includes(fromApi.body.detail),
    "the console's refusal carries the API's message: " + fromApi.body.detail);
  seen.self_approval = fromApi.body.detail;

  // The approver, in a second browser context: the inbox and its countdown.
  const bob = await signIn(browser, input.tokens.approver);
  const row = bob.page.locator(`li[data-request="${id}"]`);
  check(await row.count() === 1, "the request is in the approver's inbox");
  check((await row.textContent()).includes("console test: disk full on primary"), "the inbox shows the reason");
  const t1 = await row.locator("time.countdown").textContent();
  await bob.page.waitForTimeout(2200);
  const t2 = await row.locator("time.countdown").textContent();
  check(t1 !== t2, `the countdown ticks (${t1} then ${t2})`);
  seen.countdown = [t1, t2];
  await bob.page.screenshot({ path: join(input.artefacts, "inbox.png"), fullPage: true });

  // CSRF: a form without the token, and with another session's token.
  const bobCsrf = await csrfOf(bob.page);
  const aliceCsrf = await csrfOf(alice.page);
  check(bobCsrf !== aliceCsrf, "each session has its own CSRF token");
  for (const [what, form] of [["missing", { decision: "approve" }], ["another session's", { decision: "approve", csrf: aliceCsrf }]]) {
    const r = await bob.context.request.post(`${base}/requests/${id}/decide`, { form, maxRedirects: 0 });
    check(r.status() === 403, `a ${what} CSRF token is refused, got ${r.status()}`);
    check((await r.text()).includes("CSRF token"), "the refusal says why");
  }
  check((await api("GET", `/v1/requests/${id}`, input.tokens.approver)).body.state === "pending", "still pending after the refused forms");

  // Approve: one click plus a comment.
  await row.locator("input[name=comment]").fill("go ahead");
  await Promise.all([bob.page.waitForURL(`${base}/requests/${id}`), row.locator("button.approve").click()]);
  check((await bob.page.textContent("dd.state")).trim() === "active", "approved: the grant is active");
  const timeline = await bob.page.$$eval("ol.timeline li", (els) => els.map((e) => e.getAttribute("data-action")));
  check(timeline.includes("request.created") && timeline.includes("request.approved"), "the timeline has the events: " + timeline);
  seen.timeline = timeline;
  await bob.page.screenshot({ path: join(input.artefacts, "request.png"), fullPage: true });

  // My grants: the countdown, credentials shown once, the psql hint.
  await alice.page.goto(base + "/grants");
  const grant = alice.page.locator(`li[data-request="${id}"]`);
  check(await grant.count() === 1, "the grant is listed under My grants");
  await Promise.all([alice.page.waitForURL(`${base}/requests/${id}/credentials`), grant.locator("text=Get credentials").click()]);
  const token = await alice.page.inputValue("#secret");
  check(token.length > 20, "a credential is shown");
  check(await alice.page.isVisible("button[data-copy]"), "the copy button shows with JavaScript");
  const hint = await alice.page.textContent("pre code");
  seen.psql_hint = hint;
  const m = hint.match(/host=(\S+) port=(\d+) user=(\S+) dbname=([^"\s]+)/);
  check(m, "a psql hint: " + hint);
  const conn = { host: m[1], port: Number(m[2]), user: m[3], db: m[4] };
  const out = await psql(conn, token, ["SELECT 40 + 2 AS answer", "SELECT * FROM console_no_such_table"]);
  check(out.stdout.includes("42"), "psql ran through the gateway: " + out.stdout + out.stderr);
  seen.psql = out.stdout;

  // The replay of the recorded session.
  let sessionLink = null;
  for (let i = 0; i < 100 && !sessionLink; i++) {
    await alice.page.goto(`${base}/requests/${id}`);
    const links = await alice.page.$$eval("a[href*='/sessions/']", (els) => els.map((e) => e.getAttribute("href")));
    const ended = await alice.page.$$eval("table tbody tr td:nth-child(3)", (els) => els.map((e) => e.textContent.trim()));
    if (links.length && ended.length && ended[0] !== "live") sessionLink = links[0];
    else await alice.page.waitForTimeout(100);
  }
  check(sessionLink, "the ended session is listed on the request page");
  await alice.page.goto(base + sessionLink);
  const statements = await alice.page.$$eval("table.statements tbody tr", (els) => els.map((e) => e.textContent));
  check(statements.some((s) => s.includes("SELECT 40 + 2") && s.includes("SELECT 1")), "the statement and its outcome: " + statements);
  check(statements.some((s) => s.includes("console_no_such_table") && s.includes("ERROR 42P01")), "the failed statement and its error");
  await alice.page.screenshot({ path: join(input.artefacts, "replay.png"), fullPage: true });
  await alice.page.fill("#q", "no_such");
  await Promise.all([alice.page.waitForURL(/q=no_such/), alice.page.click("form.search button")]);
  const found = await alice.page.$$eval("table.statements tbody tr", (els) => els.map((e) => e.textContent));
  check(found.length === 1 && found[0].includes("console_no_such_table"), "search finds the one statement: " + found);
  seen.statements = statements.length;

  // An admin revokes the grant from the list of all requests.
  const carol = await signIn(browser, input.tokens.admin);
  await carol.page.goto(base + "/admin?state=active");
  const adminRow = carol.page.locator(`tr[data-request="${id}"]`);
  check(await adminRow.count() === 1, "the admin list shows the active grant");
  await adminRow.locator("input[name=reason]").fill("console test revoke");
  await Promise.all([carol.page.waitForURL(/\/admin\?state=active/), adminRow.locator("button").click()]);
  const after = await api("GET", `/v1/requests/${id}`, input.tokens.admin);
  check(after.body.state === "revoked" && after.body.ended_by === input.admin_name, "revoked by the admin: " + JSON.stringify(after.body.state));
  await carol.page.goto(base + "/admin/audit?verify=yes");
  check(await carol.page.isVisible("p.verified"), "the audit page verifies the chain");
  // What the sessions did, on the request's page: the two statements, one
  // of them failed.
  await carol.page.goto(`${base}/requests/${id}`);
  const figures = await carol.page.$$eval("section.summary dl.figures dd", (els) => els.map((e) => e.textContent.trim()));
  check(figures.length === 6 && figures[1] === "read 2" && figures[2].startsWith("1 "), "the summary's figures: " + figures);
  seen.summary = figures;
  await carol.page.screenshot({ path: join(input.artefacts, "summary.png"), fullPage: true });
  // The usage report and the drill report, for admins.
  await carol.page.goto(base + "/admin/reports?since=1d");
  const total = await carol.page.$$eval("section.report:first-of-type tbody td", (els) => els.map((e) => e.textContent.trim()));
  check(total[0] === "all" && Number(total[1]) >= 1, "the report counts the grant: " + total);
  const targets = await carol.page.textContent("main");
  check(targets.includes("Targets") && targets.includes(input.target), "the report lists the target");
  await carol.page.goto(base + "/admin/reports?since=400d");
  check((await carol.page.textContent("main")).includes("longer than the maximum"), "an over-long window is refused with the reason");
  await carol.page.goto(base + "/admin/drills");
  check((await carol.page.textContent("main")).includes("No drill is configured"), "the drill report says none is configured");
  await alice.page.goto(base + "/grants");
  check(await alice.page.locator(`li[data-request="${id}"]`).count() === 0, "the revoked grant left My grants");

  // Sign-out ends the session.
  await Promise.all([alice.page.waitForURL(/\/signin/), alice.page.click("form.signout button")]);
  await alice.page.goto(base + "/grants");
  check(alice.page.url().startsWith(base + "/signin"), "signed out: pages ask to sign in again");

  // Without JavaScript: sign-in and the pages work; the countdown shows
  // the server's figure.
  const nojs = await signIn(browser, input.tokens.approver, { js: false, viewport: { width: 390, height: 844 } });
  await nojs.page.goto(`${base}/requests/${id}`);
  check((await nojs.page.textContent("dd.state")).trim() === "revoked", "the request page without JavaScript");
  await nojs.page.goto(base + "/requests/new");
  await nojs.page.screenshot({ path: join(input.artefacts, "phone-new-request.png"), fullPage: true });

  for (const c of [alice, bob, carol, nojs]) await c.context.close();
  console.log(JSON.stringify({ ok: true, ...seen }));
} finally {
  await browser.close();
}
