//! Per-session recordings: JSON lines with their own hash chain.
//!
//! Entry `n` is a JSON object with `seq` (from 1), `time`, `kind` and the
//! kind's fields; `hash(n) = SHA-256(hash(n-1) || canonical(n))` where
//! `canonical(n)` is the entry's canonical JSON without its `hash` field and
//! `hash(0)` is 32 zero bytes. The final hash goes into the main audit chain's
//! `session.ended` event.
//!
//! Durability: each entry is written to the file with one `write` before the
//! statement it records is forwarded, so a `kill -9` of breakglass cannot
//! lose a statement that reached the database. A flusher thread makes
//! written entries durable (`fdatasync`) within `FLUSH_INTERVAL_MS`; strict
//! mode syncs before forwarding instead.
//!
//! Anchoring: after each sync the flusher publishes the recording's durable
//! point (entry count and hash); the gateway anchors the points that moved
//! into the main audit chain (`session.progress`), so a recording cannot be
//! shortened or rewritten after a crash without recovery and verification
//! noticing.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use breakglass_core::Timestamp;
use breakglass_core::audit::canonical_json;
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::entry::write_entry;
pub use crate::entry::{Field, RESERVED, write_str};

/// Written entries become durable within this bound (group-committed).
pub const FLUSH_INTERVAL_MS: u64 = 5;
/// A recording line longer than this is refused when reading.
const LINE_LEN_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum RecordingError {
    #[error("recording {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("recording {path} broken at entry {seq}: {reason}")]
    Broken {
        path: String,
        seq: u64,
        reason: String,
    },
    /// The recording does not hold what the audit chain anchored.
    #[error("recording {path} differs from what the audit chain anchored: {reason}")]
    Unanchored { path: String, reason: String },
}

struct Dirty {
    file: Weak<File>,
    dirty: Arc<AtomicBool>,
    progress: Weak<Progress>,
}

/// A point of a recording's chain: entries `1..=entries` hash to `hash`.
pub type Point = (u64, [u8; 32]);

/// Where a live recording stands: what was written, what is durable, what
/// the audit chain anchors.
#[derive(Default)]
struct Progress {
    /// Set after each `write` (entries already handed to the kernel).
    written: Mutex<Point>,
    /// Set by the flusher after a sync (or by a strict write).
    durable: Mutex<Point>,
    /// Entry count of the newest `session.progress` committed.
    anchored: AtomicU64,
    /// The recording was closed; its end goes into `session.ended`.
    closed: AtomicBool,
}

/// A live session whose durable recording moved past its last anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionProgress {
    pub session_id: String,
    pub request_id: String,
    pub principal: String,
    pub entries: u64,
    pub hash: [u8; 32],
}

struct Live {
    request_id: String,
    principal: String,
    progress: Weak<Progress>,
}

/// Opens recordings in one directory and keeps them flushed.
pub struct Recorder {
    dir: PathBuf,
    strict: bool,
    dirty: Arc<Mutex<Vec<Dirty>>>,
    live: Mutex<std::collections::HashMap<String, Live>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    /// `strict`: fsync every entry before the statement is forwarded.
    pub fn new(dir: &Path, strict: bool) -> std::io::Result<Recorder> {
        std::fs::create_dir_all(dir)?;
        let dirty: Arc<Mutex<Vec<Dirty>>> = Arc::default();
        let weak = Arc::downgrade(&dirty);
        std::thread::Builder::new()
            .name("recording-flush".into())
            .spawn(move || flush_loop(weak))?;
        Ok(Recorder {
            dir: dir.to_path_buf(),
            strict,
            dirty,
            live: Mutex::default(),
        })
    }

