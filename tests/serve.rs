//! `pali serve` over real HTTP on 127.0.0.1 (port 0), with the bundled demo model: answers
//! equal the CLI's, every error gets its OpenAI status and body and the server keeps
//! serving, limits, cancellation and a clean SIGTERM. Plain `std::net` requests, so the
//! tests can also send what no HTTP client would.
#![cfg(feature = "serve")]

mod common;

use common::{assert_success, pali_cmd};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A `pali serve` process, stopped with SIGTERM (and checked to exit 0) or killed on drop.
struct Server {
    child: Child,
    addr: String,
    /// What the server wrote to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = pali_cmd()
            .args(["serve", "--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("pali serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("pali serve prints its address")
                .unwrap();
            if let Some(a) = line.strip_prefix("pali: listening on http://") {
                break a.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        let server = Server { child, addr, log };
        let t0 = Instant::now();
        while server.get("/health").status != 200 {
            assert!(t0.elapsed() < Duration::from_secs(60), "model never loaded");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn get(&self, path: &str) -> Reply {
        http(&self.addr, "GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        http(&self.addr, "POST", path, &[], body.to_string().as_bytes())
    }

    /// The value of a `/metrics` series.
    fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert_success(
            &std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .output()
                .unwrap(),
        );
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "pali serve exited with {status} after SIGTERM"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Checks an OpenAI error reply: status, `type`, `code`, and words of the message.
    fn assert_error(&self, status: u16, code: &str, needle: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let e = &self.json()["error"];
        assert_eq!(e["code"], code, "{}", self.body);
        assert!(e["type"].is_string(), "{}", self.body);
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
}

/// One HTTP/1.1 request (`Connection: close`), the whole reply read back.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before it has read a large body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (headers, body) = text.split_once("\r\n\r\n").expect("a reply with headers");
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = headers.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn example(name: &str) -> String {
    common::root()
        .join("examples/images")
        .join(name)
        .display()
        .to_string()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn data_url(path: &str) -> String {
    format!(
        "data:image/png;base64,{}",
        base64(&std::fs::read(path).unwrap())
    )
}

/// A chat request: one user message with the prompt and the given image URLs.
fn chat(prompt: &str, images: &[&str], extra: Value) -> Value {
    let mut content = vec![json!({ "type": "text", "text": prompt })];
    content.extend(
        images
            .iter()
            .map(|u| json!({ "type": "image_url", "image_url": { "url": u } })),
    );
    let mut body = json!({ "model": "pali", "messages": [{ "role": "user", "content": content }] });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `pali ARGS --json`, parsed.
fn cli_json(args: &[&str]) -> Value {
    let out = pali_cmd().args(args).arg("--json").output().unwrap();
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

#[test]
fn chat_answers_equal_the_cli_whole_and_streamed() {
    let server = Server::start(&[]);
    for name in ["three_shapes_wide.png", "two_shapes_tall.png"] {
        let img = example(name);
        let cli = cli_json(&["caption", &img]);
        let r = server.post(
            "/v1/chat/completions",
            &chat("caption en", &[&data_url(&img)], json!({})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], cli["text"], "{name}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let n_tokens = cli["tokens"].as_array().unwrap().len();
        assert_eq!(v["usage"]["completion_tokens"], n_tokens);
        assert_eq!(v["usage"]["prompt_tokens"], cli["timings"]["n_prefix"]);
        assert_eq!(
            v["usage"]["total_tokens"],
            n_tokens as u64 + cli["timings"]["n_prefix"].as_u64().unwrap()
        );

        let extra = json!({ "stream": true, "stream_options": { "include_usage": true } });
        let r = server.post(
            "/v1/chat/completions",
            &chat("caption en", &[&data_url(&img)], extra),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.headers.contains("content-type: text/event-stream"),
            "{}",
            r.headers
        );
        let data = sse_data(&r.body);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            cli["text"].as_str().unwrap(),
            "{name}: the streamed pieces"
        );
        assert!(chunks.len() > 4, "streamed in pieces: {chunks:?}");
        let finish: Vec<&Value> = chunks
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .map(|c| &c["choices"][0]["finish_reason"])
            .collect();
        assert_eq!(finish, [&json!("stop")]);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], n_tokens);
    }
    // max_tokens and stop sequences.
    let img = data_url(&example("three_shapes_wide.png"));
    let r = server.post(
        "/v1/chat/completions",
        &chat("caption en", &[&img], json!({ "max_tokens": 2 })),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    let r = server.post(
        "/v1/chat/completions",
        &chat("caption en", &[&img], json!({ "stop": [" blue"] })),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], "a red circle, a");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "pali-demo-F16");
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains("pali_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 6"),
        "{metrics}"
    );
    assert!(server.metric("pali_completion_tokens_total") > 10.0);
    assert!(server.metric("pali_stage_seconds_count{stage=\"vision\"}") >= 6.0);
    server.stop();
}

#[test]
fn detect_and_segment_equal_the_cli() {
    let server = Server::start(&[]);
    let same = |api: &Value, cli: &Value| {
        for k in ["objects", "text", "tokens", "image", "warnings"] {
            assert_eq!(api[k], cli[k], "{k}");
        }
    };
    let img = example("three_shapes_wide.png");
    let cli = cli_json(&["detect", &img, "circle ; square"]);
    assert!(!cli["objects"].as_array().unwrap().is_empty());
    let body =
        json!({ "image": base64(&std::fs::read(&img).unwrap()), "objects": ["circle", "square"] });
    let r = server.post("/v1/detect", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    same(&r.json(), &cli);
    // The same as a multipart upload, objects as one "a ; b" field.
    let boundary = "pali-test-boundary";
    let mut form = Vec::new();
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"objects\"\r\n\r\ncircle ; square\r\n").as_bytes());
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
    form.extend(std::fs::read(&img).unwrap());
    form.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ctype = format!("multipart/form-data; boundary={boundary}");
    let r = http(
        &server.addr,
        "POST",
        "/v1/detect",
        &[("Content-Type", &ctype)],
        &form,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    same(&r.json(), &cli);

    let img = example("one_shape.png");
    let cli = cli_json(&["segment", &img, "triangle"]);
    assert!(
        cli["objects"][0]["mask"]["counts"].is_array(),
        "bundled mask decoder: {cli}"
    );
    let body = json!({ "image": data_url(&img), "objects": "triangle" });
    let r = server.post("/v1/segment", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    same(&r.json(), &cli);
    server.stop();
}

/// A PNG whose header claims `w` × `h` pixels, with almost no pixel data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |ty: &[u8], data: &[u8]| {
        let body = [ty, data].concat();
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    chunk(
        b"IHDR",
        &[&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat(),
    );
    chunk(b"IDAT", &[0x78, 0x9c]);
    chunk(b"IEND", &[]);
    png
}

/// The library's refusal of a bad option, word for word: what every front end must say.
fn library_refusal(values: pali::options::RequestValues) -> String {
    pali::GenerateOptions::default()
        .apply(&values)
        .unwrap_err()
        .to_string()
}

/// Bad sampling and length options get the library's own refusal as a 400, on chat (whole
/// and streamed) and on detect, before the request is queued; the server goes on serving.
#[test]
fn bad_options_get_the_librarys_refusal() {
    use pali::options::RequestValues;
    let server = Server::start(&[]);
    let img = data_url(&example("two_shapes_small.png"));
    let v = RequestValues::default;
    let cases = [
        (
            json!({ "temperature": -1.0 }),
            RequestValues {
                temperature: Some(-1.0),
                ..v()
            },
        ),
        (
            json!({ "top_p": 7.0 }),
            RequestValues {
                top_p: Some(7.0),
                ..v()
            },
        ),
        (
            json!({ "top_k": -1 }),
            RequestValues {
                top_k: Some(-1),
                ..v()
            },
        ),
        (
            json!({ "max_tokens": 0 }),
            RequestValues {
                n_predict: Some(0),
                ..v()
            },
        ),
        (
            json!({ "stop": ["a", "b", "c", "d", "e"] }),
            RequestValues {
                stop: Some(vec!["a".into(); 5]),
                ..v()
            },
        ),
    ];
    for (extra, values) in cases {
        let want = library_refusal(values);
        for stream in [false, true] {
            let mut extra = extra.clone();
            extra["stream"] = json!(stream);
            let r = server.post("/v1/chat/completions", &chat("caption en", &[&img], extra));
            r.assert_error(400, "invalid_request", &want);
        }
    }
    let r = server.post(
        "/v1/detect",
        &json!({ "image": img, "objects": ["circle"], "max_tokens": 0 }),
    );
    r.assert_error(
        400,
        "invalid_request",
        &library_refusal(RequestValues {
            n_predict: Some(0),
            ..v()
        }),
    );
    let ok = server.post(
        "/v1/chat/completions",
        &chat("caption en", &[&img], json!({})),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    server.stop();
}

/// Several `image_url` parts are one prompt about all of them, as `pali run --image A --image
/// B`; a `video_url` clip (an animated GIF as a data URL) answers as `pali caption CLIP
/// --frames K`, with its frames. Too many frames, a non-video data URL and mixed or bad parts
/// are 400s, and the server goes on.
#[test]
fn several_images_and_a_clip() {
    let server = Server::start(&["--max-frames", "8"]);
    let (a, b) = (example("one_shape.png"), example("two_shapes_tall.png"));
    let cli = cli_json(&["run", "--image", &a, "--image", &b, "-p", "caption en"]);
    let r = server.post(
        "/v1/chat/completions",
        &chat("caption en", &[&data_url(&a), &data_url(&b)], json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], cli["text"]);
    assert_eq!(v["usage"]["prompt_tokens"], cli["timings"]["n_prefix"]);

    // An animated GIF of the two examples, made by the library's own writer of frames.
    let gif = common::scratch_dir("serve-clip").join("two.gif");
    {
        use image::codecs::gif::GifEncoder;
        let mut enc = GifEncoder::new(std::fs::File::create(&gif).unwrap());
        for p in [&a, &b] {
            let img = image::open(p)
                .unwrap()
                .resize_exact(96, 96, image::imageops::Nearest);
            let frame = image::Frame::from_parts(
                img.into_rgba8(),
                0,
                0,
                image::Delay::from_numer_denom_ms(200, 1),
            );
            enc.encode_frame(frame).unwrap();
        }
    }
    let gif = gif.display().to_string();
    let cli = cli_json(&["caption", &gif, "--frames", "4"]);
    let video = |extra: Value, url: &str| {
        let mut body = chat("caption en", &[], extra);
        body["messages"][0]["content"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "type": "video_url", "video_url": { "url": url } }));
        server.post("/v1/chat/completions", &body)
    };
    let gif_url = format!(
        "data:image/gif;base64,{}",
        base64(&std::fs::read(&gif).unwrap())
    );
    let r = video(json!({ "frames": 4 }), &gif_url);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], cli["text"]);
    assert_eq!(r.json()["timings"]["n_prefix"], cli["timings"]["n_prefix"]);

    video(json!({ "frames": 9 }), &gif_url).assert_error(400, "invalid_request", "--max-frames 8");
    video(json!({ "fps": 50.0 }), &gif_url).assert_error(
        400,
        "invalid_request",
        "more than the server's --max-frames 8",
    );
    video(json!({}), "data:text/plain;base64,aGVsbG8=").assert_error(
        400,
        "invalid_request",
        "not a video type",
    );
    video(json!({}), "data:video/mp4;base64,aGVsbG8=").assert_error(
        400,
        "invalid_request",
        "video",
    );
    let mut mixed = chat("caption en", &[&data_url(&a)], json!({}));
    mixed["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": "video_url", "video_url": { "url": gif_url } }));
    server.post("/v1/chat/completions", &mixed).assert_error(
        400,
        "invalid_request",
        "images or one clip",
    );
    let garbage = format!("data:image/png;base64,{}", base64(b"not an image"));
    server
        .post(
            "/v1/chat/completions",
            &chat("caption en", &[&data_url(&a), &garbage], json!({})),
        )
        .assert_error(400, "invalid_request", "image 2");
    let ok = server.post(
        "/v1/chat/completions",
        &chat("caption en", &[&data_url(&a)], json!({})),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    server.stop();

    // A clip whose frames do not fit the context is refused (before its frames are decoded)
    // with the numbers and the frames that would fit.
    let n_prefix = cli["timings"]["n_prefix"].as_u64().unwrap().to_string();
    let server = Server::start(&["-c", &n_prefix]);
    let too_long = |frames: u64| {
        let mut body = chat(
            "caption en",
            &[],
            json!({ "frames": frames, "max_tokens": 4 }),
        );
        body["messages"][0]["content"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "type": "video_url", "video_url": { "url": gif_url } }));
        server.post("/v1/chat/completions", &body)
    };
    too_long(4).assert_error(400, "context_length_exceeded", "would fit");
    let fits = too_long(3);
    assert_eq!(fits.status, 200, "{}", fits.body);
    server.stop();
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&[]);
    let img = data_url(&example("two_shapes_small.png"));
    let expected = cli_json(&["caption", &example("two_shapes_small.png")])["text"].clone();
    let garbage = format!(
        "data:image/png;base64,{}",
        base64(b"this is not an image at all")
    );
    let huge = format!(
        "data:image/png;base64,{}",
        base64(&png_header(20_000, 20_000))
    );
    let raw = |body: &str| {
        http(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            &[],
            body.as_bytes(),
        )
    };
    let cases: Vec<(Reply, u16, &str, &str)> = vec![
        (
            raw("{\"messages\": [{"),
            400,
            "invalid_request",
            "malformed",
        ),
        (raw(""), 400, "invalid_request", "malformed"),
        (
            server.post("/v1/chat/completions", &chat("caption en", &[], json!({}))),
            400,
            "invalid_request",
            "no image",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &["data:image/png;base64,%%%"], json!({})),
            ),
            400,
            "invalid_request",
            "bad base64",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &[&garbage], json!({})),
            ),
            400,
            "invalid_request",
            "image",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &[&huge], json!({})),
            ),
            400,
            "invalid_request",
            "400000000",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &["https://example.com/cat.jpg"], json!({})),
            ),
            400,
            "invalid_request",
            "remote image URLs",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &["/etc/passwd"], json!({})),
            ),
            400,
            "invalid_request",
            "--allow-files",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &[&img], json!({ "n": 2 })),
            ),
            400,
            "invalid_request",
            "n = 2",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat("caption en", &[&img], json!({ "max_tokens": 9000 })),
            ),
            400,
            "context_length_exceeded",
            "8192",
        ),
        (
            server.post(
                "/v1/chat/completions",
                &chat(
                    "caption en",
                    &[&img],
                    json!({ "max_tokens": 9000, "stream": true }),
                ),
            ),
            400,
            "context_length_exceeded",
            "8192",
        ),
        (
            server.post("/v1/detect", &json!({ "image": img, "objects": [" ; "] })),
            400,
            "invalid_request",
            "no object names",
        ),
        (
            server.post("/v1/detect", &json!({ "objects": ["circle"] })),
            400,
            "invalid_request",
            "no image",
        ),
        (
            http(
                &server.addr,
                "POST",
                "/v1/segment",
                &[("Content-Type", "multipart/form-data; boundary=x")],
                b"--x\r\nbroken",
            ),
            400,
            "invalid_request",
            "multipart",
        ),
        (server.get("/v1/nothing"), 404, "not_found", "/v1/nothing"),
    ];
    for (i, (reply, status, code, needle)) in cases.iter().enumerate() {
        reply.assert_error(*status, code, needle);
        // The server still answers, and correctly.
        if i % 4 == 3 {
            let ok = server.post(
                "/v1/chat/completions",
                &chat("caption en", &[&img], json!({})),
            );
            assert_eq!(ok.json()["choices"][0]["message"]["content"], expected);
        }
    }
    // Not HTTP at all, then a request cut off mid-body: the server shrugs both off.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"),
        "{buf:?}"
    );
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"mess")
        .unwrap();
    drop(s);
    let ok = server.post(
        "/v1/chat/completions",
        &chat("caption en", &[&img], json!({})),
    );
    assert_eq!(ok.json()["choices"][0]["message"]["content"], expected);
    let bad =
        server.metric("pali_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}");
    assert!(bad >= 12.0, "{bad}");
    server.stop();
}

