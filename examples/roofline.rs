//! This machine's roofline: the two limits every pali benchmark number should be read against.
//!
//! `cargo run --release --example roofline -- --threads 2 [--json]`
//!
//! 1. **Memory bandwidth** (STREAM-like: copy `c=a`, scale `b=s·c`, add `c=a+b`, triad
//!    `a=b+s·c`, read `Σa`) over f32 arrays far larger than the caches, split into one
//!    contiguous slice per thread and first touched by the thread that uses it; best of
//!    5 repetitions, bytes counted as STREAM does (copy and scale move 2 arrays, add and
//!    triad 3, read 1). Decoding one token reads every weight of the decoder once, so
//!    `tok/s ≤ bandwidth / weight bytes per token`.
//! 2. **Matmul throughput** of ggml's CPU backend through pali's own [`Graph`] API (the path
//!    the SigLIP tower takes), for each weight type our quantizers write and F32
//!    activations, at PaliGemma 2 3B's shapes: the decoder FFN `[K=2304, N=9216]` at M=260
//!    tokens (prefill) and M=1 (decode, also reported as weight bytes read per second) and
//!    the SigLIP So400m MLP `[K=1152, N=4304]` at M=256 patches (vision). Vision and
//!    prefill are compute-bound: their time is at least `FLOPs / these GFLOP/s`.
//!
//! Weights are random, quantized by [`convert_f32`] (ggml's own quantizers), written to a
//! temporary GGUF (about 2 GB, removed at the end) and mapped by [`Weights::load`] exactly
//! as a model file is. Each matmul is a fresh graph, as in pali: graph allocation and
//! ggml's thread start-up are included (the "graph overhead" line measures them alone).
//! Only a few outputs are read back, and they are checked against dot products of the
//! dequantized weights.
//!
//! Decode runs cycle through identical copies of their matrix totalling 256 MiB, so that,
//! as in a real decode of a model far larger than the L3, the weights come from DRAM: a
//! single 12 MiB Q4_0 matrix would otherwise be read from the L3 again and again (reading a
//! 256 MiB buffer between runs was not enough: F32 decode then beat the STREAM bandwidth,
//! the L3 keeping reused lines).
//!
//! Our ggml build (no OpenMP) starts fresh worker threads at every compute, and on a
//! 2-vCPU VM one of them sometimes waits several milliseconds before it runs (a 0.6 ms
//! matmul once had a median of 7 ms with 2 threads; 1 thread showed no stalls): the median
//! is what pali gets, the best run the hardware's bound.
//!
//! llama.cpp may repack Q4_0/Q4_K weights into an interleaved layout for its own decoder on
//! the CPU; our graphs use them as stored.

use clap::Parser;
use pali_ggml::gguf::GgufWriter;
use pali_ggml::graph::{Backend, Graph, Weights};
use pali_ggml::quant::{convert_f32, to_f32};
use pali_ggml::GgmlType;
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Measure memory bandwidth and ggml matmul throughput (the roofline)")]
struct Args {
    /// Threads for the bandwidth kernels and for ggml.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Elements per STREAM array, in Mi (2^20) f32.
    #[arg(long, default_value_t = 64)]
    stream_mi: usize,
    /// Timed runs per matmul (after one warm-up); fast cases get more, up to 100 or ~1 s.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args = Args::parse();
    let threads = args.threads.max(1);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    let stream = stream(args.stream_mi << 20, threads);
    let (matmuls, overhead) = matmuls(threads, args.runs.max(5))?;
    let total = started.elapsed();
    // CPU time other processes took while we ran: numbers measured under load are low.
    let others = cpu0
        .zip(cpu_seconds())
        .map(|((all0, me0), (all1, me1))| ((all1 - all0) - (me1 - me0)).max(0.0));
    if let Some(o) = others.filter(|&o| o > 1.0) {
        eprintln!(
            "warning: other processes used {o:.1} CPU-seconds during this {:.1} s run: \
             the numbers are low; rerun on an idle machine",
            total.as_secs_f64()
        );
    }

