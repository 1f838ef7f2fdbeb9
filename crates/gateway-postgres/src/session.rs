//! One client connection: start-up, grant check, upstream login, then the
//! relay loop that records every statement before forwarding it and ends
//! the session when the grant ends, the client leaves, or it idles out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakglass_core::Timestamp;
use breakglass_core::slots::{Slot, SlotRefusal};
use bytes::{Buf, BytesMut};
use rand::Rng;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::codec::{
    Severity, Startup, authentication, backend_key_data, cstr, decode_frame, decode_startup,
    error_response,
};
use crate::recording::{Field, Recording};
use crate::transcript::{Client as Next, Stop, Tracker};
use crate::{Authorized, CancelTarget, Cut, Io, SessionEnd, SessionInfo, Shared};
use crate::{settings, upstream};

/// Passwords (grant credentials) are short.
const PASSWORD_LEN_MAX: usize = 4096;
/// Largest message accepted from the upstream database.
const UPSTREAM_FRAME_LEN_MAX: usize = 1 << 30;
/// Asks the upstream to send what it has (see `blocked` in `relay`).
const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];
const READ_CHUNK: usize = 64 * 1024;
/// Outcome entries wait at most this long for the next statement's write.
const OUTCOME_FLUSH_DELAY: Duration = Duration::from_millis(2);
/// A cut that lands while a reply is half written to the client lets the
/// client take the rest of it for this long, so the FATAL can follow at a
/// message boundary; a client that does not read is simply disconnected.
const CUT_FLUSH_TIMEOUT: Duration = Duration::from_millis(100);
/// The last words to a client (a FATAL) wait this long at most: a client
/// that stopped reading must not keep its upstream query alive.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(500);

struct Fail {
    code: &'static str,
    message: String,
}

impl Fail {
    fn new(code: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
        }
    }
}

type Client = Box<dyn Io>;

async fn fatal<W: AsyncWrite + Unpin + ?Sized>(client: &mut W, code: &str, message: &str) {
    let _ = client
        .write_all(&error_response(Severity::Fatal, code, message))
        .await;
    let _ = client.shutdown().await;
}

/// Said to a client whose connection was closed to make room for a newer
/// one (see `breakglass_core::slots`).
const EVICTED: &str = "breakglass gateway: too many connections are waiting to sign in; this one waited longest and was closed to make room (retry now)";
const STARTUP_LATE: &str = "breakglass gateway: start-up not completed in time";