#[test]
fn body_limit_api_key_and_files() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-allow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(example("one_shape.png"), dir.join("one.png")).unwrap();
    let allow = dir.display().to_string();
    let server = Server::start(&[
        "--api-key",
        "s3cret",
        "--max-body",
        "100000",
        "--allow-files",
        &allow,
    ]);
    let auth = [("Authorization", "Bearer s3cret")];
    let body = chat("caption en", &["one.png"], json!({})).to_string();
    let post = |headers: &[(&str, &str)], body: &str| {
        http(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            headers,
            body.as_bytes(),
        )
    };
    post(&[], &body).assert_error(401, "invalid_api_key", "API key");
    post(&[("Authorization", "Bearer s3cre")], &body).assert_error(
        401,
        "invalid_api_key",
        "API key",
    );
    post(&[("Authorization", "Bearer s3cret!")], &body).assert_error(
        401,
        "invalid_api_key",
        "API key",
    );
    http(&server.addr, "GET", "/metrics", &[], b"").assert_error(401, "invalid_api_key", "API key");
    // Public, as in llama-server.
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/v1/models").status, 200);
    // A file inside --allow-files is read; outside it never.
    let r = post(&auth, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let expected = cli_json(&["caption", &example("one_shape.png")])["text"].clone();
    assert_eq!(r.json()["choices"][0]["message"]["content"], expected);
    let outside = chat("caption en", &["../../../Cargo.toml"], json!({})).to_string();
    post(&auth, &outside).assert_error(400, "invalid_request", "not a file inside");
    // Over --max-body: 413, by Content-Length or as read.
    let big = chat(
        "caption en",
        &[&format!("data:image/png;base64,{}", "A".repeat(150_000))],
        json!({}),
    )
    .to_string();
    post(&auth, &big).assert_error(413, "request_too_large", "100000");
    assert_eq!(post(&auth, &body).status, 200);
    server.stop();
}

