//! Stage 2, vision: the SigLIP tower and PaliGemma's projector as pali's own ggml graph —
//! settings and shape checks ([`config`]), the graph (`graph.rs`) and the loaded encoder
//! ([`VisionEncoder`]).

pub mod config;
mod encoder;
mod graph;

pub use config::{AttentionKernel, VisionConfig, VisionPrecision, MAX_IMAGE_SIZE};
pub use encoder::{VisionEncoder, VisionOutput};
