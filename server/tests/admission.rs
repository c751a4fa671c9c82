//! Admission, `--timeout`, cancellation, loading and error statuses, end to end: [`serve`]
//! on a local port over a fake engine whose every call does what its prompt (or its first
//! object name) says, driven by plain HTTP/1.1 requests.
//!
//! The test waits on the engine's own reports (a channel) wherever one says what happened;
//! it polls (bounded by [`WAIT`]) only for what nothing announces: a worker's place being
//! freed after its thread returned, and a count in `/metrics`.

use pali_server::{
    serve, Completion, CompletionRequest, Config, Engine, EngineError, ErrorKind, LocateRequest,
    LocateResponse, RequestOptions, Usage,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest any step may take: a hang fails the test instead of blocking it.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The fake engine

/// What the fake engine reports, with the prompt of the call.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A call began (`block` and `until-cancelled` only).
    Started(String),
    /// An `until-cancelled` call saw its cancel flag set.
    Cancelled(String),
}

struct Control {
    calls: AtomicUsize,
    seen: Mutex<Sender<Seen>>,
    /// One `()` lets one blocked call return.
    gate: Mutex<Receiver<()>>,
}

/// Its calls do what their prompt says:
/// - `ok`: answer at once (the answer is the prompt);
/// - `block`: report `Started`, wait to be released, answer;
/// - `until-cancelled`: report `Started`, emit text and poll the cancel flag (as an engine
///   does between tokens) until it is set, report `Cancelled`, wait to be released, then
///   return [`ErrorKind::Cancelled`];
/// - `fail invalid` / `fail context` / `fail cancelled` / `fail internal`: that error.
struct Fake(Arc<Control>);

/// The test's side of a [`Fake`].
struct Handle {
    control: Arc<Control>,
    seen: Receiver<Seen>,
    gate: Sender<()>,
}

fn fake() -> (Fake, Handle) {
    let (seen_tx, seen) = channel();
    let (gate, gate_rx) = channel();
    let control = Arc::new(Control {
        calls: AtomicUsize::new(0),
        seen: Mutex::new(seen_tx),
        gate: Mutex::new(gate_rx),
    });
    let handle = Handle {
        control: control.clone(),
        seen,
        gate,
    };
    (Fake(control), handle)
}

impl Handle {
    /// The engine's next report, which must be `want`.
    fn expect(&self, want: Seen) {
        let got = self.seen.recv_timeout(WAIT).expect("the engine reports");
        assert_eq!(got, want);
    }

    /// Lets one blocked call return.
    fn release(&self) {
        self.gate.send(()).expect("the engine is there");
    }

    /// Calls of `complete` and `locate` so far.
    fn calls(&self) -> usize {
        self.control.calls.load(Ordering::SeqCst)
    }
}

impl Fake {
    fn act(
        &self,
        what: &str,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(), EngineError> {
        let c = &self.0;
        c.calls.fetch_add(1, Ordering::SeqCst);
        let tell = |s| {
            let _ = c.seen.lock().unwrap().send(s);
        };
        let released = || {
            let gate = c.gate.lock().unwrap();
            gate.recv_timeout(WAIT)
                .map_err(|_| EngineError::new(ErrorKind::Internal, "never released"))
        };
        let fail = |kind| Err(EngineError::new(kind, what));
        match what {
            "ok" => Ok(()),
            "block" => {
                tell(Seen::Started(what.into()));
                released()
            }
            "until-cancelled" => {
                tell(Seen::Started(what.into()));
                let t0 = Instant::now();
                while !cancel.load(Ordering::Relaxed) {
                    if t0.elapsed() > WAIT {
                        return fail(ErrorKind::Internal);
                    }
                    on_text("x");
                    std::thread::sleep(Duration::from_millis(2));
                }
                tell(Seen::Cancelled(what.into()));
                released()?;
                fail(ErrorKind::Cancelled)
            }
            "fail invalid" => fail(ErrorKind::InvalidRequest),
            "fail context" => fail(ErrorKind::ContextLength),
            "fail cancelled" => fail(ErrorKind::Cancelled),
            "fail internal" => fail(ErrorKind::Internal),
            other => panic!("the fake engine cannot {other:?}"),
        }
    }
}

const USAGE: Usage = Usage {
    prompt_tokens: 3,
    completion_tokens: 1,
};

impl Engine for Fake {
    fn model_id(&self) -> String {
        "fake".into()
    }