/// A request that generates `n` tokens whatever the model says (llama-server's
/// `ignore_eos`): long enough to be caught running.
fn long_request(n: usize) -> Value {
    let img = data_url(&example("one_shape.png"));
    chat(
        "caption en",
        &[&img],
        json!({ "max_tokens": n, "ignore_eos": true }),
    )
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn queue_timeout_and_disconnects() {
    // A full queue: one running, none may wait.
    let server = Server::start(&["--queue", "0", "--parallel", "1"]);
    let addr = server.addr.clone();
    let body = long_request(1500).to_string();
    let running = std::thread::spawn(move || {
        http(&addr, "POST", "/v1/chat/completions", &[], body.as_bytes())
    });
    wait_for("the long request to run", || {
        server.metric("pali_requests_running") == 1.0
    });
    let r = server.post("/v1/chat/completions", &long_request(5));
    r.assert_error(503, "queue_full", "busy");
    assert!(r.headers.contains("retry-after: "), "{}", r.headers);
    let done = running.join().unwrap();
    assert_eq!(done.json()["usage"]["completion_tokens"], 1500);
    assert_eq!(
        server.post("/v1/chat/completions", &long_request(5)).status,
        200
    );

    // A client that disconnects cancels its generation: not streamed; streamed, before
    // the stream began (still in the prefix) and after its first chunks.
    for (stream, read_first) in [(false, false), (true, false), (true, true)] {
        let before = server.metric("pali_cancelled_total");
        let tokens_before = server.metric("pali_completion_tokens_total");
        let mut req = long_request(8000);
        req["stream"] = json!(stream);
        let body = req.to_string();
        let mut s = TcpStream::connect(&server.addr).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        wait_for("the request to run", || {
            server.metric("pali_requests_running") == 1.0
        });
        if read_first {
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        }
        drop(s);
        wait_for("the generation to stop", || {
            server.metric("pali_requests_running") == 0.0
        });
        assert_eq!(
            server.metric("pali_cancelled_total"),
            before + 1.0,
            "stream: {stream}, read: {read_first}"
        );
        // Nothing was counted as a finished generation.
        assert_eq!(server.metric("pali_completion_tokens_total"), tokens_before);
    }
    server.stop();

    // --timeout ends a request with 504, the server goes on. (8000 tokens take well over the
    // limit, 3 s or more at 2500 tok/s; the 5-token request after it well under, even with
    // other tests running.)
    let server = Server::start(&["--timeout", "1.2"]);
    server
        .post("/v1/chat/completions", &long_request(8000))
        .assert_error(504, "timeout", "1.2");
    wait_for("the timed-out generation to stop", || {
        server.metric("pali_requests_running") == 0.0
    });
    assert_eq!(server.metric("pali_cancelled_total"), 1.0);
    // The server goes on: a short request succeeds. Under the other tests' load (their
    // servers' ggml threads spin on the same 2 cores; 10 tries at a 0.8 s limit once all
    // failed in a full `.ci/run`) one may itself exceed the limit, so tries for up to a
    // minute; a wedged server fails them all.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let served = std::iter::repeat(())
        .take_while(|_| std::time::Instant::now() < until)
        .any(|_| {
            let status = server.post("/v1/chat/completions", &long_request(5)).status;
            assert!(status == 200 || status == 504, "status {status}");
            status == 200
        });
    assert!(served, "no short request succeeded after the timeout");
    server.stop();
}

/// The real `openai` Python client (scripts/requirements-serve.txt), whole and streamed.
/// Runs where a Python with it is found: `PALI_OPENAI_PYTHON`, or the venv `.ci/run` makes
/// in target/serve-venv.
#[test]
fn openai_python_client() {
    let python = std::env::var_os("PALI_OPENAI_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::root().join("target/serve-venv/bin/python"));
    if !python.exists() {
        common::prerequisite_missing(
            "openai_python_client",
            &format!(
                "no Python with the openai client at {} (.ci/run makes one)",
                python.display()
            ),
        );
        return;
    }
    let server = Server::start(&[]);
    let img = example("three_shapes_wide.png");
    let expected = cli_json(&["caption", &img])["text"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new(&python)
        .arg(common::root().join("scripts/openai_check.py"))
        .arg(format!("http://{}/v1", server.addr))
        .arg(&img)
        .arg(&expected)
        .output()
        .unwrap();
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(", 0 failed"));
    server.stop();
}

/// Resident memory of a process, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Writes `raw` on a fresh connection and reads whatever comes back (bounded by a timeout):
/// for requests that are not HTTP enough for [`http`].
fn raw_exchange(addr: &str, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(raw);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Hostile clients for `PALI_SOAK_SECONDS` (8 here; scripts/fuzz.sh runs 60): malformed
/// HTTP, slowloris-style clients, oversized bodies and clients that leave mid-stream, while
/// normal requests keep succeeding; the server's memory does not grow, it drops clients that
/// are slow to send headers, and SIGTERM still ends it cleanly with slow clients connected.
#[test]
fn hostile_clients_while_normal_requests_keep_succeeding() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    let secs: u64 = std::env::var("PALI_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let server = Server::start(&[
        "--header-timeout",
        "1",
        "--max-connections",
        "64",
        "--max-body",
        "1000000",
        "--parallel",
        "2",
    ]);
    let pid = server.child.id();
    let addr = server.addr.clone();
    let normal_body = chat(
        "caption en",
        &[&data_url(&example("one_shape.png"))],
        json!({ "max_tokens": 4 }),
    )
    .to_string();
    // Warm up (allocator arenas, caches) before the first memory reading.
    for _ in 0..3 {
        assert_eq!(
            http(
                &addr,
                "POST",
                "/v1/chat/completions",
                &[],
                normal_body.as_bytes()
            )
            .status,
            200
        );
    }
    let rss_start = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let hostile = Arc::new(AtomicU64::new(0));
    let dropped_slow = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // Normal requests: every one must succeed.
    {
        let (addr, stop, ok, body) = (addr.clone(), stop.clone(), ok.clone(), normal_body.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let r = http(&addr, "POST", "/v1/chat/completions", &[], body.as_bytes());
                assert_eq!(r.status, 200, "a normal request failed: {}", r.body);
                assert_eq!(http(&addr, "GET", "/health", &[], b"").status, 200);
                ok.fetch_add(1, Relaxed);
            }
        }));
    }
    // Malformed HTTP and bodies.
    {
        let (addr, stop, hostile) = (addr.clone(), stop.clone(), hostile.clone());
        threads.push(std::thread::spawn(move || {
            let big_header = format!(
                "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(1 << 20)
            );
            let cases: Vec<Vec<u8>> = vec![
                b"\x00\xff\x13garbage\r\n\r\n".to_vec(),
                b"GET / HTTP/9.9\r\n\r\n".to_vec(),
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n0123456789".to_vec(),
                b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n".to_vec(),
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"messages\":".to_vec(),
                b"POST /v1/detect HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 30\r\n\r\n--x\r\nContent-Disposition: bad\r\n".to_vec(),
                b"GET /\xc3\x28 HTTP/1.1\r\nHost: \xff\r\n\r\n".to_vec(),
                big_header.into_bytes(),
            ];
            let mut i = 0;
            while !stop.load(Relaxed) {
                raw_exchange(&addr, &cases[i % cases.len()]);
                i += 1;
                hostile.fetch_add(1, Relaxed);
            }
        }));
    }
    // Oversized bodies: declared (413 before reading it) and streamed without a length.
    {
        let (addr, stop, hostile) = (addr.clone(), stop.clone(), hostile.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let r = http(
                    &addr,
                    "POST",
                    "/v1/chat/completions",
                    &[],
                    &vec![b'{'; 1_500_000],
                );
                assert_eq!(r.status, 413, "{}", r.body);
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = s.write_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, "x".repeat(1 << 16));
                for _ in 0..40 {
                    if s.write_all(chunk.as_bytes()).is_err() {
                        break;
                    }
                }
                let mut reply = Vec::new();
                let _ = s.read_to_end(&mut reply);
                hostile.fetch_add(1, Relaxed);
            }
        }));
    }
    // Slowloris: 24 clients sending a header byte every 300 ms; each must be dropped by the
    // header timeout (1 s) and comes back.
    for _ in 0..24 {
        let (addr, stop, dropped_slow) = (addr.clone(), stop.clone(), dropped_slow.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let t0 = Instant::now();
                let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
                let mut n = 0;
                let closed = loop {
                    if stop.load(Relaxed) {
                        break false;
                    }
                    if s.write_all(&head[n % head.len()..][..1]).is_err() {
                        break true;
                    }
                    n += 1;
                    let mut b = [0u8; 512];
                    match s.read(&mut b) {
                        Ok(0) => break true,
                        Ok(_) => break true, // 408 Request Timeout, then close
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break true,
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(20),
                        "a slow client was kept for 20 s (header timeout 1 s)"
                    );
                };
                if closed {
                    dropped_slow.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    // Clients that leave mid-stream and before the answer.
    {
        let (addr, stop, hostile) = (addr.clone(), stop.clone(), hostile.clone());
        threads.push(std::thread::spawn(move || {
            let mut req = long_request(400);
            req["stream"] = json!(true);
            let body = req.to_string();
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = write!(
                    s,
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if i.is_multiple_of(2) {
                    let mut b = [0u8; 1024];
                    let _ = s.read(&mut b);
                } else {
                    std::thread::sleep(Duration::from_millis(30));
                }
                drop(s);
                i += 1;
                hostile.fetch_add(1, Relaxed);
            }
        }));
    }
    // Memory under this load, sampled every 250 ms: the first third sets the level (the
    // queues and buffers of a loaded server), the last third must not be above it.
    let mut server = server;
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        if let Some(st) = server.child.try_wait().unwrap() {
            panic!("the server died ({st}): {}", server.log.lock().unwrap());
        }
        samples.push(rss_kib(pid));
    }
    let third = samples.len() / 3;
    let rss_level = *samples[..third].iter().max().unwrap();
    let rss_end = *samples[samples.len() - third..].iter().max().unwrap();
    stop.store(true, Relaxed);
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let (ok, hostile, slow) = (
        ok.load(Relaxed),
        hostile.load(Relaxed),
        dropped_slow.load(Relaxed),
    );
    eprintln!(
        "{secs} s: {ok} normal requests ok, {hostile} hostile requests, {slow} slow clients dropped; RSS idle {rss_start}, loaded {rss_level}, at the end {rss_end} KiB"
    );
    assert!(ok >= 3 && hostile >= 10 && slow >= 10, "too little traffic");
    // Room for allocator noise, none for a leak per request.
    assert!(
        rss_end <= rss_level + rss_level / 10 + 8 * 1024,
        "RSS grew under the same load from {rss_level} to {rss_end} KiB"
    );
    // Slow clients still connected while the server stops.
    let _slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(&server.addr).unwrap();
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHo");
            s
        })
        .collect();
    server.stop();
}

