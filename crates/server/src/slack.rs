//! Approving from Slack (`POST /v1/integrations/slack/actions`): Slack's
//! request signature is checked (HMAC-SHA256 with the signing secret, in
//! constant time, the timestamp within 5 minutes, each signature once),
//! the Slack user is mapped to a principal (`slack_user` on a local
//! principal, or the identity provider's person with the Slack user's
//! verified e-mail, from `users.info`, while their newest ID token seen by
//! this node is unexpired), and the button
//! runs the same lifecycle step as the API. The original message is then
//! replaced with the outcome through the interaction's `response_url`.
//! Refused calls are answered 401 and audited as `slack.refused`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use breakglass_core::lifecycle::Command;
use breakglass_core::{EventDraft, Principal, Request};
use breakglass_notify::notice::{self, RequestView, SLACK_ACTION_APPROVE, SLACK_ACTION_DENY};
use breakglass_notify::sign::{self, SlackAuthError};
use serde::Deserialize;
use serde_json::json;

use crate::app::{App, now};
use crate::config::Config;
use crate::http::ApiError;

/// Signatures remembered against replay; Slack's timestamps are only
/// accepted within 5 minutes, so older entries are dropped.
pub const REPLAY_CACHE_LEN_MAX: usize = 100_000;
/// `slack.refused` events written per minute at most; more refusals are
/// only logged, so unsigned floods cannot grow the audit log without bound.
pub const REFUSALS_AUDITED_PER_MIN_MAX: u32 = 60;
/// The longest Slack user id, action id or request id we read.
pub const SLACK_FIELD_LEN_MAX: usize = 128;
/// Actions in one interaction we look at (Slack sends one per click).
pub const ACTIONS_MAX: usize = 1;

/// Slack's own host for `response_url`s.
pub const SLACK_RESPONSE_URL_PREFIX: &str = "https://hooks.slack.com/";
/// Slack's Web API, whose `users.info` names a user's e-mail.
pub const SLACK_API_URL: &str = "https://slack.com/api";
/// The largest `users.info` answer read.
pub const USER_INFO_LEN_MAX: u64 = 64 * 1024;

/// `[integrations]`: chat integrations that act on requests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrationsConfig {
    #[serde(default)]
    pub slack: Option<SlackConfig>,
}

/// `[integrations.slack]`: the Slack app whose buttons approve and deny.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Environment variable holding the app's signing secret.
    #[serde(default)]
    pub signing_secret_env: Option<String>,
    /// File holding the signing secret instead.
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// Messages are updated only through `response_url`s under this
    /// prefix (default Slack's own host).
    #[serde(default = "default_prefix")]
    pub response_url_prefix: String,
    /// Environment variable holding the app's bot token (`xoxb-...`, with
    /// the `users:read.email` scope): with it, a Slack user who is not a
    /// local principal's `slack_user` is matched by e-mail to the identity
    /// provider's person.
    #[serde(default)]
    pub bot_token_env: Option<String>,
    /// File holding the bot token instead.
    #[serde(default)]
    pub bot_token_file: Option<PathBuf>,
    /// Slack's Web API base URL.
    #[serde(default = "default_api_url")]
    pub api_url: String,
}

fn default_prefix() -> String {
    SLACK_RESPONSE_URL_PREFIX.into()
}

fn default_api_url() -> String {
    SLACK_API_URL.into()
}

impl IntegrationsConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(s) = self.slack.as_mut() {
            for f in [s.signing_secret_file.as_mut(), s.bot_token_file.as_mut()]
                .into_iter()
                .flatten()
            {
                if f.is_relative() {
                    *f = base.join(&*f);
                }
            }
        }
    }
}

/// Checks `[integrations.slack]` and the principals' `slack_user`s.
pub fn validate(config: &Config) -> anyhow::Result<()> {
    if let Some(s) = &config.integrations.slack {
        if s.signing_secret_env.is_some() == s.signing_secret_file.is_some() {
            anyhow::bail!(
                "integrations.slack: set signing_secret_env or signing_secret_file (one of them)"
            );
        }
        if !(s.response_url_prefix.starts_with("https://")
            || s.response_url_prefix.starts_with("http://"))
            || s.response_url_prefix.len() > 512
        {
            anyhow::bail!(
                "integrations.slack.response_url_prefix: an http(s) URL prefix of at most 512 characters"
            );
        }
        if s.bot_token_env.is_some() && s.bot_token_file.is_some() {
            anyhow::bail!("integrations.slack: set bot_token_env or bot_token_file, not both");
        }
        crate::identity::config::check_issuer_url(&s.api_url)
            .map_err(|e| anyhow::anyhow!("integrations.slack.api_url: {e}"))?;
    }
    let mut seen = std::collections::BTreeMap::new();
    for (i, p) in config.principals.iter().enumerate() {
        let Some(u) = &p.slack_user else { continue };
        if u.is_empty()
            || u.len() > SLACK_FIELD_LEN_MAX
            || !u.chars().all(|c| c.is_ascii_alphanumeric())
        {
            anyhow::bail!(
                "principals[{i}].slack_user: a Slack user id (letters and digits, like U024BE7LH)"
            );
        }
        if let Some(j) = seen.insert(u.clone(), i) {
            anyhow::bail!(
                "principals[{i}].slack_user: {u} is already principals[{j}]'s Slack user"
            );
        }
    }
    Ok(())
}