    if args.json {
        let stream_json: serde_json::Map<_, _> = stream
            .iter()
            .map(|(k, gbps)| (k.name().to_string(), round(*gbps, 2).into()))
            .collect();
        let mm: Vec<_> = matmuls
            .iter()
            .map(|r| {
                serde_json::json!({
                    "type": r.ty.name(), "kernel": r.kernel, "m": r.m, "n": r.n, "k": r.k,
                    "ms": round(r.ms, 4), "best_ms": round(r.best_ms, 4),
                    "gflops": round(r.gflops(), 2),
                    "weight_gbps": (r.m == 1).then(|| round(r.weight_gbps(), 2)),
                    "best_weight_gbps": (r.m == 1).then(|| round(r.best_weight_gbps(), 2)),
                })
            })
            .collect();
        let out = serde_json::json!({
            "threads": threads,
            "stream": stream_json,
            "matmul": mm,
            "graph_overhead_ms": round(overhead * 1e3, 4),
            "loadavg_1m_at_start": load,
            "other_cpu_seconds": others.map(|o| round(o, 2)),
            "cpu_features": pali_ggml::cpu_features(),
            "seconds": round(total.as_secs_f64(), 1),
        });
        println!("{out}");
        return Ok(());
    }

    println!(
        "pali roofline: {threads} thread(s); ggml CPU features: {}; load average at start: {}",
        pali_ggml::cpu_features().join(" "),
        load.map_or("?".into(), |l| format!("{l:.2}"))
    );
    println!(
        "\nMemory bandwidth (STREAM-like, {} Mi f32 = {} MiB per array, best of {STREAM_REPS})",
        args.stream_mi,
        args.stream_mi * 4
    );
    for (k, gbps) in &stream {
        println!("  {:<6} {gbps:>7.2} GB/s", k.name());
    }
    println!(
        "\nggml mul_mat on the CPU backend (weights [K, N] × F32 activations [K, M]; \
         ms = median, GFLOP/s and weight GB/s from it)"
    );
    println!(
        "  {:<20} {:<5} {:<6} {:>4} {:>5} {:>5} {:>6} {:>9} {:>9} {:>9} {:>18}",
        "shape",
        "type",
        "kernel",
        "M",
        "N",
        "K",
        "MiB",
        "ms",
        "best ms",
        "GFLOP/s",
        "weight GB/s (best)"
    );
    for r in &matmuls {
        let bw = if r.m == 1 {
            format!("{:.2} ({:.2})", r.weight_gbps(), r.best_weight_gbps())
        } else {
            "-".into()
        };
        println!(
            "  {:<20} {:<5} {:<6} {:>4} {:>5} {:>5} {:>6.1} {:>9.3} {:>9.3} {:>9.1} {:>18}",
            r.label,
            r.ty.name(),
            r.kernel,
            r.m,
            r.n,
            r.k,
            r.weight_bytes as f64 / (1 << 20) as f64,
            r.ms,
            r.best_ms,
            r.gflops(),
            bw
        );
    }
    println!(
        "  (q4_K/q6_K need K divisible by 256: not run for K=1152; graph overhead per \
         compute, included above: {:.3} ms)",
        overhead * 1e3
    );
    println!(
        "\ntotal {:.1} s; other processes used {} CPU-seconds meanwhile",
        total.as_secs_f64(),
        others.map_or("?".into(), |o| format!("{o:.2}"))
    );
    Ok(())
}

/// CPU seconds used so far by all processes and by this one (Linux `/proc`, in its
/// 100 Hz ticks; `None` elsewhere).
fn cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let all: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user, nice, system, (idle, iowait,) irq, softirq
    let busy: f64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| all.get(i))
        .sum::<Option<f64>>()?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3; utime, stime are 14, 15.
    let f: Vec<&str> = me[me.rfind(')')? + 1..].split_whitespace().collect();
    let mine = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((busy / 100.0, mine / 100.0))
}

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

// ---------------------------------------------------------------------------------------
// 1. Memory bandwidth
// ---------------------------------------------------------------------------------------

const STREAM_REPS: usize = 5;
const SCALAR: f32 = 3.0;

#[derive(Clone, Copy)]
enum Kernel {
    Copy,
    Scale,
    Add,
    Triad,
    Read,
}