/// A model file truncated while the server has it mapped (`cp` over it does that): the
/// next request that reads the lost pages ends the server with one line naming the file and
/// exit status 74, not a bare SIGBUS. (Linux cannot prevent the truncation; see
/// pali_ggml::mapped.)
#[test]
fn a_model_file_truncated_while_mapped_is_reported() {
    let dir = common::scratch_dir("truncated-while-mapped");
    let demo = common::root().join("models/demo");
    for f in ["pali-demo-F16.gguf", "mmproj-pali-demo-F16.gguf"] {
        std::fs::copy(demo.join(f), dir.join(f)).unwrap();
    }
    let mmproj = dir.join("mmproj-pali-demo-F16.gguf");
    let server = Server::start(&[
        "-m",
        &common::path_str(&dir.join("pali-demo-F16.gguf")),
        "--mmproj",
        &common::path_str(&mmproj),
    ]);
    let img = data_url(&example("one_shape.png"));
    let req = chat("caption en", &[&img], json!({ "max_tokens": 4 }));
    assert_eq!(server.post("/v1/chat/completions", &req).status, 200);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mmproj)
        .unwrap()
        .set_len(4096)
        .unwrap();
    // The reply never comes: the process ends while reading the tower's weights.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let body = req.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut server = server;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100));
    let log = server.log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(74), "{status}: {log}");
    assert!(
        log.contains("was truncated or overwritten") && log.contains(&common::path_str(&mmproj)),
        "{log}"
    );
}