pub(crate) async fn handle(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    slot: Result<Slot, SlotRefusal>,
) {
    let _ = tcp.set_nodelay(true);
    // INVARIANT: the slot is held until the connection ends; it is
    // unauthenticated (evictable, under the start-up deadline) until the
    // grant credential is accepted.
    let slot = match slot {
        Ok(slot) => slot,
        Err(refusal) => {
            let message = match refusal {
                SlotRefusal::Full { .. } => "breakglass gateway: too many connections".to_string(),
                SlotRefusal::Source { max } => format!(
                    "breakglass gateway: too many connections from your address ({max}, gateway.postgres.max_connections_per_source); close some and retry"
                ),
            };
            tracing::info!(client = %peer, reason = %refusal, "gateway connection refused");
            fatal(&mut tcp, "53300", &message).await;
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + shared.config.startup();
    let (mut client, buf, tls) = match negotiate(&shared, tcp, deadline, &slot).await {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err((mut client, f)) => {
            tracing::info!(client = %peer, code = f.code, reason = %f.message, "gateway connection refused");
            fatal(&mut client, f.code, &f.message).await;
            return;
        }
    };
    let startup = tokio::select! {
        r = tokio::time::timeout_at(deadline, start(&shared, &mut client, buf, tls, peer, &slot)) => Some(r),
        () = slot.evicted() => None,
    };
    let Some(startup) = startup else {
        tracing::info!(client = %peer, "gateway connection closed to make room for a newer one");
        fatal(&mut client, "53300", EVICTED).await;
        return;
    };
    let ready = match startup {
        Err(_) => {
            fatal(&mut client, "08P01", STARTUP_LATE).await;
            return;
        }
        Ok(Err(f)) => {
            tracing::info!(client = %peer, code = f.code, reason = %f.message, "gateway connection refused");
            fatal(&mut client, f.code, &f.message).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(ready))) => ready,
    };
    run(shared, client, peer, ready).await;
}

/// Answers SSLRequest / GSSENCRequest on the raw socket and upgrades to TLS
/// when configured. Returns the client stream, the bytes already read, and
/// whether TLS is on; `None` when the client left.
async fn negotiate(
    shared: &Shared,
    mut tcp: TcpStream,
    deadline: tokio::time::Instant,
    slot: &Slot,
) -> Result<Option<(Client, BytesMut, bool)>, (Client, Fail)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let packet = match decode_startup(&buf) {
            Err(e) => {
                return Err((
                    Box::new(tcp),
                    Fail::new("08P01", format!("invalid start-up packet: {e}")),
                ));
            }
            Ok(p) => p,
        };
        match packet {
            None => {
                let read = tokio::select! {
                    r = tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)) => Some(r),
                    () = slot.evicted() => None,
                };
                match read {
                    Some(Ok(Ok(0)) | Ok(Err(_))) => return Ok(None),
                    Some(Ok(Ok(_))) => {}
                    Some(Err(_)) => {
                        return Err((Box::new(tcp), Fail::new("08P01", STARTUP_LATE)));
                    }
                    None => return Err((Box::new(tcp), Fail::new("53300", EVICTED))),
                }
            }
            Some((Startup::Ssl, n)) => {
                buf.advance(n);
                // INVARIANT: nothing may follow an SSLRequest before the
                // handshake; bytes sent ahead would bypass TLS.
                if !buf.is_empty() {
                    return Err((
                        Box::new(tcp),
                        Fail::new("08P01", "unexpected data after SSLRequest"),
                    ));
                }
                let Some(acceptor) = &shared.tls else {
                    if tcp.write_all(b"N").await.is_err() {
                        return Ok(None);
                    }
                    continue;
                };
                if tcp.write_all(b"S").await.is_err() {
                    return Ok(None);
                }
                // The handshake is part of start-up: under its deadline,
                // and evictable.
                let handshake = tokio::select! {
                    r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => r,
                    () = slot.evicted() => return Ok(None),
                };
                return match handshake {
                    Ok(Ok(tls)) => Ok(Some((Box::new(tls), buf, true))),
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "gateway TLS handshake failed");
                        Ok(None)
                    }
                    Err(_) => Ok(None),
                };
            }
            Some((Startup::GssEnc, n)) => {
                buf.advance(n);
                if tcp.write_all(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            Some(_) => return Ok(Some((Box::new(tcp), buf, false))),
        }
    }
}

struct Ready {
    auth: Authorized,
    /// The start-up settings forwarded to the upstream.
    startup: settings::Startup,
    upstream: Box<dyn Io>,
    ubuf: BytesMut,
    cbuf: BytesMut,
}

async fn read_more(client: &mut Client, buf: &mut BytesMut) -> Result<bool, Fail> {
    match client.read_buf(buf).await {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(Fail::new("08006", format!("connection failure: {e}"))),
    }
}

