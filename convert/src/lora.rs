//! `pali convert-lora`: a PEFT LoRA adapter folder (`adapter_config.json` +
//! `adapter_model.safetensors`) → llama.cpp adapter GGUFs, named and laid out as in
//! [`pali_ggml::schema::adapter`]: the decoder's pairs in a file stock llama.cpp loads
//! (`llama_adapter_lora_init`) onto pali's decoder GGUF, the vision tower's and projector's
//! in an `mmproj-…` file beside it.
//!
//! PEFT computes `W x + s_m · B A x` per module, `s_m = alpha_m / r_m` (`alpha_m / √r_m` with
//! rsLoRA; `rank_pattern` / `alpha_pattern` set `r_m` / `alpha_m`), llama.cpp
//! `W x + scale · alpha / r · B A x` with one `alpha` per file and `r` read from each pair.
//! The files keep PEFT's `lora_alpha` as `alpha` and fold what differs into `B`:
//! `B' = B · s_m / (alpha / r_m)` (1 for a plain adapter, whose `B` is stored unchanged).
//!
//! Refused with a message that names the key, module or tensor: other PEFT types, DoRA,
//! `modules_to_save`, trainable biases or tokens, adapters on the embeddings or the (tied)
//! head, unknown modules, unpaired or mis-shaped matrices, ranks that contradict the config.
//! Writing streams tensor by tensor into `*.partial` files renamed when whole, as `convert`.

use crate::peft::{PeftConfig, MERGE_HINT};
use crate::plan::{Pad, Planned};
use crate::safetensors::{Checkpoint, TensorEntry};
use crate::write::{commit, prepare_outputs, write_gguf};
use crate::{ConvertError, Result};
use pali_ggml::gguf::{GgufWriter, Value};
use pali_ggml::quant::FileType;
use pali_ggml::schema::{adapter as names, hf_prefixes, keys, Fixup};
use pali_ggml::GgmlType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `convert_lora` converts and how.
#[derive(Debug, Clone)]
pub struct LoraConvertOptions {
    /// The PEFT adapter folder.
    pub input: PathBuf,
    /// Output folder (created if missing).
    pub out_dir: PathBuf,
    /// Element type of the matrices: F16 (default), F32 or Q8_0 (matrices whose rows are
    /// not whole 32-blocks, e.g. every `B` of rank < 32, stay F16).
    pub ty: FileType,
    /// Overwrite existing outputs.
    pub force: bool,
    /// Name for the files and `general.name` (default: the folder's name).
    pub name: Option<String>,
}

/// What `convert_lora` wrote.
#[derive(Debug, Clone)]
pub struct LoraConvertOutput {
    /// The decoder's adapter (none when the adapter changes only the vision side).
    pub decoder: Option<PathBuf>,
    /// The vision tower's and projector's adapter (none for a decoder-only adapter).
    pub mmproj: Option<PathBuf>,
    /// LoRA pairs written (decoder, vision).
    pub pairs: (usize, usize),
}

/// Which file a module's pair goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Decoder,
    Vision,
}

/// A module the adapter changes: where its pair goes.
#[derive(Debug)]
struct Target {
    part: Part,
    /// Sort key: layer (usize::MAX for the projector), position in the target table.
    order: (usize, usize),
    /// The base tensor's GGUF name (`blk.3.attn_q.weight`).
    gguf: String,
    /// The GGUF name without the layer (`attn_q.weight`), for the per-kind shape check.
    kind: &'static str,
}

/// `layers.{N}.{module}` → (N, the table entry).
fn layer_module<'t>(
    rest: &str,
    layers: &str,
    table: &'t [(&'static str, &'static str)],
) -> Option<(usize, usize, &'t (&'static str, &'static str))> {
    let rest = rest.strip_prefix(layers)?;
    let (n, module) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    let n: usize = n.parse().ok()?;
    let (i, entry) = table
        .iter()
        .enumerate()
        .find(|(_, (hf, _))| *hf == module)?;
    Some((n, i, entry))
}

