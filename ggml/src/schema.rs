//! The one place that says how pali's two GGUF files are laid out: metadata keys and the
//! mapping between HF checkpoint tensor names and GGUF tensor names. The converter writes
//! with these names and the runtime reads with them, so they can never drift apart.
//!
//! Decoder file: llama.cpp's `gemma2` architecture, so stock llama.cpp loads it.
//! mmproj file: llama.cpp's `clip` conventions (`clip.vision.*` keys, `v.*` / `mm.*` tensors)
//! with projector type `paligemma`, plus a few `paligemma.*` keys for preprocessing.
//! Mask decoder file (optional, for `segment`): architecture `paligemma-vae`, see [`vae`].
//!
//! Layout of the projector: `mm.input_projection.weight` has ggml shape `[vision_width,
//! text_hidden]`, i.e. the PyTorch `[out, in]` Linear layout (NOT Gemma 3's transposed one),
//! applied as `y = W x + b` to each vision token.

/// Metadata keys.
pub mod keys {
    /// `general.architecture`: `gemma2` for the decoder, `clip` for the mmproj.
    pub const ARCHITECTURE: &str = "general.architecture";
    /// Human-readable model name (e.g. `PaliGemma2-3B-pt-224`).
    pub const NAME: &str = "general.name";
    /// llama.cpp `llama_ftype` of the file.
    pub const FILE_TYPE: &str = "general.file_type";
    /// Quantization format version (2 for current ggml blocks).
    pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
    /// Alignment of tensor data.
    pub const ALIGNMENT: &str = "general.alignment";

    /// Decoder architecture string.
    pub const ARCH_GEMMA2: &str = "gemma2";
    /// Decoder hyper-parameters (`gemma2.` prefix).
    pub const CONTEXT_LENGTH: &str = "gemma2.context_length";
    #[allow(missing_docs)]
    pub const EMBEDDING_LENGTH: &str = "gemma2.embedding_length";
    #[allow(missing_docs)]
    pub const BLOCK_COUNT: &str = "gemma2.block_count";
    #[allow(missing_docs)]
    pub const FEED_FORWARD_LENGTH: &str = "gemma2.feed_forward_length";
    #[allow(missing_docs)]
    pub const HEAD_COUNT: &str = "gemma2.attention.head_count";
    #[allow(missing_docs)]
    pub const HEAD_COUNT_KV: &str = "gemma2.attention.head_count_kv";
    #[allow(missing_docs)]
    pub const KEY_LENGTH: &str = "gemma2.attention.key_length";
    #[allow(missing_docs)]
    pub const VALUE_LENGTH: &str = "gemma2.attention.value_length";
    #[allow(missing_docs)]
    pub const RMS_EPS: &str = "gemma2.attention.layer_norm_rms_epsilon";
    /// Sliding-window size llama.cpp applies to every other layer.
    pub const SLIDING_WINDOW: &str = "gemma2.attention.sliding_window";
    #[allow(missing_docs)]
    pub const ATTN_SOFTCAP: &str = "gemma2.attn_logit_softcapping";
    #[allow(missing_docs)]
    pub const FINAL_SOFTCAP: &str = "gemma2.final_logit_softcapping";
    #[allow(missing_docs)]
    pub const ROPE_FREQ_BASE: &str = "gemma2.rope.freq_base";
    /// Every `gemma2.` key a decoder may have: the ones `pali convert` writes. llama.cpp
    /// reads more (experts, rope scaling, extra layers) and aborts on some of their values,
    /// so a decoder with any other `gemma2.` key is refused before llama.cpp sees it.
    pub const DECODER_HPARAMS: &[&str] = &[
        CONTEXT_LENGTH,
        EMBEDDING_LENGTH,
        BLOCK_COUNT,
        FEED_FORWARD_LENGTH,
        HEAD_COUNT,
        HEAD_COUNT_KV,
        KEY_LENGTH,
        VALUE_LENGTH,
        RMS_EPS,
        SLIDING_WINDOW,
        ATTN_SOFTCAP,
        FINAL_SOFTCAP,
        ROPE_FREQ_BASE,
    ];
    /// llama.cpp's layer limit (`LLAMA_MAX_LAYERS`): more aborts its loader.
    pub const MAX_DECODER_LAYERS: u32 = 512;

