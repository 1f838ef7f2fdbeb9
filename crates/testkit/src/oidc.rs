//! Real identity providers for tests: [`OidcProvider`], the certified
//! `oidc-provider` npm package (device flow, authorization code with PKCE,
//! refresh tokens, `auth_time`, `amr`, a `groups` claim), and
//! [`GithubActionsIssuer`], a GitHub-Actions-like issuer of job tokens.
//!
//! Both are Node.js scripts in this crate's `oidc/` folder, run as child
//! processes on `127.0.0.1` and stopped by pid when dropped. Their node
//! modules are installed by `cargo xtask test` (`npm ci` from the
//! committed `package-lock.json`) into a cache directory named after the
//! lock file's hash; `BREAKGLASS_TEST_NODE_MODULES` overrides where they
//! are.
//!
//! Users log in through the provider's real HTML pages (user code, login,
//! consent), driven here by [`Browser`], an HTTP client that keeps cookies
//! and follows redirects itself. Each test user has one browser, so a
//! second login reuses the provider's session (same `auth_time`) unless the
//! client asks for `max_age=0`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use breakglass_localpg::free_port;
use breakglass_localpg::os;

/// The OpenID Provider script.
const PROVIDER_SCRIPT: &str = include_str!("../oidc/provider.mjs");
/// The GitHub-Actions-like issuer script.
const GITHUB_SCRIPT: &str = include_str!("../oidc/github.mjs");
/// The lock file `npm ci` installs from; its hash names the install dir.
pub const PACKAGE_LOCK: &str = include_str!("../oidc/package-lock.json");
/// The package manifest installed beside the lock file.
pub const PACKAGE_JSON: &str = include_str!("../oidc/package.json");

/// Where `cargo xtask test` says the node modules are.
pub const NODE_MODULES_ENV: &str = "BREAKGLASS_TEST_NODE_MODULES";

/// How long a script may take to print `ready`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times start picks a new port when the chosen one was taken.
const PORT_ATTEMPTS_MAX: u32 = 3;
/// Redirects one page load may follow.
const REDIRECTS_MAX: usize = 20;
/// Pages one login may go through (user code, login, consent, result).
const PAGES_MAX: usize = 12;
/// Bytes of a response body read at most.
const BODY_BYTES_MAX: u64 = 1 << 20;
/// Timeout of each HTTP call to the providers.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The client id the provider registers for the breakglass CLI: a public
/// native client (no secret, PKCE, loopback redirects on any port).
pub const CLIENT_ID: &str = "breakglass-cli";

/// The scopes the CLI asks for.
pub const SCOPES: &[&str] = &["openid", "profile", "groups", "email", "offline_access"];

/// A user of the test provider.
#[derive(Debug, Clone, Copy)]
pub struct TestUser {
    /// Login name, `sub` and `preferred_username`.
    pub name: &'static str,
    /// The password the login form wants.
    pub password: &'static str,
    /// The `groups` claim.
    pub groups: &'static [&'static str],
    /// Logs in "with MFA": `amr` is `["pwd", "mfa"]` instead of `["pwd"]`.
    pub mfa: bool,
}

/// The provider's users.
pub const USERS: &[TestUser] = &[
    TestUser {
        name: "alice",
        password: "alice-password",
        groups: &["oncall"],
        mfa: false,
    },
    TestUser {
        name: "bob",
        password: "bob-password",
        groups: &["sre-leads"],
        mfa: false,
    },
    TestUser {
        name: "carol",
        password: "carol-password",
        groups: &["sre-leads"],
        mfa: true,
    },
    TestUser {
        name: "dave",
        password: "dave-password",
        groups: &["oncall", "breakglass-admins"],
        mfa: false,
    },
];

/// The test user called `name`.
pub fn user(name: &str) -> anyhow::Result<&'static TestUser> {
    USERS
        .iter()
        .find(|u| u.name == name)
        .with_context(|| format!("no test user {name:?}"))
}

