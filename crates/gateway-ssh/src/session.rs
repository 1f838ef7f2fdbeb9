//! One client connection: the russh server handler that signs the client
//! in with a grant credential, connects the upstream, relays session
//! channels while recording them, refuses what the role does not allow,
//! and the cut.
//!
//! Recording entries (each also has `seq`, `time`, `kind`, `hash`):
//! - `session`: the header (protocol `ssh`, principal, grant, target,
//!   role, upstream user and address, client);
//! - `channel` `{channel}`: a session channel opened;
//! - `pty` `{channel, term, cols, rows}`, `r` `{channel, cols, rows}`:
//!   the terminal and its resizes;
//! - `shell` `{channel}`, `exec` `{channel, command}`: what runs;
//! - `i` / `o` `{channel, data | b64[, stream]}`: input from the client,
//!   output from the target (`stream: "stderr"` for extended data), as
//!   text or base64, whichever is shorter (see
//!   [`breakglass_gateway_common::data`]);
//! - `signal` `{channel, signal}`, `exit` `{channel, status}` or
//!   `{channel, signal}`, `eof` and `close` `{channel}`;
//! - `forward` `{channel, host, port, originator[, remote]}`: a forwarded
//!   TCP connection (`ssh -L`, or `ssh -R` with `remote: true`; roles
//!   with `port_forwarding = true`), whose bytes are `forward_in` (from
//!   the client) / `forward_out` (from the target) `{channel, data |
//!   b64}`; `remote_forward` `{address, port}`: a port the target listens
//!   on for the client;
//! - `subsystem` `{channel, name: "sftp"}`, then `file` `{channel, path,
//!   direction: upload | download, size, sha256 | null, closed}` per file
//!   handle and `sftp` `{channel, op, path, target?}` per change to the
//!   tree (roles with `file_transfer = true`; see [`crate::sftp`]);
//! - `refused` `{channel?, what, detail}`: SFTP, scp, forwarding, agent,
//!   X11 and anything else the gateway refused;
//! - `end` `{reason}`.
//!
//! Input is written to the recording before it is forwarded upstream, and
//! output before it is forwarded to the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakglass_core::Timestamp;
use breakglass_core::slots::{Slot, SlotRefusal};
use breakglass_gateway_common::data::Data;
use breakglass_gateway_common::recording::{Field, Recording};
use breakglass_gateway_common::{Cut, SessionEnd, SessionInfo, cut_of};
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Response, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelWriteHalf, Pty, Sig, client};
use serde_json::json;
use tokio::sync::{Notify, watch};

use crate::upstream::{self, Upstream};
use crate::{Authorized, COMMAND_LEN_MAX, Shared, TERM_LEN_MAX, TERMINAL_SIZE_MAX};

/// The longest host name a forwarded connection may name (DNS's limit).
const FORWARD_HOST_LEN_MAX: usize = 253;

/// After the cut line is queued, the connection is closed at the latest
/// this much later, whatever the client does.
const CUT_GRACE_MS: u64 = 50;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A signed-in session with its upstream.
struct Live {
    auth: Authorized,
    info: SessionInfo,
    /// The recording; `None` once its end is written (nothing may follow
    /// the `end` entry that `session.ended` names).
    rec: Mutex<Option<Recording>>,
    upstream: Upstream,
    /// Client channels open now, and what each is.
    channels: Mutex<HashMap<ChannelId, Open>>,
    /// The SFTP channels (roles with `file_transfer = true`) and what each
    /// has moved so far.
    sftp: Mutex<HashMap<ChannelId, crate::sftp::Tracker>>,
    /// Connections the target forwards for `ssh -R`, until the relay task
    /// takes them at sign-in.
    forwarded: Mutex<Option<tokio::sync::mpsc::Receiver<upstream::Forwarded>>>,
    /// Set once, by whatever ends the session first.
    end: Mutex<Option<String>>,
    /// Wakes the cutter at once (expiry seen on the data path, a failed
    /// recording).
    cut_now: Notify,
    cut_reason_now: Mutex<Option<Cut>>,
    /// The cutter finished telling the client; close the connection.
    closed: Notify,
}

impl Live {
    /// Writes one entry; a failure cuts the session (nothing unrecorded is
    /// forwarded).
    fn record(&self, kind: &str, fields: &[(&str, Field<'_>)]) -> bool {
        let mut rec = lock(&self.rec);
        let Some(rec) = rec.as_mut() else {
            return false;
        };
        match rec.append(kind, fields, Timestamp::now()) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(session = %self.info.session_id, error = %e, "cannot write the session recording; cutting the session");
                self.cut(Cut::new("recording_failed"));
                false
            }
        }
    }

