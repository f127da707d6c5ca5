//! `kiln serve` against slow, unauthenticated, cross-site and many clients, over raw TCP on the
//! loopback: every deadline and limit with short configured values (so the suite stays fast),
//! the checks made from the headers before any body byte is read, client mistakes as 4xx before
//! work starts, and a bounded load test whose answers are all checked.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "sk-limits";
/// The configured deadlines (seconds) and caps the tests check.
const HEADER_TIMEOUT: f64 = 1.0;
const BODY_TIMEOUT: f64 = 1.0;
const MAX_CONNECTIONS: usize = 24;
const MAX_BODY: usize = 4096;
/// How long past a deadline a connection may stay before the test calls it held.
const SLACK: Duration = Duration::from_secs(4);

fn root() -> String {
    format!("{}/..", env!("CARGO_MANIFEST_DIR"))
}

/// A `kiln serve` process; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run kiln serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("kiln serve exited before listening:\n{log}");
            };
            log += &line;
            log += "\n";
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.trim().to_string();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// One request on its own connection (`Connection: close`); the whole answer.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut s = self.connect();
        s.write_all(raw_request(method, path, headers, body).as_bytes())
            .unwrap();
        read_reply(&mut s)
    }

    /// A JSON POST with the key and the right content type.
    fn post(&self, path: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {KEY}");
        self.request(
            "POST",
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &body.to_string(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        r += "host: 127.0.0.1\r\n";
    }
    for (k, v) in headers {
        r += &format!("{k}: {v}\r\n");
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        r += &format!("content-length: {}\r\n", body.len());
    }
    r + "connection: close\r\n\r\n" + body
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The error message of an OpenAI-style error answer.
    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {}", self.body))
            .to_string()
    }
}

/// Reads one answer: the head, then the body by Content-Length (or to the end).
fn read_reply(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let split = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).expect("read the answer");
        assert!(n > 0, "the connection closed without an answer: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let mut body = buf[split + 4..].to_vec();
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    while len.is_none_or(|n| body.len() < n) {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Reply {
        status,
        head,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

/// Waits for the server to close `s`; how long that took. Fails if it is still open after
/// `deadline` + [`SLACK`].
fn closed_within(s: &mut TcpStream, deadline: f64, what: &str) -> Duration {
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(deadline) + SLACK;
    s.set_read_timeout(Some(limit)).unwrap();
    let mut sink = [0u8; 1024];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => continue, // an answer (e.g. 408) before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: the connection is still open after {limit:?}")
            }
            Err(_) => return t0.elapsed(), // reset
        }
    }
}

fn text_model() -> String {
    format!("{}/tests/fixtures/llm/llama-gqa-f32", root())
}

fn limits_server(extra: &[&str]) -> Server {
    let (h, b, c, m) = (
        HEADER_TIMEOUT.to_string(),
        BODY_TIMEOUT.to_string(),
        MAX_CONNECTIONS.to_string(),
        MAX_BODY.to_string(),
    );
    let model = text_model();
    let mut args = vec![
        "-m",
        &model,
        "--ctx",
        "128",
        "--api-key",
        KEY,
        "--header-timeout",
        &h,
        "--body-timeout",
        &b,
        "--max-connections",
        &c,
        "--max-body",
        &m,
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn slow_and_idle_connections_are_timed_out() {
    let srv = limits_server(&[]);
    // Nothing sent at all.
    let mut s = srv.connect();
    closed_within(&mut s, HEADER_TIMEOUT, "a connection that sends nothing");
    // Half a header.
    let mut s = srv.connect();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .unwrap();
    closed_within(&mut s, HEADER_TIMEOUT, "a half-sent header");
    // A kept-alive connection left idle after its answer.
    let mut s = srv.connect();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 200, "{r:?}");
    closed_within(&mut s, HEADER_TIMEOUT, "an idle keep-alive connection");
    // A body shorter than its Content-Length: 408 within the body deadline.
    let mut s = srv.connect();
    let auth = format!("Bearer {KEY}");
    let head = raw_request(
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-length", "100"),
        ],
        "{\"messages\"",
    );
    s.write_all(head.as_bytes()).unwrap();
    let t0 = Instant::now();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.message().contains("--body-timeout"), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs_f64(BODY_TIMEOUT) + SLACK);
    // The server still answers.
    assert_eq!(srv.request("GET", "/health", &[], "").status, 200);
}