    /// Refuses a negative temperature, as a real engine's rules would.
    fn check_options(&self, o: &RequestOptions) -> Result<(), EngineError> {
        match o.temperature {
            Some(t) if t < 0.0 => Err(EngineError::new(
                ErrorKind::InvalidRequest,
                format!("temperature = {t}: refused by the engine"),
            )),
            _ => Ok(()),
        }
    }

    fn complete(
        &self,
        req: CompletionRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, EngineError> {
        self.act(&req.prompt, &req.cancel, on_text)?;
        Ok(Completion {
            text: req.prompt,
            finish_reason: "stop",
            usage: USAGE,
            stages: vec![("decode", 1.0)],
            timings: serde_json::Value::Null,
        })
    }

    fn locate(&self, req: LocateRequest) -> Result<LocateResponse, EngineError> {
        let what = req.objects.first().cloned().unwrap_or_default();
        self.act(&what, &req.cancel, &mut |_| {})?;
        Ok(LocateResponse {
            json: serde_json::json!({ "objects": req.objects, "segment": req.segment }),
            usage: USAGE,
            stages: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------
// The server and its client

/// `serve` on `127.0.0.1:0`, on a runtime of its own; stopped when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

fn config(parallel: usize, queue: usize, timeout: Option<f64>) -> Config {
    Config {
        parallel,
        queue,
        timeout,
        shutdown_grace: Duration::from_secs(1),
        ..Config::default()
    }
}

fn start(config: Config, load: impl FnOnce() -> Result<Fake, String> + Send + 'static) -> Server {
    let (addr_tx, addr_rx) = channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let r = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a free port");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            serve(listener, config, load, shutdown).await
        });
        rt.shutdown_timeout(Duration::from_secs(1));
        r
    });
    Server {
        addr: addr_rx.recv_timeout(WAIT).expect("the server binds"),
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// A server whose engine is loaded.
fn start_loaded(config: Config, engine: Fake) -> Server {
    let s = start(config, move || Ok(engine));
    eventually("the engine is loaded", || s.get("/health").status == 200);
    s
}

impl Server {
    /// What `serve` returned, without asking it to stop.
    fn returned(mut self) -> Result<(), String> {
        self.thread.take().unwrap().join().expect("serve panicked")
    }

    fn get(&self, path: &str) -> Reply {
        http(self.addr, "GET", path, &[], "")
    }

    fn post(&self, path: &str, body: &str) -> Reply {
        http(self.addr, "POST", path, &[], body)
    }

    /// A sample from `/metrics`.
    fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").body;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '));
        line.map_or(0.0, |v| v.parse().expect("a number"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (bounded) for `cond`, for what nothing announces.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A response.
struct Reply {
    status: u16,
    /// The header lines, names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let h = self.headers.iter().find(|(n, _)| n == name);
        h.map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    /// OpenAI's error `code` of an error response, checking the error's shape.
    fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e["param"].is_null(), "{v}");
        e["code"].as_str().expect("a code").to_string()
    }
}

/// Sends a request (`Connection: close`) and returns the open connection.
fn send(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("the server accepts");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in headers {
        head += &format!("{h}\r\n");
    }
    head += &format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    s
}

/// Reads a whole response (the server closes the connection after it).
fn reply(mut s: TcpStream) -> Reply {
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("a response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status: status.parse().unwrap(),
        headers,
        body: body.to_string(),
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> Reply {
    reply(send(addr, method, path, headers, body))
}

/// A chat request whose prompt tells the fake engine what to do.
fn chat(prompt: &str) -> String {
    chat_body(prompt, false)
}

fn chat_body(prompt: &str, stream: bool) -> String {
    serde_json::json!({ "stream": stream, "messages": [{ "role": "user", "content": [
        { "type": "text", "text": prompt },
        { "type": "image_url", "image_url": { "url": "data:image/png;base64,aGVsbG8=" } },
    ]}]})
    .to_string()
}

/// A detect request whose one object name tells the fake engine what to do.
fn detect(what: &str) -> String {
    serde_json::json!({ "image": "aGVsbG8=", "objects": [what] }).to_string()
}

const CHAT: &str = "/v1/chat/completions";

/// A chat answer of the fake engine.
fn assert_answered(r: &Reply, prompt: &str) {
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], prompt);
}

// ---------------------------------------------------------------------------
// The tests

/// `--parallel 1 --queue 1`: one request runs, one waits, a third is refused at once with
/// 503, `Retry-After` and OpenAI's error JSON, never reaching the engine; the first two
/// finish once the engine is released.
#[test]
fn a_full_queue_refuses_with_503_and_retry_after() {
    let (engine, h) = fake();
    let srv = start_loaded(config(1, 1, None), engine);
    let addr = srv.addr;
    let first = std::thread::spawn(move || http(addr, "POST", CHAT, &[], &chat("block")));
    h.expect(Seen::Started("block".into()));
    let second = std::thread::spawn(move || http(addr, "POST", CHAT, &[], &chat("block")));
    eventually("the second request waits", || {
        srv.metric("pali_queue_depth") == 1.0
    });

    let third = srv.post(CHAT, &chat("ok"));
    assert_eq!(third.status, 503);
    assert_eq!(third.header("retry-after"), Some("1"));
    assert_eq!(third.error_code(), "queue_full");
    assert_eq!(third.json()["error"]["type"], "server_error");
    assert_eq!(
        h.calls(),
        1,
        "the second waits for the worker, the third never came in"
    );

    h.release();
    h.expect(Seen::Started("block".into()));
    h.release();
    assert_answered(&first.join().unwrap(), "block");
    assert_answered(&second.join().unwrap(), "block");
    assert_eq!(h.calls(), 2);
    assert_eq!(srv.metric("pali_queue_depth"), 0.0);
    assert_eq!(srv.metric("pali_requests_running"), 0.0);
    let refused = r#"pali_requests_total{endpoint="/v1/chat/completions",status="503"}"#;
    assert_eq!(srv.metric(refused), 1.0);
}

/// `--timeout`: 504, and the engine sees its cancel flag; the request's place stays taken
/// until its worker has really returned, then the next request gets in.
#[test]
fn a_timeout_is_504_and_cancels_but_frees_the_place_only_when_the_work_ends() {
    let (engine, h) = fake();
    let srv = start_loaded(config(1, 0, Some(0.2)), engine);

    let late = srv.post(CHAT, &chat("until-cancelled"));
    assert_eq!(late.status, 504);
    assert_eq!(late.error_code(), "timeout");
    h.expect(Seen::Started("until-cancelled".into()));
    h.expect(Seen::Cancelled("until-cancelled".into()));

    // The cancelled generation is still on its worker (waiting to be released).
    let refused = srv.post(CHAT, &chat("ok"));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error_code(), "queue_full");
    assert_eq!(h.calls(), 1);

    h.release();
    // The place is freed after the worker's thread returns: nothing announces it.
    eventually("the next request is admitted", || {
        let r = srv.post(CHAT, &chat("ok"));
        if r.status == 503 {
            assert_eq!(r.error_code(), "queue_full");
        }
        r.status == 200
    });
    assert_eq!(srv.metric("pali_cancelled_total"), 1.0);
}

/// A client that disconnects mid-request cancels its generation (and `/metrics` counts
/// it); the worker is free for the next request.
#[test]
fn a_client_gone_cancels_its_request() {
    let (engine, h) = fake();
    let srv = start_loaded(config(1, 1, None), engine);

    let conn = send(srv.addr, "POST", CHAT, &[], &chat("until-cancelled"));
    h.expect(Seen::Started("until-cancelled".into()));
    drop(conn);
    h.expect(Seen::Cancelled("until-cancelled".into()));
    h.release();
    eventually("the cancellation is counted", || {
        srv.metric("pali_cancelled_total") == 1.0
    });
    assert_answered(&srv.post(CHAT, &chat("ok")), "ok");
}

/// The same while streaming: the client reads the first event, then goes.
#[test]
fn a_client_gone_cancels_its_stream() {
    let (engine, h) = fake();
    let srv = start_loaded(config(1, 1, None), engine);

    let mut conn = send(
        srv.addr,
        "POST",
        CHAT,
        &[],
        &chat_body("until-cancelled", true),
    );
    h.expect(Seen::Started("until-cancelled".into()));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"content\":\"x\"") {
        let n = conn.read(&mut buf).expect("the stream");
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    drop(conn);
    h.expect(Seen::Cancelled("until-cancelled".into()));
    h.release();
    eventually("the cancellation is counted", || {
        srv.metric("pali_cancelled_total") == 1.0
    });
}

/// While `load` runs, `/health`, `/v1/models` and requests get 503 `model_loading`; once it
/// returns, 200.
#[test]
fn while_loading_everything_is_503() {
    let (engine, h) = fake();
    let (loaded, load_gate) = channel::<()>();
    let srv = start(config(1, 1, None), move || {
        load_gate.recv_timeout(WAIT).map_err(|e| e.to_string())?;
        Ok(engine)
    });

    for r in [
        srv.get("/health"),
        srv.get("/v1/models"),
        srv.post(CHAT, &chat("ok")),
        srv.post("/v1/detect", &detect("ok")),
    ] {
        assert_eq!(r.status, 503);
        assert_eq!(r.error_code(), "model_loading");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(h.calls(), 0);

    loaded.send(()).unwrap();
    eventually("the engine is loaded", || srv.get("/health").status == 200);
    assert_eq!(srv.get("/v1/models").json()["data"][0]["id"], "fake");
    assert_answered(&srv.post(CHAT, &chat("ok")), "ok");
}

/// A failing `load` ends `serve` with its error.
#[test]
fn a_failed_load_ends_serve() {
    let srv = start(config(1, 1, None), || Err("no model here".into()));
    assert_eq!(srv.returned(), Err("no model here".to_string()));
}

/// Engine errors get their HTTP status and OpenAI code, on every endpoint and also when
/// streaming (they come before the first piece of text).
#[test]
fn engine_errors_map_to_statuses() {
    let (engine, h) = fake();
    let srv = start_loaded(config(1, 4, None), engine);
    let cases = [
        (
            "fail invalid",
            400,
            "invalid_request",
            "invalid_request_error",
        ),
        (
            "fail context",
            400,
            "context_length_exceeded",
            "invalid_request_error",
        ),
        ("fail internal", 500, "internal_error", "server_error"),
        ("fail cancelled", 499, "cancelled", "server_error"),
    ];
    for (what, status, code, kind) in cases {
        for (path, body) in [
            (CHAT, chat(what)),
            (CHAT, chat_body(what, true)),
            ("/v1/detect", detect(what)),
            ("/v1/segment", detect(what)),
        ] {
            let r = srv.post(path, &body);
            assert_eq!(r.status, status, "{what} at {path}: {}", r.body);
            assert_eq!(r.error_code(), code, "{what} at {path}");
            let v = r.json();
            assert_eq!(v["error"]["type"], kind, "{what} at {path}");
            assert_eq!(v["error"]["message"], what, "{what} at {path}");
        }
    }
    assert_eq!(h.calls(), 16);
    let found = srv.post("/v1/segment", &detect("ok"));
    assert_eq!(found.status, 200);
    assert_eq!(
        found.json(),
        serde_json::json!({ "objects": ["ok"], "segment": true })
    );
}

/// The engine's option rules refuse a request before it is queued: 400 with the engine's
/// message, on every endpoint, and the engine never runs it; a full queue does not matter.
#[test]
fn options_the_engine_refuses_are_400_before_the_queue() {
    let (engine, h) = fake();
    let srv = start_loaded(config(1, 0, None), engine);
    let mut bad = serde_json::from_str::<serde_json::Value>(&chat("ok")).unwrap();
    bad["temperature"] = serde_json::json!(-1.0);
    let addr = srv.addr;
    let running = std::thread::spawn(move || http(addr, "POST", CHAT, &[], &chat("block")));
    h.expect(Seen::Started("block".into()));
    for stream in [false, true] {
        bad["stream"] = serde_json::json!(stream);
        let r = srv.post(CHAT, &bad.to_string());
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.error_code(), "invalid_request");
        assert_eq!(
            r.json()["error"]["message"],
            "temperature = -1: refused by the engine"
        );
    }
    h.release();
    assert_answered(&running.join().unwrap(), "block");
    assert_eq!(h.calls(), 1);
}

/// `--api-key`: required on the endpoints that run the model, not on `/health`.
#[test]
fn the_api_key_guards_the_endpoints() {
    let (engine, _h) = fake();
    let srv = start_loaded(
        Config {
            api_key: Some("sesame".into()),
            ..config(1, 1, None)
        },
        engine,
    );
    let r = srv.post(CHAT, &chat("ok"));
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "invalid_api_key");
    assert_eq!(srv.get("/v1/models").status, 200);
    let keyed = http(
        srv.addr,
        "POST",
        CHAT,
        &["Authorization: Bearer sesame"],
        &chat("ok"),
    );
    assert_answered(&keyed, "ok");
}
