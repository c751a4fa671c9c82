//! A small safe wrapper over llama.cpp for the Gemma 2 decoder: load a model (with metadata
//! overrides), make a context sized for one request, decode a batch of embeddings with the
//! causal mask switched off (PaliGemma's prefix), then single tokens causally.

use crate::{sys, Error, Result};
use std::ffi::CString;
use std::path::Path;
use std::ptr;

/// Model loading options.
#[derive(Debug, Clone, Default)]
pub struct ModelParams {
    /// Layers to offload to a GPU (GPU builds only); -1 = all.
    pub n_gpu_layers: i32,
    /// Integer metadata overrides, e.g. the sliding window.
    pub int_overrides: Vec<(String, i64)>,
    /// Load only the vocabulary (for tokenizer checks).
    pub vocab_only: bool,
    /// Use every weight in place from the memory map, without llama.cpp's repacked CPU
    /// copies (its "extra buffer types"): less memory (the copies double the repacked
    /// tensors while loading), prefill ~20 % slower.
    pub skip_repack: bool,
    /// How offloaded layers are shared among the devices (llama.cpp's `--tensor-split`: one
    /// proportion per device, in ggml's device order); empty = by each device's free memory.
    pub tensor_split: Vec<f32>,
}

/// A loaded llama.cpp model.
pub struct LlamaModel {
    raw: *mut sys::llama_model,
    /// llama.cpp's own mappings of the file, watched for truncation (see [`crate::mapped`]).
    watched: Vec<crate::mapped::Watched>,
    /// LoRA adapters loaded onto the model ([`LlamaModel::load_adapter`]); NULL once freed.
    adapters: Vec<*mut sys::llama_adapter_lora>,
}

/// A LoRA adapter loaded onto one [`LlamaModel`] ([`LlamaModel::load_adapter`]), applied per
/// context with [`LlamaContext::set_adapters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoraAdapter(usize);

// SAFETY: llama_model is immutable after loading and documented as shareable across contexts.
unsafe impl Send for LlamaModel {}
// SAFETY: as above.
unsafe impl Sync for LlamaModel {}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        self.watched.clear();
        // SAFETY: owned pointers, freed once: the adapters before their model.
        unsafe {
            for a in self.adapters.drain(..).filter(|a| !a.is_null()) {
                sys::llama_adapter_lora_free(a);
            }
            sys::llama_model_free(self.raw)
        }
    }
}