    /// Records bytes that crossed the gateway.
    fn record_data(&self, kind: &str, channel: ChannelId, data: &[u8], stderr: bool) -> bool {
        let ch = u64::from(u32::from(channel));
        let data = Data::of(data);
        let mut fields: Vec<(&str, Field<'_>)> = vec![data.field(), ("channel", Field::U64(ch))];
        if stderr {
            fields.push(("stream", Field::Str("stderr")));
        }
        fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
        self.record(kind, &fields)
    }

    /// Bytes of an SFTP channel (`from_client` or from the target): what
    /// they complete is recorded, file contents are not. `None` when the
    /// channel is not an SFTP channel; `Some(Err(why))` when it must be cut
    /// (a packet beyond the limits, or a failed recording), with the line
    /// the client is told.
    fn record_sftp(
        &self,
        channel: ChannelId,
        data: &[u8],
        from_client: bool,
    ) -> Option<Result<(), String>> {
        let events = {
            let mut all = lock(&self.sftp);
            let t = all.get_mut(&channel)?;
            if from_client {
                t.client(data)
            } else {
                t.server(data).map(|()| Vec::new())
            }
        };
        Some(match events {
            Ok(events) => {
                if events.iter().all(|e| self.record_sftp_event(channel, e)) {
                    Ok(())
                } else {
                    Err("breakglass: the session recording failed; SFTP channel closed\r\n".into())
                }
            }
            Err(why) => {
                tracing::info!(session = %self.info.session_id, reason = %why, "sftp channel cut");
                self.record(
                    "refused",
                    &[
                        ("channel", Field::U64(u64::from(u32::from(channel)))),
                        ("detail", Field::Str(&why)),
                        ("what", Field::Str("sftp")),
                    ],
                );
                Err(format!("breakglass: {why}; SFTP channel closed\r\n"))
            }
        })
    }

    fn record_sftp_event(&self, channel: ChannelId, e: &crate::sftp::Event) -> bool {
        let ch = Field::U64(u64::from(u32::from(channel)));
        match e {
            crate::sftp::Event::File {
                path,
                direction,
                size,
                sha256,
                closed,
            } => self.record(
                "file",
                &[
                    ("channel", ch),
                    (
                        "closed",
                        Field::Json(if *closed { "true" } else { "false" }),
                    ),
                    ("direction", Field::Str(direction)),
                    ("path", Field::Str(path)),
                    (
                        "sha256",
                        sha256.as_deref().map_or(Field::Json("null"), Field::Plain),
                    ),
                    ("size", Field::U64(*size)),
                ],
            ),
            crate::sftp::Event::Op { op, path, target } => {
                let mut fields = vec![
                    ("channel", ch),
                    ("op", Field::Str(op)),
                    ("path", Field::Str(path)),
                ];
                if let Some(t) = target {
                    fields.push(("target", Field::Str(t)));
                }
                self.record("sftp", &fields)
            }
        }
    }

    /// The SFTP channel ended: the files still open are recorded.
    fn finish_sftp(&self, channel: ChannelId) {
        let left = lock(&self.sftp).remove(&channel).map(|mut t| t.finish());
        for e in left.unwrap_or_default() {
            self.record_sftp_event(channel, &e);
        }
    }

    /// Asks the cutter to end the session now.
    fn cut(&self, cut: Cut) {
        lock(&self.cut_reason_now).get_or_insert(cut);
        self.cut_now.notify_one();
    }

    /// The data path's own look at the clock: a grant past its end is cut
    /// even if the timer is late. `false` when it has ended.
    fn within_grant(&self) -> bool {
        if Timestamp::now() >= self.auth.expires_at {
            self.cut(Cut::new("expired"));
            return false;
        }
        true
    }
}

/// A client channel and its upstream twin.
enum Chan {
    Relayed {
        up: ChannelWriteHalf<client::Msg>,
        /// A shell, a command or a subsystem runs on it (one at most).
        started: bool,
    },
    /// A forwarded TCP connection (`ssh -L`): bytes only, no requests.
    Forwarded { up: ChannelWriteHalf<client::Msg> },
    /// The session could not start; the first request is told why.
    Failed,
}

/// What an open client channel is, for the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// A session channel without a terminal: the cut line goes to stderr.
    Session,
    /// A session channel with a terminal: the cut line goes to the screen.
    Terminal,
    /// A forwarded connection: closed without a word (its bytes are the
    /// forwarded stream's).
    Forward,
}

/// The russh handler of one connection.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    slot: Slot,
    live: Arc<std::sync::OnceLock<Arc<Live>>>,
    signed_in: Arc<Notify>,
    cut_rx: Option<watch::Receiver<Option<Cut>>>,
    /// Why a signed-in connection has no session (told on its channels).
    failed: Option<String>,
    channels: HashMap<ChannelId, Chan>,
    /// Ports the target listens on for this client (`ssh -R`).
    remote_listens: usize,
}

