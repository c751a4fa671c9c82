#!/usr/bin/env python3
"""Load-test `pali serve` on this machine (loopback only), standard library only.

Usage: python scripts/serve_load.py [--pali target/release/pali] [--requests 300]
           [--clients 8] [--malformed 10] [--port 0] [--json OUT] [-- SERVER ARGS...]

It starts `pali serve` itself (from the repository root, so the bundled demo
model is found), waits for /health, then:
  1. warm-up: 20 sequential good requests;
  2. load: REQUESTS good requests (chat captions, JSON and multipart /v1/detect
     over the four example images) plus MALFORMED ones (bad JSON, bad base64,
     missing image: each must get a 400 with an OpenAI error body), shuffled
     and sent by CLIENTS threads, each a client with one keep-alive connection;
  3. checks that the same request always got the same answer (greedy decoding)
     and that /metrics counted what was sent;
  4. overhead: the median of 30 sequential HTTP captions of one image against
     the in-process median of `pali bench` on the same image and token count;
  5. SIGTERM, and the server's exit code.
Server RSS (VmRSS) is read at start, after the warm-up and after the load.
Exits non-zero if anything failed.
"""

import argparse
import base64
import collections
import concurrent.futures
import http.client
import json
import math
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["three_shapes_wide.png", "one_shape.png", "two_shapes_small.png", "two_shapes_tall.png"]
# One object per request: the demo model finds only the first class of `a ; b`.
OBJECTS = ["circle", "square", "triangle"]
GOOD_KINDS = ["caption", "detect", "detect_multipart"]

HOST = "127.0.0.1"  # all traffic stays on loopback, whatever --host the server binds
HEALTH_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120  # one request, socket timeout
LOAD_DEADLINE_S = 900  # the load phase sends nothing new after this
BENCH_TIMEOUT_S = 600
SHUTDOWN_TIMEOUT_S = 30
WARMUP = 20
OVERHEAD_RUNS = 30
LISTEN_RE = re.compile(r"pali: listening on http://(\S+):(\d+)")
# Server options that change the model or how it runs; forwarded to `pali bench`
# so the overhead comparison measures the same thing. All take one value.
BENCH_SHARED_OPTS = {
    "-m", "--model", "--mmproj", "-t", "--threads", "-c", "--ctx-size",
    "--n-gpu-layers", "--ngl", "--cache-type", "--ctk", "--sliding-window", "--low-mem",
}

Job = collections.namedtuple("Job", "kind path body ctype key")
# key: requests with equal keys must get equal answers (None for malformed ones)