impl LlamaModel {
    /// Loads a GGUF model (memory-mapped).
    pub fn load(path: &Path, params: &ModelParams) -> Result<Self> {
        crate::logging::init();
        let cpath = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| Error::Invalid(format!("bad path {}", path.display())))?;
        let mut overrides: Vec<sys::llama_model_kv_override> = Vec::new();
        for (key, val) in &params.int_overrides {
            // SAFETY: zeroed is a valid bit pattern for this plain C struct.
            let mut o: sys::llama_model_kv_override = unsafe { std::mem::zeroed() };
            if key.len() >= o.key.len() {
                return Err(Error::Invalid(format!("override key too long: {key}")));
            }
            for (d, s) in o.key.iter_mut().zip(key.bytes()) {
                *d = s as std::os::raw::c_char;
            }
            o.tag = sys::LLAMA_KV_OVERRIDE_TYPE_INT;
            o.__bindgen_anon_1.val_i64 = *val;
            overrides.push(o);
        }
        // SAFETY: zeroed terminator (empty key) ends the list, as llama.cpp expects.
        overrides.push(unsafe { std::mem::zeroed() });
        // SAFETY: a constant of the library.
        let max_devices = unsafe { sys::llama_max_devices() };
        if params.tensor_split.len() > max_devices {
            return Err(Error::Invalid(format!(
                "--tensor-split: {} proportions for at most {max_devices} devices",
                params.tensor_split.len()
            )));
        }
        let mut split = params.tensor_split.clone();
        split.resize(max_devices, 0.0);
        crate::logging::clear_last_error();
        // SAFETY: default params plus valid pointers that outlive the call.
        let load = || unsafe {
            let mut p = sys::llama_model_default_params();
            if !params.tensor_split.is_empty() {
                p.tensor_split = split.as_ptr();
            }
            p.n_gpu_layers = params.n_gpu_layers;
            p.vocab_only = params.vocab_only;
            p.use_extra_bufts = !params.skip_repack;
            if params.int_overrides.is_empty() {
                p.kv_overrides = ptr::null();
            } else {
                p.kv_overrides = overrides.as_ptr();
            }
            sys::llama_model_load_from_file(cpath.as_ptr(), p)
        };
        // Offloaded layers (GPU, RPC servers) are copied out of the memory map: its pages are
        // a source only, dropped as the upload goes (a 10B's 5.8 GB file would otherwise be
        // resident whole at the end of the load, on a board that lent its layers away).
        let raw = if params.n_gpu_layers != 0 {
            with_mapped_pages_released(path, load)
        } else {
            load()
        };
        if raw.is_null() {
            let why = crate::logging::take_last_error()
                .unwrap_or_else(|| "not a gemma2 GGUF, or corrupt".into());
            return Err(Error::Backend(format!(
                "llama.cpp could not load {}: {why}",
                path.display()
            )));
        }
        let released = release_mapped_pages(path);
        if released > 0 {
            log::debug!(
                "released {:.0} MiB of mapped pages of {} after loading",
                released as f64 / (1 << 20) as f64,
                path.display()
            );
        }
        Ok(LlamaModel {
            raw,
            watched: crate::mapped::watch_file_mappings(path),
            adapters: Vec::new(),
        })
    }

    /// Loads a llama.cpp LoRA adapter GGUF (`general.type = adapter`, `adapter.type = lora`,
    /// the model's architecture, `<tensor>.lora_a` / `.lora_b` pairs) onto this model with
    /// llama.cpp's own loader (`llama_adapter_lora_init`), which copies its tensors next to
    /// the ones they change (on the CPU, or the device holding them). It changes nothing
    /// until a context asks for it ([`LlamaContext::set_adapters`]). `&mut self`: no context
    /// of the model is alive meanwhile.
    ///
    /// The metadata llama.cpp reads with type assertions (aborting the process on a wrong
    /// type) is checked first; llama.cpp itself then refuses a wrong architecture, tensors
    /// the model lacks or whose shapes differ, with the reason in the error.
    pub fn load_adapter(&mut self, path: &Path) -> Result<LoraAdapter> {
        check_adapter_metadata(path)?;
        let cpath = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| Error::Invalid(format!("bad path {}", path.display())))?;
        crate::logging::clear_last_error();
        // SAFETY: valid model with no live context (&mut self); the path outlives the call;
        // NULL is checked.
        let raw = unsafe { sys::llama_adapter_lora_init(self.raw, cpath.as_ptr()) };
        if raw.is_null() {
            let why = crate::logging::take_last_error().unwrap_or_else(|| "unreadable".into());
            return Err(Error::Backend(format!(
                "llama.cpp could not load the LoRA adapter {}: {why}",
                path.display()
            )));
        }
        self.adapters.push(raw);
        Ok(LoraAdapter(self.adapters.len() - 1))
    }

    /// Frees an adapter of this model (an error if it was freed already). `&mut self`: no
    /// context uses it meanwhile.
    pub fn free_adapter(&mut self, adapter: LoraAdapter) -> Result<()> {
        let raw = self.adapter_raw(adapter)?;
        // SAFETY: an adapter of this model, not freed (checked), used by no context.
        unsafe { sys::llama_adapter_lora_free(raw) };
        self.adapters[adapter.0] = ptr::null_mut();
        Ok(())
    }

    /// A metadata value of a loaded adapter, as text (`llama_adapter_meta_val_str`).
    pub fn adapter_meta(&self, adapter: LoraAdapter, key: &str) -> Option<String> {
        let raw = self.adapter_raw(adapter).ok()?;
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: valid adapter; the buffer's size is passed; a negative result is a miss.
        let n = unsafe {
            sys::llama_adapter_meta_val_str(raw, key.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if n < 0 {
            return None;
        }
        buf.truncate((n as usize).min(buf.len() - 1));
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    fn adapter_raw(&self, adapter: LoraAdapter) -> Result<*mut sys::llama_adapter_lora> {
        match self.adapters.get(adapter.0) {
            Some(a) if !a.is_null() => Ok(*a),
            _ => Err(Error::Invalid(format!(
                "LoRA adapter {} is not loaded on this model",
                adapter.0
            ))),
        }
    }

    /// Hidden size.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_embd(self.raw) as usize }
    }

    /// Vocabulary size (= embedding rows).
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid model and its vocab.
        unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(self.raw)) as usize }
    }

    /// Tokenizes with llama.cpp's own tokenizer (special pieces such as `<loc0001>` parsed).
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<i32>> {
        // SAFETY: valid model; the vocab lives as long as it.
        let vocab = unsafe { sys::llama_model_get_vocab(self.raw) };
        let run = |out: &mut Vec<i32>| {
            // SAFETY: buffer sizes passed explicitly; a negative result is the needed size.
            unsafe {
                sys::llama_tokenize(
                    vocab,
                    text.as_ptr() as *const _,
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_bos,
                    true,
                )
            }
        };
        let mut out = vec![0i32; text.len() + 8];
        let mut n = run(&mut out);
        if n < 0 {
            out.resize((-n) as usize, 0);
            n = run(&mut out);
            if n < 0 {
                return Err(Error::Backend("llama_tokenize failed".into()));
            }
        }
        out.truncate(n as usize);
        Ok(out)
    }
}