#[test]
fn size_key_and_type_are_checked_before_the_body() {
    let srv = limits_server(&[]);
    let auth = format!("Bearer {KEY}");
    // Each sends its headers and 11 bytes of a longer body, and must be answered at once.
    let partial = |headers: &[(&str, &str)], len: usize| {
        let mut s = srv.connect();
        let len = len.to_string();
        let mut h = headers.to_vec();
        h.push(("content-length", &len));
        s.write_all(raw_request("POST", "/v1/chat/completions", &h, "{\"messages\"").as_bytes())
            .unwrap();
        // Well inside the body deadline: the answer did not wait for the body.
        s.set_read_timeout(Some(Duration::from_secs_f64(BODY_TIMEOUT * 0.8)))
            .unwrap();
        read_reply(&mut s)
    };
    let json_type = ("content-type", "application/json");
    let r = partial(&[("authorization", &auth), json_type], MAX_BODY + 1);
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.message().contains("--max-body"), "{r:?}");
    let r = partial(&[json_type], 100);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = partial(&[("authorization", "Bearer wrong"), json_type], 100);
    assert_eq!(r.status, 401, "{r:?}");
    let r = partial(
        &[("authorization", &auth), ("content-type", "text/plain")],
        100,
    );
    assert_eq!(r.status, 415, "{r:?}");
    assert!(r.message().contains("application/json"), "{r:?}");
    // A chunked body over the limit is cut off while it is read.
    let mut s = srv.connect();
    let big = "x".repeat(MAX_BODY + 10);
    let chunked = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: {auth}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         {:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    s.write_all(chunked.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut s).status, 413);
    // The scheme is case-insensitive in HTTP: `bearer` is as good as `Bearer`.
    let lower = format!("bearer {KEY}");
    let r = srv.request("GET", "/v1/models", &[("authorization", &lower)], "");
    assert_eq!(r.status, 200, "{r:?}");
    // JSON with a charset parameter is JSON.
    let r = srv.request(
        "POST",
        "/v1/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json; charset=utf-8"),
        ],
        &json!({"prompt": "Once", "max_tokens": 2, "temperature": 0}).to_string(),
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn connections_past_the_cap_get_503_and_the_server_recovers() {
    let srv = limits_server(&[]);
    // Hold every slot with connections that have sent nothing yet.
    let held: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| srv.connect()).collect();
    let mut over = srv.connect();
    let r = read_reply(&mut over);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.message().contains("--max-connections"), "{r:?}");
    drop(held);
    // The slots come back as the held connections close.
    let t0 = Instant::now();
    loop {
        let r = srv.request("GET", "/health", &[], "");
        if r.status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < SLACK,
            "still refused after the others closed: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn foreign_hosts_and_origins_are_refused_allowed_origins_get_cors() {
    let allowed = "http://app.example:5173";
    let srv = limits_server(&["--cors-origin", allowed, "--allowed-host", "kiln.lan"]);
    let auth = format!("Bearer {KEY}");
    // DNS rebinding: the page's own domain in Host.
    let r = srv.request(
        "GET",
        "/v1/models",
        &[("host", "evil.example:8080"), ("authorization", &auth)],
        "",
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.message().contains("evil.example"), "{r:?}");
    for host in [
        "localhost:8080",
        "127.0.0.1",
        "[::1]:8080",
        "KILN.lan:1",
        "192.168.1.5:80",
    ] {
        let r = srv.request(
            "GET",
            "/v1/models",
            &[("host", host), ("authorization", &auth)],
            "",
        );
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    // A preflight from the allowed origin is answered; from another, refused.
    let preflight = |origin: &str| {
        srv.request(
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            "",
        )
    };
    let r = preflight(allowed);
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some(allowed)
    );
    assert!(r
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization")));
    assert!(r
        .header("access-control-allow-methods")
        .is_some_and(|h| h.contains("POST")));
    let r = preflight("http://evil.example");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), None);
    // The actual request from the allowed page carries the CORS header; a simple text/plain
    // POST from another page (no preflight) is refused before it runs.
    let body = json!({"prompt": "Once", "max_tokens": 2}).to_string();
    let r = srv.request(
        "POST",
        "/v1/completions",
        &[
            ("origin", allowed),
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some(allowed)
    );
    let r = srv.request(
        "POST",
        "/v1/completions",
        &[
            ("origin", "http://evil.example"),
            ("content-type", "text/plain"),
        ],
        &body,
    );
    assert_eq!(r.status, 403, "{r:?}");
    // Without a key, text/plain from no page at all is still not JSON.
    let open = Server::start(&["-m", &text_model(), "--ctx", "128"]);
    let r = open.request(
        "POST",
        "/v1/completions",
        &[("content-type", "text/plain")],
        &body,
    );
    assert_eq!(r.status, 415, "{r:?}");
}