/// Start-up and authentication. `Ok(None)`: nothing more to do (a cancel
/// request was forwarded, or the client left).
async fn start(
    shared: &Shared,
    client: &mut Client,
    mut buf: BytesMut,
    tls: bool,
    peer: SocketAddr,
    slot: &Slot,
) -> Result<Option<Ready>, Fail> {
    let params = loop {
        match decode_startup(&buf) {
            Err(e) => return Err(Fail::new("08P01", format!("invalid start-up packet: {e}"))),
            Ok(None) => {
                if !read_more(client, &mut buf).await? {
                    return Ok(None);
                }
            }
            Ok(Some((packet, n))) => {
                buf.advance(n);
                match packet {
                    Startup::Ssl | Startup::GssEnc => {
                        return Err(Fail::new(
                            "08P01",
                            "encryption was already negotiated; unexpected second request",
                        ));
                    }
                    Startup::Cancel { pid, secret } => {
                        let target = shared
                            .cancel_keys
                            .lock()
                            .ok()
                            .and_then(|k| k.get(&(pid, secret)).cloned());
                        if let Some(t) = target
                            && let Err(e) = upstream::cancel(&t.host, t.port, t.pid, t.secret).await
                        {
                            tracing::warn!(error = %e, "cannot forward cancel request");
                        }
                        return Ok(None);
                    }
                    Startup::Message { params } => break params,
                }
            }
        }
    };
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let Some(user) = get("user").map(str::to_string) else {
        return Err(Fail::new("28000", "no user name in the start-up message"));
    };
    let database = get("database").unwrap_or(&user).to_string();
    if get("replication").is_some_and(|v| v != "false" && v != "0" && v != "off") {
        return Err(Fail::new(
            "28000",
            "replication connections are not allowed through the breakglass gateway",
        ));
    }
    // Refused before the password is asked: nothing was spent on it.
    let startup = settings::check(&params).map_err(|m| Fail::new("42501", m))?;
    if !tls && !peer.ip().is_loopback() && !shared.config.allow_plaintext_off_loopback {
        return Err(Fail::new(
            "28000",
            "breakglass gateway: TLS is required for connections that are not on loopback (use sslmode=require)",
        ));
    }
    client
        .write_all(&authentication(3, &[]))
        .await
        .map_err(|e| Fail::new("08006", e.to_string()))?;
    let password = loop {
        match decode_frame(&buf, PASSWORD_LEN_MAX) {
            Err(e) => return Err(Fail::new("08P01", format!("invalid password message: {e}"))),
            Ok(None) => {
                if !read_more(client, &mut buf).await? {
                    return Ok(None);
                }
            }
            Ok(Some(f)) if f.tag == b'p' => {
                let pw = cstr(f.payload(&buf))
                    .map(|(s, _)| s.to_string())
                    .ok_or_else(|| Fail::new("08P01", "malformed password message"))?;
                buf.advance(f.len);
                break pw;
            }
            Ok(Some(f)) => {
                return Err(Fail::new(
                    "08P01",
                    format!("expected a password message, got {:?}", f.tag as char),
                ));
            }
        }
    };
    let auth = shared
        .authority
        .authorize(&user, &database, &password)
        .await
        .map_err(|r| Fail::new(r.sqlstate(), format!("breakglass: {}", r.message())))?;
    // Signed in: the connection leaves the evictable pool and may use the
    // reserved slots.
    if !slot.authenticate() {
        return Err(Fail::new("53300", EVICTED));
    }
    // A cheap early refusal, so a client over its grant's limit does not
    // cost an upstream login; `register` enforces the limit for real.
    if shared.grant_sessions(&auth.request_id) >= shared.config.max_connections_per_grant {
        return Err(Fail::new(
            "53300",
            "breakglass: too many sessions for this grant",
        ));
    }
    let (upstream, ubuf) = upstream::connect(&auth.upstream, &startup.forwarded)
        .await
        .map_err(|e| {
            tracing::error!(target_name = %auth.target, error = %e, "upstream login failed");
            Fail::new("08001", format!("breakglass gateway: {e}"))
        })?;
    Ok(Some(Ready {
        auth,
        startup,
        upstream,
        ubuf,
        cbuf: buf,
    }))
}

fn cut_message(reason: &str) -> String {
    Cut::new(reason).message()
}

