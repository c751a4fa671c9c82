//! Segmentation masks: the decoder half of big_vision's VQ-VAE (`vae-oid.npz`) on ggml, and
//! the placement of its 64×64 map into the original image, both as big_vision's evaluator
//! does them (`big_vision/evaluators/proj/paligemma/transfers/segmentation.py`, spec §7.2).
//!
//! - `pali convert-vae` (`pali_convert::vae`) turns `vae-oid.npz` into the small F32 GGUF
//!   this module loads (`paligemma-vae`; names and layouts in [`pali_ggml::schema::vae`]).
//! - [`MaskDecoder::decode`] maps the 16 `<segNNN>` codes of an object to a 64×64 map of
//!   logits (≈ −1 … 1; inside where > 0): codebook lookup → 1×1 conv D→128 + ReLU → two
//!   residual blocks (3×3, ReLU, 3×3, ReLU, 1×1, + input) → four transposed convs (kernel 4,
//!   stride 2: 4→8→16→32→64 px, 128→128→64→32→16 channels) each + ReLU → 1×1 conv 16→1.
//!   All in F32. big_vision runs Flax `ConvTranspose(padding=2, transpose_kernel=True)` on
//!   kernels transposed from the PyTorch file; that equals PyTorch's
//!   `ConvTranspose2d(k=4, s=2, padding=1)` on the stored weights (proved numerically by
//!   `models/fixtures/make_vae_fixture.py`), computed here as ggml's unpadded transposed
//!   conv (output 2n+2) cropped by one pixel on each side.
//! - [`place_mask`] puts a map into the box like the evaluator: box edges truncated to whole
//!   pixels ([`mask_box`]), the map resized to the box with PIL's BILINEAR filter on a float
//!   image ([`resize_bilinear_f32`], bit-exact with Pillow ≥ 13), thresholded at `> 0`, and
//!   pasted into an all-zero image of the original size.

use crate::image::pillow::resize_bilinear_f32;
use crate::tasks::parse::{SegmentObject, SEG_TOKENS};
use crate::{Error, Result};
use pali_ggml::gguf::GgufFile;
use pali_ggml::graph::{Backend, Graph, Tensor, Weights};
use pali_ggml::schema::{keys, vae as names};
use pali_ggml::GgmlType;
use std::collections::BTreeMap;
use std::path::Path;

/// Side of the decoded map: 64 (a 64×64 map per object).
pub const MAP_SIZE: usize = names::MAP;

// ---------------------------------------------------------------------------
// The decoder graph

/// The VQ-VAE mask decoder, loaded from a `pali convert-vae` GGUF, running on ggml's CPU
/// backend (it is small: ≈ 40 MFLOP and 4 MB of weights per map).
pub struct MaskDecoder {
    // Field order: the weights' buffer is freed before the backend.
    weights: Weights,
    backend: Backend,
    dim: usize,
}

