//! PaliGemma's projector: one linear layer (with bias, no activation) from the vision width
//! to the decoder's hidden size, and the scaling that hands its output to llama.cpp.

use crate::siglip::VisionConfig;
use crate::Result;
use pali_ggml::graph::{Graph, Tensor};
use pali_ggml::schema::vision as names;

/// Ggml shapes the projector tensors must have.
pub fn expected_shapes(c: &VisionConfig) -> Vec<(String, Vec<i64>)> {
    let (d, h) = (c.width as i64, c.projection_dim as i64);
    vec![
        (names::PROJ_W.into(), vec![d, h]),
        (names::PROJ_B.into(), vec![h]),
    ]
}

/// `W·x + b` for every vision token: `[width, n] → [hidden, n]`. On OpenBLAS where the build
/// has it (F32 activations: an F16 projector's error against HF drops from ~2e-4 to the F32
/// file's ~1e-5), else ggml's matmul as it is.
pub fn project<'g>(g: &'g Graph, x: Tensor<'g>) -> Result<Tensor<'g>> {
    let w = g.weight(names::PROJ_W)?;
    let product = g.mul_mat_blas(w, x).unwrap_or_else(|| g.mul_mat(w, x));
    Ok(g.add(product, g.weight(names::PROJ_B)?))
}

/// PaliGemma feeds image features to Gemma unscaled, but llama.cpp's gemma2 graph multiplies
/// every input embedding by √hidden (as it must for text). Dividing by the same f32 constant
/// first makes the product equal the projector output (HF does the same division).
pub fn to_decoder_input(features: &mut [f32], hidden: usize) {
    let s = 1.0 / (hidden as f32).sqrt();
    for v in features.iter_mut() {
        *v *= s;
    }
}
