//! Real notification receivers on loopback: an HTTP endpoint that records
//! every POST (headers and body), checks it with the caller's signature
//! check, counts duplicates by `webhook-id`, and can be told to fail,
//! stall or answer 429; and a syslog TCP listener that keeps the raw bytes.
//! Plain `std::net` with a thread per connection: nothing in it can hide
//! what went over the wire.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest request body the receiver reads.
const BODY_LEN_MAX: usize = 1024 * 1024;
/// The most header lines of one request.
const HEADERS_MAX: usize = 100;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200.
    Ok,
    /// This status (500, 503, 404...).
    Status(u16),
    /// 429 with `Retry-After: 1`.
    TooMany,
    /// Reads the request and never answers (until the receiver drops).
    Stall,
    /// 200, after this many milliseconds (a receiver that takes its time).
    Slow(u64),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    /// Lowercased header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// What the signature check said.
    pub signature_ok: bool,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

type Check = Box<dyn Fn(&Delivery) -> bool + Send + Sync>;

struct Shared {
    mode: Mutex<Mode>,
    /// The JSON body of 200 answers (`ok` as text when unset).
    answer: Mutex<Option<String>>,
    got: Mutex<Vec<Delivery>>,
    /// Requests answered with something other than 200, by mode.
    refused: Mutex<u64>,
    stop: AtomicBool,
    check: Check,
    /// Requests being answered right now, and the most there ever were.
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// An HTTP receiver on `127.0.0.1`, stopped when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Receiver {
    /// `check` decides whether a delivery's signature is valid (return
    /// true when there is nothing to check).
    pub fn start(check: impl Fn(&Delivery) -> bool + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("receiver binds loopback");
        let addr = listener.local_addr().expect("receiver address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Ok),
            answer: Mutex::new(None),
            got: Mutex::new(Vec::new()),
            refused: Mutex::new(0),
            stop: AtomicBool::new(false),
            check: Box::new(check),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Receiver { addr, shared }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Answers 200s with this JSON body from now on (an API the service
    /// calls, rather than a sink it delivers to).
    pub fn set_answer(&self, json: &serde_json::Value) {
        *self.shared.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(json.to_string());
    }

    /// The most requests this receiver was answering at once.
    pub fn most_in_flight(&self) -> usize {
        self.shared.most_in_flight.load(Ordering::SeqCst)
    }

    /// Every request answered 200 (or stalled), in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared
            .got
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests answered with an error status.
    pub fn refused(&self) -> u64 {
        *self
            .shared
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// How often each `webhook-id` arrived.
    pub fn counts_by_id(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for d in self.deliveries() {
            if let Some(id) = d.header("webhook-id") {
                *out.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(conn: TcpStream, s: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut out = write_half;
    // Keep-alive: serve requests until the client closes.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        for _ in 0..HEADERS_MAX {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            .min(BODY_LEN_MAX);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut d = Delivery {
            path,
            headers,
            body,
            signature_ok: false,
        };
        d.signature_ok = (s.check)(&d);
        let mode = *s.mode.lock().unwrap_or_else(|p| p.into_inner());
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.most_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Mode::Slow(ms) = mode {
            std::thread::sleep(Duration::from_millis(ms));
        }
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        let answer = match mode {
            Mode::Ok | Mode::Slow(_) => {
                s.got.lock().unwrap_or_else(|p| p.into_inner()).push(d);
                match s
                    .answer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_deref()
                {
                    Some(json) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                        json.len()
                    ),
                    None => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
                }
            }
            Mode::Status(code) => {
                *s.refused.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                format!("HTTP/1.1 {code} Error\r\ncontent-length: 0\r\n\r\n")
            }
            Mode::TooMany => {
                *s.refused.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"
                    .to_string()
            }
            Mode::Stall => {
                while !s.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A TCP listener on `127.0.0.1` that keeps every byte it receives (for a
/// syslog sink), stopped when dropped.
pub struct TcpSink {
    pub addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl TcpSink {
    pub fn start() -> TcpSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("tcp sink binds loopback");
        let addr = listener.local_addr().expect("tcp sink address");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let b = b.clone();
                std::thread::spawn(move || {
                    // Kept as it arrives: a sink keeps its connection open.
                    let mut buf = [0u8; 64 * 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => b
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        TcpSink { addr, bytes, stop }
    }

    /// Everything received so far, in the order it arrived.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}