#[test]
fn client_mistakes_are_4xx_before_any_work() {
    let srv = Server::start(&[
        "-m",
        &text_model(),
        "--ctx",
        "128",
        "--image-model",
        &format!("{}/models/image-shapes", root()),
        "--api-key",
        KEY,
    ]);
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "wizard", "content": "hi"}]}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let m = r.message();
    assert!(
        m.contains("wizard") && m.contains("system, developer, user, assistant"),
        "{m}"
    );
    let r = srv.post(
        "/v1/images/generations",
        &json!({"prompt": "x", "guidance": 1e38, "steps": 200, "size": "64x64"}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.message().contains("guidance"), "{r:?}");
    let r = srv.post(
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "2048x2048", "steps": 200}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let m = r.message();
    assert!(m.contains("2048x2048") && m.contains("largest"), "{m}");
}

/// 200 requests from 20 concurrent clients on the loopback: every answer is checked against
/// the serial one, and the server's memory comes back near where it was.
#[test]
fn load_of_200_requests_from_20_clients() {
    // The default connection cap: closed connections linger a moment on the server's side.
    let srv = Server::start(&["-m", &text_model(), "--ctx", "128", "--api-key", KEY]);
    let prompts = ["Once upon a time", "The sky", "Colours are", "And then"];
    let request = |p: &str| json!({"prompt": p, "max_tokens": 4, "temperature": 0});
    let serial: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let r = srv.post("/v1/completions", &request(p));
            assert_eq!(r.status, 200, "{r:?}");
            r.json()["kiln"]["ids"].clone()
        })
        .collect();
    let baseline = srv.rss_kib();
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..20 {
            let (srv, serial, prompts) = (&srv, &serial, &prompts);
            scope.spawn(move || {
                for i in 0..10 {
                    let k = (client + i) % prompts.len();
                    if i % 5 == 4 {
                        let auth = format!("Bearer {KEY}");
                        let r = srv.request("GET", "/v1/models", &[("authorization", &auth)], "");
                        assert_eq!(r.status, 200, "client {client} request {i}: {r:?}");
                        assert_eq!(r.json()["data"][0]["id"], "llama-gqa-f32");
                        continue;
                    }
                    let r = srv.post("/v1/completions", &request(prompts[k]));
                    assert_eq!(r.status, 200, "client {client} request {i}: {r:?}");
                    assert_eq!(
                        r.json()["kiln"]["ids"],
                        serial[k],
                        "client {client} request {i}"
                    );
                }
            });
        }
    });
    let took = t0.elapsed();
    let after = srv.rss_kib();
    eprintln!(
        "200 requests from 20 clients in {took:?}; resident memory {} -> {} MiB",
        baseline / 1024,
        after / 1024
    );
    // Allocator arenas keep some freed memory for reuse: 64 MiB of headroom over a baseline of
    // a loaded model and GPU driver, far below what leaking per request would show.
    assert!(
        after <= baseline + 64 * 1024,
        "resident memory grew from {baseline} KiB to {after} KiB over the load"
    );
}
