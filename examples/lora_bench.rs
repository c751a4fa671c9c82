//! The cost of LoRA adapters, paired: one process loads the model and the adapters once, then
//! each round runs the same caption with no adapter and with each adapter back to back (32
//! tokens, past `<eos>`, as `pali bench`), so that the machine's drift hits all of a round
//! alike; it prints per-round ratios against "none" and their medians, and the memory each
//! adapter added when it was loaded (resident, anonymous and file-backed).
//!
//! Besides wall-clock times it counts the process's CPU time (`/proc/self/stat`) per stage:
//! the vision tower, the prefix (a generation of one token) and 32 decode steps (a generation
//! of 33 tokens minus that). With THREADS = 1 nothing spins, so CPU time is the work itself,
//! whatever else the machine runs.
//!
//! `cargo run --release --example lora_bench -- MODEL.gguf MMPROJ.gguf IMAGE ROUNDS THREADS ADAPTER.gguf…`
//! (BENCHMARKS.md, "LoRA adapters").

use pali::image::load_image;
use pali::{AdapterScale, GenerateOptions, LoadOptions, MemoryUse, Model, ModelPaths};

/// This process's user + system CPU seconds (Linux; 0 elsewhere).
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 6 {
        return Err("usage: lora_bench MODEL MMPROJ IMAGE ROUNDS THREADS ADAPTER…".into());
    }
    let rounds: usize = a[3].parse()?;
    let threads: i32 = a[4].parse()?;
    let model = Model::load(
        &ModelPaths::new(&a[0], &a[1]),
        &LoadOptions {
            threads,
            low_mem: Some(false),
            ..Default::default()
        },
    )?;
    let img = load_image(a[2].as_ref(), pali::MAX_IMAGE_PIXELS)?;
    let opts = GenerateOptions {
        n_predict: 32,
        ignore_eos: true,
        ..Default::default()
    };
    // One run first: every page of the base is touched before memory is compared.
    model.generate(&img, "caption en", &opts, &mut |_| {})?;
    let mut names = vec!["none".to_string()];
    let mut selections = vec![Vec::new()];
    for path in &a[5..] {
        let before = MemoryUse::now();
        let id = model.load_adapter(path)?;
        let after = MemoryUse::now();
        // The vision part is mapped: its pages count once a run has read them.
        model.generate(
            &img,
            "caption en",
            &GenerateOptions {
                lora: vec![AdapterScale::new(id, 1.0)],
                ..opts.clone()
            },
            &mut |_| {},
        )?;
        let used = MemoryUse::now();
        let info = &model.adapters()[id.0 as usize];
        if let (Some(b), Some(l), Some(u)) = (before, after, used) {
            println!(
                "{{\"adapter\":{path:?},\"tensor_mib\":{:.1},\"rss_after_load_mib\":{:.1},\"anon_after_load_mib\":{:.1},\"rss_after_a_run_mib\":{:.1},\"file_after_a_run_mib\":{:.1}}}",
                info.bytes as f64 / (1 << 20) as f64,
                l.rss_mib - b.rss_mib,
                l.anon_mib - b.anon_mib,
                u.rss_mib - b.rss_mib,
                u.file_mib - b.file_mib,
            );
        }
        names.push(
            std::path::Path::new(path)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        selections.push(vec![AdapterScale::new(id, 1.0)]);
    }
    // [config][round] = (ttft ms, decode tok/s, vision ms, prefill ms, cpu vision, cpu prefill, cpu decode)
    type Row = (f64, f64, f64, f64, f64, f64, f64);
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for (i, lora) in selections.iter().enumerate() {
            let o = GenerateOptions {
                lora: lora.clone(),
                ..opts.clone()
            };
            let c0 = cpu_s();
            let enc = model.encode_image_with(&img, lora)?;
            let c1 = cpu_s();
            let one = GenerateOptions {
                n_predict: 1,
                ..o.clone()
            };
            model.generate_encoded(enc.clone(), "caption en", &one, &mut |_| {})?;
            let c2 = cpu_s();
            let g = model.generate_encoded(enc, "caption en", &o, &mut |_| {})?;
            let c3 = cpu_s();
            let t = &g.timings;
            let ttft = t.preprocess_ms + t.vision_ms + t.prefill_ms;
            let cpu = (c1 - c0, c2 - c1, (c3 - c2) - (c2 - c1));
            println!(
                "{{\"round\":{round},\"adapter\":{:?},\"vision_ms\":{:.1},\"prefill_ms\":{:.1},\"ttft_ms\":{ttft:.1},\"decode_tok_s\":{:.3},\"cpu_vision_s\":{:.2},\"cpu_prefill_s\":{:.2},\"cpu_decode32_s\":{:.2}}}",
                names[i], t.vision_ms, t.prefill_ms, t.decode_tok_s, cpu.0, cpu.1, cpu.2
            );
            rows[i].push((
                ttft,
                t.decode_tok_s,
                t.vision_ms,
                t.prefill_ms,
                cpu.0,
                cpu.1,
                cpu.2,
            ));
        }
    }
    for (i, name) in names.iter().enumerate() {
        let r = &rows[i];
        let col = |f: fn(&Row) -> f64| median(r.iter().map(f).collect());
        let vs = |f: fn(&Row) -> f64| {
            median(
                r.iter()
                    .zip(&rows[0])
                    .map(|(x, b)| f(x) / f(b) - 1.0)
                    .collect(),
            )
        };
        println!(
            "{{\"summary\":{name:?},\"rounds\":{rounds},\"median_vision_ms\":{:.1},\"median_prefill_ms\":{:.1},\"median_ttft_ms\":{:.1},\"median_decode_tok_s\":{:.3},\"median_paired_ttft_change\":{:.4},\"median_paired_decode_change\":{:.4},\"median_cpu_vision_s\":{:.2},\"median_cpu_prefill_s\":{:.2},\"median_cpu_decode32_s\":{:.2},\"median_paired_cpu_ttft_change\":{:.4},\"median_paired_cpu_decode_change\":{:.4}}}",
            col(|x| x.2),
            col(|x| x.3),
            col(|x| x.0),
            col(|x| x.1),
            vs(|x| x.0),
            vs(|x| 1.0 / x.1),
            col(|x| x.4),
            col(|x| x.5),
            col(|x| x.6),
            vs(|x| x.4 + x.5),
            vs(|x| x.6),
        );
    }
    Ok(())
}