/// The directory holding `node_modules` for the scripts: the
/// `BREAKGLASS_TEST_NODE_MODULES` env var's parent when set, else the
/// cache directory named after the lock file's hash.
pub fn node_install_dir() -> anyhow::Result<PathBuf> {
    if let Some(modules) = std::env::var_os(NODE_MODULES_ENV) {
        let modules = PathBuf::from(modules);
        return modules
            .parent()
            .map(Path::to_path_buf)
            .with_context(|| format!("{NODE_MODULES_ENV} has no parent directory"));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("breakglass").join(format!(
        "test-node-{}",
        &hex_digest(PACKAGE_LOCK.as_bytes())[..16]
    )))
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The installed `node_modules`, or an error saying how to install them.
pub(crate) fn node_modules() -> anyhow::Result<PathBuf> {
    check_node_modules(&node_install_dir()?)
}

/// `dir/node_modules` when the scripts' packages are installed there.
fn check_node_modules(dir: &Path) -> anyhow::Result<PathBuf> {
    let modules = dir.join("node_modules");
    if !modules.join("oidc-provider").join("package.json").is_file()
        || !modules.join("jose").join("package.json").is_file()
    {
        bail!(
            "the test identity provider's node modules are not installed at {}; run \
             `cargo xtask test`, which installs them (`npm ci`), or set {NODE_MODULES_ENV}",
            modules.display()
        );
    }
    Ok(modules)
}

/// One node script running as a child process, stopped by pid on drop.
#[derive(Debug)]
struct NodeProcess {
    child: Option<Child>,
    stderr: PathBuf,
}

impl NodeProcess {
    /// Starts `node SCRIPT CONFIG` in `dir` (which holds both and a
    /// `node_modules` link) and waits for its `ready` line.
    fn start(dir: &Path, script: &str, config: &Path) -> anyhow::Result<NodeProcess> {
        let stderr = dir.join(format!("{script}.stderr"));
        let mut cmd = Command::new("node");
        cmd.arg(dir.join(script))
            .arg(config)
            .current_dir(dir)
            .env("NODE_ENV", "test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?);
        let mut child = cmd
            .spawn()
            .context("cannot run `node` (Node.js 20.19 or later is needed)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let ready = reader.read_line(&mut line).is_ok() && line == "ready\n";
            let _ = tx.send(ready);
            // Keep reading until the process exits: the provider also logs
            // notices to stdout, and a closed pipe would kill it (EPIPE).
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut process = NodeProcess {
            child: Some(child),
            stderr,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(true) => Ok(process),
            Ok(false) => {
                process.stop();
                bail!(
                    "{script} exited before it was ready:\n{}",
                    os::log_tail(&process.stderr, 20)
                )
            }
            Err(_) => {
                process.stop();
                bail!(
                    "{script} not ready within {START_TIMEOUT:?}:\n{}",
                    os::log_tail(&process.stderr, 20)
                )
            }
        }
    }

    fn stop(&mut self) {
        os::stop_child(self.child.take(), Duration::from_secs(3));
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A temporary directory with a script, its config and a `node_modules`
/// link to the installed modules.
fn script_dir(prefix: &str, script: &str, text: &str) -> anyhow::Result<tempfile::TempDir> {
    let modules = node_modules()?;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::write(dir.path().join(script), text)?;
    std::os::unix::fs::symlink(&modules, dir.path().join("node_modules"))
        .context("cannot link node_modules")?;
    Ok(dir)
}

/// Starts a script on a free port, retrying with another port when the
/// chosen one was taken meanwhile. `write_config(port)` writes its config.
fn start_on_free_port(
    dir: &Path,
    script: &str,
    mut write_config: impl FnMut(u16) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<(u16, NodeProcess)> {
    let mut last = None;
    for _ in 0..PORT_ATTEMPTS_MAX {
        let port = free_port();
        let config = write_config(port)?;
        match NodeProcess::start(dir, script, &config) {
            Ok(p) => return Ok((port, p)),
            Err(e) if format!("{e:#}").contains("EADDRINUSE") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no free port")))
}

/// Options of an [`OidcProvider`].
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// Lifetime of ID and access tokens (the refresh tests shorten it).
    pub id_token_ttl: Duration,
    /// The `interval` the device authorization response names.
    pub device_interval: Duration,
}

impl Default for OidcOptions {
    fn default() -> Self {
        OidcOptions {
            id_token_ttl: Duration::from_secs(600),
            device_interval: Duration::from_secs(1),
        }
    }
}

/// Tokens from one login.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub id_token: String,
    pub refresh_token: Option<String>,
}

/// A running OpenID Provider on `127.0.0.1`, with [`USERS`] and one public
/// client, [`CLIENT_ID`]. Stopped by pid when dropped.
#[derive(Debug)]
pub struct OidcProvider {
    port: u16,
    options: OidcOptions,
    cookie_key: String,
    process: Option<NodeProcess>,
    /// One browser per user, so sessions persist between logins.
    browsers: Mutex<BTreeMap<String, Browser>>,
    // INVARIANT: declared last so it is removed only after the process
    // that uses it has stopped.
    dir: tempfile::TempDir,
}

impl OidcProvider {
    /// Starts a provider with the default options.
    pub fn start() -> anyhow::Result<OidcProvider> {
        OidcProvider::start_with(OidcOptions::default())
    }

    /// Starts a provider; returns once it accepts connections.
    pub fn start_with(options: OidcOptions) -> anyhow::Result<OidcProvider> {
        let dir = script_dir("breakglass-oidc-", "provider.mjs", PROVIDER_SCRIPT)?;
        let mut provider = OidcProvider {
            port: 0,
            options,
            cookie_key: os::random_hex(32)?,
            process: None,
            browsers: Mutex::new(BTreeMap::new()),
            dir,
        };
        let dir = provider.dir.path().to_path_buf();
        let (port, process) = start_on_free_port(&dir, "provider.mjs", |port| {
            provider.port = port;
            provider.write_config(false)
        })?;
        provider.port = port;
        provider.process = Some(process);
        Ok(provider)
    }

    fn write_config(&self, rotate: bool) -> anyhow::Result<PathBuf> {
        let users: Vec<_> = USERS
            .iter()
            .map(|u| {
                serde_json::json!({
                    "name": u.name, "password": u.password, "groups": u.groups, "mfa": u.mfa,
                })
            })
            .collect();
        let config = serde_json::json!({
            "port": self.port,
            "client_id": CLIENT_ID,
            "cookie_key": self.cookie_key,
            "id_token_ttl_s": self.options.id_token_ttl.as_secs().max(1),
            "device_interval_s": self.options.device_interval.as_secs(),
            "keys_file": self.dir.path().join("keys.json"),
            "state_file": self.dir.path().join("state.json"),
            "rotate": rotate,
            "users": users,
        });
        let path = self.dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(path)
    }

    /// `http://127.0.0.1:PORT`, the `iss` of its tokens.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CLI's client id.
    pub fn client_id(&self) -> &'static str {
        CLIENT_ID
    }

    /// The scopes the CLI asks for.
    pub fn scopes(&self) -> Vec<String> {
        SCOPES.iter().map(|s| s.to_string()).collect()
    }

    /// Stops the provider (its state stays for [`Self::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// Starts it again on the same port, with the same keys, sessions,
    /// grants and refresh tokens.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_inner(false)
    }

    /// Restarts it with a new signing key (new `kid`) that signs from now
    /// on; the previous key stays in the JWKS.
    pub fn rotate_keys(&mut self) -> anyhow::Result<()> {
        self.restart_inner(true)
    }

    fn restart_inner(&mut self, rotate: bool) -> anyhow::Result<()> {
        self.stop();
        let config = self.write_config(rotate)?;
        // The port was ours a moment ago; another process may grab it in
        // between, which the error then says.
        self.process = Some(NodeProcess::start(
            self.dir.path(),
            "provider.mjs",
            &config,
        )?);
        Ok(())
    }

    /// The end of the provider's log (stderr), for failure messages.
    pub fn log(&self) -> String {
        os::log_tail(&self.dir.path().join("provider.mjs.stderr"), 30)
    }

    /// The `kid`s of the published keys, the signing one first.
    pub fn key_ids(&self) -> anyhow::Result<Vec<String>> {
        let text = std::fs::read_to_string(self.dir.path().join("keys.json"))?;
        let keys: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        Ok(keys
            .iter()
            .filter_map(|k| k["kid"].as_str().map(str::to_owned))
            .collect())
    }

    fn with_browser<T>(
        &self,
        user: &str,
        f: impl FnOnce(&mut Browser) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut browsers = self
            .browsers
            .lock()
            .map_err(|_| anyhow::anyhow!("browser lock poisoned"))?;
        let browser = browsers.entry(user.to_owned()).or_insert_with(Browser::new);
        f(browser)
    }

    /// Forgets `user`'s provider session (cookies), so the next login
    /// asks for the password again.
    pub fn forget_session(&self, user: &str) -> anyhow::Result<()> {
        self.with_browser(user, |b| {
            b.cookies.clear();
            Ok(())
        })
    }

    /// What a person does with the code `breakglass login` prints: opens
    /// the verification page, enters `user_code`, logs in as `user` with
    /// `password` (unless the provider still has a session for them) and
    /// consents. Fails with the page's message when the provider refuses.
    pub fn complete_device_login(
        &self,
        user_code: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let start = format!("{}/device", self.issuer());
        self.with_browser(user, |b| {
            let page = b.get(&start)?;
            let form = page
                .form_with_input("user_code")
                .with_context(|| format!("no user code form on {start}:\n{}", page.body))?;
            let mut page = b.submit(&page.url, &form, &[("user_code", user_code)])?;
            for _ in 0..PAGES_MAX {
                if page.body.contains("Sign-in Success") {
                    return Ok(());
                }
                page = b.step(&page, user, password)?;
            }
            bail!("device login did not finish within {PAGES_MAX} pages")
        })
    }

    /// What a browser does with the URL `breakglass login --browser`
    /// prints: loads it, logs in as `user`, consents, and follows the
    /// redirect to the client's loopback address (where the CLI waits).
    /// Returns the page the client answered with.
    pub fn complete_browser_login(
        &self,
        authorize_url: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let issuer = self.issuer();
        self.with_browser(user, |b| {
            let mut page = b.get_until_leaving(authorize_url, &issuer)?;
            for _ in 0..PAGES_MAX {
                if !page.url.starts_with(&issuer) {
                    return Ok(page.body);
                }
                page = b.step_until_leaving(&page, user, password, &issuer)?;
            }
            bail!("browser login did not finish within {PAGES_MAX} pages")
        })
    }

    /// What a browser does with an authorization URL a web application sent
    /// it to: loads it, logs in as `user` (unless the provider still has a
    /// session for them) and consents. Returns where the provider then
    /// sends the browser (the application's redirect URI with the code or
    /// an error), without going there.
    pub fn authorize_redirect(&self, authorize_url: &str, user: &str) -> anyhow::Result<String> {
        let test_user = self::user(user)?;
        let issuer = self.issuer();
        self.with_browser(user, |b| {
            let mut page = b.get_until_leaving_no_follow(authorize_url, &issuer)?;
            for _ in 0..PAGES_MAX {
                if let Some(location) = page.left_to.take() {
                    return Ok(location);
                }
                page = b.step_no_follow(&page, user, test_user.password, &issuer)?;
            }
            bail!("login did not finish within {PAGES_MAX} pages")
        })
    }

    /// Logs `user` in with the authorization code flow and PKCE, driven
    /// over HTTP as a browser and a client would; `max_age` as given.
    pub fn login(&self, user: &str, max_age: Option<u32>) -> anyhow::Result<Tokens> {
        let test_user = self::user(user)?;
        let verifier = os::random_hex(32)?;
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let state = os::random_hex(16)?;
        // Nothing listens there: the code is read off the redirect.
        let redirect_uri = "http://127.0.0.1:9/callback";
        let mut query = vec![
            ("response_type", "code".to_owned()),
            ("client_id", CLIENT_ID.to_owned()),
            ("redirect_uri", redirect_uri.to_owned()),
            ("scope", SCOPES.join(" ")),
            ("state", state.clone()),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256".to_owned()),
        ];
        if let Some(age) = max_age {
            query.push(("max_age", age.to_string()));
        }
        let url = format!("{}/auth?{}", self.issuer(), encode_form(&query));
        let issuer = self.issuer();
        let location = self.with_browser(user, |b| {
            let mut page = b.get_until_leaving_no_follow(&url, &issuer)?;
            for _ in 0..PAGES_MAX {
                if let Some(location) = page.left_to.take() {
                    return Ok(location);
                }
                page = b.step_no_follow(&page, user, test_user.password, &issuer)?;
            }
            bail!("login did not finish within {PAGES_MAX} pages")
        })?;
        let params = query_params(&location);
        if let Some(error) = params.get("error") {
            bail!(
                "the provider refused the login: {error} {:?}",
                params.get("error_description")
            );
        }
        if params.get("state") != Some(&state) {
            bail!("the redirect's state does not match");
        }
        let code = params.get("code").context("no code in the redirect")?;
        let body = token_call(
            &format!("{}/token", self.issuer()),
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("client_id", CLIENT_ID),
                ("code_verifier", &verifier),
            ],
        )?;
        Ok(Tokens {
            id_token: body["id_token"]
                .as_str()
                .context("no id_token in the token response")?
                .to_owned(),
            refresh_token: body["refresh_token"].as_str().map(str::to_owned),
        })
    }

    /// A fresh ID token of `user` from a real login.
    pub fn id_token(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.login(user, None)?.id_token)
    }
}

/// `POST` a token endpoint with a form; the JSON answer, or an error with
/// the OAuth error.
fn token_call(url: &str, form: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
    let agent = agent();
    let mut resp = agent
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(encode_form(form))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(BODY_BYTES_MAX)
        .read_to_string()?;
    if status != 200 {
        bail!("{url} answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// Claims of a JWT's payload, without verifying anything: for assertions
/// in tests only.
pub fn jwt_claims(jwt: &str) -> anyhow::Result<serde_json::Value> {
    let payload = jwt.split('.').nth(1).context("not a JWT")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .context("JWT payload is not base64url")?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The header of a JWT, unverified.
pub fn jwt_header(jwt: &str) -> anyhow::Result<serde_json::Value> {
    let header = jwt.split('.').next().context("not a JWT")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .context("JWT header is not base64url")?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(CALL_TIMEOUT))
        .proxy(None)
        .build()
        .into()
}

/// Percent-encodes a form or query string.
pub fn encode_form(pairs: &[(&str, impl AsRef<str>)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_ref())))
        .finish()
}

/// The query parameters of a URL.
pub fn query_params(url: &str) -> BTreeMap<String, String> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let query = query.split('#').next().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// A loaded HTML page.
#[derive(Debug)]
struct Page {
    url: String,
    body: String,
    /// Set when a redirect left the issuer and was not followed.
    left_to: Option<String>,
}

/// A form on a page: where it posts and its inputs with their values.
#[derive(Debug, Clone)]
struct Form {
    action: String,
    inputs: Vec<(String, String)>,
}

impl Page {
    fn forms(&self) -> Vec<Form> {
        let mut forms = Vec::new();
        let mut rest = self.body.as_str();
        while let Some(start) = rest.find("<form") {
            let after = &rest[start..];
            let end = after.find("</form>").unwrap_or(after.len());
            let html = &after[..end];
            let tag_end = html.find('>').unwrap_or(html.len());
            let action = attr(&html[..tag_end], "action").unwrap_or_default();
            let mut inputs = Vec::new();
            let mut inner = &html[tag_end..];
            while let Some(i) = inner.find("<input") {
                let tag = &inner[i..];
                let close = tag.find('>').unwrap_or(tag.len());
                let tag_text = &tag[..close];
                if let Some(name) = attr(tag_text, "name") {
                    inputs.push((name, attr(tag_text, "value").unwrap_or_default()));
                }
                inner = &tag[close..];
            }
            forms.push(Form { action, inputs });
            rest = &after[end..];
        }
        forms
    }

    fn form_with_input(&self, name: &str) -> Option<Form> {
        self.forms()
            .into_iter()
            .find(|f| f.inputs.iter().any(|(n, _)| n == name))
    }

    /// The page's text without tags, for error messages.
    fn text(&self) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in self.body.chars() {
            match c {
                '<' => in_tag = true,
                '>' => {
                    in_tag = false;
                    out.push(' ');
                }
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// The value of `name="..."` in a tag, with the usual entities decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let start = tag
        .match_indices(&needle)
        .find(|(i, _)| tag[..*i].ends_with(char::is_whitespace))?
        .0
        + needle.len();
    let end = tag[start..].find('"')? + start;
    Some(
        tag[start..end]
            .replace("&quot;", "\"")
            .replace("&#34;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// A cookie-keeping HTTP client that follows redirects itself and fills
/// in the provider's forms.
#[derive(Debug)]
pub struct Browser {
    agent: ureq::Agent,
    cookies: BTreeMap<String, String>,
}

impl Default for Browser {
    fn default() -> Self {
        Browser::new()
    }
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            agent: agent(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep_cookies(&mut self, resp: &ureq::http::Response<ureq::Body>) {
        for value in resp.headers().get_all("set-cookie") {
            let Ok(value) = value.to_str() else { continue };
            let mut parts = value.split(';');
            let Some((name, val)) = parts.next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            let expired = parts.any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p.starts_with("expires=thu, 01 jan 1970") || p == "max-age=0"
            });
            if expired || val.is_empty() {
                self.cookies.remove(name.trim());
            } else {
                self.cookies
                    .insert(name.trim().to_owned(), val.trim().to_owned());
            }
        }
    }

    /// One request; returns (status, location, body).
    fn call(
        &mut self,
        url: &str,
        form: Option<&[(String, String)]>,
    ) -> anyhow::Result<(u16, Option<String>, String)> {
        let cookie = self.cookie_header();
        let result = match form {
            None => self.agent.get(url).header("cookie", &cookie).call(),
            Some(pairs) => {
                let pairs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.agent
                    .post(url)
                    .header("cookie", &cookie)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .send(encode_form(&pairs))
            }
        };
        let mut resp = result.with_context(|| format!("cannot load {url}"))?;
        self.keep_cookies(&resp);
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(|l| resolve(url, l));
        let body = resp
            .body_mut()
            .with_config()
            .limit(BODY_BYTES_MAX)
            .read_to_string()
            .unwrap_or_default();
        Ok((status, location, body))
    }

    /// Loads `url` (or posts `form` to it) and follows redirects; stops
    /// without following one that leaves `stay_on` when `follow_out` is
    /// false.
    fn load(
        &mut self,
        url: &str,
        form: Option<&[(String, String)]>,
        stay_on: Option<&str>,
        follow_out: bool,
    ) -> anyhow::Result<Page> {
        let (mut status, mut location, mut body) = self.call(url, form)?;
        let mut url = url.to_owned();
        for _ in 0..REDIRECTS_MAX {
            let Some(next) = location.take() else {
                if status >= 400 {
                    let page = Page {
                        url,
                        body,
                        left_to: None,
                    };
                    bail!("the provider answered {status}: {}", page.text());
                }
                return Ok(Page {
                    url,
                    body,
                    left_to: None,
                });
            };
            if let Some(issuer) = stay_on
                && !next.starts_with(issuer)
            {
                if !follow_out {
                    return Ok(Page {
                        url,
                        body,
                        left_to: Some(next),
                    });
                }
                let (s, _, b) = self.call(&next, None)?;
                if s >= 400 {
                    bail!("{next} answered {s}: {b}");
                }
                return Ok(Page {
                    url: next,
                    body: b,
                    left_to: None,
                });
            }
            url = next;
            (status, location, body) = self.call(&url, None)?;
        }
        bail!("more than {REDIRECTS_MAX} redirects from {url}")
    }

    fn get(&mut self, url: &str) -> anyhow::Result<Page> {
        self.load(url, None, None, true)
    }

    fn get_until_leaving(&mut self, url: &str, issuer: &str) -> anyhow::Result<Page> {
        self.load(url, None, Some(issuer), true)
    }

    fn get_until_leaving_no_follow(&mut self, url: &str, issuer: &str) -> anyhow::Result<Page> {
        self.load(url, None, Some(issuer), false)
    }

    fn submit(
        &mut self,
        page_url: &str,
        form: &Form,
        set: &[(&str, &str)],
    ) -> anyhow::Result<Page> {
        self.submit_in(page_url, form, set, None, true)
    }

    fn submit_in(
        &mut self,
        page_url: &str,
        form: &Form,
        set: &[(&str, &str)],
        stay_on: Option<&str>,
        follow_out: bool,
    ) -> anyhow::Result<Page> {
        let mut fields = form.inputs.clone();
        for (name, value) in set {
            match fields.iter_mut().find(|(n, _)| n == name) {
                Some(field) => field.1 = (*value).to_owned(),
                None => fields.push(((*name).to_owned(), (*value).to_owned())),
            }
        }
        let action = if form.action.is_empty() {
            page_url.to_owned()
        } else {
            resolve(page_url, &form.action)
        };
        self.load(&action, Some(&fields), stay_on, follow_out)
    }

    /// Acts on a login or consent page: the next page.
    fn act(
        &mut self,
        page: &Page,
        user: &str,
        password: &str,
        stay_on: Option<&str>,
        follow_out: bool,
    ) -> anyhow::Result<Page> {
        if let Some(form) = page.form_with_input("password") {
            let next = self.submit_in(
                &page.url,
                &form,
                &[("login", user), ("password", password)],
                stay_on,
                follow_out,
            )?;
            if next.body.contains("wrong user name or password") {
                bail!("the provider refused the password of {user}");
            }
            return Ok(next);
        }
        if page.url.contains("/interaction/")
            && let Some(form) = page
                .forms()
                .into_iter()
                .find(|f| f.action.ends_with("/confirm"))
        {
            return self.submit_in(&page.url, &form, &[], stay_on, follow_out);
        }
        if let Some(form) = page.form_with_input("confirm") {
            // The device flow's "confirm this code" page.
            return self.submit_in(&page.url, &form, &[], stay_on, follow_out);
        }
        bail!("unexpected page at {}: {}", page.url, page.text())
    }

    fn step(&mut self, page: &Page, user: &str, password: &str) -> anyhow::Result<Page> {
        self.act(page, user, password, None, true)
    }

    fn step_until_leaving(
        &mut self,
        page: &Page,
        user: &str,
        password: &str,
        issuer: &str,
    ) -> anyhow::Result<Page> {
        self.act(page, user, password, Some(issuer), true)
    }

    fn step_no_follow(
        &mut self,
        page: &Page,
        user: &str,
        password: &str,
        issuer: &str,
    ) -> anyhow::Result<Page> {
        self.act(page, user, password, Some(issuer), false)
    }
}

/// Resolves a possibly relative `location` against `base`.
fn resolve(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let origin_end = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= origin_end)
            .unwrap_or(origin_end);
        format!("{}/{location}", &base[..dir_end])
    }
}

/// A running GitHub-Actions-like issuer on `127.0.0.1`: discovery, JWKS
/// and the job token endpoint. Stopped by pid when dropped.
#[derive(Debug)]
pub struct GithubActionsIssuer {
    port: u16,
    request_token: String,
    admin_token: String,
    process: Option<NodeProcess>,
    // INVARIANT: declared last, removed after the process stopped.
    dir: tempfile::TempDir,
}

/// Lifetime of the job tokens (GitHub's are valid for minutes).
const GITHUB_TOKEN_TTL_S: u64 = 300;

impl GithubActionsIssuer {
    /// Starts the issuer; returns once it accepts connections.
    pub fn start() -> anyhow::Result<GithubActionsIssuer> {
        let dir = script_dir("breakglass-gha-", "github.mjs", GITHUB_SCRIPT)?;
        let request_token = os::random_hex(24)?;
        let admin_token = os::random_hex(24)?;
        let path = dir.path().to_path_buf();
        let (port, process) = start_on_free_port(&path, "github.mjs", |port| {
            let config = serde_json::json!({
                "port": port,
                "request_token": request_token,
                "admin_token": admin_token,
                "keys_file": path.join("keys.json"),
                "token_ttl_s": GITHUB_TOKEN_TTL_S,
            });
            let file = path.join("config.json");
            std::fs::write(&file, serde_json::to_vec(&config)?)?;
            Ok(file)
        })?;
        Ok(GithubActionsIssuer {
            port,
            request_token,
            admin_token,
            process: Some(process),
            dir,
        })
    }

    /// `http://127.0.0.1:PORT`, the `iss` of its tokens.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What a job sees in `ACTIONS_ID_TOKEN_REQUEST_URL` (already with a
    /// query string; clients append `&audience=A`).
    pub fn request_url(&self) -> String {
        format!("{}/token?api-version=2.0", self.issuer())
    }

    /// What a job sees in `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
    pub fn request_token(&self) -> &str {
        &self.request_token
    }

    /// Replaces the claim overrides of tokens issued from now on: each
    /// key replaces the default claim, `null` removes it.
    pub fn set_claims(&self, claims: serde_json::Value) -> anyhow::Result<()> {
        let mut resp = agent()
            .put(format!("{}/__test/claims", self.issuer()))
            .header("authorization", &format!("Bearer {}", self.admin_token))
            .header("content-type", "application/json")
            .send(serde_json::to_vec(&claims)?)?;
        if resp.status() != 200 {
            bail!(
                "setting claims failed: {}",
                resp.body_mut().read_to_string().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A job token for `audience`, fetched as a job would.
    pub fn token(&self, audience: &str) -> anyhow::Result<String> {
        let url = format!(
            "{}&{}",
            self.request_url(),
            encode_form(&[("audience", audience)])
        );
        let mut resp = agent()
            .get(&url)
            .header("authorization", &format!("Bearer {}", self.request_token))
            .call()?;
        let text = resp.body_mut().read_to_string()?;
        if resp.status() != 200 {
            bail!("{url} answered {}: {text}", resp.status());
        }
        let body: serde_json::Value = serde_json::from_str(&text)?;
        Ok(body["value"].as_str().context("no value")?.to_owned())
    }

    /// Stops the issuer.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }

    /// The end of the issuer's log (stderr), for failure messages.
    pub fn log(&self) -> String {
        os::log_tail(&self.dir.path().join("github.mjs.stderr"), 30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_decode() {
        let p = query_params("http://x/cb?code=a%2Fb&state=s+t#frag");
        assert_eq!(p.get("code").map(String::as_str), Some("a/b"));
        assert_eq!(p.get("state").map(String::as_str), Some("s t"));
    }

    #[test]
    fn missing_node_modules_say_how_to_install_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = check_node_modules(dir.path()).expect_err("nothing installed");
        assert!(format!("{e:#}").contains("run `cargo xtask test`"), "{e:#}");
    }

    #[test]
    fn resolve_relative() {
        assert_eq!(resolve("http://h:1/a/b", "/c"), "http://h:1/c");
        assert_eq!(resolve("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(resolve("http://h:1/a", "http://o/x"), "http://o/x");
    }
}