impl MaskDecoder {
    /// Loads and checks a mask decoder file (`pali convert-vae`); `threads` for the CPU.
    pub fn load(path: &Path, threads: i32) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Io(format!(
                "--vae {}: file not found",
                path.display()
            )));
        }
        let file = GgufFile::open(path)?;
        let arch = file.get_str(keys::ARCHITECTURE).unwrap_or_default();
        if arch != names::ARCH {
            return Err(Error::Model(format!(
                "{} is not a mask decoder file (architecture {arch:?}, expected {:?}): make one with `pali convert-vae vae-oid.npz -o vae.gguf`",
                path.display(),
                names::ARCH
            )));
        }
        let dim = file.get_u32(names::CODEBOOK_DIM)? as usize;
        let table: BTreeMap<String, (GgmlType, Vec<i64>)> = file
            .tensors()
            .into_iter()
            .map(|t| (t.name, (t.ty, t.ne)))
            .collect();
        for (_, gguf, shape) in names::tensors(dim) {
            let want: Vec<i64> = shape.iter().rev().map(|&s| s as i64).collect();
            match table.get(&gguf) {
                None => {
                    return Err(Error::Model(format!(
                        "{}: tensor {gguf} is missing",
                        path.display()
                    )))
                }
                Some((ty, ne)) => {
                    // GGUF trims trailing 1s of the shape.
                    let mut full = ne.clone();
                    full.resize(want.len(), 1);
                    if *ty != GgmlType::F32 || full != want {
                        return Err(Error::Model(format!(
                            "{}: tensor {gguf} is {ty} {ne:?}, expected f32 {want:?}",
                            path.display()
                        )));
                    }
                }
            }
        }
        drop(file);
        let backend = Backend::new(false, threads)?;
        let weights = Weights::load(path, &backend)?;
        Ok(MaskDecoder {
            weights,
            backend,
            dim,
        })
    }

    /// Width D of the codebook.
    pub fn codebook_dim(&self) -> usize {
        self.dim
    }

    /// The 64×64 map (row-major: `map[y · 64 + x]`) of 16 codes (a 4×4 grid, row-major, each
    /// 0..=127), as big_vision's `reconstruct_masks`. Values are logits: the mask is `> 0`.
    pub fn decode(&self, codes: &[u8; SEG_TOKENS]) -> Result<Vec<f32>> {
        if let Some(c) = codes.iter().find(|&&c| usize::from(c) >= names::NUM_CODES) {
            return Err(Error::Prompt(format!(
                "mask code {c} is out of range (0..={})",
                names::NUM_CODES - 1
            )));
        }
        let g = Graph::new(&self.weights);
        let idx = g.input_i32(&[SEG_TOKENS as i64], codes.map(i32::from).to_vec());
        let d = self.dim as i64;
        let width = names::WIDTH as i64;
        // [D, 16]: one codebook row per grid cell, cells row-major (y · 4 + x).
        let x = g.get_rows(g.weight(names::CODEBOOK)?, idx);
        // 1×1 conv over channel-minor rows: [16, 128] = [4, 4, 128] in ggml's [w, h, c].
        let w_in = g.reshape(g.weight(names::IN_W)?, &[d, width]);
        let x = g.reshape(g.mul_mat(x, w_in), &[4, 4, width]);
        let mut x = g.relu(add_bias(&g, x, names::IN_B)?);
        for r in 0..2 {
            let y = g.relu(conv2d(&g, x, &names::res_conv(r, 0, "weight"), 1)?);
            let y = g.relu(conv2d(&g, y, &names::res_conv(r, 1, "weight"), 1)?);
            let y = conv2d(&g, y, &names::res_conv(r, 2, "weight"), 0)?;
            x = g.add(y, x);
        }
        for i in 0..names::UP_CHANNELS.len() {
            // PyTorch ConvTranspose2d(k=4, s=2, p=1) = the unpadded one (2n + 2) minus a
            // 1-pixel border.
            let n = x.ne()[0];
            let y = g.conv_transpose_2d_p0(g.weight(&names::up(i, "weight"))?, x, 2);
            let y = g.cont(g.crop_2d(y, 1, 1, 2 * n, 2 * n));
            x = g.relu(add_bias(&g, y, &names::up(i, "bias"))?);
        }
        let out = conv2d(&g, x, names::OUT_W, 0)?;
        let map = g.compute(out, &self.backend)?;
        debug_assert_eq!(map.len(), MAP_SIZE * MAP_SIZE);
        Ok(map)
    }

    /// The binary mask of a parsed object in the original image (`width` × `height`): its
    /// codes decoded and placed into its box ([`mask_box`], [`place_mask`]).
    pub fn mask(&self, object: &SegmentObject, width: u32, height: u32) -> Result<Mask> {
        let map = self.decode(&object.codes)?;
        Ok(place_mask(
            &map,
            mask_box(object.bbox.loc, width, height),
            width,
            height,
        ))
    }
}

