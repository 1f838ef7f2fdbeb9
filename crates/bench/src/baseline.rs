//! Physical baselines measured in the same run: what one fsync, one loopback
//! round trip and one durable commit of the store cost on this machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use breakglass_core::{EventDraft, Timestamp};
use breakglass_store::{SqliteOptions, SqliteStore, Store};
use serde_json::json;

use crate::stats::Samples;

#[derive(Debug, Clone, Default)]
pub struct Baselines {
    /// write 4 KiB (appending) + fdatasync, seconds.
    pub fsync: Samples,
    /// 64-byte ping-pong on 127.0.0.1 between two threads, seconds.
    pub rtt: Samples,
    /// One `Store::append` of one event through the SQLite store
    /// (WAL, synchronous=FULL), seconds.
    pub commit: Samples,
}

impl Baselines {
    /// "= 7.1 fsyncs, = 52 RTTs" for a latency in seconds.
    pub fn describe(&self, secs: f64) -> String {
        let mut parts = Vec::new();
        if !self.fsync.is_empty() && self.fsync.p50() > 0.0 {
            parts.push(format!("{:.1} fsyncs", secs / self.fsync.p50()));
        }
        if !self.rtt.is_empty() && self.rtt.p50() > 0.0 {
            parts.push(format!("{:.0} RTTs", secs / self.rtt.p50()));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("= {}", parts.join(", "))
        }
    }
}

pub fn fsync(dir: &Path, n: usize) -> anyhow::Result<Samples> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        out.push(t.elapsed().as_secs_f64());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Samples::from_secs(out))
}

pub fn loopback_rtt(n: usize) -> anyhow::Result<Samples> {
    const LEN: usize = 64;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; LEN];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let msg = [7u8; LEN];
    let mut buf = [0u8; LEN];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        // The first tenth warms up.
        if i >= n / 10 {
            out.push(t.elapsed().as_secs_f64());
        }
    }
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(Samples::from_secs(out))
}

pub fn store_commit(dir: &Path, n: usize) -> anyhow::Result<Samples> {
    let store = SqliteStore::open(&dir.join("commit-probe.db"), SqliteOptions::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = Vec::with_capacity(n);
    rt.block_on(async {
        for i in 0..n + 10 {
            let draft = EventDraft {
                actor: "bench".into(),
                action: "bench.probe".into(),
                request_id: None,
                details: json!({"i": i}),
            };
            let now = Timestamp(breakglass_server::app::now().millis());
            let t = Instant::now();
            store.append(vec![draft], now).await?;
            if i >= 10 {
                out.push(t.elapsed().as_secs_f64());
            }
        }
        anyhow::Ok(())
    })?;
    Ok(Samples::from_secs(out))
}