/// Maps a PEFT module path (after `base_model.model.`) to its base tensor, or says why not.
fn target(module: &str, tensor: &str) -> Result<Target> {
    let last = module.rsplit('.').next().unwrap_or(module);
    if let Some((_, gguf)) = names::REFUSED.iter().find(|(hf, _)| *hf == last) {
        return Err(ConvertError::Tensor(format!(
            "tensor {tensor}: an adapter on {module} is not supported: Gemma 2 ties the output head to the token embedding ({gguf}), which pali also reads itself for the prompt; {MERGE_HINT}"
        )));
    }
    for p in hf_prefixes::LANGUAGE_MODEL {
        if let Some(rest) = module.strip_prefix(p) {
            if let Some((n, i, (_, gg))) = layer_module(rest, "layers.", names::DECODER_TARGETS) {
                return Ok(Target {
                    part: Part::Decoder,
                    order: (n, i),
                    gguf: pali_ggml::schema::decoder_block(n, gg),
                    kind: gg,
                });
            }
        }
    }
    for p in hf_prefixes::VISION {
        if let Some(rest) = module.strip_prefix(p) {
            if let Some((n, i, (_, gg))) =
                layer_module(rest, "encoder.layers.", names::VISION_TARGETS)
            {
                return Ok(Target {
                    part: Part::Vision,
                    order: (n, i),
                    gguf: pali_ggml::schema::vision_block(n, gg),
                    kind: gg,
                });
            }
        }
    }
    let (proj, proj_gguf) = names::PROJECTOR_TARGET;
    if hf_prefixes::PROJECTOR
        .iter()
        .any(|p| module.strip_prefix(p) == Some(proj))
    {
        return Ok(Target {
            part: Part::Vision,
            order: (usize::MAX, 0),
            gguf: proj_gguf.to_string(),
            kind: proj_gguf,
        });
    }
    Err(ConvertError::Tensor(format!(
        "tensor {tensor}: unknown target module {module}: pali maps LoRA on the decoder's \
         {{q,k,v,o,gate,up,down}}_proj, SigLIP's {{q,k,v,out}}_proj and fc1/fc2, and the \
         projector's linear (transformers 4.x and 5.x module paths)"
    )))
}

/// One module's pair, checked.
struct Pair<'a> {
    target: Target,
    a: (&'a str, &'a TensorEntry),
    b: (&'a str, &'a TensorEntry),
    /// The factor folded into `B`.
    fold: f32,
}

/// Every LoRA pair of the checkpoint, checked against the config and each other.
fn pairs<'a>(ckpt: &'a Checkpoint, cfg: &PeftConfig) -> Result<Vec<Pair<'a>>> {
    #[derive(Default)]
    struct Halves<'a> {
        a: Option<(&'a str, &'a TensorEntry)>,
        b: Option<(&'a str, &'a TensorEntry)>,
    }
    let mut modules: BTreeMap<&str, Halves> = BTreeMap::new();
    for (name, e) in ckpt.tensors() {
        let Some(module_path) = name.strip_prefix(names::PEFT_PREFIX) else {
            return Err(ConvertError::Tensor(format!(
                "tensor {name} is not under {:?}: not a PEFT adapter's weights",
                names::PEFT_PREFIX
            )));
        };
        if name.contains("lora_magnitude_vector") {
            return Err(ConvertError::Tensor(format!(
                "tensor {name}: a DoRA magnitude vector; DoRA is not supported: {MERGE_HINT}"
            )));
        }
        if name.contains("lora_embedding_") {
            return Err(ConvertError::Tensor(format!(
                "tensor {name}: LoRA on an embedding is not supported (Gemma 2 ties it to the output head); {MERGE_HINT}"
            )));
        }
        let (module, half) = if let Some(m) = module_path.strip_suffix(names::PEFT_A) {
            (m, true)
        } else if let Some(m) = module_path.strip_suffix(names::PEFT_B) {
            (m, false)
        } else {
            return Err(ConvertError::Tensor(format!(
                "tensor {name} is not a LoRA matrix (lora_A / lora_B): a whole trained layer \
                 (modules_to_save, trainable tokens, a bias) is not supported; {MERGE_HINT}"
            )));
        };
        let h = modules.entry(module).or_default();
        if half {
            h.a = Some((name, e));
        } else {
            h.b = Some((name, e));
        }
    }
    if modules.is_empty() {
        return Err(ConvertError::Tensor(format!(
            "{} holds no LoRA matrices",
            names::PEFT_WEIGHTS
        )));
    }
    let mut out = Vec::new();
    // The first pair of each layer kind: (A's name, A's shape, B's name, B's shape).
    type Seen<'n> = (&'n str, Vec<usize>, &'n str, Vec<usize>);
    let mut kinds: BTreeMap<(Part, &str), Seen> = BTreeMap::new();
    for (module, h) in modules {
        let (a, b) = match (h.a, h.b) {
            (Some(a), Some(b)) => (a, b),
            (Some((n, _)), None) | (None, Some((n, _))) => {
                return Err(ConvertError::Tensor(format!(
                    "tensor {n} has no {} partner for module {module}",
                    if h.a.is_some() { "lora_B" } else { "lora_A" }
                )))
            }
            (None, None) => unreachable!("an entry has at least one half"),
        };
        let target = target(module, a.0)?;
        let (sa, sb) = (&a.1.shape, &b.1.shape);
        if sa.len() != 2 || sb.len() != 2 || sa.contains(&0) || sb.contains(&0) {
            return Err(ConvertError::Tensor(format!(
                "tensors {} {sa:?} and {} {sb:?}: LoRA matrices are 2-D and not empty",
                a.0, b.0
            )));
        }
        if sa[0] != sb[1] {
            return Err(ConvertError::Tensor(format!(
                "tensors {} {sa:?} ([r, in]) and {} {sb:?} ([out, r]): their ranks differ",
                a.0, b.0
            )));
        }
        let (r, s) = cfg.module(module)?;
        if sa[0] as u64 != r {
            return Err(ConvertError::Tensor(format!(
                "tensor {} has rank {} (shape {sa:?}), but adapter_config.json gives r = {r} for {module} (r, rank_pattern)",
                a.0, sa[0]
            )));
        }
        match kinds.get(&(target.part, target.kind)) {
            Some((na, ka, nb, kb)) if ka[1] != sa[1] || kb[0] != sb[0] => {
                return Err(ConvertError::Tensor(format!(
                    "tensors {} {sa:?} / {} {sb:?} do not match {na} {ka:?} / {nb} {kb:?}: \
                     the same layer kind has different input or output widths",
                    a.0, b.0
                )))
            }
            Some(_) => {}
            None => {
                kinds.insert(
                    (target.part, target.kind),
                    (a.0, sa.clone(), b.0, sb.clone()),
                );
            }
        }
        let base = if cfg.alpha != 0.0 {
            cfg.alpha / r as f64
        } else {
            1.0
        };
        out.push(Pair {
            target,
            a,
            b,
            fold: (s / base) as f32,
        });
    }
    out.sort_by_key(|p| (p.target.part, p.target.order));
    Ok(out)
}