class Server:
    """A `pali serve` child process whose stderr is drained by a thread."""

    def __init__(self, pali, port, extra_args):
        cmd = [pali, "serve", "--port", str(port), *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self.log = collections.deque(maxlen=200)
        self.port = None
        self.listening = threading.Event()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            m = LISTEN_RE.search(line)
            if m and not self.listening.is_set():
                self.port = int(m.group(2))
                self.listening.set()

    def wait_healthy(self, timeout_s):
        """Wait for the listening line, then for GET /health 200; return the seconds taken."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while not self.listening.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no listening line within {timeout_s} s")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while loading")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.2)
        raise RuntimeError(f"/health was not 200 within {timeout_s} s")

    def memory_mib(self, field="VmRSS"):
        """VmRSS (now) or VmHWM (peak) from /proc/PID/status, in MiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/{self.proc.pid}/status")

    def terminate(self, timeout_s):
        """SIGTERM; return (exit code or None if it had to be killed, seconds taken)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.monotonic() - t0


def cpu_seconds(pid):
    """CPU seconds so far: (whole machine busy, the server, this script and its waited children).

    The machine may be shared: what neither the server nor this script used
    during a phase is other processes competing for the cores.
    """
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    machine = (user + nice + system + irq + softirq + steal) / hz
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    server = (int(fields[11]) + int(fields[12])) / hz  # utime, stime
    t = os.times()
    return machine, server, t.user + t.system + t.children_user + t.children_system


def cpu_use(before, after, wall_s):
    """Average cores used during a phase by the server, this script and everything else."""
    machine, server, me = (b - a for a, b in zip(before, after))
    return {"server_cores": server / wall_s, "script_cores": me / wall_s,
            "other_cores": max(0.0, machine - server - me) / wall_s, "cores": os.cpu_count()}


# ---- requests ----------------------------------------------------------------

def chat_body(image_b64, prompt="caption en", data_url=None):
    url = data_url or f"data:image/png;base64,{image_b64}"
    return json.dumps({
        "model": "pali",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    }).encode()


def multipart_body(image, filename, objects):
    boundary = "pali-load-" + uuid.uuid4().hex
    parts = [
        (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
         f"Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n",
        (f'--{boundary}\r\nContent-Disposition: form-data; name="objects"\r\n\r\n'
         f"{objects}\r\n").encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def good_job(i, images):
    """The i-th good request: kinds, images and objects cycle so all combinations occur."""
    kind = GOOD_KINDS[i % len(GOOD_KINDS)]
    name = IMAGES[(i // len(GOOD_KINDS)) % len(IMAGES)]
    obj = OBJECTS[(i // (len(GOOD_KINDS) * len(IMAGES))) % len(OBJECTS)]
    raw, b64 = images[name]
    if kind == "caption":
        return Job(kind, "/v1/chat/completions", chat_body(b64), "application/json",
                   ("caption", name))
    # JSON and multipart detection of the same image and object must agree.
    if kind == "detect":
        body = json.dumps({"image": b64, "objects": [obj]}).encode()
        return Job(kind, "/v1/detect", body, "application/json", ("detect", name, obj))
    body, ctype = multipart_body(raw, name, obj)
    return Job(kind, "/v1/detect", body, ctype, ("detect", name, obj))


MALFORMED = [
    ("bad_json", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": '),
    ("bad_json", "/v1/detect", b'{"image": "abc", objects: [circle]}'),
    ("bad_base64", "/v1/chat/completions",
     chat_body(None, data_url="data:image/png;base64,!!not*base64!!")),
    ("bad_base64", "/v1/detect", b'{"image": "!!not*base64!!", "objects": ["circle"]}'),
    ("missing_image", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"}]}]}
    ).encode()),
    ("missing_image", "/v1/detect", b'{"objects": ["circle"]}'),
]


def malformed_job(i):
    name, path, body = MALFORMED[i % len(MALFORMED)]
    return Job("malformed_" + name, path, body, "application/json", None)


def send(conn, job):
    """Send one job on a keep-alive connection; return a result dict."""
    t0 = time.perf_counter()
    try:
        conn.request("POST", job.path, body=job.body,
                     headers={"Content-Type": job.ctype, "Content-Length": str(len(job.body))})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        conn.close()  # the next request opens a new connection
        return {"job": job, "status": None, "ms": (time.perf_counter() - t0) * 1e3,
                "error": f"{type(e).__name__}: {e}"}
    ms = (time.perf_counter() - t0) * 1e3
    result = {"job": job, "status": resp.status, "ms": ms, "error": None}
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if job.key is None:  # malformed: a 400 with an OpenAI error object
        err = body.get("error") if isinstance(body, dict) else None
        if resp.status != 400:
            result["error"] = f"HTTP {resp.status}, expected 400: {data[:200]!r}"
        elif not (isinstance(err, dict) and {"message", "type", "code"} <= err.keys()):
            result["error"] = f"400 without an OpenAI error object: {data[:200]!r}"
        return result
    if not 200 <= resp.status < 300 or not isinstance(body, dict):
        result["error"] = f"HTTP {resp.status}: {data[:200]!r}"
        return result
    if job.kind == "caption":
        result["answer"] = body["choices"][0]["message"]["content"]
        result["completion_tokens"] = body["usage"]["completion_tokens"]
    else:
        result["answer"] = body["text"]
    t = body.get("timings", {})
    result["model_ms"] = sum(t.get(k, 0) for k in
                             ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms"))
    return result


def run_load(port, jobs, clients):
    """Send jobs from `clients` threads; return (results, wall seconds, jobs left unsent)."""
    todo = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        out = []
        while time.monotonic() < deadline:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                break
            out.append(send(conn, job))
        conn.close()
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(lambda _: client(), range(clients)))
    wall = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    return results, wall, len(jobs) - len(results)


# ---- statistics ----------------------------------------------------------------

def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_stats(results):
    ms = [r["ms"] for r in results]
    return {"n": len(ms), "failures": sum(r["error"] is not None for r in results),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def inconsistent_answers(results):
    """Good results whose answer differs from the most common one for the same request."""
    by_key = collections.defaultdict(list)
    for r in results:
        if "answer" in r:
            by_key[r["job"].key].append(r["answer"])
    odd = []
    for key, answers in by_key.items():
        usual, _ = collections.Counter(answers).most_common(1)[0]
        odd += [(key, usual, a) for a in answers if a != usual]
    return odd


def metrics_mismatches(port, sent):
    """Compare pali_requests_total for the model endpoints with what we got back."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counted = collections.Counter()
    for m in re.finditer(r'^pali_requests_total\{endpoint="([^"]+)",status="(\d+)"\} (\d+)$',
                         text, re.M):
        if m.group(1) in ("/v1/chat/completions", "/v1/detect"):
            counted[(m.group(1), int(m.group(2)))] = int(m.group(3))
    expected = collections.Counter((r["job"].path, r["status"]) for r in sent)
    return [f"{path} {status}: metrics {counted[(path, status)]}, responses {expected[(path, status)]}"
            for path, status in sorted(set(counted) | set(expected), key=str)
            if counted[(path, status)] != expected[(path, status)]]


# ---- overhead ----------------------------------------------------------------

def bench_args(server_args):
    """The server options that `pali bench` takes too (see BENCH_SHARED_OPTS)."""
    out, i = [], 0
    while i < len(server_args):
        arg = server_args[i]
        if arg.split("=", 1)[0] in BENCH_SHARED_OPTS:
            if "=" in arg:
                out.append(arg)
            else:
                out += server_args[i:i + 2]
                i += 1
        i += 1
    return out


def measure_overhead(port, pali, image_name, images, server_args):
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    job = Job("caption", "/v1/chat/completions", chat_body(images[image_name][1]),
              "application/json", ("caption", image_name))
    runs = [send(conn, job) for _ in range(OVERHEAD_RUNS)]
    conn.close()
    failed = [r["error"] for r in runs if r["error"]]
    if failed:
        raise RuntimeError(f"overhead captions failed: {failed[0]}")
    tokens = {r["completion_tokens"] for r in runs}
    if len(tokens) != 1:
        raise RuntimeError(f"overhead captions produced different token counts: {tokens}")
    n = tokens.pop()
    cmd = [pali, "bench", str(ROOT / "examples" / "images" / image_name), "-p", "caption en",
           "-r", str(OVERHEAD_RUNS), "-n", str(n), "--json", *bench_args(server_args)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         timeout=BENCH_TIMEOUT_S, check=True).stdout
    bench = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    http_ms = statistics.median([r["ms"] for r in runs])
    in_process_ms = bench["median_ttft_ms"] + bench["median_decode_ms"]
    return {"image": image_name, "completion_tokens": n, "runs": OVERHEAD_RUNS,
            "http_median_ms": http_ms,
            "server_model_median_ms": statistics.median([r["model_ms"] for r in runs]),
            "in_process_median_ms": in_process_ms, "ratio": http_ms / in_process_ms,
            "bench_command": " ".join(cmd)}


# ---- main ----------------------------------------------------------------

def parse_args():
    argv = sys.argv[1:]
    server_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to `pali serve`.")
    p.add_argument("--pali", default="target/release/pali", help="the pali binary")
    p.add_argument("--requests", type=int, default=300, help="good requests in the load phase")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--malformed", type=int, default=10, help="malformed requests (must get 400)")
    p.add_argument("--port", type=int, default=0, help="server port (0: any free one)")
    p.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    if args.requests < 1 or args.clients < 1 or args.malformed < 0:
        p.error("--requests and --clients must be >= 1, --malformed >= 0")
    return args, server_args


def print_summary(rep):
    load = rep["load"]
    print(f"server: {rep['server_command']}")
    print(f"ready in {rep['ready_s']:.1f} s")
    print(f"load: {load['sent']} requests ({load['good']} good, {load['malformed']} malformed) "
          f"from {load['clients']} clients in {load['wall_s']:.2f} s "
          f"= {load['throughput_rps']:.1f} requests/s"
          + (f"; {load['unsent']} NOT SENT (deadline)" if load["unsent"] else ""))
    c = load["cpu"]
    print(f"  CPU (cores of {c['cores']}): server {c['server_cores']:.2f}, this script "
          f"{c['script_cores']:.2f}, other processes {c['other_cores']:.2f}")
    print(f"  {'kind':<26}{'n':>5}{'fail':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind, s in [("all", load["overall"]), *load["per_kind"].items()]:
        print(f"  {kind:<26}{s['n']:>5}{s['failures']:>6}{s['p50_ms']:>10.1f}{s['p95_ms']:>10.1f}"
              f"{s['p99_ms']:>10.1f}{s['max_ms']:>10.1f}")
    for e in load["failure_samples"]:
        print(f"  FAILED {e}")
    print(f"status codes: {load['status_codes']}")
    print(f"inconsistent answers: {len(rep['inconsistent'])}")
    for key, usual, got in rep["inconsistent"][:5]:
        print(f"  {key}: {got!r} instead of {usual!r}")
    print("metrics: " + ("pali_requests_total matches the responses" if not rep["metrics_mismatches"]
                         else "MISMATCH " + "; ".join(rep["metrics_mismatches"])))
    m = rep["rss_mib"]
    print(f"RSS MiB: start {m['start']:.1f}, after warm-up ({WARMUP} requests) {m['warmup']:.1f}, "
          f"end {m['end']:.1f}, peak (VmHWM) {m['peak']:.1f}; "
          f"growth end vs warm-up {m['growth']:+.1f} MiB ({m['growth_pct']:+.1f}%)")
    o = rep.get("overhead")
    if o:
        print(f"overhead ({o['image']}, {o['completion_tokens']} tokens, {o['runs']} runs): "
              f"HTTP median {o['http_median_ms']:.1f} ms (server-reported model time "
              f"{o['server_model_median_ms']:.1f} ms) vs in-process `pali bench` "
              f"{o['in_process_median_ms']:.1f} ms: ratio {o['ratio']:.2f}; "
              f"other processes used {o['cpu']['other_cores']:.2f} cores meanwhile")
    else:
        print(f"overhead: FAILED {rep.get('overhead_error')}")
    code = rep["exit_code"]
    print(f"SIGTERM: exit code {code if code is not None else 'none (killed after timeout)'} "
          f"after {rep['shutdown_s']:.2f} s")


def main():
    args, server_args = parse_args()
    pali = str(Path(args.pali).resolve())
    if not Path(pali).is_file():
        sys.exit(f"serve load: no pali binary at {pali} (build it: cargo build --release)")
    images = {}
    for name in IMAGES:
        raw = (ROOT / "examples" / "images" / name).read_bytes()
        images[name] = (raw, base64.b64encode(raw).decode())

    server = Server(pali, args.port, server_args)
    rep = {"server_command": " ".join([pali, "serve", "--port", str(args.port), *server_args])}
    try:
        try:
            rep["ready_s"] = server.wait_healthy(HEALTH_TIMEOUT_S)
        except RuntimeError as e:
            sys.exit(f"serve load: FAILED to start: {e}\nserver log:\n  "
                     + "\n  ".join(server.log))
        port = server.port
        rss = {"start": server.memory_mib()}

        warm_conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        warmup = [send(warm_conn, good_job(i, images)) for i in range(WARMUP)]
        warm_conn.close()
        rss["warmup"] = server.memory_mib()

        jobs = [good_job(i, images) for i in range(args.requests)]
        jobs += [malformed_job(i) for i in range(args.malformed)]
        random.Random(0).shuffle(jobs)
        cpu0 = cpu_seconds(server.proc.pid)
        results, wall, unsent = run_load(port, jobs, args.clients)
        load_cpu = cpu_use(cpu0, cpu_seconds(server.proc.pid), wall)
        rss["end"] = server.memory_mib()
        rss["peak"] = server.memory_mib("VmHWM")
        rss["growth"] = rss["end"] - rss["warmup"]
        rss["growth_pct"] = 100 * rss["growth"] / rss["warmup"]
        rep["rss_mib"] = rss

        by_kind = collections.defaultdict(list)
        for r in results:
            by_kind[r["job"].kind].append(r)
        failures = [r for r in warmup + results if r["error"]]
        rep["load"] = {
            "sent": len(results), "good": args.requests, "malformed": args.malformed,
            "clients": args.clients, "wall_s": wall, "throughput_rps": len(results) / wall,
            "unsent": unsent, "cpu": load_cpu, "overall": latency_stats(results),
            "per_kind": {k: latency_stats(v) for k, v in sorted(by_kind.items())},
            "warmup_failures": sum(r["error"] is not None for r in warmup),
            "status_codes": dict(sorted(collections.Counter(
                str(r["status"]) for r in results).items())),
            "failure_samples": [f"{r['job'].kind} {r['job'].path}: {r['error']}"
                                for r in failures[:5]],
        }
        rep["inconsistent"] = inconsistent_answers(warmup + results)
        rep["metrics_mismatches"] = metrics_mismatches(port, warmup + results)
        try:
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            rep["overhead"] = measure_overhead(port, pali, IMAGES[0], images, server_args)
            rep["overhead"]["cpu"] = cpu_use(cpu0, cpu_seconds(server.proc.pid),
                                             time.perf_counter() - t0)
        except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
            rep["overhead_error"] = f"{type(e).__name__}: {e}"
    finally:
        rep["exit_code"], rep["shutdown_s"] = server.terminate(SHUTDOWN_TIMEOUT_S)

    print_summary(rep)
    ok = (not rep["load"]["failure_samples"] and not rep["load"]["unsent"]
          and not rep["inconsistent"] and not rep["metrics_mismatches"]
          and "overhead" in rep and rep["exit_code"] == 0)
    if not ok:
        print("server log (last lines):", *list(server.log)[-15:], sep="\n  ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1, default=str)
            f.write("\n")
    print("serve load: " + ("all checks passed" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
