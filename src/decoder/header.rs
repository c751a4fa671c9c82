//! What a decoder GGUF says about itself, read without loading its weights: the embedded
//! tokenizer, the special tokens, the memory-mapped token embedding table, and the checks of
//! everything llama.cpp's loader would abort on instead of returning an error.

use crate::{Error, Result};
use pali_ggml::gguf::GgufFile;
use pali_ggml::schema::{decoder as names, keys};
use pali_ggml::GgmlType;
use std::path::Path;

/// Rows of the decoder's token embedding table, read straight from the mapped GGUF
/// (dequantized on demand) so the prompt can join the image in one embedding batch.
pub(super) struct TokenEmbeddings {
    map: pali_ggml::mapped::MappedFile,
    offset: usize,
    ty: GgmlType,
    pub(super) width: usize,
    pub(super) rows: usize,
}

impl TokenEmbeddings {
    fn open(path: &Path, f: &GgufFile) -> Result<Self> {
        let t = f
            .tensors()
            .into_iter()
            .find(|t| t.name == names::TOKEN_EMBD)
            .ok_or_else(|| {
                Error::Model(format!(
                    "{}: no {} tensor",
                    path.display(),
                    names::TOKEN_EMBD
                ))
            })?;
        let map =
            pali_ggml::mapped::MappedFile::open(path).map_err(|e| Error::Io(e.to_string()))?;
        let offset = (f.data_offset() + t.offset) as usize;
        if offset as u64 + t.size > map.len() as u64 || t.ne.len() != 2 {
            return Err(Error::Model(format!(
                "{}: {} is truncated or malformed",
                path.display(),
                names::TOKEN_EMBD
            )));
        }
        Ok(TokenEmbeddings {
            map,
            offset,
            ty: t.ty,
            width: t.ne[0] as usize,
            rows: t.ne[1] as usize,
        })
    }

    pub(super) fn row(&self, id: u32) -> Result<Vec<f32>> {
        let id = id as usize;
        if id >= self.rows {
            return Err(Error::Model(format!(
                "token id {id} is outside the {}-row embedding",
                self.rows
            )));
        }
        let rs = self.ty.row_size(self.width as i64);
        let bytes = &self.map[self.offset + id * rs..self.offset + (id + 1) * rs];
        Ok(pali_ggml::quant::to_f32(self.ty, bytes)?)
    }
}

/// What a decoder GGUF says about itself, read from its header and the memory-mapped
/// embedding table, without loading the weights through llama.cpp.
pub(super) struct DecoderHeader {
    pub(super) embeddings: TokenEmbeddings,
    pub(super) tokenizer: tokenizers::Tokenizer,
    /// Ids at or above this are padding / `<image>` and are never generated.
    pub(super) vocab_real: usize,
    pub(super) bos: u32,
    pub(super) newline: Vec<u32>,
    pub(super) stop: Vec<u32>,
    /// `gemma2.context_length`: the context the model was trained for.
    pub(super) n_ctx_train: usize,
}

impl DecoderHeader {
    pub(super) fn facts(&self) -> DecoderFacts {
        DecoderFacts {
            hidden: self.embeddings.width,
            loc_token: self.tokenizer.token_to_id("<loc0000>"),
            n_ctx_train: self.n_ctx_train,
        }
    }

    pub(super) fn read(path: &Path) -> Result<Self> {
        let f = GgufFile::open(path)?;
        let arch = f.get_str(keys::ARCHITECTURE)?;
        if arch != keys::ARCH_GEMMA2 {
            return Err(Error::Model(format!(
                "{} is a {arch:?} GGUF, not a Gemma 2 decoder{}",
                path.display(),
                if arch == keys::ARCH_CLIP {
                    ": it looks like the mmproj; pass it with --mmproj"
                } else {
                    ""
                }
            )));
        }
        check_for_llama_cpp(path, &f)?;
        let json = f.get_str(keys::TOKENIZER_HF_JSON).map_err(|_| {
            Error::Model(format!(
                "{}: no {} (convert the checkpoint with `pali convert`)",
                path.display(),
                keys::TOKENIZER_HF_JSON
            ))
        })?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            Error::Model(format!("{}: embedded tokenizer.json: {e}", path.display()))
        })?;
        let vocab_real = f.get_u32(keys::PALI_VOCAB_SIZE)? as usize;
        let bos = f.get_u32(keys::TOKENIZER_BOS)?;
        let eos = f.get_u32(keys::TOKENIZER_EOS)?;
        let mut stop = vec![eos];
        if let Some(id) = tokenizer.token_to_id("<end_of_turn>") {
            stop.push(id);
        }
        let newline = tokenizer
            .encode("\n", false)
            .map_err(|e| Error::Model(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        let embeddings = TokenEmbeddings::open(path, &f)?;
        let declared = f.get_u32(keys::EMBEDDING_LENGTH)? as usize;
        if embeddings.width != declared || vocab_real > embeddings.rows {
            return Err(Error::Model(format!(
                "{}: inconsistent embedding table ({} x {}, {} = {declared}, {} real tokens)",
                path.display(),
                embeddings.rows,
                embeddings.width,
                keys::EMBEDDING_LENGTH,
                vocab_real
            )));
        }
        let n_ctx_train = f.get_u32(keys::CONTEXT_LENGTH)? as usize;
        Ok(DecoderHeader {
            embeddings,
            tokenizer,
            vocab_real,
            bos,
            newline,
            stop,
            n_ctx_train,
        })
    }
}