/// `x + bias` with a `[c]` bias broadcast over `[w, h, c]`.
fn add_bias<'g>(g: &'g Graph<'_>, x: Tensor<'g>, bias: &str) -> Result<Tensor<'g>> {
    let b = g.weight(bias)?;
    let c = b.ne()[0];
    Ok(g.add(x, g.reshape(b, &[1, 1, c])))
}

/// Same-size convolution (stride 1, zero padding `pad`) of `x` `[w, h, c_in]` with the
/// kernel `weight` (its `.bias` added): im2col in F32, then one F32 matmul.
fn conv2d<'g>(g: &'g Graph<'_>, x: Tensor<'g>, weight: &str, pad: i32) -> Result<Tensor<'g>> {
    let k = g.weight(weight)?;
    let [kw, kh, cin, cout] = k.ne();
    let [w, h, _, _] = x.ne();
    let cols = g.im2col(k, x, pad);
    let (ow, oh) = (cols.ne()[1], cols.ne()[2]);
    debug_assert_eq!(
        (ow, oh),
        (
            w + 2 * i64::from(pad) - kw + 1,
            h + 2 * i64::from(pad) - kh + 1
        )
    );
    let cols = g.reshape(cols, &[kw * kh * cin, ow * oh]);
    let y = g.mul_mat(cols, g.reshape(k, &[kw * kh * cin, cout]));
    let y = g.reshape(y, &[ow, oh, cout]);
    add_bias(g, y, &weight.replace(".weight", ".bias"))
}

// ---------------------------------------------------------------------------
// Placement

/// A binary mask over an image, row-major (`data[y · width + x]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `true` inside the mask.
    pub data: Vec<bool>,
}

impl Mask {
    /// An empty (all outside) mask.
    pub fn empty(width: u32, height: u32) -> Self {
        Mask {
            width,
            height,
            data: vec![false; width as usize * height as usize],
        }
    }

    /// Whether pixel (x, y) is inside.
    pub fn get(&self, x: u32, y: u32) -> bool {
        self.data[y as usize * self.width as usize + x as usize]
    }

    /// Pixels inside.
    pub fn area(&self) -> u64 {
        self.data.iter().filter(|&&v| v).count() as u64
    }

    /// COCO's uncompressed RLE `counts`: run lengths over the pixels in **column-major**
    /// order (down the first column, then the next), alternating outside/inside and starting
    /// with an outside run (0 if the first pixel is inside). Exactly what
    /// `pycocotools.mask.frPyObjects({"size": [height, width], "counts": counts}, …)` reads.
    pub fn rle(&self) -> Vec<u32> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut counts = Vec::new();
        let (mut cur, mut run) = (false, 0u32);
        for x in 0..w {
            for y in 0..h {
                let v = self.data[y * w + x];
                if v != cur {
                    counts.push(run);
                    cur = v;
                    run = 0;
                }
                run += 1;
            }
        }
        counts.push(run);
        counts
    }

    /// The mask of COCO uncompressed RLE `counts` (see [`Mask::rle`]); `None` if the counts
    /// do not add up to `width · height`.
    pub fn from_rle(width: u32, height: u32, counts: &[u32]) -> Option<Self> {
        let (w, h) = (width as usize, height as usize);
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if total != (w * h) as u64 {
            return None;
        }
        let mut m = Mask::empty(width, height);
        let mut i = 0usize;
        for (k, &c) in counts.iter().enumerate() {
            for j in i..i + c as usize {
                if k % 2 == 1 {
                    let (x, y) = (j / h, j % h);
                    m.data[y * w + x] = true;
                }
            }
            i += c as usize;
        }
        Some(m)
    }
}

