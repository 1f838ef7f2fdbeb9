//! What an SFTP channel moves, for roles with `file_transfer = true`: the
//! gateway reads the SFTP packets (draft-ietf-secsh-filexfer-02, the
//! version OpenSSH speaks) in both directions and reports, before the
//! packet that completes them is relayed:
//! - each file transfer when its handle is closed: path, direction, size
//!   and the SHA-256 of the bytes moved (when they moved in order, as
//!   `sftp` and `scp` move them; `null` when the client jumped around);
//! - each change to the file tree: remove, rename, mkdir, rmdir, setstat
//!   (by path or by handle), symlink (and OpenSSH's `posix-rename`,
//!   `hardlink`, `lsetstat` and `copy-data` extensions), with its paths.
//!   A `copy-data` copy happens on the target: its bytes never cross the
//!   gateway, so the file it wrote has no hash.
//!
//! File contents are not recorded, only their hashes. A packet longer than
//! [`PACKET_LEN_MAX`], or more outstanding requests or open handles than
//! the limits, is an error: the channel is cut.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// OpenSSH's sftp-server refuses packets over 256 KiB; a little room for
/// the header.
pub const PACKET_LEN_MAX: usize = 256 * 1024 + 1024;
/// Requests waiting for their answer at once.
const PENDING_MAX: usize = 4096;
/// Files open at once on one channel.
const HANDLES_MAX: usize = 1024;
/// A path is at most this long.
const STRING_LEN_MAX: usize = 64 * 1024;
/// A handle is at most this long (the draft's own limit; OpenSSH's are 4
/// bytes). Handles are kept per open file and per outstanding read.
const HANDLE_LEN_MAX: usize = 256;

/// Something to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A file handle was closed (`closed`), or was still open when the
    /// channel ended.
    File {
        path: String,
        /// `upload` (opened for writing) or `download`.
        direction: &'static str,
        /// The highest byte written or read through the gateway, plus one.
        size: u64,
        /// Hex SHA-256 of the bytes moved, when they moved in order from
        /// offset 0.
        sha256: Option<String>,
        closed: bool,
    },
    /// A change to the file tree.
    Op {
        op: &'static str,
        path: String,
        target: Option<String>,
    },
}

enum Pending {
    Open { path: String, write: bool },
    Read { handle: Vec<u8>, offset: u64 },
}

struct OpenFile {
    path: String,
    write: bool,
    hasher: Sha256,
    /// Where the bytes moved in order so far end.
    next: u64,
    size: u64,
    in_order: bool,
}

impl OpenFile {
    fn moved(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        self.size = self.size.max(end);
        if self.in_order && offset == self.next {
            self.hasher.update(data);
            self.next = end;
        } else if offset < self.next && end <= self.next {
            // A byte range moved again (a retried read): same bytes.
        } else {
            self.in_order = false;
        }
    }

    fn event(self, closed: bool) -> Event {
        let complete = self.in_order && self.next == self.size;
        Event::File {
            path: self.path,
            direction: if self.write { "upload" } else { "download" },
            size: self.size,
            sha256: complete.then(|| hex::encode(self.hasher.finalize())),
            closed,
        }
    }
}

/// Follows one SFTP channel.
#[derive(Default)]
pub struct Tracker {
    from_client: Vec<u8>,
    from_server: Vec<u8>,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Vec<u8>, OpenFile>,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let hi = u64::from(self.u32()?);
        let lo = u64::from(self.u32()?);
        Some(hi << 32 | lo)
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
    fn text(&mut self) -> Option<String> {
        let s = self.string()?;
        (s.len() <= STRING_LEN_MAX).then(|| String::from_utf8_lossy(s).into_owned())
    }
}

