//! The PaliGemma prefix as ONE batch of embedding rows: the image features (scaled for
//! llama.cpp's input multiplication), `<bos>`, the prompt and the `"\n"` separator.

use super::header::DecoderHeader;
use super::load::Decoder;
use crate::{Error, Result};
use std::path::Path;

/// The PaliGemma prefix as decoder input rows: `[image × N][<bos>][prompt…]["\n"]`, each
/// already scaled for llama.cpp's input multiplication by √hidden.
pub struct PrefixBatch {
    /// Row-major `[n_tokens][hidden]`.
    pub rows: Vec<f32>,
    /// Text ids after the image rows (`<bos>`, prompt, newline).
    pub text_ids: Vec<u32>,
    /// Image rows.
    pub n_image: usize,
}

impl PrefixBatch {
    /// Number of prefix tokens.
    pub fn len(&self) -> usize {
        self.n_image + self.text_ids.len()
    }

    /// Whether the prefix is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DecoderHeader {
    /// The text part of the prefix: `<bos>`, the prompt and the `"\n"` separator (tokenized
    /// separately, as big_vision does).
    pub(super) fn text_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        ids.extend(
            self.tokenizer
                .encode(prompt, false)
                .map_err(|e| Error::Model(format!("tokenizer: {e}")))?
                .get_ids(),
        );
        ids.extend(&self.newline);
        Ok(ids)
    }
}

impl Decoder {
    /// Tokens of the prefix's text part (`<bos>`, the prompt, `"\n"`).
    pub fn text_tokens(&self, prompt: &str) -> Result<usize> {
        Ok(self.header.text_ids(prompt)?.len())
    }

    /// [`Decoder::text_tokens`] from the file's header alone, without loading the decoder.
    pub fn probe_text_tokens(path: &Path, prompt: &str) -> Result<usize> {
        Ok(DecoderHeader::read(path)?.text_ids(prompt)?.len())
    }

    /// Builds the prefix: image rows (projector output, scaled here), `<bos>`, the prompt and
    /// the `"\n"` separator (tokenized separately, as big_vision does).
    pub fn prefix(&self, image_features: &[f32], prompt: &str) -> Result<PrefixBatch> {
        if !image_features.len().is_multiple_of(self.hidden) {
            return Err(Error::Model(format!(
                "image features of width {} do not match the decoder's hidden size {}",
                image_features.len(),
                self.hidden
            )));
        }
        let n_image = image_features.len() / self.hidden;
        let mut rows = image_features.to_vec();
        to_decoder_input(&mut rows, self.hidden);
        let text_ids = self.header.text_ids(prompt)?;
        for &id in &text_ids {
            // llama.cpp scales these by √hidden itself, exactly as for token-id input.
            rows.extend(self.header.embeddings.row(id)?);
        }
        Ok(PrefixBatch {
            rows,
            text_ids,
            n_image,
        })
    }
}

/// PaliGemma feeds image features to Gemma unscaled, but llama.cpp's gemma2 graph multiplies
/// every input embedding by √hidden (as it must for text). Dividing by the same f32 constant
/// first makes the product equal the projector output (HF does the same division).
pub(super) fn to_decoder_input(features: &mut [f32], hidden: usize) {
    let s = 1.0 / (hidden as f32).sqrt();
    for v in features.iter_mut() {
        *v *= s;
    }
}
