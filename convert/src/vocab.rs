//! The vocabulary for the decoder GGUF: SentencePiece pieces, scores and types from
//! `tokenizer.model`, the added tokens of `tokenizer.json` (`<image>`, and `<loc>`/`<seg>`
//! when the .model lacks them), and `[PADn]` fillers up to the embedding row count, which
//! llama.cpp requires to equal the vocabulary size.

use crate::{ConvertError, Result};
use pali_ggml::schema::token_type;
use std::path::Path;

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    #[allow(missing_docs)]
    pub text: String,
    #[allow(missing_docs)]
    pub score: f32,
    /// llama.cpp token type (see [`pali_ggml::schema::token_type`]).
    pub ty: i32,
}

/// The whole vocabulary plus what the runtime needs to know about it.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// Exactly `embedding_rows` entries.
    pub pieces: Vec<Piece>,
    /// Real entries (SentencePiece pieces plus non-special added tokens below `<image>`);
    /// ids from here on are never generated.
    pub real_size: usize,
    /// Whether SentencePiece prepends a space (`add_dummy_prefix`).
    pub add_space_prefix: bool,
    /// `tokenizer.json` text, embedded for the runtime.
    pub hf_json: String,
    /// How many `[PADn]` fillers were appended.
    pub n_padding: usize,
}

// Minimal protobuf reader for sentencepiece's ModelProto.
struct Pb<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Pb<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i)?;
            self.i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// Next (field number, wire type, payload); payload is the bytes for length-delimited
    /// fields, the value bytes otherwise.
    fn field(&mut self) -> Option<(u64, u64, u64, &'a [u8])> {
        let key = self.varint()?;
        let (num, wt) = (key >> 3, key & 7);
        match wt {
            0 => Some((num, wt, self.varint()?, &[])),
            1 => {
                let s = self.b.get(self.i..self.i + 8)?;
                self.i += 8;
                Some((num, wt, 0, s))
            }
            2 => {
                let n = self.varint()? as usize;
                let s = self.b.get(self.i..self.i.checked_add(n)?)?;
                self.i += n;
                Some((num, wt, 0, s))
            }
            5 => {
                let s = self.b.get(self.i..self.i + 4)?;
                self.i += 4;
                Some((num, wt, 0, s))
            }
            _ => None,
        }
    }
}

/// Parses a SentencePiece `tokenizer.model`: pieces and the `add_dummy_prefix` flag.
pub fn parse_sentencepiece(bytes: &[u8]) -> Option<(Vec<Piece>, bool)> {
    let mut pb = Pb { b: bytes, i: 0 };
    let mut pieces = Vec::new();
    let mut add_dummy_prefix = true;
    while pb.i < bytes.len() {
        let (num, wt, _, payload) = pb.field()?;
        match (num, wt) {
            (1, 2) => {
                let mut p = Pb { b: payload, i: 0 };
                let mut piece = Piece {
                    text: String::new(),
                    score: 0.0,
                    ty: token_type::NORMAL,
                };
                while p.i < payload.len() {
                    let (n, w, v, s) = p.field()?;
                    match (n, w) {
                        (1, 2) => piece.text = String::from_utf8(s.to_vec()).ok()?,
                        (2, 5) => piece.score = f32::from_le_bytes(s.try_into().ok()?),
                        (3, 0) => piece.ty = v as i32,
                        _ => {}
                    }
                }
                pieces.push(piece);
            }
            (3, 2) => {
                let mut p = Pb { b: payload, i: 0 };
                while p.i < payload.len() {
                    let (n, w, v, _) = p.field()?;
                    if (n, w) == (3, 0) {
                        add_dummy_prefix = v != 0;
                    }
                }
            }
            _ => {}
        }
    }
    (!pieces.is_empty()).then_some((pieces, add_dummy_prefix))
}