impl Kernel {
    const ALL: [Kernel; 5] = [
        Kernel::Copy,
        Kernel::Scale,
        Kernel::Add,
        Kernel::Triad,
        Kernel::Read,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::Copy => "copy",
            Kernel::Scale => "scale",
            Kernel::Add => "add",
            Kernel::Triad => "triad",
            Kernel::Read => "read",
        }
    }

    /// Arrays read plus arrays written, as STREAM counts them.
    fn arrays_moved(self) -> usize {
        match self {
            Kernel::Copy | Kernel::Scale => 2,
            Kernel::Add | Kernel::Triad => 3,
            Kernel::Read => 1,
        }
    }

    /// Runs the kernel on one thread's slices; returns the sum for `Read` (else 0).
    fn run(self, a: &mut [f32], b: &mut [f32], c: &mut [f32]) -> f32 {
        match self {
            Kernel::Copy => c.copy_from_slice(a),
            Kernel::Scale => b
                .iter_mut()
                .zip(c.iter())
                .for_each(|(b, c)| *b = SCALAR * c),
            Kernel::Add => c
                .iter_mut()
                .zip(a.iter().zip(b.iter()))
                .for_each(|(c, (a, b))| *c = a + b),
            Kernel::Triad => a
                .iter_mut()
                .zip(b.iter().zip(c.iter()))
                .for_each(|(a, (b, c))| *a = b + SCALAR * c),
            Kernel::Read => return sum(a),
        }
        0.0
    }
}

