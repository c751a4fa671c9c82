//! Stage 3, the decoder: Gemma 2 on llama.cpp. The header checks (`header.rs`), loading
//! ([`Decoder`]), the prefix as one batch of embeddings ([`PrefixBatch`]), generation with
//! sampling and streamed text, LoRA adapters through llama.cpp's adapter API (`adapter.rs`).

mod adapter;
mod generate;
mod header;
mod load;
mod prefix;
mod sampling;
mod stream;

pub(crate) use adapter::check_adapter;
pub use generate::Generation;
pub use header::DecoderFacts;
pub use load::{
    Decoder, DecoderOptions, SlidingWindow, FLASH_ATTN_AUTO_TOKENS, FULL_ATTENTION_WINDOW,
};
pub use prefix::PrefixBatch;
