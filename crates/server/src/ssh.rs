//! The SSH gateway's side of the application: its targets in the config,
//! the [`breakglass_gateway_ssh::Authority`] (grant credential → where and
//! as whom to log in), its keys in the data dir, and starting it.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use breakglass_gateway_ssh::keys::{fingerprint, load_or_create, parse_public_key};
use breakglass_gateway_ssh::{
    Authority, Authorized, GatewayKeys, Refusal, SshGateway, UpstreamLogin, UpstreamTarget,
};
use tokio::net::TcpListener;

use crate::app::{App, RefusalKind};
use crate::config::TargetConfig;
use crate::gateway::GatewayAuthority;

/// Upstream addresses are at most this long.
const UPSTREAM_LEN_MAX: usize = 512;

/// `ssh://host[:port]` (port 22 by default) into host and port.
pub fn parse_upstream(url: &str) -> Result<(String, u16), String> {
    if url.len() > UPSTREAM_LEN_MAX {
        return Err(format!("longer than {UPSTREAM_LEN_MAX} characters"));
    }
    let rest = url
        .strip_prefix("ssh://")
        .ok_or_else(|| format!("{url:?}: expected ssh://host[:port]"))?;
    if rest.contains(['/', '@', '?', '#']) || rest.is_empty() {
        return Err(format!(
            "{url:?}: expected ssh://host[:port] (no user, path or query; the role says the user)"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed ["))?;
        (h.to_string(), tail.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        None => 22,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((host, port))
}

/// Checks an `ssh` target; the error starts with the key it names.
pub fn validate_target(t: &TargetConfig) -> Result<(), String> {
    let url = t
        .upstream
        .as_deref()
        .ok_or("upstream: an ssh target needs upstream = \"ssh://host:22\"")?;
    parse_upstream(url).map_err(|e| format!("upstream: {e}"))?;
    let key = t.host_key.as_deref().ok_or(
        "host_key: an ssh target needs its upstream's host key pinned (the line of /etc/ssh/ssh_host_ed25519_key.pub); there is no trust on first use",
    )?;
    parse_public_key(key).map_err(|e| format!("host_key: {e}"))?;
    for (name, role) in &t.roles {
        if role.user.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "roles.{name}.user: an ssh target's role needs the login user on the target"
            ));
        }
        if role.password_env.is_some() || role.password_file.is_some() {
            return Err(format!(
                "roles.{name}: ssh targets log in with a certificate or key_file, not a password"
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl Authority for GatewayAuthority {
    async fn authorize(&self, target: &str, credential: &str) -> Result<Authorized, Refusal> {
        let (app, t) = self.ssh_target(target)?;
        let grant = app.check_grant(credential, None, Some(target)).await;
        Self::authorized(t, grant)
    }

    async fn authorize_certificate(
        &self,
        target: &str,
        credential_hash: [u8; 32],
    ) -> Result<Authorized, Refusal> {
        let (app, t) = self.ssh_target(target)?;
        let grant = app
            .check_grant_hash(credential_hash, None, Some(target))
            .await;
        Self::authorized(t, grant)
    }
}

impl GatewayAuthority {
    /// The node, if it admits sign-ins, and the SSH target named `target`.
    fn ssh_target(&self, target: &str) -> Result<(Arc<App>, TargetConfig), Refusal> {
        let app = self.admitting().map_err(Refusal::Unavailable)?;
        let t = app
            .config
            .target(target)
            .ok_or_else(|| Refusal::UnknownTarget(format!("no target named {target:?}")))?;
        if t.kind != "ssh" {
            return Err(Refusal::UnknownTarget(format!(
                "target {target:?} is not an SSH target (kind {})",
                t.kind
            )));
        }
        let t = t.clone();
        Ok((app, t))
    }

    /// What the gateway needs for a sign-in to `t` with `grant`.
    fn authorized(
        t: TargetConfig,
        grant: Result<crate::app::GrantCheck, crate::app::GrantRefusal>,
    ) -> Result<Authorized, Refusal> {
        let target = t.name.as_str();
        let grant = grant.map_err(|r| match r.answer(target, None) {
            (RefusalKind::BadCredential, why) => Refusal::BadCredential(why),
            (RefusalKind::NotAuthorized, why) => Refusal::NotAuthorized(why),
            (RefusalKind::Unavailable, why) => Refusal::Unavailable(why),
        })?;
        let role = t.roles.get(&grant.request.role).ok_or_else(|| {
            Refusal::NotAuthorized(format!(
                "role {:?} is no longer configured on {target:?}",
                grant.request.role
            ))
        })?;
        // Validated at start-up; a failure here is a configuration change
        // the process has not seen.
        let bad_config = |e: String| {
            tracing::error!(target_name = %t.name, error = %e, "ssh target misconfigured");
            Refusal::Unavailable("the target is misconfigured; see the server log".into())
        };
        let (host, port) =
            parse_upstream(t.upstream.as_deref().unwrap_or("")).map_err(bad_config)?;
        let host_key = parse_public_key(t.host_key.as_deref().unwrap_or("")).map_err(bad_config)?;
        let expires_at = grant.ends_at();
        Ok(Authorized {
            request_id: grant.request.id.clone(),
            principal: grant.request.requester.clone(),
            target: t.name.clone(),
            role: grant.request.role.clone(),
            expires_at,
            port_forwarding: role.port_forwarding,
            file_transfer: role.file_transfer,
            upstream: UpstreamTarget {
                host,
                port,
                host_key,
                user: role.user.clone().unwrap_or_default(),
                login: match &role.key_file {
                    Some(f) => UpstreamLogin::KeyFile(f.clone()),
                    None => UpstreamLogin::Certificate,
                },
            },
        })
    }
}

/// Reads every role's `key_file` of every ssh target, so a missing or
/// unusable key stops start-up instead of surfacing at sign-in while a
/// grant's clock runs. The error names the target, the role and the file.
pub fn check_key_files(config: &crate::config::Config) -> anyhow::Result<()> {
    for (i, t) in config.targets.iter().enumerate() {
        if t.kind != "ssh" {
            continue;
        }
        for (name, role) in &t.roles {
            if let Some(path) = &role.key_file {
                breakglass_gateway_ssh::keys::read_private_key(path).map_err(|e| {
                    anyhow::anyhow!(
                        "targets[{i}].roles.{name}.key_file: target {} role {name}: cannot use the upstream key: {e}",
                        t.name
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// The gateway's host and CA keys, created in the data dir when absent;
/// the client CA's private key goes to `app.ssh_client_ca` (the API signs
/// `connect`'s certificates with it).
pub fn gateway_keys(app: &App) -> anyhow::Result<Option<GatewayKeys>> {
    let (Some(host), Some(ca), Some(client)) = (
        app.config.ssh_host_key_file(),
        app.config.ssh_user_ca_key_file(),
        app.config.ssh_client_ca_key_file(),
    ) else {
        return Ok(None);
    };
    let (host_key, created) =
        load_or_create(&host).context("gateway.ssh.host_key_file: cannot load or create")?;
    let fp = fingerprint(host_key.public_key());
    if created {
        tracing::warn!(fingerprint = %fp, path = %host.display(), "created the SSH gateway's host key");
    }
    tracing::info!(fingerprint = %fp, "SSH gateway host key");
    let (user_ca, created) =
        load_or_create(&ca).context("gateway.ssh.user_ca_key_file: cannot load or create")?;
    let ca_pub = user_ca.public_key().to_openssh().unwrap_or_default();
    if created {
        tracing::warn!(path = %ca.display(), public_key = %ca_pub, "created the SSH user CA; put its public key into the targets' TrustedUserCAKeys");
    }
    let (client_ca, created) =
        load_or_create(&client).context("gateway.ssh.client_ca_key_file: cannot load or create")?;
    if created {
        tracing::warn!(path = %client.display(), "created the SSH client CA (certificates for `breakglass connect`); nodes that share a store must share this key");
    }
    let client_pub = client_ca.public_key().clone();
    let _ = app.ssh_client_ca.set(client_ca);
    Ok(Some(GatewayKeys {
        host_key,
        user_ca,
        client_ca: client_pub,
    }))
}

/// Starts the SSH gateway when configured; returns where it listens.
pub async fn start(
    app: &Arc<App>,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(cfg) = app.config.gateway.ssh.clone() else {
        return Ok(None);
    };
    check_key_files(&app.config)?;
    let Some(keys) = gateway_keys(app)? else {
        return Ok(None);
    };
    let _ = app.ssh_host_key.set(
        keys.host_key
            .public_key()
            .to_openssh()
            .context("gateway.ssh: cannot encode the host key")?,
    );
    let authority = Arc::new(GatewayAuthority {
        app: Arc::downgrade(app),
    });
    let gw = SshGateway::new(
        cfg.clone(),
        keys,
        authority,
        app.config.recordings_dir(),
        app.sessions.clone(),
    )
    .context("gateway.ssh: cannot start")?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("gateway.ssh.listen: cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    background.push(tokio::spawn(gw.serve(listener)));
    Ok(Some(addr))
}

/// A cast is at most this long; longer sessions are read page by page as
/// JSON lines.
pub const CAST_LEN_MAX: usize = 256 * 1024 * 1024;

/// A session's recording as an asciicast v2 file, verified as it is read.
pub async fn recording_cast(
    app: &App,
    who: &breakglass_core::Principal,
    session_id: &str,
) -> Result<String, crate::app::AppError> {
    use crate::app::AppError;
    let (path, _) = app.visible_recording(who, session_id).await?;
    let id = session_id.to_string();
    tokio::task::spawn_blocking(move || {
        let mut cast = breakglass_gateway_ssh::cast::CastBuilder::new();
        breakglass_gateway_common::recording::read_recording(&path, |v| cast.push(v)).map_err(
            |e| {
                tracing::error!(session = %id, error = %e, "recording does not verify");
                AppError::Conflict("recording_broken", e.to_string())
            },
        )?;
        let text = cast
            .finish()
            .map_err(|e| AppError::BadInput(e.to_string()))?;
        if text.len() > CAST_LEN_MAX {
            return Err(AppError::BadInput(format!(
                "the cast would be longer than {CAST_LEN_MAX} bytes; read the recording page by page as JSON lines instead"
            )));
        }
        Ok(text)
    })
    .await
    .map_err(|e| AppError::BadInput(format!("cannot read recording: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::parse_upstream;

    #[test]
    fn upstream_addresses() {
        assert_eq!(parse_upstream("ssh://db1:2200"), Ok(("db1".into(), 2200)));
        assert_eq!(
            parse_upstream("ssh://10.0.0.1"),
            Ok(("10.0.0.1".into(), 22))
        );
        assert_eq!(parse_upstream("ssh://[::1]:22"), Ok(("::1".into(), 22)));
        for bad in [
            "db1:22",
            "ssh://",
            "ssh://root@db1",
            "ssh://db1:0",
            "ssh://db1:99999",
            "ssh://db1/x",
            "ssh://:22",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }
}
