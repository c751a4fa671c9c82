//! One model over several processes with ggml's RPC backend, on 127.0.0.1 only: two
//! `pali rpc-server` processes hold the decoder's layers (all of them, or a share next to
//! the local CPU), and generation equals the single-process run's. Errors name the server.
//!
//! Its own test binary: RPC devices, once registered, are process-wide.
#![cfg(feature = "rpc")]

mod common;
use common::*;
use pali::{GenerateOptions, LoadOptions, Model, ModelPaths};
use pali_ggml::quant::FileType;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A `pali rpc-server` on a free loopback port, killed on drop.
struct RpcServer {
    child: Child,
    endpoint: String,
}

impl RpcServer {
    fn start() -> RpcServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = pali_cmd()
            .args(["rpc-server", "-t", "1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pali rpc-server starts");
        let endpoint = format!("127.0.0.1:{port}");
        let t0 = Instant::now();
        while pali_ggml::rpc::greet(&endpoint).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{endpoint} never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RpcServer { child, endpoint }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn load(name: &str, rpc: &[&RpcServer], n_gpu_layers: i32, split: &[f32]) -> Model {
    let c = converted(name, FileType::F32, FileType::F32);
    Model::load(
        &ModelPaths::new(c.decoder, c.mmproj),
        &LoadOptions {
            threads: 1,
            n_gpu_layers,
            rpc_servers: rpc.iter().map(|s| s.endpoint.clone()).collect(),
            tensor_split: split.to_vec(),
            low_mem: Some(false),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Greedy tokens and first-step logits of every case (image × prompt) of fixture `name`.
fn outputs(m: &Model, name: &str) -> Vec<(Vec<u32>, Vec<f32>)> {
    let r = Reference::load(name);
    let prompts = r.prompts();
    r.cases()
        .iter()
        .map(|case| {
            let img = case["image"].as_str().unwrap();
            let k = case["prompt_index"].as_u64().unwrap() as usize;
            let image = pali::image::load_image(&image_path(img), pali::MAX_IMAGE_PIXELS).unwrap();
            let opts = GenerateOptions {
                n_predict: ids(&case["greedy"]).len(),
                ..Default::default()
            };
            let g = m.generate(&image, &prompts[k], &opts, &mut |_| {}).unwrap();
            (g.tokens.clone(), g.first_logits.clone())
        })
        .collect()
}

/// Split over two servers (every layer remote; one layer local and the rest on one server;
/// a 1:3 tensor split), each fixture's greedy tokens equal the single-process run's and the
/// first-step logits are within float reassociation of it (the servers run the same CPU
/// kernels on the same weights; measured: bit-identical on every fixture).
#[test]
fn layers_split_over_rpc_servers_generate_like_one_process() {
    let (a, b) = (RpcServer::start(), RpcServer::start());
    for name in FIXTURES {
        let local = outputs(&load(name, &[], 0, &[]), name);
        let n_layers = pali_convert::config::PaliGemmaConfig::load(&fixture_dir(name).join("hf"))
            .unwrap()
            .text
            .num_hidden_layers as i32;
        let splits: [(&str, Vec<&RpcServer>, i32, Vec<f32>); 3] = [
            ("two servers", vec![&a, &b], 999, vec![]),
            ("local + one server", vec![&a], n_layers - 1, vec![]),
            ("two servers 1:3", vec![&a, &b], 999, vec![1.0, 3.0]),
        ];
        for (label, servers, ngl, split) in splits {
            let m = load(name, &servers, ngl, &split);
            assert_eq!(m.vision_backend(), "CPU", "the vision tower stays local");
            let remote = outputs(&m, name);
            let mut worst = 0f32;
            for (i, ((lt, ll), (rt, rl))) in local.iter().zip(&remote).enumerate() {
                assert_eq!(lt, rt, "{name} {label}: case {i} generated differently");
                worst = worst.max(max_abs_diff(ll, rl));
            }
            println!(
                "{name} {label}: {} cases, greedy tokens equal, first-step max |dlogit| {worst:.1e}",
                local.len()
            );
            assert!(
                worst <= 1e-4,
                "{name} {label}: first-step logits differ by {worst}"
            );
        }
    }
}

/// The CLI with --rpc captions the demo images exactly like without; a server that dies
/// mid-run ends pali with one line naming it and exit status 69, not an abort; a missing or
/// non-RPC server and a bad spelling are errors naming the endpoint.
#[test]
fn cli_rpc_errors_name_the_server() {
    let imgs = [
        "examples/images/one_shape.png",
        "examples/images/two_shapes_tall.png",
    ];
    let plain = pali_cmd()
        .args(["caption", "-t", "1"])
        .args(imgs)
        .output()
        .unwrap();
    assert_success(&plain);
    let server = RpcServer::start();
    let split = pali_cmd()
        .args(["caption", "-t", "1", "--rpc", &server.endpoint])
        .args(imgs)
        .output()
        .unwrap();
    assert_success(&split);
    assert_eq!(
        String::from_utf8_lossy(&split.stdout),
        String::from_utf8_lossy(&plain.stdout)
    );

    // A server killed after the first caption: the next image's decode needs its layers.
    let mut server = server;
    let mut child = pali_cmd()
        .args(["caption", "-t", "1", "--rpc", &server.endpoint])
        .args(imgs.repeat(20))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader stays open to the end: with stdout's reader gone, pali's quiet end on
    // SIGPIPE (like `| head`) would be the right outcome and hide the one under test.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("one_shape.png"), "{first}");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(pali_ggml::rpc::EXIT_SERVER_LOST),
        "{err}"
    );
    assert!(err.contains("lost an RPC server"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");

    let dead = server.endpoint.clone();
    let not_rpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let not_rpc_ep = not_rpc.local_addr().unwrap().to_string();
    let cases = [
        (dead.as_str(), format!("RPC server {dead}: cannot connect")),
        (
            not_rpc_ep.as_str(),
            format!("RPC server {not_rpc_ep}: no answer to the RPC hello"),
        ),
        (
            "localhost",
            "RPC server \"localhost\": expected host:port".to_string(),
        ),
        (
            "127.0.0.1:0",
            "the port must be a number from 1 to 65535".to_string(),
        ),
    ];
    for (endpoint, needle) in cases {
        let out = pali_cmd()
            .args(["caption", "-t", "1", "--rpc", endpoint, imgs[0]])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{endpoint}: {err}");
        assert!(err.contains(&needle), "{endpoint}: {err}");
    }
    drop(not_rpc);

    let out = pali_cmd()
        .args(["caption", "-t", "1", "--tensor-split", "0,0", imgs[0]])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not all zero"),
        "{out:?}"
    );
}

/// `pali rpc-server` warns before listening on anything but loopback, and refuses a taken
/// port with a clear error (here both: a port taken on 0.0.0.0, so nothing is ever exposed).
#[test]
fn rpc_server_open_address_warning_and_port_taken() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = pali_cmd()
        .args(["rpc-server", "-H", "0.0.0.0", "--port", &port])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no authentication or encryption"), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 0.0.0.0:{port}")),
        "{err}"
    );
}