/// The mask box in whole pixels, `[x1, y1, x2, y2]`, from `<loc>` bins `[y1, x1, y2, x2]`, as
/// big_vision's evaluator computes it: `int(bin / 1023 · size)` per edge, i.e. truncated
/// (not rounded). It can be empty (x2 == x1 or y2 == y1) for a box under a pixel wide.
pub fn mask_box(loc: [u16; 4], width: u32, height: u32) -> [u32; 4] {
    let px = |bin: u16, size: u32| (f64::from(bin) / 1023.0 * f64::from(size)) as u32;
    [
        px(loc[1], width),
        px(loc[0], height),
        px(loc[3], width),
        px(loc[2], height),
    ]
}

/// The binary mask in an image of `width` × `height`: the 64×64 `map` (row-major) resized to
/// the box `[x1, y1, x2, y2]` (whole pixels, see [`mask_box`]) with PIL's BILINEAR filter on a
/// float image ([`resize_bilinear_f32`]), thresholded at `> 0.0` and pasted into an empty
/// mask, like big_vision's evaluator. An empty box gives an empty mask; a box reaching past
/// the image is resized whole and clipped.
///
/// # Panics
/// If `map` does not hold 64 × 64 values.
pub fn place_mask(map: &[f32], bbox: [u32; 4], width: u32, height: u32) -> Mask {
    assert_eq!(map.len(), MAP_SIZE * MAP_SIZE, "the map must be 64x64");
    let mut m = Mask::empty(width, height);
    let [x1, y1, x2, y2] = bbox;
    if x2 <= x1 || y2 <= y1 {
        return m;
    }
    let (bw, bh) = (x2 - x1, y2 - y1);
    let r = resize_bilinear_f32(map, MAP_SIZE as u32, MAP_SIZE as u32, bw, bh);
    for y in 0..bh.min(height.saturating_sub(y1)) {
        for x in 0..bw.min(width.saturating_sub(x1)) {
            if r[(y * bw + x) as usize] > 0.0 {
                m.data[((y1 + y) * width + x1 + x) as usize] = true;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_is_coco_column_major_and_round_trips() {
        // 3 wide × 2 high:  . # #
        //                   . . #
        let m = Mask {
            width: 3,
            height: 2,
            data: vec![false, true, true, false, false, true],
        };
        // Column-major: (0,0)=0 (0,1)=0 | (1,0)=1 (1,1)=0 | (2,0)=1 (2,1)=1
        assert_eq!(m.rle(), [2, 1, 1, 2]);
        assert_eq!(Mask::from_rle(3, 2, &m.rle()), Some(m.clone()));
        assert_eq!(m.area(), 3);
        let full = Mask {
            width: 2,
            height: 2,
            data: vec![true; 4],
        };
        assert_eq!(full.rle(), [0, 4]);
        assert_eq!(Mask::empty(2, 3).rle(), [6]);
        assert_eq!(Mask::from_rle(2, 2, &[1, 1]), None);
    }

    #[test]
    fn mask_box_truncates_like_int() {
        // 97 × 61: x 200/1023·97 = 18.96 → 18, y 100/1023·61 = 5.96 → 5.
        assert_eq!(mask_box([100, 200, 900, 700], 97, 61), [18, 5, 66, 53]);
        assert_eq!(mask_box([0, 0, 1023, 1023], 97, 61), [0, 0, 97, 61]);
        // Under one pixel wide: empty.
        let [x1, _, x2, _] = mask_box([500, 500, 505, 505], 97, 61);
        assert_eq!(x1, x2);
    }

    #[test]
    fn placement_clips_and_handles_empty_boxes() {
        let map = vec![1.0f32; 64 * 64];
        let m = place_mask(&map, [2, 1, 5, 3], 6, 4);
        assert_eq!(m.area(), 6);
        assert!(m.get(2, 1) && m.get(4, 2) && !m.get(5, 2) && !m.get(1, 1) && !m.get(2, 3));
        assert_eq!(place_mask(&map, [3, 1, 3, 3], 6, 4).area(), 0);
        // Past the image: clipped.
        assert_eq!(place_mask(&map, [4, 2, 9, 9], 6, 4).area(), 4);
    }
}