/// Context options.
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// KV cache size in tokens.
    pub n_ctx: u32,
    /// Largest batch (and micro-batch): a non-causal prefix must fit in one.
    pub n_batch: u32,
    /// Threads for single-token decoding.
    pub threads: i32,
    /// Threads for batch (prefix) decoding.
    pub threads_batch: i32,
    /// Use flash attention.
    pub flash_attn: bool,
    /// KV cache element type (K and V).
    pub kv_type: KvCacheType,
    /// Let llama.cpp run big batches' ops on a GPU even for layers kept in host memory
    /// (its `op_offload`, on by default there): faster prefill on a real GPU, but with
    /// `-ngl 0` it is no longer a CPU run (on lavapipe a 68-token prefill of the demo model
    /// takes 0.9 s instead of 12 ms). pali turns it on only when layers are offloaded.
    pub op_offload: bool,
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    /// llama.cpp's default.
    #[default]
    F16,
    /// Bit-level checks against a float32 reference.
    F32,
    /// Half the F16 cache's memory. llama.cpp needs flash attention for a quantized V
    /// cache, so a quantized type turns it on.
    Q8_0,
    /// A quarter of the F16 cache's memory (4.5 bits per value), less exact than Q8_0.
    Q4_0,
}

/// A decoding context over a [`LlamaModel`].
pub struct LlamaContext<'m> {
    raw: *mut sys::llama_context,
    model: &'m LlamaModel,
    n_batch: u32,
    n_ctx: u32,
    // Freed after the context (fields drop after `Drop::drop`).
    _pool: Option<ThreadPool>,
}

/// A persistent pool of ggml CPU worker threads. Without one, ggml (built without OpenMP)
/// starts and joins fresh threads at every graph compute, i.e. at every decoded token, and
/// on a small VM a worker can take milliseconds to get scheduled. llama-bench attaches one
/// too. Reached through the CPU backend's registry, so `dynamic-backends` builds have it.
struct ThreadPool {
    raw: sys::ggml_threadpool_t,
    free: unsafe extern "C" fn(sys::ggml_threadpool_t),
}

impl ThreadPool {
    fn new(threads: i32) -> Option<Self> {
        type New = unsafe extern "C" fn(*mut sys::ggml_threadpool_params) -> sys::ggml_threadpool_t;
        type Free = unsafe extern "C" fn(sys::ggml_threadpool_t);
        let (new, free) = (
            crate::cpu_proc(c"ggml_threadpool_new")?,
            crate::cpu_proc(c"ggml_threadpool_free")?,
        );
        // SAFETY: the looked-up functions have exactly these C signatures (ggml-cpu.h).
        unsafe {
            let (new, free) = (
                std::mem::transmute::<*mut std::ffi::c_void, New>(new),
                std::mem::transmute::<*mut std::ffi::c_void, Free>(free),
            );
            let mut params = sys::ggml_threadpool_params_default(threads.max(1));
            let raw = new(&mut params);
            (!raw.is_null()).then_some(ThreadPool { raw, free })
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: owned pool, freed once, after every context using it.
        unsafe { (self.free)(self.raw) }
    }
}

/// A llama.cpp extended batch (owns its copies of the rows), freed on drop.
struct ExtBatch(*mut sys::llama_batch_ext);

impl ExtBatch {
    fn new(ctx: *mut sys::llama_context) -> Result<Self> {
        // SAFETY: valid context; NULL is checked.
        let raw = unsafe { sys::llama_batch_ext_init(ctx) };
        if raw.is_null() {
            return Err(Error::Backend("llama.cpp could not make a batch".into()));
        }
        Ok(ExtBatch(raw))
    }
}

impl Drop for ExtBatch {
    fn drop(&mut self) {
        // SAFETY: owned batch, freed once.
        unsafe { sys::llama_batch_ext_free(self.0) }
    }
}

impl Drop for LlamaContext<'_> {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once.
        unsafe { sys::llama_free(self.raw) }
    }
}

