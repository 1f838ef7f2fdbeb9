//! An issuer's signing keys: fetched from its discovery document and JWKS
//! with a bounded HTTP client off the async workers, kept in memory and in
//! the data dir (written atomically), refreshed on a timer and when a token
//! names an unknown `kid` (at most once every [`KID_REFETCH_MIN_S`]). When
//! the issuer is unreachable the keys last fetched keep working.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::jwt::{self, Jwk};

/// An unknown `kid` refetches the keys at most this often.
pub const KID_REFETCH_MIN_S: u64 = 30;
/// Keys are refetched this often while the issuer answers.
pub const REFRESH_INTERVAL_S: u64 = 300;
/// ... and this often while it does not.
pub const RETRY_INTERVAL_S: u64 = 30;
/// Connect and whole-call timeouts of one fetch.
const CONNECT_TIMEOUT_S: u64 = 5;
const CALL_TIMEOUT_S: u64 = 10;
/// Largest discovery document and JWKS read.
pub const DISCOVERY_LEN_MAX: u64 = 64 * 1024;
pub const JWKS_LEN_MAX: u64 = 256 * 1024;

struct State {
    keys: Arc<Vec<Jwk>>,
    healthy: bool,
    last_kid_fetch: Option<Instant>,
}

/// The keys of one issuer.
pub struct KeySource {
    issuer: String,
    cache_file: Option<PathBuf>,
    agent: ureq::Agent,
    state: RwLock<State>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

/// A JSON answer of at most `limit` bytes. A non-2xx answer (when the
/// request reads them rather than failing) is an error naming OAuth's
/// `error` and `error_description` (RFC 6749 §5.2) when it has them.
pub(crate) fn read_json(
    resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    limit: u64,
) -> Result<Value, String> {
    let mut resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&body).map_err(|_| format!("{status}, not JSON"))?;
    if !status.is_success() {
        let error = v["error"].as_str().unwrap_or("no error code");
        let description: String = v["error_description"]
            .as_str()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Err(format!("{status}: {error} {description}"));
    }
    Ok(v)
}

/// The HTTP client for identity providers: the system's roots, no proxy,
/// no redirects, and timeouts.
pub(crate) fn http_agent() -> ureq::Agent {
    let roots: Vec<ureq::tls::Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(CALL_TIMEOUT_S)))
        .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_S)))
        .max_redirects(0)
        .proxy(None)
        .user_agent(concat!("breakglass/", env!("CARGO_PKG_VERSION")))
        .build();
    breakglass_notify::agent::agent(config)
}