/// Largest head count × head width accepted (the 28B has 32 × 128 = 4096).
const MAX_ATTENTION_WIDTH: u64 = 1 << 20;

/// What llama.cpp's loader would abort on (a failed `GGML_ASSERT` ends the process), checked
/// before it reads the file: the `gemma2.` hyper-parameters (only the keys pali writes, sizes
/// positive, the layer count within llama.cpp's limit) and the vocabulary (the SentencePiece
/// model pali writes, no token text twice).
fn check_for_llama_cpp(path: &Path, f: &GgufFile) -> Result<()> {
    let bad = |why: String| Error::Model(format!("{}: {why}", path.display()));
    if let Some(k) = f
        .keys()
        .into_iter()
        .find(|k| k.starts_with("gemma2.") && !keys::DECODER_HPARAMS.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "metadata key {k} is not one a PaliGemma decoder has (convert the checkpoint with `pali convert`)"
        )));
    }
    let layers = f.get_u32(keys::BLOCK_COUNT)?;
    if !(1..=keys::MAX_DECODER_LAYERS).contains(&layers) {
        return Err(bad(format!(
            "{} = {layers}: must be 1 to {}",
            keys::BLOCK_COUNT,
            keys::MAX_DECODER_LAYERS
        )));
    }
    for k in [
        keys::CONTEXT_LENGTH,
        keys::FEED_FORWARD_LENGTH,
        keys::HEAD_COUNT,
        keys::HEAD_COUNT_KV,
        keys::KEY_LENGTH,
        keys::VALUE_LENGTH,
    ] {
        if f.get_u32(k)? == 0 {
            return Err(bad(format!("{k} = 0: must be at least 1")));
        }
    }
    // llama.cpp multiplies these in 32 bits (n_embd_k_gqa = key_length × head_count_kv): a
    // product that wraps can match the tensor shapes its loader checks and then fail an
    // assert in the graph (found by fuzzing: head_count_kv 0x30000004 × 32 wraps to 128).
    let heads = f.get_u32(keys::HEAD_COUNT)? as u64;
    let kv_heads = f.get_u32(keys::HEAD_COUNT_KV)? as u64;
    for (k, width) in [keys::KEY_LENGTH, keys::VALUE_LENGTH]
        .into_iter()
        .map(|k| f.get_u32(k).map(|v| (k, v as u64)))
        .collect::<std::result::Result<Vec<_>, _>>()?
    {
        if heads * width > MAX_ATTENTION_WIDTH {
            return Err(bad(format!(
                "{} × {k} = {heads} × {width}: larger than any Gemma 2 ({MAX_ATTENTION_WIDTH} at most)",
                keys::HEAD_COUNT
            )));
        }
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(bad(format!(
            "{} = {kv_heads} must divide {} = {heads}",
            keys::HEAD_COUNT_KV,
            keys::HEAD_COUNT
        )));
    }
    let model = f.get_str(keys::TOKENIZER_MODEL)?;
    if model != "llama" {
        return Err(bad(format!(
            "{} = {model:?}: PaliGemma's vocabulary is SentencePiece (\"llama\")",
            keys::TOKENIZER_MODEL
        )));
    }
    let Some(pali_ggml::gguf::Value::ArrStr(tokens)) = f.get(keys::TOKENIZER_TOKENS) else {
        return Err(bad(format!(
            "{} is missing or not a string array",
            keys::TOKENIZER_TOKENS
        )));
    };
    let mut seen = std::collections::HashSet::with_capacity(tokens.len());
    if let Some((id, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| !seen.insert(t.as_str()))
    {
        return Err(bad(format!(
            "{}: token {id} ({t:?}) appears twice in the vocabulary",
            keys::TOKENIZER_TOKENS
        )));
    }
    Ok(())
}

/// A decoder file's facts that the rest of the model needs, read without loading its
/// weights ([`super::Decoder::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderFacts {
    /// Hidden size (the width image features must have).
    pub hidden: usize,
    /// Token id of `<loc0000>`, if the vocabulary has loc tokens.
    pub loc_token: Option<u32>,
    /// The context length the model was trained for (`gemma2.context_length`).
    pub n_ctx_train: usize,
}