    /// SentencePiece vocabulary, as llama.cpp's `llama` (SPM) tokenizer reads it.
    pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
    #[allow(missing_docs)]
    pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
    #[allow(missing_docs)]
    pub const TOKENIZER_SCORES: &str = "tokenizer.ggml.scores";
    #[allow(missing_docs)]
    pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    #[allow(missing_docs)]
    pub const TOKENIZER_BOS: &str = "tokenizer.ggml.bos_token_id";
    #[allow(missing_docs)]
    pub const TOKENIZER_EOS: &str = "tokenizer.ggml.eos_token_id";
    #[allow(missing_docs)]
    pub const TOKENIZER_UNK: &str = "tokenizer.ggml.unknown_token_id";
    #[allow(missing_docs)]
    pub const TOKENIZER_PAD: &str = "tokenizer.ggml.padding_token_id";
    #[allow(missing_docs)]
    pub const TOKENIZER_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    #[allow(missing_docs)]
    pub const TOKENIZER_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    #[allow(missing_docs)]
    pub const TOKENIZER_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    /// The HF `tokenizer.json` text (llama.cpp's gguf-py name for it); pali tokenizes with it.
    pub const TOKENIZER_HF_JSON: &str = "tokenizer.huggingface.json";

    /// Number of real vocabulary entries (257152 for PaliGemma 2); rows past it are padding
    /// (`<image>` and HF's random fill) and are never sampled.
    pub const PALI_VOCAB_SIZE: &str = "paligemma.vocab_size";
    /// Id of the `<image>` placeholder in the HF tokenizer.
    pub const PALI_IMAGE_TOKEN_ID: &str = "paligemma.image_token_id";
    /// `query_pre_attn_scalar` of config.json, kept so the runtime can check llama.cpp's scale.
    pub const PALI_QUERY_PRE_ATTN_SCALAR: &str = "paligemma.query_pre_attn_scalar";

    /// mmproj architecture string.
    pub const ARCH_CLIP: &str = "clip";
    #[allow(missing_docs)]
    pub const CLIP_HAS_VISION: &str = "clip.has_vision_encoder";
    /// Projector type; pali's value is [`PROJECTOR_PALIGEMMA`].
    pub const CLIP_PROJECTOR_TYPE: &str = "clip.projector_type";
    /// The one projector type pali writes and accepts.
    pub const PROJECTOR_PALIGEMMA: &str = "paligemma";
    #[allow(missing_docs)]
    pub const CLIP_USE_GELU: &str = "clip.use_gelu";
    #[allow(missing_docs)]
    pub const V_IMAGE_SIZE: &str = "clip.vision.image_size";
    #[allow(missing_docs)]
    pub const V_PATCH_SIZE: &str = "clip.vision.patch_size";
    #[allow(missing_docs)]
    pub const V_EMBEDDING_LENGTH: &str = "clip.vision.embedding_length";
    #[allow(missing_docs)]
    pub const V_FEED_FORWARD_LENGTH: &str = "clip.vision.feed_forward_length";
    #[allow(missing_docs)]
    pub const V_BLOCK_COUNT: &str = "clip.vision.block_count";
    #[allow(missing_docs)]
    pub const V_HEAD_COUNT: &str = "clip.vision.attention.head_count";
    #[allow(missing_docs)]
    pub const V_LN_EPS: &str = "clip.vision.attention.layer_norm_epsilon";
    /// Output width of the projector = the decoder's hidden size.
    pub const V_PROJECTION_DIM: &str = "clip.vision.projection_dim";
    #[allow(missing_docs)]
    pub const V_IMAGE_MEAN: &str = "clip.vision.image_mean";
    #[allow(missing_docs)]
    pub const V_IMAGE_STD: &str = "clip.vision.image_std";
    /// PIL resample code of preprocessor_config.json (3 = bicubic).
    pub const PALI_RESAMPLE: &str = "paligemma.image_resample";
    /// Pixel rescale factor of preprocessor_config.json (1/255).
    pub const PALI_RESCALE_FACTOR: &str = "paligemma.image_rescale_factor";
    /// Image tokens per image, (image_size / patch_size)².
    pub const PALI_IMAGE_TOKENS: &str = "paligemma.image_token_count";
    /// Decoder hidden size the projector feeds.
    pub const PALI_TEXT_HIDDEN: &str = "paligemma.text_hidden_size";
}

/// How a tensor's values are changed on the way into GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    /// Stored as is.
    None,
    /// Gemma RMSNorm stores `w` and computes with `1 + w`; llama.cpp multiplies by the stored
    /// weight, so the converter stores `1 + w` (in F32, to keep the low bits of `w`).
    AddOne,
}

