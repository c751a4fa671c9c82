//! pali: PaliGemma 2 on the edge.
//!
//! The SigLIP vision tower runs as pali's own ggml graph, the Gemma 2 decoder on llama.cpp,
//! both on the same ggml. The library is laid out by the stages an image goes through:
//!
//! 1. [`image`]: decode the file, resize it with Pillow's filter, normalise it (HF's
//!    PaliGemma input pipeline, bit-exact);
//! 2. [`vision`]: the SigLIP tower and the projector, ending in image features;
//! 3. [`decoder`]: the prefix (image features, `<bos>`, prompt, `"\n"`) as ONE non-causal
//!    batch of embeddings, then causal generation on llama.cpp;
//! 4. [`tasks`]: the prompts, the parsing of `<loc>`/`<seg>` answers and the results whose
//!    JSON every front end prints; [`mask`] turns `<seg>` codes into masks.
//!
//! [`Model`] ([`model`]) loads the files and ties the stages together, with LoRA adapters
//! beside them ([`adapter`]: fine-tuned models without merging); [`GenerateOptions`]
//! ([`options`]) is the one set of per-request options, checked by one
//! [`GenerateOptions::validate`] whichever front end built it. [`system`] holds what pali
//! asks of the OS, [`draw`] and [`eval`] serve the CLI's `--draw` and `pali eval`.
//!
//! Load a [`Model`] once, then call its tasks as often as needed, from any thread:
//!
//! ```no_run
//! use pali::{Model, ModelPaths, LoadOptions, GenerateOptions, Task};
//! let model = Model::load(&ModelPaths::new("model.gguf", "mmproj.gguf"), &LoadOptions::default())?;
//! let image = pali::image::load_image("cat.jpg".as_ref(), pali::MAX_IMAGE_PIXELS)?;
//! let opts = GenerateOptions::default();
//! let caption = model.answer(&image, &Task::Caption { lang: "en".into(), long: false },
//!                            &opts, &mut |piece| print!("{piece}"))?;
//! println!("\n{} tokens", caption.tokens.len());
//! let found = model.detect(&image, &["cat", "dog"], &opts)?;
//! println!("{}", serde_json::to_string(&found).unwrap()); // = `pali detect --json`
//! # Ok::<(), pali::Error>(())
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod adapter;
pub mod decoder;
pub mod draw;
mod error;
pub mod eval;
pub mod files;
pub mod image;
pub mod mask;
pub mod model;
pub mod options;
pub mod system;
pub mod tasks;
pub mod vision;

pub use adapter::AdapterInfo;
pub use decoder::{Generation, SlidingWindow};
pub use error::{Error, Result};
pub use files::{LoadOptions, ModelPaths};
pub use image::{ImageSize, RgbImage, MAX_IMAGE_PIXELS};
pub use mask::{Mask, MaskDecoder};
pub use model::{EncodedImage, Model};
pub use options::{
    AdapterId, AdapterScale, CancelFlag, FinishReason, GenerateOptions, Sampling, Timings,
};
pub use pali_ggml::llama::KvCacheType;
pub use system::{default_threads, no_gpu_notice, peak_rss_mb, total_ram_bytes, MemoryUse};
pub use tasks::{
    parse_detections, parse_segments, Answer, DetectionBox, Detections, Located, LocatedObject,
    ObjectMask, SegmentObject, Segments, Task, TextAnswer,
};
pub use vision::VisionPrecision;
