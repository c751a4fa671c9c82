//! The task commands: caption / ask / ocr / run (text), detect / segment, bench, eval.

use crate::args::{gen_options, load_model, ClipArgs, ModelArgs};
use crate::files::model_paths;
use pali::image::{load_image, Clip, ClipPlan, FrameSelection};
use pali::{Answer, GenerateOptions, Model, RgbImage, Task};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Output files and the mask decoder of `pali detect` / `pali segment`.
#[derive(Default)]
pub(crate) struct LocateOutputs<'a> {
    /// `--draw`.
    pub(crate) draw: Option<&'a Path>,
    /// `--mask-out` (segment).
    pub(crate) mask_out: Option<&'a Path>,
    /// `--vae` (segment).
    pub(crate) vae: Option<&'a Path>,
}

/// `pali detect` / `pali segment`: the library's task, printed as `label: x1,y1,x2,y2`
/// lines or one JSON object; `--draw` writes the labelled picture, `--mask-out` the masks.
pub(crate) fn run_locate(
    input: &Input,
    task: &Task,
    outs: LocateOutputs<'_>,
    args: &ModelArgs,
) -> Result<bool, String> {
    let segment = matches!(task, Task::Segment(_));
    let paths = model_paths(args, outs.vae, segment)?;
    if outs.mask_out.is_some() && paths.mask_decoder.is_none() {
        return Err("--mask-out needs the mask decoder: pass --vae VAE.gguf (made by `pali convert-vae vae-oid.npz`)".into());
    }
    // Before loading anything: a request without names fails at once.
    task.check().map_err(|e| e.to_string())?;
    let opened = input.open().map_err(|e| e.to_string())?;
    let model = load_model(args, &paths)?;
    let opts = gen_options(args)?;
    let loaded = opened
        .ready(&model, task, &opts)
        .map_err(|e| e.to_string())?;
    // `--draw` draws on the first image (a clip's first frame).
    let first = outs.draw.is_some().then(|| loaded.first().clone());
    let found = match loaded.run(&model, task, &opts, &mut |_| {}) {
        Ok(Answer::Located(found)) => found,
        Ok(Answer::Text(_)) => unreachable!("detect and segment answer with objects"),
        Err(e) => return Err(e.to_string()),
    };
    if args.json {
        let mut obj = pali::tasks::to_json(&found);
        if let Some(p) = outs.draw {
            obj["draw"] = serde_json::json!(p.display().to_string());
        }
        if let Some(p) = outs.mask_out {
            obj["mask_out"] = serde_json::json!(p.display().to_string());
        }
        println!("{obj}");
    } else {
        print_located(&found);
    }
    let masks = found.masks();
    if let (Some(p), Some(img)) = (outs.draw, &first) {
        let pic = pali::draw::draw_segments(img, &found.boxes(), &masks);
        pali::draw::save_png(&pic, p).map_err(|e| e.to_string())?;
    }
    if let Some(p) = outs.mask_out {
        let refs: Vec<&pali::Mask> = masks.into_iter().flatten().collect();
        let size = found.image;
        pali::draw::save_mask_png(&refs, size.width, size.height, p).map_err(|e| e.to_string())?;
    }
    Ok(true)
}

/// The text form of detect / segment: one line per object, warnings on stderr.
fn print_located(found: &pali::Located) {
    for o in &found.objects {
        let b = &o.bbox;
        let [x1, y1, x2, y2] = b.rect().map(|v| v.round() as i64);
        let mut line = format!("{}: {x1},{y1},{x2},{y2}", b.label);
        if let Some(score) = b.score {
            line.push_str(&format!(" score={score:.2}"));
        }
        if let Some(seg) = &o.segment {
            let c: Vec<String> = seg.codes.iter().map(u8::to_string).collect();
            line.push_str(&format!(" codes={}", c.join(",")));
            if let Some(m) = &seg.mask {
                line.push_str(&format!(" area={}", m.area()));
            }
        }
        println!("{line}");
    }
    for wline in &found.warnings {
        eprintln!("warning: {wline}");
    }
    if found.objects.is_empty() {
        eprintln!("no objects found (the model answered {:?})", found.text);
    }
}