impl<'m> LlamaContext<'m> {
    /// Creates a context.
    pub fn new(model: &'m LlamaModel, p: &ContextParams) -> Result<Self> {
        // SAFETY: default params with plain values; NULL result checked.
        let raw = unsafe {
            let mut c = sys::llama_context_default_params();
            c.n_ctx = p.n_ctx;
            c.n_batch = p.n_batch;
            c.n_ubatch = p.n_batch;
            // pali asks for logits at one position per batch (the prefix's last, then each
            // new token). By default llama.cpp sizes its compute buffer for logits at every
            // position of the largest batch: 257216 x 4100 floats = 4.2 GB for a 896 px
            // prefix, which a GPU backend allocates for real.
            c.n_outputs_max = 1;
            c.n_seq_max = 1;
            c.n_threads = p.threads;
            c.n_threads_batch = p.threads_batch;
            c.no_perf = true;
            c.op_offload = p.op_offload;
            c.flash_attn_type = if p.flash_attn {
                sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
            } else {
                sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
            };
            let ty = match p.kv_type {
                KvCacheType::F16 => sys::GGML_TYPE_F16,
                KvCacheType::F32 => sys::GGML_TYPE_F32,
                KvCacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
                KvCacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
            };
            c.type_k = ty;
            c.type_v = ty;
            if matches!(p.kv_type, KvCacheType::Q8_0 | KvCacheType::Q4_0) {
                c.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_ENABLED;
            }
            sys::llama_init_from_model(model.raw, c)
        };
        if raw.is_null() {
            return Err(Error::Backend(format!(
                "llama.cpp could not create a context of {} tokens (out of memory?)",
                p.n_ctx
            )));
        }
        // Prefill and decode use the same thread count here, so one pool serves both.
        let pool = (p.threads == p.threads_batch)
            .then(|| ThreadPool::new(p.threads))
            .flatten();
        if let Some(pool) = &pool {
            // SAFETY: valid context and pool; the pool outlives the context (field order).
            unsafe { sys::llama_attach_threadpool(raw, pool.raw, pool.raw) };
        }
        Ok(LlamaContext {
            raw,
            model,
            n_batch: p.n_batch,
            n_ctx: p.n_ctx,
            _pool: pool,
        })
    }

    /// The LoRA adapters this context applies from now on, each with its scale (llama.cpp's
    /// `llama_set_adapters_lora`: scale 0 = not applied); replaces the previous set.
    pub fn set_adapters(&mut self, adapters: &[(LoraAdapter, f32)]) -> Result<()> {
        let mut raw = Vec::with_capacity(adapters.len());
        let mut scales = Vec::with_capacity(adapters.len());
        for &(a, s) in adapters {
            if !s.is_finite() {
                return Err(Error::Invalid(format!(
                    "LoRA adapter {} has scale {s}: must be a finite number",
                    a.0
                )));
            }
            raw.push(self.model.adapter_raw(a)?);
            scales.push(s);
        }
        // SAFETY: valid context; adapters of its model, alive while the context borrows the
        // model; both arrays hold `adapters.len()` entries.
        let rc = unsafe {
            sys::llama_set_adapters_lora(self.raw, raw.as_mut_ptr(), raw.len(), scales.as_mut_ptr())
        };
        if rc != 0 {
            return Err(Error::Backend(format!(
                "llama.cpp refused the LoRA adapters (code {rc})"
            )));
        }
        Ok(())
    }

