//! The results of the tasks, [`TextAnswer`] and [`Located`]: one serializable value per
//! call whose JSON is what `pali … --json` prints, `pali serve` returns and the C library
//! hands out ([`to_json`]).

use super::parse::{DetectionBox, SEG_TOKENS};
use crate::decoder::Generation;
use crate::image::ImageSize;
use crate::mask::{mask_box, Mask};
use crate::options::{FinishReason, Timings};
use serde::ser::{SerializeMap, Serializer};

/// What [`crate::Model::run`] returns: a text answer, or the objects of a detect / segment
/// task. Serializes as the one it holds.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// Captions, answers, OCR, any prompt.
    Text(TextAnswer),
    /// Detect and segment.
    Located(Located),
}

/// The answer to a text task (caption, question, OCR, any prompt).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextAnswer {
    /// The generated text (special tokens dropped, `<loc>`/`<seg>` kept).
    pub text: String,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// `stop` (end of text or a stop sequence) or `length` (the token limit).
    pub finish_reason: FinishReason,
    /// Where the time went.
    pub timings: Timings,
    /// Images in the prompt (in the JSON only when more than one).
    #[serde(skip_serializing_if = "is_one")]
    pub n_images: usize,
    /// A clip's frame indices, in the prompt's order (in the JSON only for a clip).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<usize>,
    /// A clip shorter than the frames asked for, …: one line each (in the JSON only when
    /// there is one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl From<Generation> for TextAnswer {
    fn from(g: Generation) -> Self {
        TextAnswer {
            text: g.text,
            tokens: g.tokens,
            finish_reason: g.finish_reason,
            timings: g.timings,
            n_images: 1,
            frames: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

impl Answer {
    /// Records the clip the answer is about: its frame indices and its warnings (first).
    pub(crate) fn set_clip(&mut self, indices: Vec<usize>, clip_warnings: Vec<String>) {
        let (frames, warnings) = match self {
            Answer::Text(t) => (&mut t.frames, &mut t.warnings),
            Answer::Located(l) => (&mut l.frames, &mut l.warnings),
        };
        *frames = indices;
        warnings.splice(0..0, clip_warnings);
    }
}

/// The objects found by [`crate::Model::detect`] or [`crate::Model::segment`], in the original image's
/// pixels.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Located {
    /// The objects in the order the model wrote them.
    pub objects: Vec<LocatedObject>,
    /// The image's size (the boxes' coordinate frame).
    pub image: ImageSize,
    /// The model's raw answer.
    pub text: String,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// `stop` or `length` (the answer was cut at the token limit).
    pub finish_reason: FinishReason,
    /// Where the time went.
    pub timings: Timings,
    /// Skipped objects, ignored text, masks not decoded, a cut answer: one line each.
    pub warnings: Vec<String>,
    /// Images in the prompt (in the JSON only when more than one; boxes are in the first
    /// image's pixels, all of one size).
    #[serde(skip_serializing_if = "is_one")]
    pub n_images: usize,
    /// A clip's frame indices (in the JSON only for a clip).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<usize>,
}

/// One object: its box and score, and for `segment` its mask codes and mask.
///
/// JSON: `{"label", "box": [x1, y1, x2, y2], "score", "loc": [y1, x1, y2, x2]}`, plus for
/// `segment` `"codes"` (16 numbers) and `"mask"` (`null` without a mask decoder, else COCO's
/// uncompressed RLE `{"size": [h, w], "counts"}`) with `"mask_box"` and `"area"`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocatedObject {
    /// The box, label and score.
    pub bbox: DetectionBox,
    /// `segment` only.
    pub segment: Option<ObjectMask>,
}

/// A segmented object's mask codes and, with a mask decoder, its mask.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectMask {
    /// The 16 `<segNNN>` codes (4×4, row-major).
    pub codes: [u8; SEG_TOKENS],
    /// The binary mask over the whole image, if a mask decoder was loaded.
    pub mask: Option<Mask>,
}

impl serde::Serialize for LocatedObject {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let b = &self.bbox;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("label", &b.label)?;
        m.serialize_entry("box", &b.rect())?;
        m.serialize_entry("score", &b.score)?;
        m.serialize_entry("loc", &b.loc)?;
        if let Some(seg) = &self.segment {
            m.serialize_entry("codes", &seg.codes)?;
            match &seg.mask {
                None => m.serialize_entry("mask", &())?,
                Some(mask) => {
                    let rle = serde_json::json!({
                        "size": [mask.height, mask.width],
                        "counts": mask.rle(),
                    });
                    m.serialize_entry("mask", &rle)?;
                    m.serialize_entry("mask_box", &mask_box(b.loc, mask.width, mask.height))?;
                    m.serialize_entry("area", &mask.area())?;
                }
            }
        }
        m.end()
    }
}

impl Located {
    /// The boxes alone (e.g. to draw them).
    pub fn boxes(&self) -> Vec<DetectionBox> {
        self.objects.iter().map(|o| o.bbox.clone()).collect()
    }

    /// The decoded masks, one per object where there is one.
    pub fn masks(&self) -> Vec<Option<&Mask>> {
        self.objects
            .iter()
            .map(|o| o.segment.as_ref().and_then(|s| s.mask.as_ref()))
            .collect()
    }
}

/// A result as every front end prints it (`pali … --json`, `pali serve`, the C library): the
/// result's JSON plus this process's peak memory (`peak_rss_mb`).
pub fn to_json(result: &impl serde::Serialize) -> serde_json::Value {
    let mut obj = serde_json::to_value(result).expect("results serialize");
    obj["peak_rss_mb"] = serde_json::json!(crate::peak_rss_mb());
    obj
}