/// Drives one connection to its end and records the end.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: Result<Slot, SlotRefusal>,
) {
    // INVARIANT: the slot is held until the connection ends.
    let slot = match slot {
        Ok(s) => s,
        Err(r) => {
            tracing::info!(client = %peer, reason = ?r, "ssh gateway connection refused: no free slot");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let live: Arc<std::sync::OnceLock<Arc<Live>>> = Arc::default();
    let signed_in = Arc::new(Notify::new());
    let conn = Conn {
        shared: shared.clone(),
        peer,
        slot: slot.clone(),
        live: live.clone(),
        signed_in: signed_in.clone(),
        cut_rx: None,
        failed: None,
        channels: HashMap::new(),
        remote_listens: 0,
    };
    let config = shared.server_config.clone();
    // Boxed, so that dropping it below closes the connection before the
    // session is finished (a stack pin would live to the end of the scope).
    let mut session = Box::pin(async move {
        match russh::server::run_stream(config, stream, conn).await {
            Ok(running) => running.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    let deadline = tokio::time::Instant::now() + shared.config.handshake();
    enum Phase {
        Done(Result<(), String>),
        Timeout,
        Evicted,
        SignedIn,
    }
    // Until signed in: the handshake deadline and eviction apply.
    let phase = tokio::select! {
        r = &mut session => Phase::Done(r),
        () = tokio::time::sleep_until(deadline) => Phase::Timeout,
        () = slot.evicted() => Phase::Evicted,
        () = signed_in.notified() => Phase::SignedIn,
    };
    let outcome = match phase {
        Phase::Done(r) => Some(r),
        Phase::Timeout => {
            tracing::info!(client = %peer, "ssh gateway connection closed: no sign-in within the handshake timeout");
            None
        }
        Phase::Evicted => {
            tracing::info!(client = %peer, "ssh gateway connection closed to make room for a newer one");
            None
        }
        Phase::SignedIn => {
            // Signed in: run to the end, or until the cutter is done.
            let closed = async {
                match live.get() {
                    Some(l) => l.closed.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut session => Some(r),
                () = closed => {
                    // The cut line is queued; give it a moment, then drop.
                    tokio::time::timeout(Duration::from_millis(CUT_GRACE_MS), &mut session)
                        .await
                        .ok()
                }
            }
        }
    };
    if let Some(Err(e)) = &outcome {
        tracing::debug!(client = %peer, error = %e, "ssh gateway connection ended with an error");
    }
    drop(session);
    if let Some(l) = live.get() {
        finish(&shared, l).await;
    }
}

/// Records the end of a session and releases it.
async fn finish(shared: &Shared, live: &Arc<Live>) {
    // Transfers still open (a cut, a dropped connection) are recorded
    // before the recording ends, not when their relay task gets to it.
    let open: Vec<ChannelId> = lock(&live.sftp).keys().copied().collect();
    for ch in open {
        live.finish_sftp(ch);
    }
    let reason = lock(&live.end)
        .get_or_insert_with(|| "client_closed".to_string())
        .clone();
    let _ = live
        .upstream
        .disconnect(russh::Disconnect::ByApplication, "session ended", "")
        .await;
    let end = {
        let Some(mut rec) = lock(&live.rec).take() else {
            return;
        };
        if let Err(e) = rec.append("end", &[("reason", Field::Str(&reason))], Timestamp::now()) {
            tracing::error!(session = %live.info.session_id, error = %e, "cannot write the end of a session recording");
        }
        if let Err(e) = rec.close() {
            tracing::error!(session = %live.info.session_id, error = %e, "cannot close a session recording");
        }
        SessionEnd {
            reason: reason.clone(),
            statements: rec.statements(),
            entries: rec.entries(),
            final_hash: rec.final_hash(),
        }
    };
    shared.authority.session_ended(&live.info, &end).await;
    shared
        .sessions
        .unregister(&live.auth.request_id, &live.info.session_id);
    tracing::info!(session = %live.info.session_id, reason = %reason, "ssh session ended");
}

/// Waits for the grant's end (cut, expiry, the data path's own check) and
/// cuts: one line on every channel, then the channels, the upstream and
/// the client connection close.
async fn cutter(live: Arc<Live>, mut cut_rx: watch::Receiver<Option<Cut>>, client: Handle) {
    let expiry = {
        let left = live.auth.expires_at.millis() - Timestamp::now().millis();
        tokio::time::Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
    };
    let cut = tokio::select! {
        r = cut_rx.changed() => match r {
            Ok(()) => cut_of(&cut_rx),
            // The registry dropped the sender: fail closed.
            Err(_) => Cut::new("revoked"),
        },
        () = tokio::time::sleep_until(expiry) => Cut::new("expired"),
        () = live.cut_now.notified() => lock(&live.cut_reason_now).clone().unwrap_or_else(|| Cut::new("revoked")),
    };
    {
        let mut end = lock(&live.end);
        if end.is_some() {
            return;
        }
        *end = Some(cut.reason.clone());
    }
    tracing::info!(session = %live.info.session_id, reason = %cut.reason, "cutting ssh session");
    // The upstream goes first: nothing more runs there.
    let message = cut.message();
    let upstream = live
        .upstream
        .disconnect(russh::Disconnect::ByApplication, &message, "");
    let _ = tokio::time::timeout(Duration::from_millis(CUT_GRACE_MS), upstream).await;
    let line = format!("\r\n{message}\r\n");
    let channels: Vec<(ChannelId, Open)> =
        lock(&live.channels).iter().map(|(c, o)| (*c, *o)).collect();
    for (ch, open) in channels {
        let bytes = line.clone().into_bytes();
        match open {
            Open::Terminal => {
                let _ = client.data(ch, bytes).await;
            }
            Open::Session => {
                let _ = client.extended_data(ch, 1, bytes).await;
            }
            Open::Forward => {}
        }
        if open != Open::Forward {
            let _ = client.exit_status_request(ch, 255).await;
        }
        let _ = client.eof(ch).await;
        let _ = client.close(ch).await;
    }
    let _ = client
        .disconnect(
            russh::Disconnect::ByApplication,
            cut.message(),
            String::new(),
        )
        .await;
    live.closed.notify_one();
}

/// Relays one upstream channel to its client channel, recording output
/// before forwarding it.
async fn pump(
    live: Arc<Live>,
    mut up: russh::ChannelReadHalf,
    client: Handle,
    ch: ChannelId,
    out: &'static str,
) {
    let chan = u64::from(u32::from(ch));
    while let Some(msg) = up.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if !live.within_grant() {
                    break;
                }
                match live.record_sftp(ch, &data, false) {
                    Some(Ok(())) => {}
                    Some(Err(line)) => {
                        let _ = client.extended_data(ch, 1, line.into_bytes()).await;
                        break;
                    }
                    None => {
                        if !live.record_data(out, ch, &data, false) {
                            break;
                        }
                    }
                }
                if client.data(ch, data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                if !live.within_grant() || !live.record_data(out, ch, &data, true) {
                    break;
                }
                if client.extended_data(ch, ext, data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::ExitStatus { exit_status } => {
                live.record(
                    "exit",
                    &[
                        ("channel", Field::U64(chan)),
                        ("status", Field::U64(u64::from(exit_status))),
                    ],
                );
                let _ = client.exit_status_request(ch, exit_status).await;
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                let name = format!("{signal_name:?}");
                live.record(
                    "exit",
                    &[("channel", Field::U64(chan)), ("signal", Field::Str(&name))],
                );
                let _ = client
                    .exit_signal_request(ch, signal_name, core_dumped, error_message, lang_tag)
                    .await;
            }
            ChannelMsg::Eof => {
                live.record("eof", &[("channel", Field::U64(chan))]);
                let _ = client.eof(ch).await;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    live.finish_sftp(ch);
    if lock(&live.channels).remove(&ch).is_some() {
        live.record("close", &[("channel", Field::U64(chan))]);
        let _ = client.close(ch).await;
    }
}

/// Relays the connections the target forwards for `ssh -R` (roles with
/// `port_forwarding = true`) to the client, each recorded like a local
/// forward: `forward` with `remote: true`, then its bytes.
async fn remote_forwards(
    live: Arc<Live>,
    mut forwarded: tokio::sync::mpsc::Receiver<upstream::Forwarded>,
    client: Handle,
    max_channels: usize,
) {
    while let Some(f) = forwarded.recv().await {
        // Refused (the reply dropped) once the grant has ended, or when
        // the connection has as many channels as it may: whoever connects
        // on the target's side must not open channels without bound.
        if !live.within_grant() {
            continue;
        }
        if lock(&live.channels).len() >= max_channels {
            live.record(
                "refused",
                &[
                    ("detail", Field::Str("too many channels on this connection")),
                    ("what", Field::Str("port_forwarding")),
                ],
            );
            continue;
        }
        let Ok(to_client) = client
            .channel_open_forwarded_tcpip(
                f.connected_address.clone(),
                f.connected_port,
                f.originator_address.clone(),
                f.originator_port,
            )
            .await
        else {
            continue;
        };
        let id = to_client.id();
        let origin = format!("{}:{}", f.originator_address, f.originator_port);
        if !live.record(
            "forward",
            &[
                ("channel", Field::U64(u64::from(u32::from(id)))),
                ("host", Field::Str(&f.connected_address)),
                ("originator", Field::Str(&origin)),
                ("port", Field::U64(u64::from(f.connected_port))),
                ("remote", Field::Json("true")),
            ],
        ) {
            let _ = to_client.close().await;
            continue;
        }
        f.reply.accept().await;
        lock(&live.channels).insert(id, Open::Forward);
        let (client_read, client_write) = to_client.split();
        drop(client_write);
        let (up_read, up_write) = f.channel.split();
        tokio::spawn(pump(
            live.clone(),
            up_read,
            client.clone(),
            id,
            "forward_out",
        ));
        tokio::spawn(relay_in(live.clone(), client_read, up_write, id));
    }
}

/// Relays what the client sends on a channel the gateway opened to it
/// (a remote forward) to the target, recording it first.
async fn relay_in(
    live: Arc<Live>,
    mut from_client: russh::ChannelReadHalf,
    up: ChannelWriteHalf<client::Msg>,
    ch: ChannelId,
) {
    while let Some(msg) = from_client.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if !live.within_grant() || !live.record_data("forward_in", ch, &data, false) {
                    break;
                }
                if up.data_bytes(data.to_vec()).await.is_err() {
                    break;
                }
            }
            ChannelMsg::Eof => {
                let _ = up.eof().await;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = up.close().await;
}

/// What a client signed in with.
enum Presented<'a> {
    /// A grant credential (password or keyboard-interactive).
    Token(&'a str),
    /// A client certificate standing for the credential with this SHA-256.
    Certificate([u8; 32]),
}

impl Conn {
    async fn sign_in(&mut self, target: &str, presented: Presented<'_>) -> Auth {
        if self.live.get().is_some() || self.failed.is_some() {
            return Auth::reject();
        }
        let authority = &self.shared.authority;
        let checked = match presented {
            Presented::Token(credential) => authority.authorize(target, credential).await,
            Presented::Certificate(hash) => authority.authorize_certificate(target, hash).await,
        };
        let auth = match checked {
            Ok(a) => a,
            Err(r) => {
                tracing::info!(client = %self.peer, target, reason = r.message(), "ssh sign-in refused");
                return Auth::reject();
            }
        };
        // INVARIANT: a connection is evictable until it showed a valid
        // credential.
        if !self.slot.authenticate() {
            return Auth::reject();
        }
        match self.start(auth).await {
            Ok((live, rx)) => {
                let _ = self.live.set(live);
                self.cut_rx = Some(rx);
            }
            Err(why) => {
                tracing::info!(client = %self.peer, target, reason = %why, "ssh session refused after sign-in");
                self.failed = Some(why);
            }
        }
        Auth::Accept
    }

    /// Registers the session, checks the grant once more, connects the
    /// upstream and opens the recording; the error is the line the client
    /// is told.
    async fn start(
        &mut self,
        auth: Authorized,
    ) -> Result<(Arc<Live>, watch::Receiver<Option<Cut>>), String> {
        let shared = &self.shared;
        let session_id = uuid::Uuid::now_v7().to_string();
        // INVARIANT: registered before the grant is checked for the last
        // time, so a grant that ends at any moment ends the session.
        let Some(rx) = shared.sessions.register(
            &auth.request_id,
            &session_id,
            shared.config.max_connections_per_grant,
        ) else {
            return Err("breakglass: too many sessions for this grant".into());
        };
        let unregister = || shared.sessions.unregister(&auth.request_id, &session_id);
        if let Err(reason) = shared.authority.grant_live(&auth.request_id).await {
            unregister();
            return Err(Cut::new(&reason).message());
        }
        let (forwarded_tx, forwarded_rx) =
            tokio::sync::mpsc::channel(upstream::FORWARDED_QUEUE_LEN);
        let up = match upstream::connect(
            &auth,
            &session_id,
            &shared.user_ca,
            shared.config.packet_len_max,
            forwarded_tx,
        )
        .await
        {
            Ok(u) => u,
            Err(e) => {
                unregister();
                tracing::warn!(target_name = %auth.target, error = %e, "ssh upstream refused");
                return Err(format!("breakglass: {e}"));
            }
        };
        let info = SessionInfo {
            session_id: session_id.clone(),
            request_id: auth.request_id.clone(),
            principal: auth.principal.clone(),
            target: auth.target.clone(),
            role: auth.role.clone(),
            upstream_user: auth.upstream.user.clone(),
            client: self.peer,
            protocol: "ssh",
        };
        let header = json!({
            "protocol": "ssh",
            "session_id": session_id,
            "request_id": auth.request_id,
            "principal": auth.principal,
            "target": auth.target,
            "role": auth.role,
            "upstream_user": auth.upstream.user,
            "upstream": format!("{}:{}", auth.upstream.host, auth.upstream.port),
            "client": self.peer.to_string(),
            "expires_at": auth.expires_at.to_rfc3339(),
        });
        let rec = match shared.recorder.open(&session_id, header, Timestamp::now()) {
            Ok(r) => r,
            Err(e) => {
                unregister();
                tracing::error!(error = %e, "cannot open a session recording");
                return Err("breakglass: cannot record the session right now; refused".into());
            }
        };
        if let Err(e) = shared.authority.session_started(&info).await {
            unregister();
            if let Err(e) = shared.recorder.discard(rec, &session_id) {
                tracing::error!(error = %e, "cannot remove the recording of a refused session");
            }
            tracing::error!(error = %e, "cannot audit a session start");
            return Err("breakglass: cannot audit the session right now; refused".into());
        }
        tracing::info!(session = %session_id, request = %auth.request_id, target = %auth.target, "ssh session started");
        Ok((
            Arc::new(Live {
                auth,
                info,
                rec: Mutex::new(Some(rec)),
                upstream: up,
                channels: Mutex::default(),
                sftp: Mutex::default(),
                forwarded: Mutex::new(Some(forwarded_rx)),
                end: Mutex::default(),
                cut_now: Notify::new(),
                cut_reason_now: Mutex::default(),
                closed: Notify::new(),
            }),
            rx,
        ))
    }

    fn live(&self) -> Option<&Arc<Live>> {
        self.live.get()
    }

    /// Tells the client on `channel` why something was refused, records it.
    fn refuse(&self, channel: Option<ChannelId>, what: &str, detail: &str, session: &mut Session) {
        if let Some(live) = self.live() {
            let mut fields: Vec<(&str, Field<'_>)> = Vec::new();
            if let Some(c) = channel {
                fields.push(("channel", Field::U64(u64::from(u32::from(c)))));
            }
            fields.push(("detail", Field::Str(detail)));
            fields.push(("what", Field::Str(what)));
            live.record("refused", &fields);
        }
        tracing::info!(client = %self.peer, what, detail, "ssh request refused");
        if let Some(c) = channel {
            let line = format!("breakglass: {detail}\r\n");
            let _ = session.extended_data(c, 1, line.into_bytes());
        }
    }

    /// Refuses what a channel was opened for: the request succeeds, so the
    /// client reads the reason on the channel's stderr before it closes
    /// (a failed request makes OpenSSH quit before it reads anything),
    /// then exit status 1 and close. The upstream twin is closed too.
    fn refuse_and_close(
        &mut self,
        channel: ChannelId,
        what: &str,
        detail: &str,
        session: &mut Session,
    ) {
        self.refuse(Some(channel), what, detail, session);
        reply(session, channel, true);
        let _ = session.exit_status_request(channel, 1);
        let _ = session.eof(channel);
        let _ = session.close(channel);
        if let Some(Chan::Relayed { up, .. }) = self.channels.remove(&channel) {
            tokio::spawn(async move {
                let _ = up.close().await;
            });
        }
        if let Some(live) = self.live() {
            lock(&live.channels).remove(&channel);
        }
    }

    /// The upstream twin of a client channel, or tells the client why there
    /// is none.
    fn relayed(
        &self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Option<&ChannelWriteHalf<client::Msg>> {
        match self.channels.get(&channel) {
            Some(Chan::Relayed { up, .. }) => Some(up),
            Some(Chan::Failed) => {
                let why = self.failed.clone().unwrap_or_default();
                let _ = session.extended_data(channel, 1, format!("{why}\r\n").into_bytes());
                let _ = session.exit_status_request(channel, 255);
                let _ = session.eof(channel);
                let _ = session.close(channel);
                None
            }
            // Requests on a forwarded connection make no sense: ignored.
            Some(Chan::Forwarded { .. }) | None => None,
        }
    }

    /// Marks `channel` as running what it was opened for, or refuses a
    /// second shell, command or subsystem on it and closes it: the bytes
    /// that follow would be read as the first one's (SFTP packets, which
    /// are recorded by what they do, reaching a shell unrecorded). False
    /// when refused.
    fn begin(&mut self, channel: ChannelId, what: &str, session: &mut Session) -> bool {
        let again = match self.channels.get_mut(&channel) {
            Some(Chan::Relayed { started, .. }) => std::mem::replace(started, true),
            _ => false,
        };
        if again {
            self.refuse_and_close(
                channel,
                what,
                "this channel already runs a shell, a command or a subsystem",
                session,
            );
        }
        !again
    }

    /// Whether the connection has as many channels as it may: session
    /// channels, local forwards and the target's remote forwards together.
    fn channels_full(&self) -> bool {
        let open = match self.live() {
            Some(live) => lock(&live.channels).len(),
            None => self.channels.len(),
        };
        open >= self.shared.config.max_channels_per_connection
    }
}

fn reply(session: &mut Session, channel: ChannelId, ok: bool) {
    let _ = if ok {
        session.channel_success(channel)
    } else {
        session.channel_failure(channel)
    };
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self.sign_in(user, Presented::Token(password)).await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = u64::try_from(Timestamp::now().millis().div_euclid(1000)).unwrap_or(0);
        match crate::keys::check_client_certificate(certificate, user, &self.shared.client_ca, now)
        {
            Ok(hash) => Ok(self.sign_in(user, Presented::Certificate(hash)).await),
            Err(why) => {
                tracing::info!(client = %self.peer, target = user, reason = why, "ssh certificate refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(mut response) = response else {
            return Ok(Auth::Partial {
                name: "breakglass".into(),
                instructions: format!(
                    "Sign in to {user} with a grant credential (`breakglass credentials ID`)."
                )
                .into(),
                prompts: vec![("Grant credential: ".into(), false)].into(),
            });
        };
        let Some(answer) = response.next() else {
            return Ok(Auth::reject());
        };
        let Ok(credential) = std::str::from_utf8(&answer) else {
            return Ok(Auth::reject());
        };
        let credential = credential.to_string();
        Ok(self.sign_in(user, Presented::Token(&credential)).await)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let (Some(live), Some(rx)) = (self.live.get(), self.cut_rx.take()) {
            tokio::spawn(cutter(live.clone(), rx, session.handle()));
            if let Some(forwarded) = lock(&live.forwarded).take() {
                tokio::spawn(remote_forwards(
                    live.clone(),
                    forwarded,
                    session.handle(),
                    self.shared.config.max_channels_per_connection,
                ));
            }
        }
        self.signed_in.notify_one();
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply_to: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        if self.channels_full() {
            tracing::info!(client = %self.peer, "ssh channel refused: too many channels on this connection");
            reply_to
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        let Some(live) = self.live().cloned() else {
            self.channels.insert(id, Chan::Failed);
            reply_to.accept().await;
            return Ok(());
        };
        if !live.within_grant() {
            reply_to
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let up = match live.upstream.channel_open_session().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(session = %live.info.session_id, error = %e, "upstream refused a session channel");
                reply_to
                    .reject(russh::ChannelOpenFailure::ConnectFailed)
                    .await;
                return Ok(());
            }
        };
        let (read, write) = up.split();
        live.record(
            "channel",
            &[("channel", Field::U64(u64::from(u32::from(id))))],
        );
        lock(&live.channels).insert(id, Open::Session);
        self.channels.insert(
            id,
            Chan::Relayed {
                up: write,
                started: false,
            },
        );
        reply_to.accept().await;
        tokio::spawn(pump(live, read, session.handle(), id, "o"));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            reply(session, channel, true);
            return Ok(());
        };
        if term.len() > TERM_LEN_MAX
            || col_width > TERMINAL_SIZE_MAX
            || row_height > TERMINAL_SIZE_MAX
        {
            self.refuse(
                Some(channel),
                "pty",
                "terminal name or size out of range",
                session,
            );
            reply(session, channel, false);
            return Ok(());
        }
        let Some(up) = self.relayed(channel, session) else {
            return Ok(());
        };
        let ok = live.record(
            "pty",
            &[
                ("channel", Field::U64(u64::from(u32::from(channel)))),
                ("cols", Field::U64(u64::from(col_width))),
                ("rows", Field::U64(u64::from(row_height))),
                ("term", Field::Str(term)),
            ],
        ) && up
            .request_pty(
                false, term, col_width, row_height, pix_width, pix_height, modes,
            )
            .await
            .is_ok();
        if ok {
            lock(&live.channels).insert(channel, Open::Terminal);
        }
        reply(session, channel, ok);
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            reply(session, channel, true);
            let _ = self.relayed(channel, session);
            return Ok(());
        };
        if !self.begin(channel, "shell", session) {
            return Ok(());
        }
        let Some(up) = self.relayed(channel, session) else {
            return Ok(());
        };
        let ok = live.record(
            "shell",
            &[("channel", Field::U64(u64::from(u32::from(channel))))],
        ) && up.request_shell(false).await.is_ok();
        reply(session, channel, ok);
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            reply(session, channel, true);
            let _ = self.relayed(channel, session);
            return Ok(());
        };
        if data.len() > COMMAND_LEN_MAX {
            self.refuse(
                Some(channel),
                "exec",
                &format!("command longer than {COMMAND_LEN_MAX} bytes"),
                session,
            );
            reply(session, channel, false);
            return Ok(());
        }
        let command = String::from_utf8_lossy(data).into_owned();
        if is_file_transfer(&command) && !live.auth.file_transfer {
            self.refuse_and_close(
                channel,
                "scp",
                "file transfer (scp, rsync) is not allowed for this role (file_transfer = false)",
                session,
            );
            return Ok(());
        }
        if !self.begin(channel, "exec", session) {
            return Ok(());
        }
        let Some(up) = self.relayed(channel, session) else {
            return Ok(());
        };
        let ok = live.record(
            "exec",
            &[
                ("channel", Field::U64(u64::from(u32::from(channel)))),
                ("command", Field::Str(&command)),
            ],
        ) && up.exec(false, data.to_vec()).await.is_ok();
        reply(session, channel, ok);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp"
            && let Some(live) = self.live().cloned()
            && live.auth.file_transfer
        {
            if !self.begin(channel, "subsystem", session) {
                return Ok(());
            }
            let Some(up) = self.relayed(channel, session) else {
                return Ok(());
            };
            lock(&live.sftp).insert(channel, crate::sftp::Tracker::default());
            let ok = live.record(
                "subsystem",
                &[
                    ("channel", Field::U64(u64::from(u32::from(channel)))),
                    ("name", Field::Str("sftp")),
                ],
            ) && up.request_subsystem(false, "sftp").await.is_ok();
            reply(session, channel, ok);
            return Ok(());
        }
        let detail = if name == "sftp" {
            "SFTP is not allowed for this role (file_transfer = false)".to_string()
        } else {
            format!("subsystem {name:?} is not allowed")
        };
        self.refuse_and_close(channel, "subsystem", &detail, session);
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(());
        };
        if col_width > TERMINAL_SIZE_MAX || row_height > TERMINAL_SIZE_MAX {
            return Ok(());
        }
        let Some(up) = self.relayed(channel, session) else {
            return Ok(());
        };
        if live.record(
            "r",
            &[
                ("channel", Field::U64(u64::from(u32::from(channel)))),
                ("cols", Field::U64(u64::from(col_width))),
                ("rows", Field::U64(u64::from(row_height))),
            ],
        ) {
            let _ = up
                .window_change(col_width, row_height, pix_width, pix_height)
                .await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(());
        };
        let Some(up) = self.relayed(channel, session) else {
            return Ok(());
        };
        let name = format!("{signal:?}");
        if live.record(
            "signal",
            &[
                ("channel", Field::U64(u64::from(u32::from(channel)))),
                ("signal", Field::Str(&name)),
            ],
        ) {
            let _ = up.signal(signal).await;
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(());
        };
        let (up, kind) = match self.channels.get(&channel) {
            Some(Chan::Forwarded { up }) => (up, "forward_in"),
            _ => match self.relayed(channel, session) {
                Some(up) => (up, "i"),
                None => return Ok(()),
            },
        };
        // INVARIANT: input reaches the upstream only after it is recorded,
        // and only within the grant.
        if !live.within_grant() {
            return Ok(());
        }
        match live.record_sftp(channel, data, true) {
            Some(Ok(())) => {
                let _ = up.data_bytes(data.to_vec()).await;
            }
            Some(Err(line)) => {
                let _ = session.extended_data(channel, 1, line.into_bytes());
                let _ = up.close().await;
                let _ = session.close(channel);
            }
            None => {
                if live.record_data(kind, channel, data, false) {
                    let _ = up.data_bytes(data.to_vec()).await;
                }
            }
        }
        Ok(())
    }

    async fn extended_data(
        &mut self,
        _channel: ChannelId,
        _code: u32,
        _data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Clients send no extended data on session channels; dropped.
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(Chan::Forwarded { up }) = self.channels.get(&channel) {
            let _ = up.eof().await;
        } else if let Some(up) = self.relayed(channel, session) {
            let _ = up.eof().await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(Chan::Relayed { up, .. } | Chan::Forwarded { up }) =
            self.channels.remove(&channel)
        {
            let _ = up.close().await;
        }
        if let Some(live) = self.live() {
            lock(&live.channels).remove(&channel);
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The target's environment is its own; clients' variables (LANG,
        // LC_*) are not passed on.
        reply(session, channel, false);
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(
            Some(channel),
            "x11",
            "X11 forwarding is not allowed",
            session,
        );
        reply(session, channel, false);
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse(
            Some(channel),
            "agent",
            "agent forwarding is not allowed",
            session,
        );
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        originator_address: &str,
        originator_port: u32,
        reply_to: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(live) = self.live().cloned() else {
            reply_to
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let to = format!("{host}:{port}");
        let why = if !live.auth.port_forwarding {
            Some(format!(
                "local port forwarding to {to} is not allowed for this role (port_forwarding = false)"
            ))
        } else if host.is_empty() || host.len() > FORWARD_HOST_LEN_MAX || port > 65535 {
            Some(format!(
                "local port forwarding to {:?}: not a host and port",
                to.chars().take(80).collect::<String>()
            ))
        } else if self.channels_full() {
            Some("too many channels on this connection".into())
        } else if !live.within_grant() {
            Some("the grant has ended".into())
        } else {
            None
        };
        if let Some(why) = why {
            reply_to
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            self.refuse(None, "port_forwarding", &why, session);
            return Ok(());
        }
        let id = channel.id();
        let up = match live
            .upstream
            .channel_open_direct_tcpip(host, port, originator_address, originator_port)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(session = %live.info.session_id, to, error = %e, "upstream refused a forwarded connection");
                self.refuse(
                    None,
                    "port_forwarding",
                    &format!("the target refused the forwarded connection to {to}"),
                    session,
                );
                reply_to
                    .reject(russh::ChannelOpenFailure::ConnectFailed)
                    .await;
                return Ok(());
            }
        };
        let (read, write) = up.split();
        let origin = format!("{originator_address}:{originator_port}");
        if !live.record(
            "forward",
            &[
                ("channel", Field::U64(u64::from(u32::from(id)))),
                ("host", Field::Str(host)),
                ("originator", Field::Str(&origin)),
                ("port", Field::U64(u64::from(port))),
            ],
        ) {
            reply_to
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        lock(&live.channels).insert(id, Open::Forward);
        self.channels.insert(id, Chan::Forwarded { up: write });
        reply_to.accept().await;
        tokio::spawn(pump(live, read, session.handle(), id, "forward_out"));
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(false);
        };
        let from = format!("{address}:{port}");
        let why = if !live.auth.port_forwarding {
            Some(format!(
                "remote port forwarding from {from} is not allowed for this role (port_forwarding = false)"
            ))
        } else if address.len() > FORWARD_HOST_LEN_MAX || *port > 65535 {
            Some("remote port forwarding: not a host and port".to_string())
        } else if self.remote_listens >= self.shared.config.max_channels_per_connection {
            Some("too many remote port forwards on this connection".to_string())
        } else if !live.within_grant() {
            Some("the grant has ended".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            self.refuse(None, "port_forwarding", &why, session);
            return Ok(false);
        }
        match live.upstream.tcpip_forward(address, *port).await {
            Ok(bound) => {
                if *port == 0 {
                    *port = bound;
                }
                self.remote_listens += 1;
                Ok(live.record(
                    "remote_forward",
                    &[
                        ("address", Field::Str(address)),
                        ("port", Field::U64(u64::from(*port))),
                    ],
                ))
            }
            Err(e) => {
                tracing::info!(session = %live.info.session_id, from, error = %e, "upstream refused a remote forward");
                self.refuse(
                    None,
                    "port_forwarding",
                    &format!("the target refused remote port forwarding from {from}"),
                    session,
                );
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(live) = self.live().cloned() else {
            return Ok(false);
        };
        if !live.auth.port_forwarding {
            return Ok(false);
        }
        let cancelled = live
            .upstream
            .cancel_tcpip_forward(address, port)
            .await
            .is_ok();
        if cancelled {
            self.remote_listens = self.remote_listens.saturating_sub(1);
        }
        Ok(cancelled)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse(
            None,
            "port_forwarding",
            &format!("socket forwarding of {socket_path:?} is not allowed"),
            session,
        );
        Ok(false)
    }
}

/// Whether an exec command is a file transfer (`scp -t`/`-f` in the legacy
/// protocol, an rsync server).
pub(crate) fn is_file_transfer(command: &str) -> bool {
    let mut words = command.split_whitespace();
    let Some(first) = words.next() else {
        return false;
    };
    let program = first.rsplit('/').next().unwrap_or(first);
    match program {
        "scp" => true,
        "rsync" => words.any(|w| w == "--server"),
        "sftp-server" => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_file_transfer;

    #[test]
    fn file_transfers_are_told_from_commands() {
        for c in [
            "scp -t /tmp/x",
            "/usr/bin/scp -f secret",
            "rsync --server -vlogDtpre.iLsfxC . /tmp",
            "/usr/lib/openssh/sftp-server",
        ] {
            assert!(is_file_transfer(c), "{c}");
        }
        for c in ["", "ls -l", "echo scp", "rsync-report", "rsync --version"] {
            assert!(!is_file_transfer(c), "{c}");
        }
    }
}