/// What one prompt is about.
pub(crate) enum Input {
    /// One image file.
    Image(PathBuf),
    /// A clip's frames.
    Clip(PathBuf, FrameSelection),
    /// Several image files, in order.
    Images(Vec<PathBuf>),
}

impl Input {
    /// Each file as its own prompt: a clip with `--frames` / `--fps`, else an image.
    pub(crate) fn each(files: Vec<PathBuf>, clip: &ClipArgs) -> Vec<Input> {
        files.into_iter().map(|f| Input::one(f, clip)).collect()
    }

    /// One file: a clip with `--frames` / `--fps`, else an image.
    pub(crate) fn one(file: PathBuf, clip: &ClipArgs) -> Input {
        match clip.selection() {
            Some(sel) => Input::Clip(file, sel),
            None => Input::Image(file),
        }
    }

    /// The name printed before an answer when there are several.
    fn label(&self) -> String {
        match self {
            Input::Image(p) | Input::Clip(p, _) => p.display().to_string(),
            Input::Images(ps) => ps
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
        }
    }

    /// Reads the input before any model is loaded: its images decoded, or its clip opened
    /// and its frames chosen.
    fn open(&self) -> pali::Result<Opened> {
        let image = |p: &PathBuf| load_image(p, pali::MAX_IMAGE_PIXELS).map_err(pali::Error::from);
        Ok(match self {
            Input::Image(p) => Opened::Images(vec![image(p)?]),
            Input::Images(ps) => Opened::Images(ps.iter().map(image).collect::<Result<_, _>>()?),
            Input::Clip(p, sel) => Opened::Clip(ClipPlan::open(p, *sel, pali::MAX_IMAGE_PIXELS)?),
        })
    }

    /// [`Input::open`], then [`Opened::ready`].
    fn load(&self, model: &Model, task: &Task, opts: &GenerateOptions) -> pali::Result<Loaded> {
        self.open()?.ready(model, task, opts)
    }
}

/// An input read: images, or a clip whose frames are chosen but not decoded.
enum Opened {
    Images(Vec<RgbImage>),
    Clip(ClipPlan),
}

impl Opened {
    /// The pixels to run: a clip's frames are decoded once they are known to fit the
    /// context (K frames × tokens per frame + the prompt), so a clip too long for it costs
    /// no decoding.
    fn ready(self, model: &Model, task: &Task, opts: &GenerateOptions) -> pali::Result<Loaded> {
        Ok(match self {
            Opened::Images(images) => Loaded::Images(images),
            Opened::Clip(plan) => {
                model.check_context(plan.indices.len(), &task.prompt(), opts)?;
                Loaded::Clip(plan.decode(pali::MAX_IMAGE_PIXELS)?)
            }
        })
    }
}

/// An input's pixels.
enum Loaded {
    Images(Vec<RgbImage>),
    Clip(Clip),
}