/// One entry of a name map: HF suffix, GGUF suffix, fixup.
pub type NameMapEntry = (&'static str, &'static str, Fixup);

/// GGUF tensor names of the decoder (llama.cpp `gemma2`).
pub mod decoder {
    use super::{Fixup, NameMapEntry};
    /// Token embedding (also the tied output head).
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    /// Final RMSNorm.
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    /// Global tensors: HF name after the language-model prefix → GGUF name.
    pub const GLOBAL: &[NameMapEntry] = &[
        ("embed_tokens.weight", TOKEN_EMBD, Fixup::None),
        ("norm.weight", OUTPUT_NORM, Fixup::AddOne),
    ];
    /// Per-layer tensors: HF suffix after `layers.{i}.` → GGUF suffix after `blk.{i}.`.
    pub const LAYER: &[NameMapEntry] = &[
        ("input_layernorm.weight", "attn_norm.weight", Fixup::AddOne),
        ("self_attn.q_proj.weight", "attn_q.weight", Fixup::None),
        ("self_attn.k_proj.weight", "attn_k.weight", Fixup::None),
        ("self_attn.v_proj.weight", "attn_v.weight", Fixup::None),
        ("self_attn.o_proj.weight", "attn_output.weight", Fixup::None),
        (
            "post_attention_layernorm.weight",
            "post_attention_norm.weight",
            Fixup::AddOne,
        ),
        (
            "pre_feedforward_layernorm.weight",
            "ffn_norm.weight",
            Fixup::AddOne,
        ),
        ("mlp.gate_proj.weight", "ffn_gate.weight", Fixup::None),
        ("mlp.up_proj.weight", "ffn_up.weight", Fixup::None),
        ("mlp.down_proj.weight", "ffn_down.weight", Fixup::None),
        (
            "post_feedforward_layernorm.weight",
            "post_ffw_norm.weight",
            Fixup::AddOne,
        ),
    ];
}

/// GGUF tensor names of the vision tower and projector (mmproj file).
pub mod vision {
    use super::{Fixup, NameMapEntry};
    /// Patch embedding kernel, ggml shape `[patch, patch, 3, width]`.
    pub const PATCH_EMBD_W: &str = "v.patch_embd.weight";
    #[allow(missing_docs)]
    pub const PATCH_EMBD_B: &str = "v.patch_embd.bias";
    /// Learned positions, ggml shape `[width, n_patches]`.
    pub const POS_EMBD: &str = "v.position_embd.weight";
    #[allow(missing_docs)]
    pub const POST_LN_W: &str = "v.post_ln.weight";
    #[allow(missing_docs)]
    pub const POST_LN_B: &str = "v.post_ln.bias";
    /// Projector weight, ggml shape `[width, text_hidden]`.
    pub const PROJ_W: &str = "mm.input_projection.weight";
    #[allow(missing_docs)]
    pub const PROJ_B: &str = "mm.input_projection.bias";

    #[allow(missing_docs)]
    pub const LN1_W: &str = "ln1.weight";
    #[allow(missing_docs)]
    pub const LN1_B: &str = "ln1.bias";
    #[allow(missing_docs)]
    pub const Q_W: &str = "attn_q.weight";
    #[allow(missing_docs)]
    pub const Q_B: &str = "attn_q.bias";
    #[allow(missing_docs)]
    pub const K_W: &str = "attn_k.weight";
    #[allow(missing_docs)]
    pub const K_B: &str = "attn_k.bias";
    #[allow(missing_docs)]
    pub const V_W: &str = "attn_v.weight";
    #[allow(missing_docs)]
    pub const V_B: &str = "attn_v.bias";
    #[allow(missing_docs)]
    pub const O_W: &str = "attn_out.weight";
    #[allow(missing_docs)]
    pub const O_B: &str = "attn_out.bias";
    #[allow(missing_docs)]
    pub const LN2_W: &str = "ln2.weight";
    #[allow(missing_docs)]
    pub const LN2_B: &str = "ln2.bias";
    #[allow(missing_docs)]
    pub const FC1_W: &str = "ffn_up.weight";
    #[allow(missing_docs)]
    pub const FC1_B: &str = "ffn_up.bias";
    #[allow(missing_docs)]
    pub const FC2_W: &str = "ffn_down.weight";
    #[allow(missing_docs)]
    pub const FC2_B: &str = "ffn_down.bias";