    /// Forgets everything decoded so far.
    pub fn clear(&mut self) {
        // SAFETY: valid context and its memory.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.raw), true) }
    }

    /// Decodes `n` rows of embeddings at positions `pos0..pos0+n` in ONE batch, with
    /// bidirectional attention among them when `causal` is false. Logits are kept for the
    /// last row only. The rows are taken by value: they are copied into llama.cpp's own batch
    /// and freed before the decode starts, so one copy fewer is resident while it runs
    /// (llama.cpp keeps two more; 59 MB each for a 10B's 896 px prefix).
    pub fn decode_embeddings(&mut self, embd: Vec<f32>, pos0: i32, causal: bool) -> Result<()> {
        let d = self.model.n_embd();
        if embd.is_empty() || !embd.len().is_multiple_of(d) {
            return Err(Error::Invalid(format!(
                "embedding batch of {} values is not a multiple of {d}",
                embd.len()
            )));
        }
        let n = embd.len() / d;
        // llama.cpp aborts the process on a non-causal batch larger than n_ubatch: refuse first.
        if n as u32 > self.n_batch {
            return Err(Error::Invalid(format!(
                "prefix of {n} tokens exceeds the batch size {}",
                self.n_batch
            )));
        }
        if pos0 < 0 || pos0 as usize + n > self.n_ctx as usize {
            return Err(Error::Invalid(format!(
                "prefix of {n} tokens at position {pos0} does not fit the context of {}",
                self.n_ctx
            )));
        }
        let batch = ExtBatch::new(self.raw)?;
        for (i, row) in embd.chunks_exact(d).enumerate() {
            let pos = [pos0 + i as i32, 0, 0, 0];
            // SAFETY: valid batch; `row` holds n_embd floats, which llama.cpp copies; `pos`
            // has room for the up to 4 positions a multi-position model reads (Gemma 2: 1).
            let ok = unsafe {
                let idx = sys::llama_batch_ext_add_embd(
                    batch.0,
                    0,
                    sys::llama_embd {
                        data: row.as_ptr(),
                        n_rows: 1,
                        n_embd: d,
                    },
                );
                idx == i as i32
                    && sys::llama_batch_ext_set_pos(batch.0, idx, pos.as_ptr())
                    && sys::llama_batch_ext_set_output_logits(batch.0, idx, i + 1 == n)
            };
            if !ok {
                return Err(Error::Backend(format!(
                    "llama.cpp refused prefix row {i} of {n}"
                )));
            }
        }
        drop(embd);
        // SAFETY: valid context and batch; the causal flag is restored whatever happens.
        unsafe {
            sys::llama_set_causal_attn(self.raw, causal);
            let rc = sys::llama_process(self.raw, sys::LLAMA_PROCESS_TYPE_DECODE, batch.0);
            sys::llama_set_causal_attn(self.raw, true);
            if rc != 0 {
                return Err(Error::Backend(format!(
                    "llama_decode of the prefix failed (code {rc})"
                )));
            }
        }
        Ok(())
    }

    /// Decodes one token at `pos` (causal).
    pub fn decode_token(&mut self, token: i32, pos: i32) -> Result<()> {
        if pos as u32 >= self.n_ctx {
            return Err(Error::Invalid(format!(
                "position {pos} is past the context of {}",
                self.n_ctx
            )));
        }
        // SAFETY: one-token batch, fully initialised, freed after use.
        unsafe {
            let mut b = sys::llama_batch_init(1, 0, 1);
            *b.token = token;
            *b.pos = pos;
            *b.n_seq_id = 1;
            **b.seq_id = 0;
            *b.logits = 1;
            b.n_tokens = 1;
            let rc = sys::llama_decode(self.raw, b);
            sys::llama_batch_free(b);
            if rc != 0 {
                return Err(Error::Backend(format!(
                    "llama_decode of token {token} failed (code {rc})"
                )));
            }
        }
        Ok(())
    }

