//! A client of the gateway itself, for drills: sign in with a grant
//! credential, run one command, and keep the connection open so the caller
//! can watch the gateway cut it when the grant ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::{ChannelMsg, client};

use crate::keys::parse_public_key;
use crate::upstream::Pinned;

/// Bytes of the command's output kept for an error message.
const OUTPUT_KEPT_MAX: usize = 512;
/// How often [`Probe::closed_within`] looks at the connection.
const CLOSED_POLL_MS: u64 = 10;

/// A signed-in connection through the gateway whose command has run.
pub struct Probe {
    handle: client::Handle<Pinned>,
}

/// Signs in to `target` at the gateway `addr` (whose host key must be
/// `host_key`, as `ssh-ed25519 AAAA...`) with the grant `credential`, runs
/// `command` and waits for it to exit 0. The error is one line saying why.
pub async fn exec(
    addr: SocketAddr,
    host_key: &str,
    target: &str,
    credential: &str,
    command: &str,
    timeout: Duration,
) -> Result<Probe, String> {
    let key = parse_public_key(host_key).map_err(|e| format!("the gateway's host key: {e}"))?;
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    });
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the SSH gateway at {addr}: {e}"))?;
        let mut handle = client::connect_stream(config, tcp, Pinned::new(key))
            .await
            .map_err(|e| format!("cannot set up SSH with the gateway at {addr}: {e}"))?;
        let signed_in = handle
            .authenticate_password(target, credential)
            .await
            .map_err(|e| format!("the gateway failed during sign-in: {e}"))?;
        if !signed_in.success() {
            return Err(format!(
                "the gateway refused the grant credential for {target}"
            ));
        }
        let mut channel = handle
            .channel_open_session()
            .await
            .map_err(|e| format!("the gateway opened no session channel: {e}"))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| format!("cannot run {command:?}: {e}"))?;
        let mut output = Vec::new();
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                    let room = OUTPUT_KEPT_MAX.saturating_sub(output.len());
                    output.extend_from_slice(&data[..data.len().min(room)]);
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Failure => {
                    return Err(format!("the gateway refused to run {command:?}"));
                }
                _ => {}
            }
        }
        let said = String::from_utf8_lossy(&output).trim().to_string();
        match status {
            Some(0) => Ok(Probe { handle }),
            Some(n) => Err(format!("{command:?} exited with {n}: {said}")),
            None => Err(format!("{command:?} ended without an exit status: {said}")),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{command:?} through the SSH gateway at {addr} did not finish within {}s",
            timeout.as_secs()
        )),
    }
}

impl Probe {
    /// Whether the gateway closed the connection within `timeout`.
    pub async fn closed_within(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.handle.is_closed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(CLOSED_POLL_MS)).await;
        }
        true
    }
}
