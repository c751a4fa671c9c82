//! The decoder GGUF's vocabulary against HF's tokenizer: llama.cpp's own SentencePiece
//! tokenizer (what stock llama.cpp tools see) and the embedded `tokenizer.huggingface.json`
//! (what pali tokenizes with) must both give the ids HF recorded in reference.json.

mod common;
use common::*;
use pali_ggml::gguf::GgufFile;
use pali_ggml::llama::{LlamaModel, ModelParams};
use pali_ggml::quant::FileType;
use pali_ggml::schema::keys;

/// `(text, HF ids)` of a fixture's `tokenization` list.
fn reference_tokenization(name: &str) -> Vec<(String, Vec<u32>)> {
    let r = Reference::load(name);
    let cases = r.json["tokenization"].as_array().unwrap();
    assert!(!cases.is_empty(), "{name}: no tokenization cases");
    cases
        .iter()
        .map(|c| (c["text"].as_str().unwrap().to_string(), ids(&c["ids"])))
        .collect()
}

fn vocab_only(path: &std::path::Path) -> LlamaModel {
    LlamaModel::load(
        path,
        &ModelParams {
            vocab_only: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn hf_tokenizer(path: &std::path::Path) -> tokenizers::Tokenizer {
    let json = GgufFile::open(path)
        .unwrap()
        .get_str(keys::TOKENIZER_HF_JSON)
        .unwrap();
    tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap()
}

/// llama.cpp's tokenizer, reading only the GGUF vocabulary the converter wrote, gives HF's
/// ids for every recorded text (unicode, byte fallback, leading spaces, newlines, loc/seg).
#[test]
fn llama_cpp_tokenizer_matches_hf() {
    for name in FIXTURES {
        let c = converted(name, FileType::F32, FileType::F32);
        let m = vocab_only(&c.decoder);
        let mut bad = Vec::new();
        for (text, want) in reference_tokenization(name) {
            let got: Vec<u32> = m
                .tokenize(&text, false)
                .unwrap()
                .into_iter()
                .map(|t| t as u32)
                .collect();
            if got != want {
                bad.push(format!("{text:?}: llama.cpp {got:?}, HF {want:?}"));
            }
        }
        assert!(bad.is_empty(), "{name}:\n{}", bad.join("\n"));
    }
}

/// The HF `tokenizer.json` embedded in the GGUF, loaded by the `tokenizers` crate, gives
/// HF's ids for every recorded text.
#[test]
fn embedded_hf_tokenizer_matches_hf() {
    for name in FIXTURES {
        let c = converted(name, FileType::F32, FileType::F32);
        let tok = hf_tokenizer(&c.decoder);
        for (text, want) in reference_tokenization(name) {
            let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "{name}: {text:?}");
        }
    }
}

/// `<loc0001>` and `<seg005>` are single, atomic tokens (base + 1 and base + 1024 + 5) for
/// both tokenizers, also when glued to text.
#[test]
fn loc_and_seg_tokens_are_atomic() {
    for name in FIXTURES {
        let r = Reference::load(name);
        // 1024 <loc> + 128 <seg> pieces end the real vocabulary.
        let base = (r.vocab_real() - 1024 - 128) as u32;
        let c = converted(name, FileType::F32, FileType::F32);
        let m = vocab_only(&c.decoder);
        let tok = hf_tokenizer(&c.decoder);
        for (text, id) in [("<loc0001>", base + 1), ("<seg005>", base + 1024 + 5)] {
            let ours: Vec<u32> = m
                .tokenize(text, false)
                .unwrap()
                .into_iter()
                .map(|t| t as u32)
                .collect();
            assert_eq!(ours, vec![id], "{name}: llama.cpp on {text}");
            let hf = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(hf, vec![id], "{name}: tokenizers on {text}");
        }
        let glued: Vec<u32> = m
            .tokenize("x<loc0001><seg005>y", false)
            .unwrap()
            .into_iter()
            .map(|t| t as u32)
            .collect();
        assert!(
            glued.windows(2).any(|w| w == [base + 1, base + 1024 + 5]),
            "{name}: {glued:?}"
        );
    }
}

/// Beyond the recorded texts: llama.cpp and the embedded HF tokenizer agree with each other
/// on edge cases (empty, whitespace-only, leading/trailing spaces, unseen characters through
/// byte fallback, control and added tokens written in the text, digits).
#[test]
fn llama_cpp_agrees_with_embedded_tokenizer_on_edge_cases() {
    const TEXTS: &[&str] = &[
        "",
        " ",
        "   ",
        "\n",
        "\n\n\n",
        "\t",
        " caption en",
        "caption en ",
        "a  b   c",
        "Ω ∑ ж 🦀🦀 ﬁ",
        "e\u{301}",
        "x\u{0}y",
        "<image><image>caption en",
        "<bos>text<eos>",
        "<unk>",
        "<loc>",
        "<loc12345>",
        "<loc0001 >",
        "9876543210",
        "answer en <seg127>\n<loc1023>",
    ];
    for name in FIXTURES {
        let c = converted(name, FileType::F32, FileType::F32);
        let m = vocab_only(&c.decoder);
        let tok = hf_tokenizer(&c.decoder);
        let mut bad = Vec::new();
        for text in TEXTS {
            let ours: Vec<u32> = m
                .tokenize(text, false)
                .unwrap()
                .into_iter()
                .map(|t| t as u32)
                .collect();
            let hf = tok.encode(*text, false).unwrap().get_ids().to_vec();
            if ours != hf {
                bad.push(format!("{text:?}: llama.cpp {ours:?}, tokenizers {hf:?}"));
            }
        }
        assert!(bad.is_empty(), "{name}:\n{}", bad.join("\n"));
    }
}

/// The GGUF vocabulary has one entry per embedding row with the types llama.cpp needs:
/// control tokens (`<pad>`, `<eos>`, `<bos>`, `<image>`), atomic user-defined `\n`,
/// `<loc>`/`<seg>`, byte pieces, and `[PADn]` fillers marked unused; BOS is prepended on
/// request; `<image>` written in text is its single id.
#[test]
fn vocabulary_layout_matches_the_embedding() {
    use pali_ggml::gguf::Value;
    use pali_ggml::schema::token_type as tt;
    for name in FIXTURES {
        let r = Reference::load(name);
        let rows = r.json["embedding_rows"].as_u64().unwrap() as usize;
        let real = r.vocab_real();
        let image = r.json["image_token_index"].as_u64().unwrap() as u32;
        let c = converted(name, FileType::F32, FileType::F32);
        let g = GgufFile::open(&c.decoder).unwrap();
        let Some(Value::ArrStr(tokens)) = g.get(keys::TOKENIZER_TOKENS) else {
            panic!("{name}: no token list")
        };
        let Some(Value::ArrI32(types)) = g.get(keys::TOKENIZER_TOKEN_TYPE) else {
            panic!("{name}: no token types")
        };
        assert_eq!((tokens.len(), types.len()), (rows, rows), "{name}");
        assert_eq!(g.get_u32(keys::PALI_VOCAB_SIZE).unwrap() as usize, real);
        assert_eq!(g.get_u32(keys::PALI_IMAGE_TOKEN_ID).unwrap(), image);
        let base = real - 1024 - 128;
        let expect = [
            (0, "<pad>", tt::CONTROL),
            (1, "<eos>", tt::CONTROL),
            (2, "<bos>", tt::CONTROL),
            (4, "\n", tt::USER_DEFINED),
            (5, "<0x00>", tt::BYTE),
            (260, "<0xFF>", tt::BYTE),
            (base, "<loc0000>", tt::USER_DEFINED),
            (base + 1024, "<seg000>", tt::USER_DEFINED),
            (real - 1, "<seg127>", tt::USER_DEFINED),
            (image as usize, "<image>", tt::CONTROL),
        ];
        for (id, text, ty) in expect {
            assert_eq!(
                (tokens[id].as_str(), types[id]),
                (text, ty),
                "{name}: id {id}"
            );
        }
        for id in image as usize + 1..rows {
            assert_eq!(tokens[id], format!("[PAD{id}]"), "{name}");
            assert_eq!(types[id], tt::UNUSED, "{name}: id {id}");
        }

        let m = vocab_only(&c.decoder);
        assert_eq!(m.n_vocab(), rows, "{name}");
        assert_eq!(m.tokenize("caption en", true).unwrap(), vec![2, 328, 275]);
        assert_eq!(
            m.tokenize("<image><image>caption", false).unwrap()[..2],
            [image as i32, image as i32]
        );
    }
}