    /// The live recordings whose durable point moved past their anchor
    /// (the header alone is never anchored: `session.started` covers it).
    pub fn moved(&self) -> Vec<SessionProgress> {
        let mut live = lock(&self.live);
        live.retain(|_, l| l.progress.strong_count() > 0);
        live.iter()
            .filter_map(|(id, l)| {
                let p = l.progress.upgrade()?;
                if p.closed.load(Ordering::Acquire) {
                    return None;
                }
                let (entries, hash) = *lock(&p.durable);
                (entries >= 2 && entries > p.anchored.load(Ordering::Acquire)).then(|| {
                    SessionProgress {
                        session_id: id.clone(),
                        request_id: l.request_id.clone(),
                        principal: l.principal.clone(),
                        entries,
                        hash,
                    }
                })
            })
            .collect()
    }

    /// Notes that `done` is committed to the audit chain.
    pub fn anchored(&self, done: &[SessionProgress]) {
        let live = lock(&self.live);
        for d in done {
            if let Some(p) = live.get(&d.session_id).and_then(|l| l.progress.upgrade()) {
                p.anchored.fetch_max(d.entries, Ordering::AcqRel);
            }
        }
    }

    pub fn path_of(dir: &Path, session_id: &str) -> PathBuf {
        dir.join(format!("{session_id}.jsonl"))
    }

    fn marker_of(dir: &Path, session_id: &str) -> PathBuf {
        dir.join(format!("{session_id}.open"))
    }

    /// Whether a session's recording may still grow: its `.open` marker is
    /// removed only after the `end` entry is durable.
    pub fn is_open(dir: &Path, session_id: &str) -> bool {
        Self::marker_of(dir, session_id).exists()
    }

    /// Closes the recordings of sessions that were live when the process
    /// died (their `.open` marker is still there): drops a torn last line,
    /// appends an `end` entry with `reason`, and returns each session's id
    /// and summary. Without anchors: see [`Recorder::close_interrupted`].
    pub fn recover_interrupted(
        dir: &Path,
        reason: &str,
        now: Timestamp,
    ) -> Vec<(String, Result<RecordingSummary, RecordingError>)> {
        Self::interrupted(dir)
            .into_iter()
            .map(|id| {
                let result = Self::close_interrupted(dir, &id, reason, now, None);
                if result.is_ok() {
                    let _ = Self::forget_marker(dir, &id);
                }
                (id, result)
            })
            .collect()
    }

    /// Ids of the sessions whose `.open` marker is still there (live when
    /// the process died, or being recorded now).
    pub fn interrupted(dir: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_suffix(".open").map(str::to_string)
            })
            .collect();
        out.sort();
        out
    }

    /// Closes one interrupted recording (see [`Recorder::recover_interrupted`])
    /// after checking it against `anchor`, the newest point the audit chain
    /// anchored: a recording shorter than it, or whose chain does not pass
    /// through it, is refused with [`RecordingError::Unanchored`] and left
    /// as it is. The marker stays; [`Recorder::forget_marker`] removes it.
    pub fn close_interrupted(
        dir: &Path,
        id: &str,
        reason: &str,
        now: Timestamp,
        anchor: Option<Point>,
    ) -> Result<RecordingSummary, RecordingError> {
        close_interrupted(dir, id, reason, now, anchor)
    }

    /// Removes a session's `.open` marker.
    pub fn forget_marker(dir: &Path, id: &str) -> std::io::Result<()> {
        std::fs::remove_file(Self::marker_of(dir, id))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the recording of a session refused before it started
    /// (nothing of it reached the database). The marker goes first: a crash
    /// in between leaves a headless file no event refers to, not a marker
    /// that a restart would close as an interrupted session.
    pub fn discard(&self, rec: Recording, session_id: &str) -> std::io::Result<()> {
        drop(rec);
        std::fs::remove_file(Self::marker_of(&self.dir, session_id))?;
        std::fs::remove_file(Self::path_of(&self.dir, session_id))
    }

    /// Creates the recording of a new session, starting with `header`.
    pub fn open(
        &self,
        session_id: &str,
        header: Value,
        now: Timestamp,
    ) -> std::io::Result<Recording> {
        let path = Self::path_of(&self.dir, session_id);
        let marker = Self::marker_of(&self.dir, session_id);
        std::fs::File::create(&marker)?;
        // INVARIANT: a failed open leaves neither marker nor file behind (a
        // marker would make a restart close a session that never started).
        let file = match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Arc::new(f),
            Err(e) => {
                let _ = std::fs::remove_file(&marker);
                return Err(e);
            }
        };
        let dirty = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        if !self.strict {
            lock(&self.dirty).push(Dirty {
                file: Arc::downgrade(&file),
                dirty: dirty.clone(),
                progress: Arc::downgrade(&progress),
            });
        }
        lock(&self.live).insert(
            session_id.to_string(),
            Live {
                request_id: header["request_id"].as_str().unwrap_or("").to_string(),
                principal: header["principal"].as_str().unwrap_or("").to_string(),
                progress: Arc::downgrade(&progress),
            },
        );
        let mut rec = Recording {
            file,
            dirty,
            progress: Some(progress),
            strict: self.strict,
            seq: 0,
            prev: [0; 32],
            statements: 0,
            marker: Some(marker.clone()),
            pending: Vec::new(),
            time: (i64::MIN, String::new()),
        };
        if let Err(e) = rec.append_value("session", header, now) {
            drop(rec);
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&marker);
            return Err(e);
        }
        Ok(rec)
    }
}

