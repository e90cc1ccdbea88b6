//! `records-server`: a data product's records over HTTP/1.1.
//!
//! - `GET /healthz` → `200 ok`
//! - `GET /records` → the records as a JSON array
//! - `GET /records/{id}` → one record, or 404
//!
//! `HEAD` works wherever `GET` does. Records are a JSON array of objects,
//! each with an `id` (string or integer), read once at start from the file
//! named by `RECORDS_FILE`; without it a built-in sample of three orders
//! is served. The server listens on `LISTEN_ADDR` (an `ip:port`, default
//! `0.0.0.0:8080`; port 0 picks a free one), prints
//! `listening on ADDR` first, then one line per request on stdout, and
//! answers each connection once (`Connection: close`) from a small pool
//! of threads. SIGTERM or SIGINT stops it cleanly: no new connections,
//! the ones accepted are answered, exit status 0.
//!
//! Std only (plus `libc` for signals and `serde_json`), so the static
//! binary stays small.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8080";
const WORKERS: usize = 4;
/// Connections accepted but not yet picked up by a worker.
const QUEUE: usize = 64;
const MAX_REQUEST_HEAD: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const SAMPLE_RECORDS: &str = r#"[
  {"id": "ord-1001", "customer": "acme-corp", "item": "widget", "quantity": 3, "total_cents": 1497, "status": "shipped"},
  {"id": "ord-1002", "customer": "globex", "item": "gadget", "quantity": 1, "total_cents": 2999, "status": "pending"},
  {"id": "ord-1003", "customer": "initech", "item": "stapler", "quantity": 12, "total_cents": 8388, "status": "delivered"}
]"#;

/// The served data, encoded once at start.
struct Records {
    /// `GET /records` body.
    all: String,
    /// id → `GET /records/{id}` body.
    by_id: HashMap<String, String>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("records-server: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let addr_text = env_or("LISTEN_ADDR", DEFAULT_LISTEN_ADDR)?;
    // Parsed, not resolved: no DNS (and no NSS in a static binary).
    let addr: SocketAddr = addr_text
        .parse()
        .map_err(|_| format!("LISTEN_ADDR={addr_text:?}: not an ip:port address"))?;
    let (records, source) = match std::env::var_os("RECORDS_FILE").filter(|v| !v.is_empty()) {
        Some(path) => {
            let shown = path.to_string_lossy().into_owned();
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("RECORDS_FILE {shown}: {e}"))?;
            let records = load_records(&text).map_err(|e| format!("RECORDS_FILE {shown}: {e}"))?;
            (records, shown)
        }
        None => (
            load_records(SAMPLE_RECORDS).map_err(|e| format!("built-in sample: {e}"))?,
            "the built-in sample".to_string(),
        ),
    };

    // Block the stop signals before any thread exists, so every thread
    // inherits the mask and only the signal thread receives them.
    let signals = block_stop_signals().map_err(|e| format!("blocking SIGTERM: {e}"))?;
    let listener =
        Arc::new(TcpListener::bind(addr).map_err(|e| format!("listening on {addr}: {e}"))?);
    let local = listener
        .local_addr()
        .map_err(|e| format!("listening on {addr}: {e}"))?;
    log(&format!(
        "listening on {local} ({} records from {source})",
        records.by_id.len()
    ));

    let stopping = Arc::new(AtomicBool::new(false));
    {
        let listener = Arc::clone(&listener);
        let stopping = Arc::clone(&stopping);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let signal = wait_for_signal(&signals);
                log(&format!("received {}, shutting down", signal_name(signal)));
                stopping.store(true, Ordering::SeqCst);
                // Wakes the accept() below (Linux returns EINVAL on a
                // listening socket that was shut down).
                // SAFETY: the fd belongs to `listener`, which this thread
                // keeps alive through its Arc.
                unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            })
            .map_err(|e| format!("starting the signal thread: {e}"))?;
    }

    let records = Arc::new(records);
    let (queue, jobs) = mpsc::sync_channel::<TcpStream>(QUEUE);
    let jobs = Arc::new(Mutex::new(jobs));
    let mut workers = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let jobs = Arc::clone(&jobs);
        let records = Arc::clone(&records);
        let worker = thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || loop {
                // A poisoned lock means another worker panicked while
                // receiving; the receiver itself is still fine.
                let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                match next {
                    Ok(stream) => serve(stream, &records),
                    Err(_) => return,
                }
            })
            .map_err(|e| format!("starting worker {i}: {e}"))?;
        workers.push(worker);
    }

    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => {
                if queue.send(stream).is_err() {
                    break;
                }
            }
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(e) => {
                log(&format!("accept: {e}"));
                // Out of file descriptors and the like: do not spin.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    drop(queue);
    for worker in workers {
        let _ = worker.join();
    }
    log("stopped");
    Ok(())
}

