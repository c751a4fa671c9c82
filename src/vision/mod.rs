//! Stage 2, vision: the SigLIP tower and PaliGemma's projector as pali's own ggml graph —
//! settings and shape checks ([`config`]), the graph (`graph.rs`), the loaded encoder
//! ([`VisionEncoder`]) and LoRA adapters on it (`adapter.rs`).

mod adapter;
pub mod config;
mod encoder;
mod graph;

pub(crate) use adapter::check_adapter;
pub use config::{AttentionKernel, VisionConfig, VisionPrecision, MAX_IMAGE_SIZE};
pub use encoder::{VisionEncoder, VisionOutput};
