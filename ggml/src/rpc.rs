//! ggml's RPC backend: one model's decoder layers spread over several machines.
//!
//! `pali rpc-server` exposes this machine's ggml device (the CPU, or its GPU in a GPU build)
//! with ggml's own server (`ggml_backend_rpc_start_server`, what llama.cpp's `rpc-server`
//! runs), and `--rpc host:port,…` registers those servers as devices, so that llama.cpp's
//! loader splits the decoder's layers over them like over local GPUs (`-ngl`,
//! `--tensor-split`). The protocol is ggml's; pali adds no protocol of its own.
//!
//! ggml's client aborts the process when a server cannot be reached or answers wrongly
//! (`GGML_ABORT` in ggml-rpc.cpp). [`connect`] therefore greets every server first with the
//! protocol's own hello, from Rust, and names the server that is missing, busy or of another
//! version; [`install_abort_report`] turns a server lost mid-run into one line and an exit
//! status instead of an abort with a backtrace.
//!
//! The RPC backend has no authentication and no encryption: a server runs whatever graph a
//! client sends and holds what it uploads. It belongs on a trusted network only.

use crate::{sys, Error, Result};
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The RPC protocol version of the vendored ggml (`RPC_PROTO_*_VERSION` in ggml-rpc.h of
/// llama-cpp-sys-2 0.1.161). A server of another major version, or a newer minor one, is
/// refused by ggml's client.
pub const PROTOCOL: (u8, u8, u8) = (7, 0, 0);
/// `RPC_CMD_HELLO`, fixed at 14 in every protocol version.
const CMD_HELLO: u8 = 14;
/// `RPC_CONN_CAPS_SIZE`: the hello's capability bytes (zero: plain TCP, no RDMA).
const CAPS: usize = 24;
/// How long a server may take to accept and answer the hello.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// The port `pali rpc-server` and llama.cpp's `rpc-server` listen on by default.
pub const DEFAULT_PORT: u16 = 50052;

/// Exit status after a lost RPC server (`EX_UNAVAILABLE` from sysexits.h).
pub const EXIT_SERVER_LOST: i32 = 69;

/// Whether this build has ggml's RPC backend (built with `GGML_RPC=ON`).
pub fn available() -> bool {
    !registry().is_null()
}

fn registry() -> sys::ggml_backend_reg_t {
    crate::logging::init();
    // SAFETY: a registry lookup by name; NULL when absent.
    unsafe { sys::ggml_backend_reg_by_name(c"RPC".as_ptr()) }
}

/// A function the RPC backend exports through its registry.
fn proc_address(name: &CStr) -> Result<*mut std::ffi::c_void> {
    let reg = registry();
    if reg.is_null() {
        return Err(Error::Backend(
            "this pali was built without ggml's RPC backend (build it with the `rpc` feature)"
                .into(),
        ));
    }
    // SAFETY: valid registry; NULL when the function is absent, which is checked.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
    if f.is_null() {
        return Err(Error::Backend(format!(
            "ggml's RPC backend has no {}",
            name.to_string_lossy()
        )));
    }
    Ok(f)
}

/// Checks a `host:port` endpoint's spelling (ggml's parser splits at the first `:`, so an
/// IPv6 address cannot be given; use a host name) and resolves it.
pub fn parse_endpoint(endpoint: &str) -> Result<SocketAddr> {
    let bad = |why: &str| Error::Invalid(format!("RPC server {endpoint:?}: {why}"));
    let (host, port) = endpoint
        .split_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    if host.is_empty() || port.contains(':') {
        return Err(bad("expected host:port (IPv6 addresses are not supported)"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| bad(&format!("{host} has no address")))
}

/// Greets the RPC server at `endpoint` with the protocol's hello and returns its version.
/// Each failure names the endpoint and what went wrong, where ggml's client would abort.
pub fn greet(endpoint: &str) -> Result<(u8, u8, u8)> {
    let addr = parse_endpoint(endpoint)?;
    let fail = |why: String| Error::Backend(format!("RPC server {endpoint}: {why}"));
    let mut s = TcpStream::connect_timeout(&addr, GREETING_TIMEOUT).map_err(|e| {
        fail(format!(
            "cannot connect ({e}); is `pali rpc-server` running there?"
        ))
    })?;
    s.set_read_timeout(Some(GREETING_TIMEOUT)).ok();
    s.set_write_timeout(Some(GREETING_TIMEOUT)).ok();
    // | cmd (1 byte) | request size (u64 LE) | request | → | reply size (u64 LE) | reply |
    let mut hello = vec![CMD_HELLO];
    hello.extend_from_slice(&(CAPS as u64).to_le_bytes());
    hello.extend_from_slice(&[0u8; CAPS]);
    let mut reply = [0u8; 8 + 4 + CAPS];
    s.write_all(&hello)
        .and_then(|_| s.read_exact(&mut reply))
        .map_err(|e| {
            fail(format!(
                "no answer to the RPC hello ({e}): not a ggml RPC server, or busy with another client"
            ))
        })?;
    let size = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    if size != (4 + CAPS) as u64 {
        return Err(fail(format!(
            "answered the hello with {size} bytes: not a ggml RPC server of protocol {}.x",
            PROTOCOL.0
        )));
    }
    let version = (reply[8], reply[9], reply[10]);
    if version.0 != PROTOCOL.0 || version.1 > PROTOCOL.1 {
        return Err(fail(format!(
            "speaks RPC protocol {}.{}.{}, this pali {}.{}.{}: use the same pali version on every machine",
            version.0, version.1, version.2, PROTOCOL.0, PROTOCOL.1, PROTOCOL.2
        )));
    }
    Ok(version)
}

/// Registers the RPC servers at `endpoints` as ggml devices, after greeting each (see
/// [`greet`]), and returns the new devices' names and descriptions. llama.cpp's loader then
/// puts offloaded layers on them (`-ngl`), split by free memory or `--tensor-split`.
/// Registering the same endpoint twice is a no-op, as in ggml.
pub fn connect(endpoints: &[String]) -> Result<Vec<String>> {
    if endpoints.is_empty() {
        return Err(Error::Invalid("--rpc: no servers given".into()));
    }
    let add = proc_address(c"ggml_backend_rpc_add_server")?;
    // SAFETY: the registry's function has this signature (ggml-rpc.h).
    let add: unsafe extern "C" fn(*const std::os::raw::c_char) -> sys::ggml_backend_reg_t =
        unsafe { std::mem::transmute(add) };
    let mut names = Vec::new();
    for endpoint in endpoints {
        greet(endpoint)?;
        let c = CString::new(endpoint.as_str())
            .map_err(|_| Error::Invalid(format!("RPC server {endpoint:?}: a NUL byte")))?;
        // SAFETY: a valid endpoint string; the server answered the hello just now. ggml keeps
        // one registry per endpoint and returns it again for a repeated endpoint.
        let reg = unsafe { add(c.as_ptr()) };
        if reg.is_null() {
            return Err(Error::Backend(format!(
                "RPC server {endpoint} offers no devices"
            )));
        }
        // SAFETY: valid registry handle; device indices are below its count.
        unsafe {
            let registered =
                (0..sys::ggml_backend_reg_count()).any(|i| sys::ggml_backend_reg_get(i) == reg);
            if !registered {
                sys::ggml_backend_register(reg);
            }
            for i in 0..sys::ggml_backend_reg_dev_count(reg) {
                let dev = sys::ggml_backend_reg_dev_get(reg, i);
                names.push(device_label(dev));
            }
        }
    }
    Ok(names)
}

/// `NAME (description, N MiB free)` of a device.
fn device_label(dev: sys::ggml_backend_dev_t) -> String {
    // SAFETY: a valid device; its strings are static.
    unsafe {
        let (mut free, mut total) = (0usize, 0usize);
        sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
        format!(
            "{} ({}, {} MiB free)",
            CStr::from_ptr(sys::ggml_backend_dev_name(dev)).to_string_lossy(),
            CStr::from_ptr(sys::ggml_backend_dev_description(dev)).to_string_lossy(),
            free >> 20
        )
    }
}

/// Whether `dev` belongs to the RPC backend (a remote device).
pub(crate) fn is_remote(dev: sys::ggml_backend_dev_t) -> bool {
    // SAFETY: valid device and registry; static name.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        !reg.is_null() && CStr::from_ptr(sys::ggml_backend_reg_name(reg)).to_bytes() == b"RPC"
    }
}

/// Serves this machine's devices to RPC clients on `endpoint` (`host:port`) until the process
/// ends: the local GPUs of a GPU build, else the CPU with `threads` threads. `cache_dir`
/// keeps large tensors on disk between runs (ggml's `-c`), so a client reconnecting with the
/// same model sends only their hashes. Returns only on failure (the port taken, …).
pub fn serve(endpoint: &str, threads: usize, cache_dir: Option<&std::path::Path>) -> Result<()> {
    parse_endpoint(endpoint)?;
    let start = proc_address(c"ggml_backend_rpc_start_server")?;
    // SAFETY: the registry's function has this signature (ggml-rpc.h).
    let start: unsafe extern "C" fn(
        *const std::os::raw::c_char,
        *const std::os::raw::c_char,
        usize,
        usize,
        *mut sys::ggml_backend_dev_t,
    ) = unsafe { std::mem::transmute(start) };
    let mut devices = served_devices();
    if devices.is_empty() {
        return Err(Error::Backend("ggml found no device to serve".into()));
    }
    // ggml's server binds with SO_REUSEADDR and reports a taken port only on stderr: check
    // first, for a clear error.
    std::net::TcpListener::bind(parse_endpoint(endpoint)?)
        .map_err(|e| Error::Io(format!("rpc-server: cannot listen on {endpoint}: {e}")))?;
    let ep = CString::new(endpoint).map_err(|_| Error::Invalid("endpoint has a NUL".into()))?;
    let cache = cache_dir
        .map(|p| {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
            CString::new(p.to_string_lossy().as_bytes())
                .map_err(|_| Error::Invalid(format!("bad cache path {}", p.display())))
        })
        .transpose()?;
    crate::logging::clear_last_error();
    // SAFETY: valid strings and a device array that outlive the call, which blocks while
    // serving.
    unsafe {
        start(
            ep.as_ptr(),
            cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            threads.max(1),
            devices.len(),
            devices.as_mut_ptr(),
        )
    };
    let why = crate::logging::take_last_error().unwrap_or_else(|| "see the lines above".into());
    Err(Error::Backend(format!(
        "rpc-server on {endpoint} stopped: {why}"
    )))
}

/// What `pali rpc-server` exposes, as llama.cpp's rpc-server does: every local GPU or
/// accelerator, else the CPU.
fn served_devices() -> Vec<sys::ggml_backend_dev_t> {
    // SAFETY: registry enumeration of valid devices.
    unsafe {
        let all: Vec<sys::ggml_backend_dev_t> = (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .filter(|d| !is_remote(*d))
            .collect();
        let gpus: Vec<_> = all
            .iter()
            .copied()
            .filter(|d| {
                let t = sys::ggml_backend_dev_type(*d);
                t == sys::GGML_BACKEND_DEVICE_TYPE_GPU || t == sys::GGML_BACKEND_DEVICE_TYPE_IGPU
            })
            .collect();
        if !gpus.is_empty() {
            return gpus;
        }
        all.into_iter()
            .filter(|d| sys::ggml_backend_dev_type(*d) == sys::GGML_BACKEND_DEVICE_TYPE_CPU)
            .take(1)
            .collect()
    }
}

/// Makes a lost RPC server end the process with one line on stderr and exit status
/// [`EXIT_SERVER_LOST`], instead of ggml's abort and backtrace (ggml's client cannot go on
/// without the layers a server held). Other ggml aborts keep their message and backtrace.
/// For programs (the pali binary), not libraries: it is process-wide.
pub fn install_abort_report() {
    extern "C" fn on_abort(msg: *const std::os::raw::c_char) {
        // SAFETY: ggml passes its NUL-terminated message buffer.
        let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
        if text.contains("ggml-rpc") {
            eprintln!(
                "pali: lost an RPC server ({}); the layers it held are gone, so pali stops",
                text.trim_end()
            );
            // SAFETY: ends the process at once, as the abort that follows would.
            unsafe { libc::_exit(EXIT_SERVER_LOST) }
        }
        eprintln!("{}", text.trim_end());
        // SAFETY: ggml's own function (ggml.h; not in the generated bindings), as its default
        // handler calls it; the abort follows.
        unsafe { ggml_print_backtrace() }
    }
    extern "C" {
        fn ggml_print_backtrace();
    }
    // SAFETY: installs a plain function pointer.
    unsafe {
        sys::ggml_set_abort_callback(Some(on_abort));
    }
}