/// Σa with 16 independent partial sums, so that the loop vectorizes.
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let blocks = a.chunks_exact(16);
    let tail: f32 = blocks.remainder().iter().sum();
    for blk in blocks {
        acc.iter_mut().zip(blk).for_each(|(s, v)| *s += v);
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs `kernel` over the three arrays with one contiguous slice per thread; returns the
/// wall time and the threads' summed result.
fn parallel(kernel: Kernel, arrays: &mut [Vec<f32>; 3], threads: usize) -> (Duration, f32) {
    let chunk = arrays[0].len().div_ceil(threads).next_multiple_of(16);
    let [a, b, c] = arrays;
    let t0 = Instant::now();
    let sum = std::thread::scope(|s| {
        let jobs: Vec<_> = a
            .chunks_mut(chunk)
            .zip(b.chunks_mut(chunk))
            .zip(c.chunks_mut(chunk))
            .map(|((a, b), c)| s.spawn(move || kernel.run(a, b, c)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("bandwidth thread panicked"))
            .sum()
    });
    (t0.elapsed(), sum)
}

/// Best GB/s of each kernel over [`STREAM_REPS`] rounds of all kernels (STREAM's order).
fn stream(n: usize, threads: usize) -> Vec<(Kernel, f64)> {
    // Zeroed allocations are fresh pages from the OS, so the parallel fill below is their
    // first touch: each thread's pages end up near the core that uses them.
    let mut arrays = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
    let chunk = n.div_ceil(threads).next_multiple_of(16);
    std::thread::scope(|s| {
        for (v, arr) in [1.0f32, 2.0, 0.0].into_iter().zip(arrays.iter_mut()) {
            for part in arr.chunks_mut(chunk) {
                s.spawn(move || part.fill(v));
            }
        }
    });
    let mut best = [Duration::MAX; 5];
    for _ in 0..STREAM_REPS {
        for (i, k) in Kernel::ALL.into_iter().enumerate() {
            let (t, sum) = parallel(k, &mut arrays, threads);
            black_box((sum, &arrays));
            best[i] = best[i].min(t);
        }
    }
    Kernel::ALL
        .into_iter()
        .zip(best)
        .map(|(k, t)| (k, (k.arrays_moved() * n * 4) as f64 / t.as_secs_f64() / 1e9))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 2. Matmul throughput
// ---------------------------------------------------------------------------------------

/// PaliGemma 2 3B matmul shapes: (label, K, N, M).
const SHAPES: [(&str, usize, usize, usize); 3] = [
    ("decoder FFN prefill", 2304, 9216, 260),
    ("decoder FFN decode", 2304, 9216, 1),
    ("SigLIP MLP vision", 1152, 4304, 256),
];

/// Weight types measured (F32 … Q4_K_M's Q4_K and Q6_K).
const TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Row length and count of the tiny matrix of `graph_overhead`.
const TINY: usize = 32;

/// Output rows read back and checked.
const CHECK_ROWS: usize = 4;

struct MatmulResult {
    label: &'static str,
    ty: GgmlType,
    /// `ggml` (its CPU matmul) or `blas` (pali's OpenBLAS op, `Graph::mul_mat_blas`).
    kernel: &'static str,
    m: usize,
    n: usize,
    k: usize,
    weight_bytes: usize,
    /// Median time.
    ms: f64,
    /// Fastest run.
    best_ms: f64,
}

impl MatmulResult {
    fn gflops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64 / (self.ms * 1e-3) / 1e9
    }

    fn weight_gbps(&self) -> f64 {
        self.weight_bytes as f64 / (self.ms * 1e-3) / 1e9
    }

    fn best_weight_gbps(&self) -> f64 {
        self.weight_bytes as f64 / (self.best_ms * 1e-3) / 1e9
    }
}

/// Deterministic uniform values in [-1, 1) (xorshift64*).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor_name(ty: GgmlType, k: usize, n: usize, copy: usize) -> String {
    format!("w.{}.{k}x{n}.{copy}", ty.name())
}

/// Removes the temporary weight file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One weight matrix as stored (in `copies` identical tensors), with its first
/// [`CHECK_ROWS`] rows dequantized.
struct Matrix {
    ty: GgmlType,
    k: usize,
    n: usize,
    copies: usize,
    bytes: Vec<u8>,
    check_rows: Vec<f32>,
}

/// Decode cycles through copies of its matrix totalling at least this much (8× a 32 MiB
/// L3), so that each run reads its weights from DRAM.
const DECODE_ROTATION_BYTES: usize = 256 << 20;

/// Every measured weight matrix, random and converted by ggml's quantizers.
fn quantized_weights() -> Res<Vec<Matrix>> {
    let mut pairs: Vec<(usize, usize)> = SHAPES.iter().map(|&(_, k, n, _)| (k, n)).collect();
    pairs.dedup();
    let mut mats = Vec::new();
    // A tiny matrix, to time a graph's fixed cost (see `graph_overhead`).
    pairs.push((TINY, TINY));
    for (i, &(k, n)) in pairs.iter().enumerate() {
        let src = random(k * n, 1 + i as u64);
        for ty in TYPES {
            if k as i64 % ty.block_size() != 0 || (k == TINY && ty != GgmlType::F32) {
                continue; // K-quants need rows of whole 256-element super-blocks
            }
            let bytes = convert_f32(ty, &src, k)?;
            let check_rows = to_f32(ty, &bytes[..ty.row_size(k as i64) * CHECK_ROWS])?;
            let decoded = SHAPES.iter().any(|s| (s.1, s.2, s.3) == (k, n, 1));
            mats.push(Matrix {
                ty,
                k,
                n,
                copies: if decoded {
                    DECODE_ROTATION_BYTES.div_ceil(bytes.len())
                } else {
                    1
                },
                bytes,
                check_rows,
            });
        }
    }
    Ok(mats)
}

/// Writes the matrices to a GGUF file (`[K, N]` tensors, no metadata).
fn write_gguf(path: &Path, mats: &[Matrix]) -> Res<()> {
    let tensors: Vec<(&Matrix, usize)> = mats
        .iter()
        .flat_map(|m| (0..m.copies).map(move |c| (m, c)))
        .collect();
    let mut w = GgufWriter::new(tensors.len());
    for &(m, c) in &tensors {
        w.add_tensor(
            &tensor_name(m.ty, m.k, m.n, c),
            m.ty,
            &[m.k as i64, m.n as i64],
        )?;
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    w.write(&mut out, |i, _, o| {
        o.write_all(&tensors[i].0.bytes)
            .map_err(|e| pali_ggml::Error::Io(format!("{}: {e}", path.display())))
    })?;
    out.flush()?;
    Ok(())
}

/// Seconds for one `compute` of a fresh graph `W·x` (x: `[K, M]`), and the first
/// [`CHECK_ROWS`] outputs of token 0.
fn time_matmul(
    backend: &Backend,
    weights: &Weights,
    name: &str,
    (k, m, x): (usize, usize, &[f32]),
    kernel: &str,
) -> Res<(f64, Vec<f32>)> {
    let g = Graph::new(weights);
    let w = g.weight(name)?;
    let x = g.input(&[k as i64, m as i64], x.to_vec());
    let y = match kernel {
        "blas" => g
            .mul_mat_blas(w, x)
            .ok_or("the BLAS op does not take this matmul")?,
        _ => g.mul_mat(w, x),
    };
    // A view of a few outputs: the whole product is computed, but little is read back.
    let out = g.crop_2d(y, 0, 0, CHECK_ROWS as i64, 1);
    let t0 = Instant::now();
    let v = g.compute(out, backend)?;
    Ok((t0.elapsed().as_secs_f64(), v))
}

/// Seconds for one `compute` of a trivial matmul graph (`[TINY, TINY]` F32 weights, one
/// token): graph allocation and ggml's thread start-up alone.
fn graph_overhead(backend: &Backend, weights: &Weights) -> Res<f64> {
    let name = tensor_name(GgmlType::F32, TINY, TINY, 0);
    let x = vec![1.0; TINY];
    let mut times = (0..51)
        .map(|_| Ok(time_matmul(backend, weights, &name, (TINY, 1, &x), "ggml")?.0))
        .collect::<Res<Vec<f64>>>()?;
    Ok(median(&mut times[1..]))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let h = v.len() / 2;
    if v.len() % 2 == 1 {
        v[h]
    } else {
        (v[h - 1] + v[h]) / 2.0
    }
}

/// Checks ggml's outputs against dot products of the dequantized weights with `x0`
/// (token 0), allowing for the activations' own rounding (ggml quantizes them to Q8 for
/// quantized weights, to F16/BF16 for those).
fn check(mat: &Matrix, x0: &[f32], y: &[f32]) -> Res<()> {
    let xx: f64 = x0.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    for (r, (row, &got)) in mat.check_rows.chunks_exact(mat.k).zip(y).enumerate() {
        let want: f64 = row
            .iter()
            .zip(x0)
            .map(|(&w, &x)| f64::from(w) * f64::from(x))
            .sum();
        let ww: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let tol = 1e-2 * (ww * xx).sqrt();
        if (f64::from(got) - want).abs() > tol {
            return Err(format!(
                "{} [{}x{}]: output {r} is {got}, expected {want:.4} (± {tol:.4})",
                mat.ty, mat.k, mat.n
            )
            .into());
        }
    }
    Ok(())
}

/// Median time of each (shape, type) matmul, and the fixed per-graph overhead.
fn matmuls(threads: usize, runs: usize) -> Res<(Vec<MatmulResult>, f64)> {
    let mut mats = quantized_weights()?;
    let path = std::env::temp_dir().join(format!("pali-roofline-{}.gguf", std::process::id()));
    let _tmp = TempFile(path.clone()); // dropped after `weights`, i.e. after the unmapping
    write_gguf(&path, &mats)?;
    for m in &mut mats {
        m.bytes = Vec::new(); // the file holds them now
    }
    let backend = Backend::new(false, threads as i32)?;
    let weights = Weights::load(&path, &backend)?;
    let overhead = graph_overhead(&backend, &weights)?;

    let mut results = Vec::new();
    for (s, &(label, k, n, m)) in SHAPES.iter().enumerate() {
        let x = random(k * m, 100 + s as u64);
        // pali's OpenBLAS op too, where the build has it, for the float types it takes.
        let blas = pali_ggml::blas::library().is_some() && m > 1;
        let cases = mats
            .iter()
            .filter(|w| w.k == k && w.n == n)
            .flat_map(|mat| {
                let float = matches!(mat.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
                std::iter::once((mat, "ggml")).chain((blas && float).then_some((mat, "blas")))
            });
        for (mat, kernel) in cases {
            let copies = if m == 1 { mat.copies } else { 1 };
            let names: Vec<String> = (0..copies).map(|c| tensor_name(mat.ty, k, n, c)).collect();
            let case = (k, m, x.as_slice());
            // Warm-up (faults the mapped weights in, grows ggml's work buffer), checked.
            for name in &names {
                let (_, y) = time_matmul(&backend, &weights, name, case, kernel)?;
                check(mat, &x[..k], &y)?;
            }
            let mut times = Vec::new();
            while times.len() < runs || (times.iter().sum::<f64>() < 1.0 && times.len() < 100) {
                let name = &names[times.len() % copies];
                times.push(time_matmul(&backend, &weights, name, case, kernel)?.0);
            }
            results.push(MatmulResult {
                label,
                ty: mat.ty,
                kernel,
                m,
                n,
                k,
                weight_bytes: mat.ty.row_size(k as i64) * n,
                ms: median(&mut times) * 1e3,
                best_ms: times[0] * 1e3, // sorted by `median`
            });
        }
    }
    Ok((results, overhead))
}
