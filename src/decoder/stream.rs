//! The generated text as it grows: incremental detokenization and stop sequences.

use crate::{Error, Result};

/// Incremental detokenization: each step decodes only the tokens since the last complete
/// piece, with the piece before them as context (whose text is then subtracted: a
/// SentencePiece decoder treats the first token of a sequence differently), so a long
/// generation costs linear time, not the quadratic cost of decoding everything each step.
/// Special tokens (dropped from the text anyway) are left out so they cannot pile up in
/// the window.
#[derive(Default)]
pub(super) struct Detokenizer {
    ids: Vec<u32>,
    text: String,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text so far.
    pub(super) fn push(&mut self, tokenizer: &tokenizers::Tokenizer, id: u32) -> Result<&str> {
        let special = tokenizer
            .id_to_token(id)
            .is_some_and(|t| tokenizer.get_added_vocabulary().is_special_token(&t));
        if special {
            return Ok(&self.text);
        }
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| Error::Model(format!("tokenizer: {e}")))
        };
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{fffd}') && now.starts_with(&before) {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(&self.text)
    }
}

/// Streams the generated text as it grows: only whole characters (a byte-fallback piece can
/// end mid-UTF-8 and change how earlier bytes decode) that extend what was already shown, and
/// never a tail that could still turn into a stop sequence.
pub(super) struct TextStream<'a> {
    stop: &'a [String],
    text: String,
    shown: String,
    /// A stop sequence was reached.
    pub(super) hit: bool,
}

impl<'a> TextStream<'a> {
    pub(super) fn new(stop: &'a [String]) -> Self {
        TextStream {
            stop,
            text: String::new(),
            shown: String::new(),
            hit: false,
        }
    }

    /// Takes the whole text decoded so far; returns true when it reached a stop sequence
    /// (the text is then cut just before it).
    pub(super) fn update(&mut self, text: &str, on_text: &mut dyn FnMut(&str)) -> bool {
        // A stop sequence can only begin in what was not shown yet.
        let from = self.shown.len();
        let hit = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.get(from..)?.find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(cut) = hit {
            self.text = text[..cut].to_string();
            self.hit = true;
            return true;
        }
        self.text.clear();
        self.text.push_str(text);
        if self.text.ends_with('\u{fffd}') {
            return false;
        }
        let ready = self.text.len() - self.held_back();
        if ready > self.shown.len() && self.text.starts_with(self.shown.as_str()) {
            on_text(&self.text[self.shown.len()..ready]);
            self.shown = self.text[..ready].to_string();
        }
        false
    }

    /// Bytes at the end of the text that begin some stop sequence (a suffix that is valid
    /// UTF-8 on its own starts on a character boundary).
    fn held_back(&self) -> usize {
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| self.text.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    /// Shows the rest of `full` (the final text) and returns it.
    pub(super) fn finish_with(mut self, full: String, on_text: &mut dyn FnMut(&str)) -> String {
        self.text = full;
        self.finish(on_text)
    }

    /// Shows what was held back and returns the final text.
    pub(super) fn finish(self, on_text: &mut dyn FnMut(&str)) -> String {
        if self.text.len() > self.shown.len() && self.text.starts_with(self.shown.as_str()) {
            on_text(&self.text[self.shown.len()..]);
        }
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `steps` (the whole text after each token) and returns (pieces shown, final text,
    /// whether a stop sequence was hit).
    fn stream(stop: &[&str], steps: &[&str]) -> (Vec<String>, String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut t = TextStream::new(&stop);
        let mut pieces = Vec::new();
        let mut hit = false;
        for s in steps {
            if t.update(s, &mut |p| pieces.push(p.to_string())) {
                hit = true;
                break;
            }
        }
        let text = t.finish(&mut |p| pieces.push(p.to_string()));
        (pieces, text, hit)
    }

    #[test]
    fn stop_sequences_end_the_text_and_are_never_streamed() {
        let (pieces, text, hit) = stream(&["square"], &["a red", "a red squ", "a red square and"]);
        assert!(hit);
        assert_eq!(text, "a red ");
        assert_eq!(pieces.concat(), "a red ");
        assert!(pieces.iter().all(|p| !p.contains("squ")), "{pieces:?}");
        // A held-back tail that does not become the stop sequence is shown later.
        let (pieces, text, hit) = stream(&["square"], &["a squ", "a squid"]);
        assert!(!hit);
        assert_eq!(text, "a squid");
        assert_eq!(pieces, ["a ", "squid"]);
        // Without stop sequences every step shows its new characters, but never half of one.
        let (pieces, text, _) = stream(&[], &["a", "a\u{fffd}", "a\u{e9}"]);
        assert_eq!(text, "a\u{e9}");
        assert_eq!(pieces, ["a", "\u{e9}"]);
    }
}