/// The Slack integration as running: the secret, the replay cache, the
/// refusal budget.
pub struct Slack {
    secret: Vec<u8>,
    /// The bot token, for `users.info`.
    bot_token: Option<String>,
    api_url: String,
    response_url_prefix: String,
    seen: Mutex<Seen>,
    http: breakglass_notify::deliver::HttpSender,
}

#[derive(Default)]
struct Seen {
    /// Signature -> its timestamp (seconds).
    sigs: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
    /// (minute, refusals audited in it).
    audited: (i64, u32),
}

impl Slack {
    /// Reads the signing secret; `None` without `[integrations.slack]`.
    pub fn open(config: &Config) -> anyhow::Result<Option<Slack>> {
        let Some(s) = &config.integrations.slack else {
            return Ok(None);
        };
        let secret = breakglass_notify::config::read_secret(
            "signing_secret",
            s.signing_secret_env.as_deref(),
            s.signing_secret_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("integrations.slack.{e}"))?
        .ok_or_else(|| anyhow::anyhow!("integrations.slack: no signing secret"))?;
        if secret.len() < sign::SECRET_LEN_MIN {
            anyhow::bail!(
                "integrations.slack.signing_secret_env: the signing secret is shorter than {} characters",
                sign::SECRET_LEN_MIN
            );
        }
        let bot_token = breakglass_notify::config::read_secret(
            "bot_token",
            s.bot_token_env.as_deref(),
            s.bot_token_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("integrations.slack.{e}"))?;
        Ok(Some(Slack {
            secret: secret.into_bytes(),
            bot_token,
            api_url: s.api_url.trim_end_matches('/').to_string(),
            response_url_prefix: s.response_url_prefix.clone(),
            seen: Mutex::new(Seen::default()),
            http: breakglass_notify::deliver::HttpSender::new(Duration::from_secs(10)),
        }))
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a verified signature; false when it was seen before (a
    /// replay) or the cache is full of live entries (fail closed).
    fn first_use(&self, sig: &str, ts: i64, now_s: i64) -> bool {
        let mut seen = self.seen();
        let horizon = now_s - 2 * sign::SLACK_TIMESTAMP_SKEW_MAX_S;
        while let Some((t, _)) = seen.order.front() {
            if *t >= horizon {
                break;
            }
            if let Some((_, old)) = seen.order.pop_front() {
                seen.sigs.remove(&old);
            }
        }
        if seen.sigs.contains_key(sig) || seen.sigs.len() >= REPLAY_CACHE_LEN_MAX {
            return false;
        }
        seen.sigs.insert(sig.to_string(), ts);
        seen.order.push_back((ts.max(horizon), sig.to_string()));
        true
    }

    /// Whether this refusal may be audited (the per-minute budget).
    fn may_audit(&self, now_s: i64) -> bool {
        let mut seen = self.seen();
        let minute = now_s / 60;
        if seen.audited.0 != minute {
            seen.audited = (minute, 0);
        }
        seen.audited.1 += 1;
        seen.audited.1 <= REFUSALS_AUDITED_PER_MIN_MAX
    }
}

#[derive(Debug, Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: String,
    user: SlackUser,
    #[serde(default)]
    actions: Vec<SlackAction>,
    #[serde(default)]
    response_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SlackUser {
    id: String,
}

#[derive(Debug, Deserialize)]
struct SlackAction {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
}

async fn refuse(app: &App, slack: &Slack, why: &str, now_s: i64) -> ApiError {
    tracing::warn!(reason = why, "refused a Slack action");
    if slack.may_audit(now_s) {
        let _ = app
            .store
            .append(
                vec![EventDraft {
                    actor: "system".into(),
                    action: "slack.refused".into(),
                    request_id: None,
                    details: json!({"reason": why}),
                }],
                now(),
            )
            .await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        format!("Slack request refused: {why}"),
    )
}

/// A Slack interaction (a button pressed in a notification).
#[utoipa::path(post, path = "/v1/integrations/slack/actions",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
        description = "Slack's interaction payload (`payload=<JSON>`), signed with X-Slack-Signature and X-Slack-Request-Timestamp"),
    responses((status = 200, description = "Taken; the message is updated with the outcome"),
              (status = 400, body = crate::dto::Problem), (status = 401, body = crate::dto::Problem),
              (status = 404, body = crate::dto::Problem)),
    security(("slack_signature" = [])))]