fn env_or(name: &str, default: &str) -> Result<String, String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(default.to_string()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name}: not valid UTF-8")),
    }
}

fn load_records(text: &str) -> Result<Records, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Array(items) = value else {
        return Err("must hold a JSON array of records".to_string());
    };
    let mut by_id = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let id = match item.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return Err(format!("record {i}: \"id\" must be a string or a number")),
            None if item.is_object() => return Err(format!("record {i}: has no \"id\"")),
            None => return Err(format!("record {i}: not a JSON object")),
        };
        let body = serde_json::to_string(item).map_err(|e| format!("record {i}: {e}"))?;
        if by_id.insert(id.clone(), body).is_some() {
            return Err(format!("record {i}: id {id:?} appears twice"));
        }
    }
    let all = serde_json::to_string(&items).map_err(|e| e.to_string())?;
    Ok(Records { all, by_id })
}

/// One line on stdout; a closed stdout is ignored (SIGPIPE is ignored by
/// Rust programs, so the write just fails).
fn log(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "records-server: {line}");
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn json(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: "application/json",
            body,
            allow: false,
        }
    }

    fn error(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "error": message }).to_string();
        Response::json(status, body)
    }
}

fn serve(mut stream: TcpStream, records: &Records) {
    let started = Instant::now();
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string());
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let (request_line, response, head_only) = match read_head(&mut stream) {
        Ok(Some(head)) => {
            let line = head.lines().next().unwrap_or("").to_string();
            let (response, head_only) = route(&line, records);
            (line, response, head_only)
        }
        // Connected and closed without a request (a TCP probe).
        Ok(None) => return,
        Err(e) => (
            String::from("-"),
            Response::error(400, &format!("bad request: {e}")),
            false,
        ),
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    if response.allow {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    let mut written = stream.write_all(head.as_bytes());
    if written.is_ok() && !head_only {
        written = stream.write_all(response.body.as_bytes());
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
    let outcome = match written {
        Ok(()) => String::new(),
        Err(e) => format!(" (write failed: {e})"),
    };
    log(&format!(
        "{peer} \"{request_line}\" {} {}B {}us{outcome}",
        response.status,
        response.body.len(),
        started.elapsed().as_micros()
    ));
}

/// Reads up to the blank line ending the request head. `None` when the
/// peer closed before sending anything.
fn read_head(stream: &mut TcpStream) -> Result<Option<String>, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err("connection closed inside the request head".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return String::from_utf8(buf)
                .map(Some)
                .map_err(|_| "request head is not UTF-8".to_string());
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Err(format!("request head longer than {MAX_REQUEST_HEAD} bytes"));
        }
    }
}

/// The response to a request line, and whether it is a HEAD request.
fn route(line: &str, records: &Records) -> (Response, bool) {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Response::error(400, "malformed request line"), false);
    };
    if !version.starts_with("HTTP/1.") {
        return (Response::error(505, "only HTTP/1.x is served"), false);
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let head_only = method == "HEAD";
    let known = path == "/healthz" || path == "/records" || path.starts_with("/records/");
    if !known {
        return (Response::error(404, "not found"), head_only);
    }
    if method != "GET" && !head_only {
        let mut r = Response::error(405, "method not allowed");
        r.allow = true;
        return (r, false);
    }
    let response = if path == "/healthz" {
        Response {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: "ok".to_string(),
            allow: false,
        }
    } else if path == "/records" {
        Response::json(200, records.all.clone())
    } else {
        let id = &path["/records/".len()..];
        match records.by_id.get(id) {
            Some(body) => Response::json(200, body.clone()),
            None => Response::error(404, &format!("no record with id {id:?}")),
        }
    };
    (response, head_only)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

fn block_stop_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; it is initialised by sigemptyset
    // before use, and pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> libc::c_int {
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is an initialised signal set; `signal` is a valid
        // out-pointer.
        if unsafe { libc::sigwait(set, &mut signal) } == 0 {
            return signal;
        }
    }
}

fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}