    /// Global vision tensors: HF name after the vision-model prefix → GGUF name.
    pub const GLOBAL: &[NameMapEntry] = &[
        (
            "embeddings.patch_embedding.weight",
            PATCH_EMBD_W,
            Fixup::None,
        ),
        ("embeddings.patch_embedding.bias", PATCH_EMBD_B, Fixup::None),
        (
            "embeddings.position_embedding.weight",
            POS_EMBD,
            Fixup::None,
        ),
        ("post_layernorm.weight", POST_LN_W, Fixup::None),
        ("post_layernorm.bias", POST_LN_B, Fixup::None),
    ];
    /// Projector tensors: HF name after the projector prefix → GGUF name.
    pub const PROJECTOR: &[NameMapEntry] = &[
        ("linear.weight", PROJ_W, Fixup::None),
        ("linear.bias", PROJ_B, Fixup::None),
    ];
    /// Per-layer tensors: HF suffix after `encoder.layers.{i}.` → GGUF suffix after `v.blk.{i}.`.
    pub const LAYER: &[NameMapEntry] = &[
        ("layer_norm1.weight", LN1_W, Fixup::None),
        ("layer_norm1.bias", LN1_B, Fixup::None),
        ("self_attn.q_proj.weight", Q_W, Fixup::None),
        ("self_attn.q_proj.bias", Q_B, Fixup::None),
        ("self_attn.k_proj.weight", K_W, Fixup::None),
        ("self_attn.k_proj.bias", K_B, Fixup::None),
        ("self_attn.v_proj.weight", V_W, Fixup::None),
        ("self_attn.v_proj.bias", V_B, Fixup::None),
        ("self_attn.out_proj.weight", O_W, Fixup::None),
        ("self_attn.out_proj.bias", O_B, Fixup::None),
        ("layer_norm2.weight", LN2_W, Fixup::None),
        ("layer_norm2.bias", LN2_B, Fixup::None),
        ("mlp.fc1.weight", FC1_W, Fixup::None),
        ("mlp.fc1.bias", FC1_B, Fixup::None),
        ("mlp.fc2.weight", FC2_W, Fixup::None),
        ("mlp.fc2.bias", FC2_B, Fixup::None),
    ];
}

/// LoRA adapters (`pali convert-lora`): llama.cpp's adapter GGUF (what its
/// `convert_lora_to_gguf.py` writes and `llama_adapter_lora_init` reads), one file per half
/// of the model as the model itself: the decoder's adapter (architecture `gemma2`) and, when
/// the adapter also changes the vision tower or the projector, an `mmproj-…` adapter
/// (architecture `clip`) beside it. Each LoRA pair is stored under its base tensor's GGUF name
/// with `.lora_a` (ggml `[in, r]`, PEFT's `lora_A.weight` `[r, in]` as is) and `.lora_b` (ggml
/// `[r, out]`); the update is `scale · alpha / r · B (A x)` with `alpha` = [`adapter::LORA_ALPHA`]
/// (llama.cpp's rule; PEFT's per-module alphas, ranks and rsLoRA are folded into `B`).
pub mod adapter {
    use super::{decoder, vision};
    /// `general.type`: [`TYPE_ADAPTER`] in adapter files.
    pub const GENERAL_TYPE: &str = "general.type";
    #[allow(missing_docs)]
    pub const TYPE_ADAPTER: &str = "adapter";
    /// `adapter.type`: [`TYPE_LORA`].
    pub const ADAPTER_TYPE: &str = "adapter.type";
    #[allow(missing_docs)]
    pub const TYPE_LORA: &str = "lora";
    /// `adapter.lora.alpha` (f32): the scale of every pair is `alpha / r` (0: 1).
    pub const LORA_ALPHA: &str = "adapter.lora.alpha";
    /// pali's own (llama.cpp ignores it): whether the pair has a decoder file (bool).
    pub const HAS_DECODER: &str = "paligemma.adapter.decoder";
    /// pali's own: whether the pair has an `mmproj-…` file (bool).
    pub const HAS_VISION: &str = "paligemma.adapter.vision";
    /// Suffix of a pair's down projection `A`.
    pub const SUFFIX_A: &str = ".lora_a";
    /// Suffix of a pair's up projection `B`.
    pub const SUFFIX_B: &str = ".lora_b";
    /// The vision file of a pair is named as its decoder file with this prefix.
    pub const MMPROJ_PREFIX: &str = "mmproj-";