impl KeySource {
    /// A source for `issuer`, starting from the keys cached in `cache_dir`
    /// if there are any.
    pub fn new(issuer: &str, cache_dir: Option<&Path>) -> KeySource {
        let cache_file = cache_dir.map(|d| {
            let h = breakglass_core::token::sha256_hex(issuer.as_bytes());
            d.join(format!("jwks-{}.json", &h[..16]))
        });
        let keys = cache_file
            .as_deref()
            .and_then(|f| read_cache(f, issuer))
            .unwrap_or_default();
        KeySource {
            issuer: issuer.to_string(),
            cache_file,
            agent: http_agent(),
            state: RwLock::new(State {
                keys: Arc::new(keys),
                healthy: false,
                last_kid_fetch: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Whether the last fetch succeeded.
    pub fn healthy(&self) -> bool {
        self.state.read().unwrap_or_else(|p| p.into_inner()).healthy
    }

    fn keys(&self) -> Arc<Vec<Jwk>> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .clone()
    }

    /// The keys to verify a token naming `kid` with. An unknown `kid`
    /// refetches first, at most once every [`KID_REFETCH_MIN_S`].
    pub async fn keys_for(self: &Arc<Self>, kid: Option<&str>) -> Arc<Vec<Jwk>> {
        let keys = self.keys();
        let Some(kid) = kid else {
            return keys;
        };
        if keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
            return keys;
        }
        let due = {
            let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
            let due = s
                .last_kid_fetch
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(KID_REFETCH_MIN_S));
            if due {
                s.last_kid_fetch = Some(Instant::now());
            }
            due
        };
        if due {
            self.refresh().await;
        } else {
            // A fetch under way (another token with the new kid started
            // it) may bring the key: wait for it rather than refuse.
            drop(self.fetching.lock().await);
        }
        self.keys()
    }

    /// Fetches the keys now; on failure the keys held so far stay.
    pub async fn refresh(self: &Arc<Self>) {
        let _one = self.fetching.lock().await;
        let me = self.clone();
        let fetched = tokio::task::spawn_blocking(move || me.fetch_blocking())
            .await
            .unwrap_or_else(|e| Err(format!("fetch task failed: {e}")));
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(keys) => {
                if !s.healthy {
                    tracing::info!(issuer = %self.issuer, keys = keys.len(), "identity provider keys fetched");
                }
                s.keys = Arc::new(keys);
                s.healthy = true;
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, cached_keys = s.keys.len(), "cannot fetch the identity provider's keys; the cached keys keep working");
                s.healthy = false;
            }
        }
    }

    /// Refreshes now, then every [`REFRESH_INTERVAL_S`] (every
    /// [`RETRY_INTERVAL_S`] while the issuer does not answer).
    pub fn spawn_refresh(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else {
                    return;
                };
                me.refresh().await;
                let wait = if me.healthy() {
                    REFRESH_INTERVAL_S
                } else {
                    RETRY_INTERVAL_S
                };
                drop(me);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        })
    }

    fn get_json(&self, url: &str, limit: u64) -> Result<Value, String> {
        read_json(
            self.agent
                .get(url)
                .header("Accept", "application/json")
                .call(),
            limit,
        )
        .map_err(|e| format!("GET {url}: {e}"))
    }

    /// Discovery document, then the JWKS it names. Blocking.
    fn fetch_blocking(&self) -> Result<Vec<Jwk>, String> {
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let discovery = self.get_json(&discovery_url, DISCOVERY_LEN_MAX)?;
        // OpenID Connect Discovery §4.3: the document's issuer is exactly
        // the one asked about.
        if discovery["issuer"].as_str() != Some(self.issuer.as_str()) {
            return Err(format!(
                "discovery document names issuer {}, not {}",
                discovery["issuer"], self.issuer
            ));
        }
        let jwks_uri = discovery["jwks_uri"]
            .as_str()
            .ok_or("discovery document has no jwks_uri")?
            .to_string();
        super::config::check_issuer_url(&jwks_uri)
            .map_err(|e| format!("jwks_uri {jwks_uri}: {e}"))?;
        let doc = self.get_json(&jwks_uri, JWKS_LEN_MAX)?;
        let keys = jwt::parse_jwks(&doc)?;
        if keys.is_empty() {
            return Err(format!("{jwks_uri} holds no usable signing key"));
        }
        if let Some(f) = &self.cache_file
            && let Err(e) = write_cache(f, &self.issuer, &doc)
        {
            tracing::warn!(file = %f.display(), error = %e, "cannot cache the identity provider's keys");
        }
        Ok(keys)
    }
}

fn read_cache(file: &Path, issuer: &str) -> Option<Vec<Jwk>> {
    let meta = std::fs::metadata(file).ok()?;
    if meta.len() > JWKS_LEN_MAX * 2 {
        return None;
    }
    let v: Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    if v["issuer"].as_str() != Some(issuer) {
        return None;
    }
    jwt::parse_jwks(&v["jwks"]).ok()
}

/// Writes the cache next to its final place and renames it over, so a
/// crash leaves the old file or the new one, never half of one.
fn write_cache(file: &Path, issuer: &str, jwks: &Value) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let tmp = file.with_extension("json.tmp");
    let body = serde_json::to_vec(&json!({"issuer": issuer, "jwks": jwks}))?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