/// The GGUF element type of a matrix whose rows hold `row` values.
fn matrix_type(ty: FileType, row: i64) -> GgmlType {
    match ty {
        FileType::F32 => GgmlType::F32,
        FileType::Q8_0 if row % GgmlType::Q8_0.block_size() == 0 => GgmlType::Q8_0,
        _ => GgmlType::F16,
    }
}

fn plan<'a>(pairs: &[Pair<'a>], part: Part, ty: FileType) -> Vec<Planned<'a>> {
    let mut out = Vec::new();
    for p in pairs.iter().filter(|p| p.target.part == part) {
        for ((hf, e), suffix, scale) in
            [(p.a, names::SUFFIX_A, 1.0), (p.b, names::SUFFIX_B, p.fold)]
        {
            let ne: Vec<i64> = e.shape.iter().rev().map(|&d| d as i64).collect();
            out.push(Planned {
                gguf_name: format!("{}{suffix}", p.target.gguf),
                hf_name: hf.to_string(),
                entry: e,
                ty: matrix_type(ty, ne[0]),
                ne,
                fixup: Fixup::None,
                pad: Pad::None,
                scale,
            });
        }
    }
    out
}

/// `general.name` and the files' stem: `--name`, else the folder's name.
fn adapter_name(opts: &LoraConvertOptions) -> String {
    let base = opts.name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(&opts.input)
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "adapter".into())
    });
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Converts a PEFT LoRA adapter folder (see the module documentation).
pub fn convert_lora(
    opts: &LoraConvertOptions,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<LoraConvertOutput> {
    pali_ggml::logging::init();
    if !matches!(opts.ty, FileType::F16 | FileType::F32 | FileType::Q8_0) {
        return Err(ConvertError::Usage(format!(
            "unsupported --type {} for an adapter: use f16, f32 or q8_0",
            opts.ty.label()
        )));
    }
    if !opts.input.is_dir() {
        return Err(ConvertError::Missing(format!(
            "{} is not a folder (give the folder PEFT's save_pretrained wrote)",
            opts.input.display()
        )));
    }
    let cfg = PeftConfig::load(&opts.input)?;
    let weights = opts.input.join(names::PEFT_WEIGHTS);
    if !weights.is_file() {
        let bin = opts.input.join("adapter_model.bin");
        return Err(ConvertError::Missing(if bin.is_file() {
            format!(
                "{} is a pickle file, which pali does not read: save the adapter with safe_serialization=True ({})",
                bin.display(),
                names::PEFT_WEIGHTS
            )
        } else {
            format!("no {} in {}", names::PEFT_WEIGHTS, opts.input.display())
        }));
    }
    let ckpt = Checkpoint::open_files(&[weights])?;
    let pairs = pairs(&ckpt, &cfg)?;
    let dec = plan(&pairs, Part::Decoder, opts.ty);
    let vis = plan(&pairs, Part::Vision, opts.ty);

    let name = adapter_name(opts);
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| ConvertError::io(&opts.out_dir, e))?;
    let file = format!("{name}-LoRA-{}.gguf", opts.ty.label());
    let decoder_path = opts.out_dir.join(&file);
    let mmproj_path = opts.out_dir.join(format!("{}{file}", names::MMPROJ_PREFIX));
    let targets: Vec<&Path> = [(&dec, &decoder_path), (&vis, &mmproj_path)]
        .iter()
        .filter(|(p, _)| !p.is_empty())
        .map(|(_, path)| path.as_path())
        .collect();
    let _lock = prepare_outputs(&opts.out_dir, &targets, opts.force)?;

    let total: u64 = dec
        .iter()
        .chain(&vis)
        .map(|p| (p.entry.numel() * p.entry.dtype.size()) as u64)
        .sum();
    let mut done = 0u64;
    let header = |plan: &[Planned], arch: &str| -> Result<GgufWriter> {
        let mut h = GgufWriter::new(plan.len());
        let quantized = plan.iter().any(|p| p.ty.is_quantized());
        let mut kvs: Vec<(&str, Value)> = vec![
            (keys::ARCHITECTURE, Value::Str(arch.into())),
            (names::GENERAL_TYPE, Value::Str(names::TYPE_ADAPTER.into())),
            (keys::NAME, Value::Str(name.clone())),
            (keys::FILE_TYPE, Value::U32(opts.ty.llama_ftype())),
            (names::ADAPTER_TYPE, Value::Str(names::TYPE_LORA.into())),
            (names::LORA_ALPHA, Value::F32(cfg.alpha as f32)),
            (names::HAS_DECODER, Value::Bool(!dec.is_empty())),
            (names::HAS_VISION, Value::Bool(!vis.is_empty())),
        ];
        if quantized {
            kvs.push((keys::QUANTIZATION_VERSION, Value::U32(2)));
        }
        if arch == keys::ARCH_CLIP {
            kvs.push((
                keys::CLIP_PROJECTOR_TYPE,
                Value::Str(keys::PROJECTOR_PALIGEMMA.into()),
            ));
        }
        for (k, v) in kvs {
            h.set(k, v)?;
        }
        for p in plan {
            h.add_tensor(&p.gguf_name, p.ty, &p.ne)?;
        }
        Ok(h)
    };
    let mut written = Vec::new();
    for (plan, path, arch, phase) in [
        (&dec, &decoder_path, keys::ARCH_GEMMA2, "decoder"),
        (&vis, &mmproj_path, keys::ARCH_CLIP, "vision"),
    ] {
        if plan.is_empty() {
            continue;
        }
        let h = header(plan, arch)?;
        written.push(write_gguf(
            path, ".partial", &ckpt, plan, &h, &mut done, total, progress, phase,
        )?);
    }
    // Both files are whole before either is renamed into place.
    for f in written {
        commit(f)?;
    }
    Ok(LoraConvertOutput {
        decoder: (!dec.is_empty()).then_some(decoder_path),
        mmproj: (!vis.is_empty()).then_some(mmproj_path),
        pairs: (dec.len() / 2, vis.len() / 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_of_both_transformers_layouts_map_to_gguf_names() {
        for (module, gguf, part) in [
            (
                "language_model.model.layers.3.self_attn.q_proj",
                "blk.3.attn_q.weight",
                Part::Decoder,
            ),
            (
                "model.language_model.layers.12.mlp.down_proj",
                "blk.12.ffn_down.weight",
                Part::Decoder,
            ),
            (
                "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj",
                "v.blk.0.attn_out.weight",
                Part::Vision,
            ),
            (
                "model.vision_tower.encoder.layers.26.mlp.fc1",
                "v.blk.26.ffn_up.weight",
                Part::Vision,
            ),
            (
                "model.vision_tower.vision_model.encoder.layers.1.self_attn.k_proj",
                "v.blk.1.attn_k.weight",
                Part::Vision,
            ),
            (
                "model.multi_modal_projector.linear",
                "mm.input_projection.weight",
                Part::Vision,
            ),
            (
                "multi_modal_projector.linear",
                "mm.input_projection.weight",
                Part::Vision,
            ),
        ] {
            let t = target(module, "t").unwrap();
            assert_eq!((t.gguf.as_str(), t.part), (gguf, part), "{module}");
        }
        for (module, needle) in [
            ("lm_head", "ties the output head"),
            ("model.language_model.embed_tokens", "ties the output head"),
            (
                "model.language_model.layers.0.mlp.act_fn",
                "unknown target module",
            ),
            (
                "model.language_model.layers.01.mlp.up_proj",
                "unknown target module",
            ),
            (
                "model.vision_tower.encoder.layers.0.self_attn.q_proj.x",
                "unknown",
            ),
            (
                "model.vision_tower.head.attention.out_proj",
                "unknown target module",
            ),
        ] {
            let e = target(module, "t").unwrap_err().to_string();
            assert!(e.contains(needle), "{module}: {e}");
        }
    }
}