    /// PEFT's adapter folder: the config file.
    pub const PEFT_CONFIG: &str = "adapter_config.json";
    /// PEFT's adapter folder: the weights.
    pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
    /// The prefix PEFT puts before every module path.
    pub const PEFT_PREFIX: &str = "base_model.model.";
    /// PEFT's suffix of a module's `A` matrix.
    pub const PEFT_A: &str = ".lora_A.weight";
    /// PEFT's suffix of a module's `B` matrix.
    pub const PEFT_B: &str = ".lora_B.weight";

    /// Decoder modules an adapter may change: HF module path after `layers.{i}.` → GGUF
    /// weight after `blk.{i}.`.
    pub const DECODER_TARGETS: &[(&str, &str)] = &[
        ("self_attn.q_proj", "attn_q.weight"),
        ("self_attn.k_proj", "attn_k.weight"),
        ("self_attn.v_proj", "attn_v.weight"),
        ("self_attn.o_proj", "attn_output.weight"),
        ("mlp.gate_proj", "ffn_gate.weight"),
        ("mlp.up_proj", "ffn_up.weight"),
        ("mlp.down_proj", "ffn_down.weight"),
    ];
    /// Vision modules: HF module path after `encoder.layers.{i}.` → GGUF weight after
    /// `v.blk.{i}.`.
    pub const VISION_TARGETS: &[(&str, &str)] = &[
        ("self_attn.q_proj", vision::Q_W),
        ("self_attn.k_proj", vision::K_W),
        ("self_attn.v_proj", vision::V_W),
        ("self_attn.out_proj", vision::O_W),
        ("mlp.fc1", vision::FC1_W),
        ("mlp.fc2", vision::FC2_W),
    ];
    /// The projector's module (after the projector prefix) → its GGUF weight.
    pub const PROJECTOR_TARGET: (&str, &str) = ("linear", vision::PROJ_W);
    /// Modules no adapter may change, with why: Gemma ties its output head to the embedding,
    /// which pali also reads itself to build the prefix.
    pub const REFUSED: &[(&str, &str)] = &[
        ("embed_tokens", decoder::TOKEN_EMBD),
        ("lm_head", decoder::TOKEN_EMBD),
    ];
}

/// GGUF name of a per-layer decoder tensor.
pub fn decoder_block(layer: usize, suffix: &str) -> String {
    format!("blk.{layer}.{suffix}")
}

/// GGUF name of a per-layer vision tensor.
pub fn vision_block(layer: usize, suffix: &str) -> String {
    format!("v.blk.{layer}.{suffix}")
}

/// HF tensor-name prefixes of the three checkpoint layouts in use, for each part.
pub mod hf_prefixes {
    /// Decoder (Gemma 2 model body, without the head).
    pub const LANGUAGE_MODEL: &[&str] = &[
        "language_model.model.", // hub (transformers 4.4x, Google's repos)
        "model.language_model.", // transformers >= 4.52
    ];
    /// A stored (untied) LM head.
    pub const LM_HEAD: &[&str] = &["language_model.lm_head.weight", "lm_head.weight"];
    /// SigLIP vision model.
    pub const VISION: &[&str] = &[
        "vision_tower.vision_model.",
        "model.vision_tower.vision_model.",
        "model.vision_tower.", // transformers 5
    ];
    /// The projector.
    pub const PROJECTOR: &[&str] = &["multi_modal_projector.", "model.multi_modal_projector."];
}

/// SentencePiece / llama.cpp token types (same numbering in both).
pub mod token_type {
    #[allow(missing_docs)]
    pub const NORMAL: i32 = 1;
    #[allow(missing_docs)]
    pub const UNKNOWN: i32 = 2;
    #[allow(missing_docs)]
    pub const CONTROL: i32 = 3;
    #[allow(missing_docs)]
    pub const USER_DEFINED: i32 = 4;
    #[allow(missing_docs)]
    pub const UNUSED: i32 = 5;
    #[allow(missing_docs)]
    pub const BYTE: i32 = 6;
}