enum End {
    /// The grant ended or the session idled out: tell the client (when the
    /// stream to it is at a message boundary), cancel the upstream query.
    Cut {
        reason: String,
        tell_client: bool,
    },
    /// The client or the upstream went away, or broke the protocol.
    Closed(String),
    Protocol(String),
    /// The client sent a message the gateway refuses (see `frontend`),
    /// where no in-protocol answer could be given.
    Refused(&'static str, String),
}

impl End {
    /// A cut at a message boundary of the stream to the client.
    fn cut(reason: &str) -> End {
        End::Cut {
            reason: reason.to_string(),
            tell_client: true,
        }
    }
}

async fn run(shared: Arc<Shared>, mut client: Client, peer: SocketAddr, ready: Ready) {
    let Ready {
        auth,
        startup,
        mut upstream,
        mut ubuf,
        mut cbuf,
    } = ready;
    let session_id = uuid::Uuid::now_v7().to_string();
    let info = SessionInfo {
        session_id: session_id.clone(),
        request_id: auth.request_id.clone(),
        principal: auth.principal.clone(),
        target: auth.target.clone(),
        role: auth.role.clone(),
        upstream_user: auth.upstream.user.clone(),
        client: peer,
        protocol: "postgres",
    };
    // The last one wins, as in PostgreSQL.
    let application = startup
        .forwarded
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case("application_name"))
        .map(|(_, v)| v.clone());
    let header = json!({
        "session_id": session_id,
        "request_id": auth.request_id,
        "principal": auth.principal,
        "target": auth.target,
        "role": auth.role,
        "upstream_user": auth.upstream.user,
        "client": peer.to_string(),
        "application_name": application,
        // Every setting forwarded in the upstream start-up packet, in order
        // (a later one overrides an earlier one of the same name), and the
        // `options` value they partly came from.
        "settings": startup.forwarded,
        "options": startup.options,
        "expires_at": auth.expires_at.to_rfc3339(),
    });
    // INVARIANT: a session refused here leaves no recording (and no `.open`
    // marker, which a restart would turn into a `session.ended` for a
    // session that never started).
    let Some(mut cut_rx) = shared.register(&auth.request_id, &session_id) else {
        fatal(
            &mut client,
            "53300",
            "breakglass: too many sessions for this grant",
        )
        .await;
        return;
    };
    // The grant may have ended since `authorize`; its cut then found no
    // session to cut. Registered now, a later end cuts this session.
    if let Err(reason) = shared.authority.grant_live(&auth.request_id).await {
        shared.unregister(&auth.request_id, &session_id);
        fatal(&mut client, "57P01", &cut_message(&reason)).await;
        return;
    }
    let mut rec = match shared.recorder.open(&session_id, header, Timestamp::now()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot create session recording");
            shared.unregister(&auth.request_id, &session_id);
            fatal(
                &mut client,
                "58000",
                "breakglass: cannot record this session; refusing it",
            )
            .await;
            return;
        }
    };
    if let Err(e) = shared.authority.session_started(&info).await {
        tracing::error!(error = %e, "cannot audit session start");
        shared.unregister(&auth.request_id, &session_id);
        if let Err(e) = shared.recorder.discard(rec, &session_id) {
            tracing::error!(error = %e, "cannot remove the recording of a refused session");
        }
        fatal(
            &mut client,
            "58000",
            "breakglass: cannot audit this session; refusing it",
        )
        .await;
        return;
    }
    // Bytes of the upstream's answers relayed to the client (the review's
    // export figure), recorded in the `end` entry.
    let mut sent_to_client: u64 = 0;
    let end = relay(
        &shared,
        &mut client,
        &mut upstream,
        &mut cbuf,
        &mut ubuf,
        &mut cut_rx,
        &auth,
        &mut rec,
        &session_id,
        &mut sent_to_client,
    )
    .await;
    let reason = match &end {
        End::Cut {
            reason: r,
            tell_client,
        } => {
            if *tell_client {
                let msg = error_response(Severity::Fatal, "57P01", &cut_message(r));
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, client.write_all(&msg)).await;
            }
            r.clone()
        }
        End::Closed(r) => r.clone(),
        End::Protocol(m) => {
            let msg = error_response(Severity::Fatal, "08P01", m);
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, client.write_all(&msg)).await;
            "protocol_violation".to_string()
        }
        End::Refused(code, m) => {
            let msg = error_response(Severity::Fatal, code, m);
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, client.write_all(&msg)).await;
            "message_refused".to_string()
        }
    };
    // Stop whatever the upstream is running, then close it, then the
    // client (bounded: a client that stopped reading must not hold up the
    // cancel of its query).
    let key = shared.cancel_keys.lock().ok().and_then(|mut k| {
        let found = k
            .iter()
            .find(|(_, t)| t.session == session_id)
            .map(|(fk, t)| (*fk, t.clone()));
        if let Some((fk, _)) = &found {
            k.remove(fk);
        }
        found.map(|(_, t)| t)
    });
    if matches!(end, End::Cut { .. } | End::Protocol(_) | End::Refused(..))
        && let Some(t) = &key
        && let Err(e) = upstream::cancel(&t.host, t.port, t.pid, t.secret).await
    {
        tracing::warn!(error = %e, "cannot cancel the upstream query");
    }
    let mut terminate = Vec::new();
    crate::codec::put_frame(&mut terminate, b'X', &[]);
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        let _ = upstream.write_all(&terminate).await;
        upstream.shutdown().await
    })
    .await;
    drop(upstream);
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, client.shutdown()).await;
    drop(client);
    let end_fields = [
        ("bytes_to_client", Field::U64(sent_to_client)),
        ("reason", Field::Str(&reason)),
    ];
    if let Err(e) = rec.append("end", &end_fields, Timestamp::now()) {
        tracing::error!(error = %e, "cannot record session end");
    }
    if let Err(e) = rec.close() {
        tracing::error!(error = %e, "cannot sync session recording");
    }
    let end = SessionEnd {
        reason,
        statements: rec.statements(),
        entries: rec.entries(),
        final_hash: rec.final_hash(),
    };
    shared.authority.session_ended(&info, &end).await;
    // Only now is the session gone: a shutdown waiting for live sessions
    // must not stop before `session.ended` is committed.
    shared.unregister(&auth.request_id, &session_id);
}