pub async fn slack_actions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(slack) = app.slack.get().and_then(|s| s.as_ref()) else {
        // An unsigned call is refused as such whether or not Slack is
        // configured; only a signed one learns that it is not.
        if !headers.contains_key("x-slack-signature") {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Slack request refused: unsigned",
            ));
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the Slack integration is not configured ([integrations.slack])",
        ));
    };
    let now_s = now().millis() / 1000;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let sig = header("x-slack-signature");
    let ts = match sign::verify_slack(
        &slack.secret,
        header("x-slack-request-timestamp"),
        sig,
        &body,
        now_s,
    ) {
        Ok(ts) => ts,
        Err(e) => {
            let why = match e {
                SlackAuthError::Unsigned => "unsigned",
                SlackAuthError::BadTimestamp => "bad timestamp",
                SlackAuthError::Stale => "stale timestamp",
                SlackAuthError::Forged => "bad signature",
            };
            return Err(refuse(&app, slack, why, now_s).await);
        }
    };
    if !slack.first_use(sig.unwrap_or(""), ts, now_s) {
        return Err(refuse(&app, slack, "replayed", now_s).await);
    }
    let bad = |why: &str| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", why.to_string());
    let payload = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| bad("no payload field in the form"))?;
    let it: Interaction = serde_json::from_str(&payload)
        .map_err(|_| bad("the payload is not a Slack interaction"))?;
    if it.kind != "block_actions" {
        return Ok(StatusCode::OK.into_response());
    }
    let Some(action) = it.actions.into_iter().take(ACTIONS_MAX).next() else {
        return Err(bad("no action in the interaction"));
    };
    let id = action.value.unwrap_or_default();
    if id.is_empty() || id.len() > SLACK_FIELD_LEN_MAX || it.user.id.len() > SLACK_FIELD_LEN_MAX {
        return Err(bad("the action names no request"));
    }
    let outcome = act(&app, slack, &it.user.id, &action.action_id, &id).await;
    tracing::info!(slack_user = %it.user.id, request = %id, outcome = %outcome.text, "Slack action");
    if let (Some(url), Some(view)) = (it.response_url, outcome.request) {
        if url.starts_with(&slack.response_url_prefix) {
            let msg = notice::slack_outcome(
                &view,
                &outcome.text,
                &breakglass_notify::Links {
                    public_url: app.config.server.public_url.clone(),
                },
            );
            let http = slack.http.clone();
            // Slack wants its answer within 3 s: the update goes after it.
            tokio::spawn(async move {
                let r = http.post(&url, &[], msg.to_string().as_bytes()).await;
                if !matches!(r, breakglass_notify::Attempt::Delivered { .. }) {
                    tracing::warn!(result = ?r, "cannot update the Slack message");
                }
            });
        } else {
            tracing::warn!(
                "Slack response_url is outside integrations.slack.response_url_prefix; message not updated"
            );
        }
    }
    Ok(StatusCode::OK.into_response())
}

struct Outcome {
    text: String,
    request: Option<RequestView>,
}

/// The principal behind a Slack user: a local principal whose
/// `slack_user` matches, acting with a local principal's authentication.
fn principal_for(app: &App, slack_user: &str) -> Option<(Principal, bool)> {
    let p = app
        .config
        .principals
        .iter()
        .find(|p| p.slack_user.as_deref() == Some(slack_user))?;
    let groups = p.groups.iter().cloned().collect();
    let admin = p
        .groups
        .iter()
        .any(|g| app.config.server.admin_groups.contains(g));
    let has_totp = p.totp_secret_env.is_some() || p.totp_secret_file.is_some();
    Some((Principal::local(p.name.clone(), groups, admin), has_totp))
}

fn console_or_cli(app: &App, id: &str, verb: &str) -> String {
    match &app.config.server.public_url {
        Some(base) => format!("{}/requests/{id}", base.trim_end_matches('/')),
        None => format!("`breakglass {verb} {id}`"),
    }
}

