//! Stage 1, images: decoding ([`decode`]), Pillow-exact resampling ([`pillow`]) and the
//! vision tower's preprocessing ([`preprocess()`]), all reproducing Hugging Face's PaliGemma
//! input pipeline with the PIL backend; [`RgbImage`] is what every front end passes in.

pub mod clip;
pub mod decode;
pub mod pillow;
pub mod preprocess;
mod rgb;
mod video;

pub use clip::{frame_indices, Clip, ClipPlan, FrameSelection};
pub use decode::{decode_image, load_image, AlphaMode, ImageError, MAX_IMAGE_PIXELS};
pub use preprocess::{preprocess, PreprocessConfig};
pub use rgb::{ImageSize, RgbImage};

#[cfg(test)]
mod tests;