/// The segmentation mask decoder file (`pali convert-vae vae-oid.npz`): the decoder half of
/// big_vision's VQ-VAE (`vae-oid.npz`, PyTorch `state_dict` names and layouts), all F32.
///
/// Every tensor keeps its PyTorch layout, so its ggml shape is the PyTorch shape reversed:
/// convolutions `[out, in, kh, kw]` → ggml `[kw, kh, in, out]` (what `im2col` + `mul_mat`
/// read), transposed convolutions `[in, out, kh, kw]` → ggml `[kw, kh, out, in]` (what
/// `ggml_conv_transpose_2d_p0` reads), the codebook `[128, D]` → ggml `[D, 128]` (rows for
/// `get_rows`).
pub mod vae {
    /// `general.architecture` of a mask decoder file.
    pub const ARCH: &str = "paligemma-vae";
    /// Number of codebook entries (`<seg000>` … `<seg127>`).
    pub const CODEBOOK_SIZE: &str = "paligemma-vae.codebook_size";
    /// Width D of one codebook entry (read from the `.npz`).
    pub const CODEBOOK_DIM: &str = "paligemma-vae.codebook_dim";
    /// Side of the decoded square map (64).
    pub const MAP_SIZE: &str = "paligemma-vae.map_size";

    /// Codebook entries of PaliGemma's mask tokenizer.
    pub const NUM_CODES: usize = 128;
    /// Channels of the decoder body (big_vision `Decoder.dim`).
    pub const WIDTH: usize = 128;
    /// Output side of the decoder: 4 × 2⁴.
    pub const MAP: usize = 64;
    /// Output channels of the four transposed convolutions (inputs: 128, then these).
    pub const UP_CHANNELS: [usize; 4] = [128, 64, 32, 16];

    /// The codebook, ggml `[D, 128]`.
    pub const CODEBOOK: &str = "vae.codebook";
    /// The 1×1 input convolution D → 128 (`decoder.0`).
    pub const IN_W: &str = "vae.in.weight";
    #[allow(missing_docs)]
    pub const IN_B: &str = "vae.in.bias";
    /// The 1×1 output convolution 16 → 1 (`decoder.12`).
    pub const OUT_W: &str = "vae.out.weight";
    #[allow(missing_docs)]
    pub const OUT_B: &str = "vae.out.bias";

    /// Convolution `j` (0: 3×3, 1: 3×3, 2: 1×1) of residual block `r` (0, 1):
    /// `vae.res.{r}.conv.{j}.{weight|bias}`.
    pub fn res_conv(r: usize, j: usize, what: &str) -> String {
        format!("vae.res.{r}.conv.{j}.{what}")
    }

    /// Transposed convolution `i` (0..4): `vae.up.{i}.{weight|bias}`.
    pub fn up(i: usize, what: &str) -> String {
        format!("vae.up.{i}.{what}")
    }

    /// The codebook array's name in `vae-oid.npz` (shape `[128, D]`).
    pub const NPZ_CODEBOOK: &str = "_vq_vae._embedding";

    /// Every tensor of the file: (name in `vae-oid.npz`, GGUF name, PyTorch shape), for a
    /// codebook of width `d`. The `.npz`'s other arrays (the encoder) are not needed.
    pub fn tensors(d: usize) -> Vec<(String, String, Vec<usize>)> {
        let mut v = vec![
            (
                NPZ_CODEBOOK.to_string(),
                CODEBOOK.to_string(),
                vec![NUM_CODES, d],
            ),
            ("decoder.0.weight".into(), IN_W.into(), vec![WIDTH, d, 1, 1]),
            ("decoder.0.bias".into(), IN_B.into(), vec![WIDTH]),
        ];
        for r in 0..2 {
            for (j, k) in [(0, 3), (1, 3), (2, 1)] {
                let npz = format!("decoder.{}.net.{}", r + 2, 2 * j);
                v.push((
                    format!("{npz}.weight"),
                    res_conv(r, j, "weight"),
                    vec![WIDTH, WIDTH, k, k],
                ));
                v.push((format!("{npz}.bias"), res_conv(r, j, "bias"), vec![WIDTH]));
            }
        }
        let mut cin = WIDTH;
        for (i, &cout) in UP_CHANNELS.iter().enumerate() {
            let npz = format!("decoder.{}", 4 + 2 * i);
            v.push((
                format!("{npz}.weight"),
                up(i, "weight"),
                vec![cin, cout, 4, 4],
            ));
            v.push((format!("{npz}.bias"), up(i, "bias"), vec![cout]));
            cin = cout;
        }
        v.push(("decoder.12.weight".into(), OUT_W.into(), vec![1, cin, 1, 1]));
        v.push(("decoder.12.bias".into(), OUT_B.into(), vec![1]));
        v
    }
}