/// Syncs every dirty recording `FLUSH_INTERVAL_MS` after the previous pass
/// ended, so an entry is durable within the interval plus two passes.
/// (Counting the interval from the start of each pass instead was measured
/// to double the syncs of busy sessions.) A pass longer than the interval
/// is logged, at most once a minute: the durability bound is then no longer
/// held.
fn flush_loop(list: Weak<Mutex<Vec<Dirty>>>) {
    let interval = Duration::from_millis(FLUSH_INTERVAL_MS);
    let mut warned: Option<std::time::Instant> = None;
    loop {
        std::thread::sleep(interval);
        let started = std::time::Instant::now();
        let Some(list) = list.upgrade() else { return };
        let files: Vec<(Arc<File>, Weak<Progress>)> = {
            let mut l = lock(&list);
            l.retain(|d| d.file.strong_count() > 0);
            l.iter()
                .filter(|d| d.dirty.swap(false, Ordering::AcqRel))
                .filter_map(|d| Some((d.file.upgrade()?, d.progress.clone())))
                .collect()
        };
        let synced = files.len();
        for (f, progress) in files {
            // What was written before the sync is durable after it.
            let progress = progress.upgrade();
            let point = progress.as_ref().map(|p| *lock(&p.written));
            match f.sync_data() {
                Ok(()) => {
                    if let (Some(p), Some(point)) = (progress, point) {
                        let mut d = lock(&p.durable);
                        if point.0 > d.0 {
                            *d = point;
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot sync a session recording"),
            }
        }
        let took = started.elapsed();
        if took > interval && warned.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
            warned = Some(std::time::Instant::now());
            tracing::warn!(
                recordings = synced,
                took_ms = took.as_millis() as u64,
                "syncing the session recordings took longer than {FLUSH_INTERVAL_MS} ms; statements may take longer than usual to become durable"
            );
        }
    }
}

/// One session's recording.
pub struct Recording {
    file: Arc<File>,
    dirty: Arc<AtomicBool>,
    /// Published points (live recordings only).
    progress: Option<Arc<Progress>>,
    strict: bool,
    seq: u64,
    prev: [u8; 32],
    statements: u64,
    /// Removed when the session ends cleanly.
    marker: Option<PathBuf>,
    /// Encoded entries not yet written (see `append_deferred`).
    pending: Vec<u8>,
    /// The last entry's time (ms) and its RFC 3339 text.
    time: (i64, String),
}

fn close_interrupted(
    dir: &Path,
    id: &str,
    reason: &str,
    now: Timestamp,
    anchor: Option<Point>,
) -> Result<RecordingSummary, RecordingError> {
    let path = Recorder::path_of(dir, id);
    let label = path.display().to_string();
    let io = |source| RecordingError::Io {
        path: label.clone(),
        source,
    };
    let s = match anchor {
        Some(point) => read_through(&path, point)?,
        None => read_recording(&path, |_| {})?,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io)?;
    // A line torn by the crash never reached the database (entries are
    // written before forwarding), so it is dropped.
    file.set_len(s.valid_len).map_err(io)?;
    drop(file);
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io)?;
    let mut rec = Recording {
        file: Arc::new(file),
        dirty: Arc::new(AtomicBool::new(false)),
        progress: None,
        strict: true,
        seq: s.entries,
        prev: s.final_hash,
        statements: s.statements,
        marker: None,
        pending: Vec::new(),
        time: (i64::MIN, String::new()),
    };
    rec.append("end", &[("reason", Field::Str(reason))], now)
        .map_err(io)?;
    Ok(RecordingSummary {
        entries: rec.seq,
        statements: rec.statements,
        final_hash: rec.prev,
        header: s.header,
        valid_len: s.valid_len,
    })
}

/// The entry kinds that count as statements: what a PostgreSQL session
/// ran (`query`, `execute`) and an SSH session's exec commands (`exec`).
fn is_statement(kind: &str) -> bool {
    matches!(kind, "query" | "execute" | "exec")
}

fn entry_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

impl Recording {
    /// Writes one entry, after any deferred ones, with one `write`; returns
    /// its `seq`. `fields` are sorted by key, without [`RESERVED`] keys.
    pub fn append(
        &mut self,
        kind: &str,
        fields: &[(&str, Field<'_>)],
        now: Timestamp,
    ) -> std::io::Result<u64> {
        let seq = self.encode(kind, fields, now);
        self.flush()?;
        Ok(seq)
    }

    /// [`Recording::append`] of a JSON object's members (members with
    /// [`RESERVED`] keys are dropped).
    pub fn append_value(
        &mut self,
        kind: &str,
        fields: Value,
        now: Timestamp,
    ) -> std::io::Result<u64> {
        let members: Vec<(String, String)> = match &fields {
            Value::Object(m) => m
                .iter()
                .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), canonical_json(v)))
                .collect(),
            _ => Vec::new(),
        };
        let mut sorted: Vec<(&str, Field<'_>)> = members
            .iter()
            .map(|(k, v)| (k.as_str(), Field::Json(v)))
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        self.append(kind, &sorted, now)
    }

    /// Chains an entry now but writes it with the next `append` or `flush`
    /// (outcomes: they need not precede anything, and sharing a write with
    /// the next statement halves the writes of a busy session).
    pub fn append_deferred(
        &mut self,
        kind: &str,
        fields: &[(&str, Field<'_>)],
        now: Timestamp,
    ) -> u64 {
        self.encode(kind, fields, now)
    }

    /// Whether deferred entries wait to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes the deferred entries.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        (&*self.file).write_all(&self.pending)?;
        self.pending.clear();
        let point = (self.seq, self.prev);
        if self.strict {
            self.file.sync_data()?;
            if let Some(p) = &self.progress {
                *lock(&p.durable) = point;
            }
        } else {
            if let Some(p) = &self.progress {
                *lock(&p.written) = point;
            }
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Encodes an entry into `pending` and advances the chain.
    fn encode(&mut self, kind: &str, fields: &[(&str, Field<'_>)], now: Timestamp) -> u64 {
        let seq = self.seq + 1;
        if self.time.0 != now.0 {
            self.time = (now.0, now.to_rfc3339());
        }
        let start = self.pending.len();
        write_entry(&mut self.pending, fields, kind, seq, &self.time.1);
        let hash = entry_hash(&self.prev, &self.pending[start..]);
        // The line is the canonical entry with its hash appended as the last
        // member (readers remove it and re-canonicalise), so it is encoded
        // once. An entry always has members (`kind`, `seq`, `time`).
        self.pending.pop();
        self.pending.extend_from_slice(b",\"hash\":\"");
        let mut hex = [0u8; 64];
        for (pair, b) in hex.chunks_exact_mut(2).zip(hash) {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        self.pending.extend_from_slice(&hex);
        self.pending.extend_from_slice(b"\"}\n");
        self.seq = seq;
        self.prev = hash;
        if is_statement(kind) {
            self.statements += 1;
        }
        seq
    }

    pub fn final_hash(&self) -> [u8; 32] {
        self.prev
    }

    pub fn statements(&self) -> u64 {
        self.statements
    }

    pub fn entries(&self) -> u64 {
        self.seq
    }

    /// Makes everything written so far durable and marks the recording
    /// complete.
    pub fn close(&mut self) -> std::io::Result<()> {
        if let Some(p) = &self.progress {
            p.closed.store(true, Ordering::Release);
        }
        self.flush()?;
        self.file.sync_data()?;
        if let Some(m) = self.marker.take() {
            std::fs::remove_file(m)?;
        }
        Ok(())
    }
}

/// What a verified recording holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingSummary {
    pub entries: u64,
    pub statements: u64,
    pub final_hash: [u8; 32],
    /// The `session` header (first entry).
    pub header: Value,
    /// Bytes of complete entries (a torn last line is not counted).
    pub valid_len: u64,
}

/// A point between two entries of a recording: reading can resume here
/// without re-reading (and re-verifying) what came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Byte offset of the next entry.
    pub offset: u64,
    /// `seq` of the entry before this point.
    pub seq: u64,
    /// Hash of the entry before this point.
    pub prev: [u8; 32],
}

/// Reads a recording, checking every link, and that its chain passes
/// through `point` (entry `point.0` has hash `point.1`): the recording holds
/// at least what was anchored, unchanged.
pub fn read_through(path: &Path, point: Point) -> Result<RecordingSummary, RecordingError> {
    let mut at = None;
    let s = read_recording_from(path, None, |_, here| {
        if here.seq == point.0 {
            at = Some(here.prev);
        }
        ControlFlow::Continue(())
    })?;
    let unanchored = |reason: String| RecordingError::Unanchored {
        path: path.display().to_string(),
        reason,
    };
    match at {
        None if point.0 > 0 => Err(unanchored(format!(
            "it holds {} entries, the audit chain anchored {}",
            s.entries, point.0
        ))),
        Some(h) if h != point.1 => Err(unanchored(format!(
            "entry {} does not have the anchored hash",
            point.0
        ))),
        _ => Ok(s),
    }
}

/// Reads a recording, checking every link; `visit` sees each entry.
pub fn read_recording(
    path: &Path,
    mut visit: impl FnMut(&Value),
) -> Result<RecordingSummary, RecordingError> {
    read_recording_from(path, None, |v, _| {
        visit(v);
        ControlFlow::Continue(())
    })
}

/// Reads a recording from the start, or from `from` (a point an earlier
/// read of the same file returned), checking every link it reads; `visit`
/// sees each entry and the point after it, and may stop the read. The
/// summary then covers what was read (`header` only when reading from the
/// start).
pub fn read_recording_from(
    path: &Path,
    from: Option<Resume>,
    visit: impl FnMut(&Value, Resume) -> ControlFlow<()>,
) -> Result<RecordingSummary, RecordingError> {
    let label = path.display().to_string();
    let io = |source| RecordingError::Io {
        path: label.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let start = from.unwrap_or(Resume {
        offset: 0,
        seq: 0,
        prev: [0u8; 32],
    });
    file.seek(SeekFrom::Start(start.offset)).map_err(io)?;
    read_entries(BufReader::new(file), &label, start, visit)
}

/// Reads a recording held in memory (an evidence bundle carries its
/// recordings as their bytes), checking every link like
/// [`read_recording`]. `label` names it in errors.
pub fn read_recording_bytes(
    bytes: &[u8],
    label: &str,
    mut visit: impl FnMut(&Value),
) -> Result<RecordingSummary, RecordingError> {
    let start = Resume {
        offset: 0,
        seq: 0,
        prev: [0u8; 32],
    };
    read_entries(bytes, label, start, |v, _| {
        visit(v);
        ControlFlow::Continue(())
    })
}

fn read_entries(
    mut reader: impl BufRead,
    label: &str,
    start: Resume,
    mut visit: impl FnMut(&Value, Resume) -> ControlFlow<()>,
) -> Result<RecordingSummary, RecordingError> {
    let io = |source| RecordingError::Io {
        path: label.to_string(),
        source,
    };
    let mut prev = start.prev;
    let mut seq = start.seq;
    let mut statements = 0;
    let mut header = Value::Null;
    let mut valid_len = start.offset;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(LINE_LEN_MAX as u64 + 1)
            .read_line(&mut line)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        let broken = |reason: &str| RecordingError::Broken {
            path: label.to_string(),
            seq: seq + 1,
            reason: reason.to_string(),
        };
        if !line.ends_with('\n') {
            // A torn last line (crash mid-write) is not part of the chain.
            if n > LINE_LEN_MAX {
                return Err(broken("entry too long"));
            }
            break;
        }
        let mut v: Value = serde_json::from_str(&line).map_err(|_| broken("not JSON"))?;
        let stored = v
            .as_object_mut()
            .and_then(|m| m.remove("hash"))
            .and_then(|h| h.as_str().map(str::to_string))
            .ok_or_else(|| broken("no hash"))?;
        if v["seq"].as_u64() != Some(seq + 1) {
            return Err(broken("seq out of order"));
        }
        let hash = entry_hash(&prev, canonical_json(&v).as_bytes());
        if hex::encode(hash) != stored {
            return Err(broken("hash does not match the entry and its predecessor"));
        }
        if seq == 0 {
            header = v.clone();
        }
        if v["kind"].as_str().is_some_and(is_statement) {
            statements += 1;
        }
        v["hash"] = Value::String(stored);
        prev = hash;
        seq += 1;
        valid_len += n as u64;
        let here = Resume {
            offset: valid_len,
            seq,
            prev,
        };
        if visit(&v, here).is_break() {
            break;
        }
    }
    Ok(RecordingSummary {
        entries: seq,
        statements,
        final_hash: prev,
        header,
        valid_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recordings_chain_and_detect_tampering() {
        let dir = std::env::temp_dir().join(format!("bg-rec-{}", std::process::id()));
        let rec = Recorder::new(&dir, false).expect("recorder");
        let mut r = rec
            .open("s1", json!({"request_id": "r1"}), Timestamp(1))
            .expect("open");
        r.append("query", &[("text", Field::Str("select 1"))], Timestamp(2))
            .expect("append");
        r.append(
            "result",
            &[
                ("statement", Field::U64(2)),
                ("tag", Field::Str("SELECT 1")),
            ],
            Timestamp(3),
        )
        .expect("append");
        let path = Recorder::path_of(&dir, "s1");
        let s = read_recording(&path, |_| {}).expect("verifies");
        assert_eq!(
            (s.entries, s.statements, s.final_hash),
            (3, 1, r.final_hash())
        );
        // A crash: torn last line, marker still there.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"kind\":\"qu"))
            .expect("tear");
        let rec2 = Recorder::recover_interrupted(&dir, "service_restart", Timestamp(9));
        assert_eq!(rec2.len(), 1);
        let (id, summary) = &rec2[0];
        let summary = summary.as_ref().expect("recovered");
        assert_eq!(
            (id.as_str(), summary.entries, summary.statements),
            ("s1", 4, 1)
        );
        let again = read_recording(&path, |_| {}).expect("verifies after recovery");
        assert_eq!(again.final_hash, summary.final_hash);
        assert!(Recorder::recover_interrupted(&dir, "x", Timestamp(10)).is_empty());
        assert_eq!(s.header["request_id"], "r1");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("select 1", "select 2")).expect("write");
        let err = read_recording(&path, |_| {}).expect_err("tampered");
        assert!(err.to_string().contains("entry 2"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reading_resumes_where_an_earlier_read_stopped() {
        let dir = std::env::temp_dir().join(format!("bg-rec-resume-{}", std::process::id()));
        let rec = Recorder::new(&dir, false).expect("recorder");
        let mut r = rec
            .open("s2", json!({"request_id": "r2"}), Timestamp(1))
            .expect("open");
        for i in 0..10u64 {
            let text = format!("select {i}");
            r.append(
                "query",
                &[("text", Field::Str(&text))],
                Timestamp(2 + i as i64),
            )
            .expect("append");
        }
        r.close().expect("close");
        let path = Recorder::path_of(&dir, "s2");
        let mut all = Vec::new();
        read_recording_from(&path, None, |v, here| {
            all.push((v.clone(), here));
            ControlFlow::Continue(())
        })
        .expect("verifies");
        assert_eq!(all.len(), 11);
        // Stop after the fifth entry, then resume there.
        let mut stopped = None;
        read_recording_from(&path, None, |_, here| {
            stopped = Some(here);
            if here.seq == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("verifies");
        let at = stopped.expect("stopped");
        assert_eq!(at, all[4].1);
        let mut rest = Vec::new();
        let summary = read_recording_from(&path, Some(at), |v, _| {
            rest.push(v.clone());
            ControlFlow::Continue(())
        })
        .expect("resumes");
        let expected: Vec<Value> = all[5..].iter().map(|(v, _)| v.clone()).collect();
        assert_eq!(rest, expected);
        assert_eq!(summary.final_hash, r.final_hash());
        // A resume point whose hash is not the chain's is caught at once.
        let forged = Resume {
            prev: [7; 32],
            ..at
        };
        let err = read_recording_from(&path, Some(forged), |_, _| ControlFlow::Continue(()))
            .expect_err("forged resume point");
        assert!(err.to_string().contains("entry 6"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn durable_points_are_published_and_recovery_holds_recordings_to_them() {
        let dir = std::env::temp_dir().join(format!("bg-rec-anchor-{}", std::process::id()));
        let rec = Recorder::new(&dir, false).expect("recorder");
        let mut r = rec
            .open(
                "s3",
                json!({"request_id": "r3", "principal": "alice"}),
                Timestamp(1),
            )
            .expect("open");
        // The header alone is never anchored.
        std::thread::sleep(Duration::from_millis(50));
        assert!(rec.moved().is_empty());
        for i in 0..4u64 {
            let text = format!("select {i}");
            r.append("query", &[("text", Field::Str(&text))], Timestamp(2))
                .expect("append");
        }
        // The flusher publishes the point once it is synced.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let moved = loop {
            let m = rec.moved();
            if m.first().is_some_and(|p| p.entries == 5) {
                break m;
            }
            assert!(std::time::Instant::now() < deadline, "not published: {m:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            (
                moved[0].session_id.as_str(),
                moved[0].request_id.as_str(),
                moved[0].principal.as_str()
            ),
            ("s3", "r3", "alice")
        );
        assert_eq!(moved[0].hash, r.final_hash());
        rec.anchored(&moved);
        assert!(rec.moved().is_empty(), "nothing moved since the anchor");
        let anchor = (moved[0].entries, moved[0].hash);
        drop(r);

        let path = Recorder::path_of(&dir, "s3");
        read_through(&path, anchor).expect("holds the anchor");
        read_through(&path, (3, [0; 32])).expect_err("another hash at entry 3");
        read_through(&path, (6, anchor.1)).expect_err("longer than the file");
        // Recovery refuses a recording that is shorter than the anchor, and
        // leaves it as it is.
        let text = std::fs::read_to_string(&path).expect("read");
        let short: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, &short).expect("shorten");
        let err =
            Recorder::close_interrupted(&dir, "s3", "service_restart", Timestamp(9), Some(anchor))
                .expect_err("shorter than anchored");
        assert!(matches!(err, RecordingError::Unanchored { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), short);
        assert!(Recorder::is_open(&dir, "s3"));
        // Restored, it is closed normally.
        std::fs::write(&path, &text).expect("restore");
        let s =
            Recorder::close_interrupted(&dir, "s3", "service_restart", Timestamp(9), Some(anchor))
                .expect("holds the anchor");
        assert_eq!(s.entries, 6);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