fn expiry_deadline(expires_at: Timestamp) -> tokio::time::Instant {
    let left = (expires_at.millis() - Timestamp::now().millis()).max(0) as u64;
    tokio::time::Instant::now() + Duration::from_millis(left)
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    shared: &Shared,
    client: &mut Client,
    upstream: &mut Box<dyn Io>,
    cbuf: &mut BytesMut,
    ubuf: &mut BytesMut,
    cut_rx: &mut watch::Receiver<Option<Cut>>,
    auth: &Authorized,
    rec: &mut Recording,
    session_id: &str,
    sent_to_client: &mut u64,
) -> End {
    let mut tracker = Tracker::new(auth.redact_parameters);
    // A client frame waits for earlier batches' answers (see
    // `transcript`): the client is not read meanwhile.
    let mut blocked = false;
    let idle = shared.config.idle();
    let expiry = tokio::time::sleep_until(expiry_deadline(auth.expires_at));
    tokio::pin!(expiry);
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    // Deferred outcome entries are written with the next statement, or by
    // this timer when the session goes quiet.
    let flush_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(flush_timer);
    let mut flush_armed = false;
    let message_max = shared.config.message_len_max;
    // (real upstream pid, fake pid shown to the client), once known.
    let mut pids: Option<(i32, i32)> = None;
    if client.write_all(&authentication(0, &[])).await.is_err() {
        return End::Closed("client_closed".into());
    }
    // Whatever the upstream sent after login (parameters, key data, ready)
    // is processed like any other upstream data.
    let mut upstream_pending = !ubuf.is_empty();
    let mut client_pending = !cbuf.is_empty();
    let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        if client_pending {
            client_pending = false;
            let mut consumed = 0;
            let mut next = Next::Forward;
            loop {
                match decode_frame(&cbuf[consumed..], message_max) {
                    Err(e) => return End::Protocol(format!("breakglass gateway: {e}")),
                    Ok(None) => break,
                    Ok(Some(f)) => {
                        let payload = &cbuf[consumed + 5..consumed + f.len];
                        match tracker.client_frame(f.tag, payload, rec) {
                            Ok(Next::Forward) => consumed += f.len,
                            Ok(Next::Terminate) => {
                                consumed += f.len;
                                next = Next::Terminate;
                                break;
                            }
                            Ok(n @ Next::Wait) => {
                                next = n;
                                break;
                            }
                            Ok(Next::Reply(bytes)) => {
                                next = Next::Reply(bytes);
                                break;
                            }
                            // Nothing of this frame was forwarded.
                            Err(Stop::Limit(m)) => return End::Protocol(m),
                            Err(Stop::Refused(code, m)) => return End::Refused(code, m),
                        }
                    }
                }
            }
            let wait = next == Next::Wait;
            // The server must answer what it has, or a waiting frame would
            // wait for ever: a Flush runs nothing and answers nothing.
            let flush = wait && !blocked;
            blocked = wait;
            if consumed > 0 || flush {
                // INVARIANT: everything forwarded here was recorded above,
                // with this one write.
                if let Err(e) = rec.flush() {
                    tracing::error!(error = %e, "cannot write session recording; closing session");
                    return End::cut("recording_failed");
                }
                let write = async {
                    upstream.write_all(&cbuf[..consumed]).await?;
                    if flush {
                        upstream.write_all(&FLUSH).await?;
                    }
                    Ok::<(), std::io::Error>(())
                };
                tokio::select! {
                    biased;
                    _ = cut_rx.changed() => return End::cut(&cut_reason(cut_rx)),
                    () = &mut expiry => return End::cut("expired"),
                    r = write => if r.is_err() { return End::Closed("upstream_closed".into()) },
                }
                cbuf.advance(consumed);
            }
            match next {
                Next::Terminate => return End::Closed("client_terminated".into()),
                Next::Reply(bytes) => {
                    // A refused frame: answered here, never forwarded.
                    if let Err(e) = rec.flush() {
                        tracing::error!(error = %e, "cannot write session recording; closing session");
                        return End::cut("recording_failed");
                    }
                    let len = decode_frame(&cbuf[..], message_max)
                        .ok()
                        .flatten()
                        .map_or(0, |f| f.len);
                    cbuf.advance(len);
                    let write = client.write_all(&bytes);
                    tokio::select! {
                        biased;
                        _ = cut_rx.changed() => return End::cut(&cut_reason(cut_rx)),
                        () = &mut expiry => return End::cut("expired"),
                        r = write => if r.is_err() { return End::Closed("client_closed".into()) },
                    }
                    client_pending = true;
                    continue;
                }
                Next::Forward | Next::Wait => {}
            }
        }
        if upstream_pending {
            upstream_pending = false;
            let mut consumed = 0;
            out.clear();
            let mut rewritten = false;
            loop {
                match decode_frame(&ubuf[consumed..], UPSTREAM_FRAME_LEN_MAX) {
                    Err(e) => return End::Protocol(format!("breakglass gateway: upstream {e}")),
                    Ok(None) => break,
                    Ok(Some(f)) => {
                        let frame = &ubuf[consumed..consumed + f.len];
                        let payload = &frame[5..];
                        if let Err(m) = tracker.server_frame(f.tag, payload, rec) {
                            return End::Protocol(m);
                        }
                        if f.tag == b'K' && payload.len() == 8 {
                            let pid = i32::from_be_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]);
                            let secret = i32::from_be_bytes([
                                payload[4], payload[5], payload[6], payload[7],
                            ]);
                            let (fake_pid, fake_secret) = {
                                let mut rng = rand::thread_rng();
                                (rng.gen_range(1..i32::MAX), rng.r#gen::<i32>())
                            };
                            if let Ok(mut keys) = shared.cancel_keys.lock() {
                                keys.insert(
                                    (fake_pid, fake_secret),
                                    CancelTarget {
                                        host: auth.upstream.host.clone(),
                                        port: auth.upstream.port,
                                        pid,
                                        secret,
                                        session: session_id.to_string(),
                                    },
                                );
                            }
                            if !rewritten {
                                out.extend_from_slice(&ubuf[..consumed]);
                                rewritten = true;
                            }
                            out.extend_from_slice(&backend_key_data(fake_pid, fake_secret));
                            pids = Some((pid, fake_pid));
                        } else if f.tag == b'A'
                            && payload.len() >= 4
                            && let Some((real, fake)) = pids
                            && payload[..4] == real.to_be_bytes()
                        {
                            // Notifications name the sending backend; the
                            // client knows its own backend by the fake pid.
                            if !rewritten {
                                out.extend_from_slice(&ubuf[..consumed]);
                                rewritten = true;
                            }
                            let start = out.len();
                            out.extend_from_slice(frame);
                            out[start + 5..start + 9].copy_from_slice(&fake.to_be_bytes());
                        } else if rewritten {
                            out.extend_from_slice(frame);
                        }
                        consumed += f.len;
                    }
                }
            }
            if consumed > 0 {
                let bytes: &[u8] = if rewritten { &out } else { &ubuf[..consumed] };
                let len = bytes.len() as u64;
                let write = client.write_all(bytes);
                tokio::pin!(write);
                let cut = tokio::select! {
                    biased;
                    _ = cut_rx.changed() => Some(cut_reason(cut_rx)),
                    () = &mut expiry => Some("expired".to_string()),
                    r = &mut write => match r {
                        Ok(()) => {
                            *sent_to_client += len;
                            None
                        }
                        Err(_) => return End::Closed("client_closed".into()),
                    },
                };
                if let Some(reason) = cut {
                    // The client may be mid-message: a FATAL now would
                    // corrupt its stream unless the rest goes first.
                    let whole = matches!(
                        tokio::time::timeout(CUT_FLUSH_TIMEOUT, write).await,
                        Ok(Ok(()))
                    );
                    return End::Cut {
                        reason,
                        tell_client: whole,
                    };
                }
                ubuf.advance(consumed);
                if blocked {
                    // Answers came: the waiting frame may go now.
                    client_pending = true;
                    continue;
                }
            }
        }
        for buf in [&mut *cbuf, &mut *ubuf] {
            // A drained buffer reads at its front again, so a busy session
            // reuses the same few cache lines instead of walking through
            // READ_CHUNK bytes (and the cache of the database beside it).
            if buf.is_empty() {
                let _ = buf.try_reclaim(READ_CHUNK);
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_CHUNK);
            }
        }
        if !rec.has_pending() {
            flush_armed = false;
        } else if !flush_armed {
            flush_armed = true;
            flush_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + OUTCOME_FLUSH_DELAY);
        }
        tokio::select! {
            biased;
            _ = cut_rx.changed() => return End::cut(&cut_reason(cut_rx)),
            () = &mut expiry => return End::cut("expired"),
            r = client.read_buf(cbuf), if !blocked => match r {
                Ok(0) | Err(_) => return End::Closed("client_closed".into()),
                Ok(_) => client_pending = true,
            },
            r = upstream.read_buf(ubuf) => match r {
                // Every whole frame it sent (often a FATAL) was passed on
                // already; what is left is a torn frame.
                Ok(0) | Err(_) => return End::Closed("upstream_closed".into()),
                Ok(_) => upstream_pending = true,
            },
            () = &mut idle_timer => return End::cut("idle_timeout"),
            () = &mut flush_timer, if flush_armed => {
                flush_armed = false;
                if let Err(e) = rec.flush() {
                    tracing::error!(error = %e, "cannot write session recording; closing session");
                    return End::cut("recording_failed");
                }
                continue;
            }
        }
        idle_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + idle);
    }
}

fn cut_reason(rx: &watch::Receiver<Option<Cut>>) -> String {
    breakglass_gateway_common::cut_of(rx).reason
}