    /// Decodes token ids in one causal batch (text-only use), logits for the last.
    pub fn decode_tokens(&mut self, tokens: &[i32], pos0: i32) -> Result<()> {
        if tokens.is_empty() || tokens.len() as u32 > self.n_batch {
            return Err(Error::Invalid(format!(
                "{} tokens do not fit the batch size {}",
                tokens.len(),
                self.n_batch
            )));
        }
        // SAFETY: batch sized for the tokens, fully initialised, freed after use.
        unsafe {
            let n = tokens.len();
            let mut b = sys::llama_batch_init(n as i32, 0, 1);
            for (i, &t) in tokens.iter().enumerate() {
                *b.token.add(i) = t;
                *b.pos.add(i) = pos0 + i as i32;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = 0;
                *b.logits.add(i) = (i == n - 1) as i8;
            }
            b.n_tokens = n as i32;
            let rc = sys::llama_decode(self.raw, b);
            sys::llama_batch_free(b);
            if rc != 0 {
                return Err(Error::Backend(format!("llama_decode failed (code {rc})")));
            }
        }
        Ok(())
    }

    /// Logits of the last decoded row that asked for them (all embedding rows).
    pub fn logits(&self) -> &[f32] {
        // SAFETY: llama.cpp keeps n_vocab floats for the last output until the next decode;
        // the borrow of self prevents a decode while the slice lives.
        unsafe {
            let p = sys::llama_get_logits_ith(self.raw, -1);
            std::slice::from_raw_parts(p, self.model.n_vocab())
        }
    }
}

/// The metadata `llama_adapter_lora_init` reads with asserting getters (a wrong type aborts
/// the process): `general.type`, `general.architecture`, `adapter.type` strings,
/// `adapter.lora.alpha` an f32, `adapter.alora.invocation_tokens` a u32 array.
fn check_adapter_metadata(path: &Path) -> Result<()> {
    use crate::gguf::{GgufFile, Value};
    use crate::schema::{adapter, keys};
    let f = GgufFile::open(path)?;
    let wrong = |key: &str, what: &str| {
        Err(Error::Invalid(format!(
            "{}: metadata key {key} is not {what}",
            path.display()
        )))
    };
    for key in [
        adapter::GENERAL_TYPE,
        keys::ARCHITECTURE,
        adapter::ADAPTER_TYPE,
    ] {
        if !matches!(f.get(key), None | Some(Value::Str(_))) {
            return wrong(key, "a string");
        }
    }
    if !matches!(f.get(adapter::LORA_ALPHA), None | Some(Value::F32(_))) {
        return wrong(adapter::LORA_ALPHA, "a float");
    }
    const ALORA: &str = "adapter.alora.invocation_tokens";
    if f.has(ALORA) {
        // llama.cpp copies it as u32s; pali writes none and has no use for activated LoRA.
        return Err(Error::Invalid(format!(
            "{}: {ALORA}: activated LoRA (aLoRA) adapters are not supported",
            path.display()
        )));
    }
    Ok(())
}

/// Drops this process's page-table entries for every memory mapping of `path` and returns
/// the bytes mapped (Linux/Android; elsewhere nothing). llama.cpp maps the whole GGUF and
/// then copies the tensors it repacks for its faster CPU kernels into buffers of their own:
/// the mapped pages it read to do so would stay resident (≈ 0.9 GiB for a 3B Q4_K_M) though
/// never touched again. Pages still in use fault back in from the page cache on next access.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn release_mapped_pages(path: &Path) -> usize {
    let Ok(path) = path.canonicalize() else {
        return 0;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let mut released = 0;
    for line in maps.lines() {
        // "start-end perms offset dev inode pathname"
        let mut f = line.splitn(6, ' ');
        let range = f.next().unwrap_or("");
        let Some(name) = f.nth(4) else { continue };
        if Path::new(name.trim_start()) != path {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        // SAFETY: [a, b) is a read-only file mapping of this process (llama.cpp's); dropping
        // its page-table entries changes no data, the pages are re-read on access.
        if unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) } == 0 {
            released += b - a;
        }
    }
    released
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn release_mapped_pages(_path: &Path) -> usize {
    0
}

/// Runs `f` while a watcher thread drops this process's mapped pages of `path` every 100 ms
/// ([`release_mapped_pages`]). For work that reads a whole file through llama.cpp's memory map
/// once, as a source only (quantizing it; uploading its layers to a GPU or RPC servers):
/// without it every page read stays resident until the end, the whole file at the peak.
pub(crate) fn with_mapped_pages_released<T>(path: &Path, f: impl FnOnce() -> T) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                release_mapped_pages(path);
            }
        });
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    })
}