/// The e-mail of a Slack user, from `users.info` with the bot token.
async fn email_of(slack: &Slack, user: &str) -> Result<String, String> {
    let Some(token) = slack.bot_token.clone() else {
        return Err("no bot token".into());
    };
    let url = format!("{}/users.info", slack.api_url);
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("user", user)
        .finish();
    tokio::task::spawn_blocking(move || {
        let v = crate::identity::keys::read_json(
            crate::identity::keys::http_agent()
                .post(&url)
                .header("Authorization", format!("Bearer {token}"))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .send(body),
            USER_INFO_LEN_MAX,
        )
        .map_err(|e| format!("POST {url}: {e}"))?;
        if v["ok"] != true {
            return Err(format!("users.info refused: {}", v["error"]));
        }
        v["user"]["profile"]["email"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                "users.info names no e-mail (the app needs the users:read.email scope)".into()
            })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// The identity provider's person behind a Slack user who is no local
/// principal's `slack_user`: the one whose verified e-mail is the Slack
/// user's, as their unexpired ID token made them. The error says why not.
async fn person_for(app: &App, slack: &Slack, slack_user: &str) -> Result<Principal, String> {
    let unlinked = "your Slack user is not linked to a breakglass principal (slack_user)";
    if app.identity.oidc().is_none() || slack.bot_token.is_none() {
        return Err(unlinked.into());
    }
    let email = email_of(slack, slack_user).await.map_err(|e| {
        tracing::warn!(slack_user, error = %e, "cannot look up a Slack user's e-mail");
        format!("{unlinked}, and its e-mail cannot be looked up")
    })?;
    app.identity.person_by_email(&email, now()).ok_or_else(|| {
        format!(
            "{email} has not signed in to breakglass with the identity provider recently (no unexpired ID token of theirs seen here)"
        )
    })
}

async fn act(app: &App, slack: &Slack, slack_user: &str, action_id: &str, id: &str) -> Outcome {
    let req: Option<Request> = app.store.get(id).await.ok().flatten();
    let view = req
        .as_ref()
        .map(|r| RequestView::new(r, crate::notify::drill_label(r)));
    let say = |text: String, request: Option<RequestView>| Outcome { text, request };
    let Some(req) = req else {
        return say(format!("no request {id}"), None);
    };
    let (who, has_totp) = match principal_for(app, slack_user) {
        Some(local) => local,
        None => match person_for(app, slack, slack_user).await {
            Ok(person) => (person, false),
            Err(why) => {
                return say(
                    format!("{why}; decide with {}", console_or_cli(app, id, "approve")),
                    view,
                );
            }
        },
    };
    let verb = match action_id {
        SLACK_ACTION_APPROVE => "approve",
        SLACK_ACTION_DENY => "deny",
        _ => return say("unknown action".into(), view),
    };
    // Where the policy wants a fresh sign-in, or the principal a one-time
    // code, a chat click is not enough: send them to the console.
    if req.approver_fresh_auth_s.is_some() || has_totp {
        return say(
            format!(
                "{} needs a fresh sign-in to {verb} this request: {}",
                who.name,
                console_or_cli(app, id, verb)
            ),
            view,
        );
    }
    let cmd = match verb {
        "approve" => Command::Approve {
            comment: Some("from Slack".into()),
        },
        _ => Command::Deny {
            reason: "denied from Slack".into(),
        },
    };
    match app.act(&who, id, cmd).await {
        Ok(r) => {
            let text = match (verb, r.state) {
                ("deny", _) => format!("denied by {}", who.name),
                (_, breakglass_core::State::Active) if r.countersignature.is_some() => {
                    format!("countersigned by {}", who.name)
                }
                (_, breakglass_core::State::Active) => {
                    format!("approved by {}: active", who.name)
                }
                _ => format!(
                    "approved by {} ({} of {} approvals)",
                    who.name,
                    r.approvals.len(),
                    r.approvals_required
                ),
            };
            say(
                text,
                Some(RequestView::new(&r, crate::notify::drill_label(&r))),
            )
        }
        Err(e) if e.is_internal() => {
            tracing::error!(error = %e, "Slack action failed");
            say("failed: internal error; see the server log".into(), view)
        }
        Err(e) => say(format!("refused: {e}"), view),
    }
}

/// The OpenAPI security scheme of the Slack route: Slack's request
/// signature (`X-Slack-Signature`, with `X-Slack-Request-Timestamp`).
pub struct SlackSignature;

impl utoipa::Modify for SlackSignature {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "slack_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Slack-Signature",
                "v0=<hex HMAC-SHA256 of \"v0:{X-Slack-Request-Timestamp}:{body}\"> with the Slack app's signing secret",
            ))),
        );
    }
}

/// The routes of this module.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/integrations/slack/actions", post(slack_actions))
}