impl Loaded {
    /// Runs the task; a clip's frames are freed once encoded.
    fn run(
        self,
        model: &Model,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> pali::Result<Answer> {
        match self {
            Loaded::Images(images) => model.run(&images, task, opts, on_text),
            Loaded::Clip(clip) => model.run_clip(clip, task, opts, on_text),
        }
    }

    /// The first image (the frame `--draw` draws on).
    fn first(&self) -> &RgbImage {
        match self {
            Loaded::Images(images) => &images[0],
            Loaded::Clip(clip) => &clip.frames[0],
        }
    }
}

/// Runs one prompt on each input; streams text (or prints JSON Lines); keeps going past bad
/// inputs. Returns whether all succeeded.
pub(crate) fn generate_each(
    inputs: &[Input],
    task: &Task,
    args: &ModelArgs,
) -> Result<bool, String> {
    let model = load_model(args, &model_paths(args, None, false)?)?;
    let opts = gen_options(args)?;
    let many = inputs.len() > 1;
    let bar = if many && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(inputs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut ok = true;
    // Single images are encoded a group at a time and then decoded: in low-memory mode the
    // vision tower and the decoder are loaded once per group, not once per image.
    let group = model.images_per_group();
    let mut encoded = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        if i % group == 0 {
            encoded = inputs[i..inputs.len().min(i + group)]
                .iter()
                .map(|input| match input {
                    Input::Image(p) => Some(
                        load_image(p, pali::MAX_IMAGE_PIXELS)
                            .map_err(pali::Error::from)
                            .and_then(|img| model.encode_image_with(&img, &opts.lora)),
                    ),
                    _ => None,
                })
                .rev()
                .collect();
        }
        let pre = encoded.pop().expect("one per input");
        let stream = !args.json;
        if stream && many {
            print!("{}: ", input.label());
        }
        let mut stdout = std::io::stdout();
        let mut on_text = |piece: &str| {
            if stream {
                print!("{piece}");
                let _ = stdout.flush();
            }
        };
        let res = match pre {
            Some(enc) => enc.and_then(|img| model.run_encoded(img, task, &opts, &mut on_text)),
            None => input
                .load(&model, task, &opts)
                .and_then(|loaded| loaded.run(&model, task, &opts, &mut on_text)),
        };
        match res {
            Ok(answer) => {
                if args.json {
                    let mut obj = pali::tasks::to_json(&answer);
                    if many {
                        obj["path"] = serde_json::json!(input.label());
                    }
                    println!("{obj}");
                } else {
                    println!();
                    if let Answer::Text(t) = &answer {
                        for w in &t.warnings {
                            eprintln!("warning: {w}");
                        }
                    }
                }
            }
            Err(e) => {
                ok = false;
                if args.json && many {
                    println!(
                        "{}",
                        serde_json::json!({ "path": input.label(), "error": e.to_string() })
                    );
                } else if many {
                    println!();
                    eprintln!("error: {e}");
                } else {
                    return Err(e.to_string());
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(ok)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn run_bench(
    image: &Path,
    prompt: &str,
    runs: usize,
    args: &ModelArgs,
) -> Result<(), String> {
    let model = load_model(args, &model_paths(args, None, false)?)?;
    let load_ms = model.load_ms();
    let img = load_image(image, pali::MAX_IMAGE_PIXELS).map_err(|e| e.to_string())?;
    // Like llama-bench's tg: exactly -n tokens, whatever they are.
    let opts = GenerateOptions {
        ignore_eos: true,
        ..gen_options(args)?
    };
    let mut rows: Vec<pali::Timings> = Vec::new();
    for i in 0..=runs {
        let g = model
            .generate(&img, prompt, &opts, &mut |_| {})
            .map_err(|e| e.to_string())?;
        if i > 0 {
            rows.push(g.timings);
        }
    }
    let col = |f: fn(&pali::Timings) -> f64| median(&mut rows.iter().map(f).collect::<Vec<_>>());
    let (pre, vis, pf, dec, tps) = (
        col(|t| t.preprocess_ms),
        col(|t| t.vision_ms),
        col(|t| t.prefill_ms),
        col(|t| t.decode_ms),
        col(|t| t.decode_tok_s),
    );
    let n_prefix = rows[0].n_prefix;
    let obj = serde_json::json!({
        "runs": runs, "load_ms": load_ms, "n_prefix": n_prefix, "n_gen": rows[0].n_gen,
        "median_preprocess_ms": pre, "median_vision_ms": vis, "median_prefill_ms": pf,
        "prefill_tok_s": n_prefix as f64 / (pf / 1e3), "median_decode_ms": dec, "median_decode_tok_s": tps,
        "median_ttft_ms": pre + vis + pf, "peak_rss_mb": pali::peak_rss_mb(),
        "vision_backend": model.vision_backend(), "low_mem": model.low_mem(), "cpu_features": pali_ggml::cpu_features(),
        "blas": pali_ggml::blas::library(),
    });
    if args.json {
        println!("{obj}");
    } else {
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
    }
    Ok(())
}

pub(crate) fn run_eval(set: &Path, args: &ModelArgs) -> Result<(), String> {
    let items = pali::eval::read_set(set).map_err(|e| e.to_string())?;
    let model = load_model(args, &model_paths(args, None, false)?)?;
    let report =
        pali::eval::evaluate(&model, &items, &gen_options(args)?).map_err(|e| e.to_string())?;
    let obj = serde_json::json!({ "set": set.display().to_string(), "tasks": report });
    println!(
        "{}",
        if args.json {
            obj.to_string()
        } else {
            serde_json::to_string_pretty(&obj).expect("json")
        }
    );
    Ok(())
}