/// Splits whole packets off the front of `buf`; each is its type and
/// body (without the length).
fn packets(buf: &mut Vec<u8>, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    buf.extend_from_slice(data);
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if len == 0 || len > PACKET_LEN_MAX {
            return Err(format!(
                "an SFTP packet of {len} bytes (the limit is {PACKET_LEN_MAX})"
            ));
        }
        if buf.len() - at - 4 < len {
            break;
        }
        out.push(buf[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    buf.drain(..at);
    Ok(out)
}

const SSH_FXF_WRITE: u32 = 0x02;
const SSH_FXF_APPEND: u32 = 0x04;
const SSH_FXF_CREAT: u32 = 0x08;
const SSH_FXF_TRUNC: u32 = 0x10;

impl Tracker {
    /// Bytes from the client; what they complete, to record before they
    /// are relayed.
    pub fn client(&mut self, data: &[u8]) -> Result<Vec<Event>, String> {
        let mut events = Vec::new();
        for p in packets(&mut self.from_client, data)? {
            self.client_packet(&p, &mut events)?;
        }
        Ok(events)
    }

    /// Bytes from the server: they complete nothing to record (what they
    /// answer was recorded when it was asked, or is at the close).
    pub fn server(&mut self, data: &[u8]) -> Result<(), String> {
        for p in packets(&mut self.from_server, data)? {
            self.server_packet(&p)?;
        }
        Ok(())
    }

    /// The channel ended: the files still open.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut open: Vec<OpenFile> = self.handles.drain().map(|(_, f)| f).collect();
        open.sort_by(|a, b| a.path.cmp(&b.path));
        open.into_iter().map(|f| f.event(false)).collect()
    }

    fn wait(&mut self, id: u32, p: Pending) -> Result<(), String> {
        if self.pending.len() >= PENDING_MAX {
            return Err(format!("more than {PENDING_MAX} SFTP requests outstanding"));
        }
        self.pending.insert(id, p);
        Ok(())
    }

    fn client_packet(&mut self, p: &[u8], events: &mut Vec<Event>) -> Result<(), String> {
        let mut r = Reader(p);
        let Some(kind) = r.u8() else { return Ok(()) };
        if kind == 1 {
            return Ok(()); // SSH_FXP_INIT: no id
        }
        let Some(id) = r.u32() else { return Ok(()) };
        let op = |op: &'static str, path: Option<String>, target: Option<String>| {
            path.map(|path| Event::Op { op, path, target })
        };
        match kind {
            3 => {
                // OPEN
                if let (Some(path), Some(flags)) = (r.text(), r.u32()) {
                    let write = flags
                        & (SSH_FXF_WRITE | SSH_FXF_APPEND | SSH_FXF_CREAT | SSH_FXF_TRUNC)
                        != 0;
                    self.wait(id, Pending::Open { path, write })?;
                }
            }
            4 => {
                // CLOSE
                if let Some(h) = r.string()
                    && let Some(f) = self.handles.remove(h)
                {
                    events.push(f.event(true));
                }
            }
            5 => {
                // READ
                if let (Some(h), Some(offset)) = (r.string(), r.u64())
                    && self.handles.contains_key(h)
                {
                    let handle = h.to_vec();
                    self.wait(id, Pending::Read { handle, offset })?;
                }
            }
            6 => {
                // WRITE
                if let (Some(h), Some(offset), Some(data)) = (r.string(), r.u64(), r.string())
                    && let Some(f) = self.handles.get_mut(h)
                {
                    f.moved(offset, data);
                }
            }
            9 => events.extend(op("setstat", r.text(), None)),
            10 => {
                // FSETSTAT: a setstat (a truncate, a mode) through a handle.
                let path = r
                    .string()
                    .and_then(|h| self.handles.get(h))
                    .map(|f| f.path.clone());
                events.extend(op("setstat", path, None));
            }
            13 => events.extend(op("remove", r.text(), None)),
            14 => events.extend(op("mkdir", r.text(), None)),
            15 => events.extend(op("rmdir", r.text(), None)),
            18 => {
                let from = r.text();
                events.extend(op("rename", from, r.text()));
            }
            20 => {
                // OpenSSH sends SYMLINK's two paths in reverse order
                // (target first); both are recorded as sent.
                let first = r.text();
                events.extend(op("symlink", first, r.text()));
            }
            200 => {
                // EXTENDED: OpenSSH's own requests that change the tree.
                let name = r.string().unwrap_or_default();
                if name == b"copy-data@openssh.com" {
                    self.copy_data(&mut r, events);
                    return Ok(());
                }
                let kind = match name {
                    b"posix-rename@openssh.com" => Some("rename"),
                    b"hardlink@openssh.com" => Some("hardlink"),
                    b"lsetstat@openssh.com" => Some("setstat"),
                    _ => None,
                };
                if let Some(kind) = kind {
                    let first = r.text();
                    let second = if kind == "setstat" { None } else { r.text() };
                    events.extend(op(kind, first, second));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// OpenSSH's `copy-data`: the target copies between two open handles
    /// (read handle, offset, length, write handle, offset). Recorded as a
    /// `copy`; the written file gets no hash, since its bytes never crossed.
    fn copy_data(&mut self, r: &mut Reader<'_>, events: &mut Vec<Event>) {
        let from = r.string().map(<[u8]>::to_vec);
        let (_, _) = (r.u64(), r.u64());
        let to = r.string();
        let src = from
            .and_then(|h| self.handles.get(&h))
            .map(|f| f.path.clone());
        let dst = to.and_then(|h| self.handles.get_mut(h)).map(|f| {
            f.in_order = false;
            f.path.clone()
        });
        if let Some(path) = src {
            events.push(Event::Op {
                op: "copy",
                path,
                target: dst,
            });
        }
    }

    fn server_packet(&mut self, p: &[u8]) -> Result<(), String> {
        let mut r = Reader(p);
        let Some(kind) = r.u8() else { return Ok(()) };
        if kind == 2 {
            return Ok(()); // SSH_FXP_VERSION
        }
        let Some(id) = r.u32() else { return Ok(()) };
        match (self.pending.remove(&id), kind) {
            (Some(Pending::Open { path, write }), 102) => {
                // HANDLE
                if let Some(h) = r.string() {
                    if h.len() > HANDLE_LEN_MAX {
                        return Err(format!(
                            "an SFTP handle of {} bytes (the limit is {HANDLE_LEN_MAX})",
                            h.len()
                        ));
                    }
                    if self.handles.len() >= HANDLES_MAX {
                        return Err(format!("more than {HANDLES_MAX} files open over SFTP"));
                    }
                    self.handles.insert(
                        h.to_vec(),
                        OpenFile {
                            path,
                            write,
                            hasher: Sha256::new(),
                            next: 0,
                            size: 0,
                            in_order: true,
                        },
                    );
                }
            }
            (Some(Pending::Read { handle, offset }), 103) => {
                // DATA
                if let (Some(data), Some(f)) = (r.string(), self.handles.get_mut(&handle)) {
                    f.moved(offset, data);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn packet(kind: u8, id: Option<u32>, body: &[u8]) -> Vec<u8> {
        let mut p = vec![kind];
        if let Some(id) = id {
            p.extend_from_slice(&id.to_be_bytes());
        }
        p.extend_from_slice(body);
        let mut out = (p.len() as u32).to_be_bytes().to_vec();
        out.extend(p);
        out
    }

    fn open(id: u32, path: &str, flags: u32) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, path.as_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // attrs: no flags
        packet(3, Some(id), &b)
    }

    fn handle(id: u32, h: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, h);
        packet(102, Some(id), &b)
    }

    fn write(id: u32, h: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, h);
        b.extend_from_slice(&offset.to_be_bytes());
        string(&mut b, data);
        packet(6, Some(id), &b)
    }

    fn read(id: u32, h: &[u8], offset: u64) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, h);
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&32768u32.to_be_bytes());
        packet(5, Some(id), &b)
    }

    fn data(id: u32, d: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, d);
        packet(103, Some(id), &b)
    }

    fn close(id: u32, h: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, h);
        packet(4, Some(id), &b)
    }

    fn sha(d: &[u8]) -> Option<String> {
        Some(hex::encode(Sha256::digest(d)))
    }

    #[test]
    fn an_upload_split_anywhere_is_hashed_and_reported_at_close() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut client = packet(1, None, &3u32.to_be_bytes());
        client.extend(open(1, "/tmp/up.bin", SSH_FXF_WRITE | SSH_FXF_CREAT));
        let mut rest = Vec::new();
        for (i, chunk) in body.chunks(32768).enumerate() {
            rest.extend(write(2 + i as u32, b"h1", (i * 32768) as u64, chunk));
        }
        rest.extend(close(99, b"h1"));
        let mut t = Tracker::default();
        assert!(t.client(&client).expect("ok").is_empty());
        t.server(&handle(1, b"h1")).expect("ok");
        // The client's bytes arrive in pieces of 7 bytes: packets are
        // rebuilt across them.
        let mut events = Vec::new();
        for piece in rest.chunks(7) {
            events.extend(t.client(piece).expect("ok"));
        }
        assert_eq!(
            events,
            vec![Event::File {
                path: "/tmp/up.bin".into(),
                direction: "upload",
                size: body.len() as u64,
                sha256: sha(&body),
                closed: true,
            }]
        );
    }

    #[test]
    fn a_download_is_hashed_from_the_servers_data() {
        let mut t = Tracker::default();
        t.client(&open(1, "/etc/motd", 1)).expect("ok");
        t.server(&handle(1, b"h")).expect("ok");
        t.client(&read(2, b"h", 0)).expect("ok");
        t.client(&read(3, b"h", 5)).expect("ok");
        t.server(&data(2, b"hello")).expect("ok");
        t.server(&data(3, b" world")).expect("ok");
        let events = t.client(&close(4, b"h")).expect("ok");
        assert_eq!(
            events,
            vec![Event::File {
                path: "/etc/motd".into(),
                direction: "download",
                size: 11,
                sha256: sha(b"hello world"),
                closed: true,
            }]
        );
    }

    #[test]
    fn out_of_order_writes_have_no_hash_and_open_files_are_reported_at_the_end() {
        let mut t = Tracker::default();
        t.client(&open(1, "a", SSH_FXF_WRITE)).expect("ok");
        t.server(&handle(1, b"h")).expect("ok");
        t.client(&write(2, b"h", 10, b"late")).expect("ok");
        t.client(&write(3, b"h", 0, b"early")).expect("ok");
        assert_eq!(
            t.finish(),
            vec![Event::File {
                path: "a".into(),
                direction: "upload",
                size: 14,
                sha256: None,
                closed: false,
            }]
        );
    }

    #[test]
    fn tree_changes_are_reported_and_limits_hold() {
        let mut t = Tracker::default();
        let mut b = Vec::new();
        string(&mut b, b"/tmp/old");
        string(&mut b, b"/tmp/new");
        let e = t.client(&packet(18, Some(1), &b)).expect("ok");
        assert_eq!(
            e,
            vec![Event::Op {
                op: "rename",
                path: "/tmp/old".into(),
                target: Some("/tmp/new".into())
            }]
        );
        let mut b = Vec::new();
        string(&mut b, b"posix-rename@openssh.com");
        string(&mut b, b"/tmp/a");
        string(&mut b, b"/tmp/b");
        let e = t.client(&packet(200, Some(7), &b)).expect("ok");
        assert_eq!(
            e,
            vec![Event::Op {
                op: "rename",
                path: "/tmp/a".into(),
                target: Some("/tmp/b".into())
            }]
        );
        let mut b = Vec::new();
        string(&mut b, b"/tmp/x");
        let e = t.client(&packet(13, Some(2), &b)).expect("ok");
        assert_eq!(
            e,
            vec![Event::Op {
                op: "remove",
                path: "/tmp/x".into(),
                target: None
            }]
        );
        // A huge length is refused at once, before any buffering.
        let err = Tracker::default()
            .client(&u32::MAX.to_be_bytes())
            .expect_err("too long");
        assert!(err.contains("limit"), "{err}");
        // Requests that are never answered are bounded.
        let mut t = Tracker::default();
        let err = (0..=PENDING_MAX as u32)
            .find_map(|i| t.client(&open(i, "f", 1)).err())
            .expect("bounded");
        assert!(err.contains("outstanding"), "{err}");
    }

    #[test]
    fn setstat_by_handle_and_copies_on_the_target_are_reported() {
        let mut t = Tracker::default();
        t.client(&open(1, "/srv/src", 1)).expect("ok");
        t.server(&handle(1, b"r")).expect("ok");
        t.client(&open(2, "/srv/dst", SSH_FXF_WRITE | SSH_FXF_CREAT))
            .expect("ok");
        t.server(&handle(2, b"w")).expect("ok");
        let mut b = Vec::new();
        string(&mut b, b"w");
        b.extend_from_slice(&0u32.to_be_bytes()); // attrs: no flags
        let e = t.client(&packet(10, Some(3), &b)).expect("ok");
        assert_eq!(
            e,
            vec![Event::Op {
                op: "setstat",
                path: "/srv/dst".into(),
                target: None
            }]
        );
        let mut b = Vec::new();
        string(&mut b, b"copy-data@openssh.com");
        string(&mut b, b"r");
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        string(&mut b, b"w");
        b.extend_from_slice(&0u64.to_be_bytes());
        let e = t.client(&packet(200, Some(4), &b)).expect("ok");
        assert_eq!(
            e,
            vec![Event::Op {
                op: "copy",
                path: "/srv/src".into(),
                target: Some("/srv/dst".into())
            }]
        );
        // The copied file's bytes never crossed: no hash claims them.
        let e = t.client(&close(5, b"w")).expect("ok");
        assert!(
            matches!(&e[..], [Event::File { path, sha256: None, .. }] if path == "/srv/dst"),
            "{e:?}"
        );
    }

    #[test]
    fn a_handle_over_its_limit_cuts_the_channel() {
        let mut t = Tracker::default();
        t.client(&open(1, "f", 1)).expect("ok");
        let err = t
            .server(&handle(1, &[b'h'; HANDLE_LEN_MAX + 1]))
            .expect_err("too long");
        assert!(err.contains("handle of 257 bytes"), "{err}");
        let mut t = Tracker::default();
        t.client(&open(1, "f", 1)).expect("ok");
        t.server(&handle(1, &[b'h'; HANDLE_LEN_MAX]))
            .expect("at the limit");
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..2000 {
            let mut t = Tracker::default();
            for _ in 0..8 {
                let len = rng.gen_range(0..64);
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                if rng.gen_bool(0.5) && bytes.len() >= 4 {
                    // A plausible length, so bodies get parsed.
                    let n = (bytes.len() - 4) as u32;
                    bytes[..4].copy_from_slice(&n.to_be_bytes());
                }
                let _ = if rng.gen_bool(0.5) {
                    t.client(&bytes).map(|_| ())
                } else {
                    t.server(&bytes)
                };
            }
            let _ = t.finish();
        }
    }
}