fn is_loc_seg_or_unused(t: &str) -> bool {
    let inner = |p: &str, n: usize| {
        t.strip_prefix(p)
            .and_then(|r| r.strip_suffix('>'))
            .is_some_and(|d| d.len() == n && d.bytes().all(|b| b.is_ascii_digit()))
    };
    inner("<loc", 4) || inner("<seg", 3) || (t.starts_with("<unused") && t.ends_with('>'))
}

impl Vocab {
    /// Builds the vocabulary from `dir/tokenizer.model` + `dir/tokenizer.json`, padded to
    /// `embedding_rows` entries.
    pub fn load(dir: &Path, embedding_rows: usize, image_token_id: u32) -> Result<Self> {
        let model_path = dir.join("tokenizer.model");
        let json_path = dir.join("tokenizer.json");
        for p in [&model_path, &json_path] {
            if !p.exists() {
                return Err(ConvertError::Missing(format!(
                    "{} not found: the converter needs both tokenizer.model (SentencePiece) and tokenizer.json",
                    p.display()
                )));
            }
        }
        let bytes = std::fs::read(&model_path).map_err(|e| ConvertError::io(&model_path, e))?;
        let (mut pieces, add_space_prefix) = parse_sentencepiece(&bytes).ok_or_else(|| {
            ConvertError::Tokenizer(format!(
                "{} is not a valid SentencePiece model",
                model_path.display()
            ))
        })?;
        let hf_json =
            std::fs::read_to_string(&json_path).map_err(|e| ConvertError::io(&json_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&hf_json).map_err(|e| {
            ConvertError::Tokenizer(format!("{}: invalid JSON: {e}", json_path.display()))
        })?;
        let mut added: Vec<(usize, String, bool)> = Vec::new();
        for t in json
            .get("added_tokens")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            let id = t.get("id").and_then(|v| v.as_u64());
            let content = t.get("content").and_then(|v| v.as_str());
            let (Some(id), Some(content)) = (id, content) else {
                return Err(ConvertError::Tokenizer(format!(
                    "{}: malformed added_tokens entry",
                    json_path.display()
                )));
            };
            let special = t.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
            added.push((id as usize, content.to_string(), special));
        }
        added.sort_by_key(|a| a.0);
        for (id, content, special) in &added {
            let ty = if *special && !is_loc_seg_or_unused(content) {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
            if *id < pieces.len() {
                if pieces[*id].text != *content {
                    return Err(ConvertError::Tokenizer(format!(
                        "tokenizer.json gives id {id} to {content:?} but tokenizer.model has {:?} there",
                        pieces[*id].text
                    )));
                }
                if pieces[*id].ty != token_type::BYTE {
                    pieces[*id].ty = ty;
                }
            } else if *id == pieces.len() {
                pieces.push(Piece {
                    text: content.clone(),
                    score: -1000.0,
                    ty,
                });
            } else {
                return Err(ConvertError::Tokenizer(format!(
                    "tokenizer.json added token {content:?} has id {id}, leaving a gap after {} pieces",
                    pieces.len()
                )));
            }
        }
        // Unused/loc/seg pieces must be matched atomically, or llama.cpp splits `<loc0001>`.
        for p in pieces.iter_mut() {
            if p.ty == token_type::NORMAL && is_loc_seg_or_unused(&p.text) {
                p.ty = token_type::USER_DEFINED;
            }
        }
        let real_size = (image_token_id as usize).min(pieces.len());
        if pieces.len() > embedding_rows {
            return Err(ConvertError::Tokenizer(format!(
                "the tokenizer has {} entries but the embedding only {embedding_rows} rows",
                pieces.len()
            )));
        }
        let n_padding = embedding_rows - pieces.len();
        while pieces.len() < embedding_rows {
            let id = pieces.len();
            pieces.push(Piece {
                text: format!("[PAD{id}]"),
                score: -1000.0,
                ty: token_type::UNUSED,
            });
        }
        Ok(Vocab {
            pieces,
            real_size,
            add_space_prefix,
            hf_json,
            n_padding,
        })
    }
}
