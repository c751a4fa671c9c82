//! The tasks as library calls: [`Model::caption`], [`Model::ask`], [`Model::answer`] (any
//! text task), [`Model::detect`] and [`Model::segment`]. Each returns one serializable
//! result, [`TextAnswer`] or [`Located`], whose JSON is what `pali … --json` prints,
//! `pali serve` returns and the C library hands out: every front end runs this code.

use crate::preprocess::RgbImage;
use crate::prompt::{self, DetectionBox, Task, SEG_TOKENS};
use crate::vae::{mask_box, Mask};
use crate::{EncodedImage, Error, FinishReason, GenerateOptions, Generation, Model, Result};
use serde::ser::{SerializeMap, Serializer};

/// An image's size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImageSize {
    #[allow(missing_docs)]
    pub width: u32,
    #[allow(missing_docs)]
    pub height: u32,
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
    pub timings: crate::Timings,
}

impl From<Generation> for TextAnswer {
    fn from(g: Generation) -> Self {
        TextAnswer {
            text: g.text,
            tokens: g.tokens,
            finish_reason: g.finish_reason,
            timings: g.timings,
        }
    }
}

/// The objects found by [`Model::detect`] or [`Model::segment`], in the original image's
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
    pub timings: crate::Timings,
    /// Skipped objects, ignored text, masks not decoded, a cut answer: one line each.
    pub warnings: Vec<String>,
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

/// Refuses a detect / segment request without a single object name (each entry may hold
/// several, separated by `;`).
pub fn check_objects(objects: &[impl AsRef<str>]) -> Result<()> {
    if objects
        .iter()
        .flat_map(|o| o.as_ref().split(';'))
        .all(|o| o.trim().is_empty())
    {
        return Err(Error::Prompt(
            "no object names given (e.g. \"cat ; dog\")".into(),
        ));
    }
    Ok(())
}

impl Model {
    /// Caption an image (`caption <lang>`).
    pub fn caption(
        &self,
        image: &RgbImage,
        lang: &str,
        opts: &GenerateOptions,
    ) -> Result<TextAnswer> {
        let task = Task::Caption {
            lang: lang.into(),
            long: false,
        };
        self.answer(image, &task, opts, &mut |_| {})
    }

    /// Answer a question about an image (`answer <lang> <question>`).
    pub fn ask(
        &self,
        image: &RgbImage,
        lang: &str,
        question: &str,
        opts: &GenerateOptions,
    ) -> Result<TextAnswer> {
        let task = Task::Ask {
            lang: lang.into(),
            question: question.into(),
        };
        self.answer(image, &task, opts, &mut |_| {})
    }

    /// Runs any task as text (captions, questions, OCR, a raw prompt; a detect prompt gives
    /// its raw `<loc>` answer); `on_text` receives the text as it is generated.
    pub fn answer(
        &self,
        image: &RgbImage,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<TextAnswer> {
        self.answer_encoded(self.encode_image(image)?, task, opts, on_text)
    }

    /// [`Model::answer`] on an image already through the vision tower
    /// ([`Model::encode_image`]).
    pub fn answer_encoded(
        &self,
        image: EncodedImage,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<TextAnswer> {
        Ok(self
            .generate_encoded(image, &task.prompt(), opts, on_text)?
            .into())
    }

    /// Finds objects (`detect a ; b`): boxes in the image's pixels, each scored by the
    /// model's confidence in its four `<loc>` tokens. Object names may also contain `;`.
    pub fn detect(
        &self,
        image: &RgbImage,
        objects: &[impl AsRef<str>],
        opts: &GenerateOptions,
    ) -> Result<Located> {
        self.locate(image, objects, false, opts)
    }

    /// Segments objects (`segment a ; b`): boxes, mask codes and, when the model was loaded
    /// with a mask decoder ([`crate::ModelPaths::mask_decoder`]), each object's mask.
    pub fn segment(
        &self,
        image: &RgbImage,
        objects: &[impl AsRef<str>],
        opts: &GenerateOptions,
    ) -> Result<Located> {
        self.locate(image, objects, true, opts)
    }

    fn locate(
        &self,
        image: &RgbImage,
        objects: &[impl AsRef<str>],
        segment: bool,
        opts: &GenerateOptions,
    ) -> Result<Located> {
        check_objects(objects)?;
        let names: Vec<String> = objects.iter().map(|o| o.as_ref().to_string()).collect();
        let task = if segment {
            Task::Segment(names)
        } else {
            Task::Detect(names)
        };
        // Scores need each token's log-probability.
        let opts = GenerateOptions {
            logprobs: true,
            ..opts.clone()
        };
        let g = self.generate(image, &task.prompt(), &opts, &mut |_| {})?;
        let size = ImageSize {
            width: image.width,
            height: image.height,
        };
        let (mut objects, mut warnings) = if segment {
            self.segment_objects(&g.text, size)?
        } else {
            let d = prompt::parse_detections(&g.text, size.width, size.height);
            let objects = d
                .objects
                .into_iter()
                .map(|bbox| LocatedObject {
                    bbox,
                    segment: None,
                })
                .collect();
            (objects, d.warnings)
        };
        if let Some(loc) = self.loc_token() {
            let boxes = objects.iter_mut().map(|o| &mut o.bbox);
            prompt::score_boxes(boxes, &g.tokens, &g.token_logprobs, loc);
        }
        if g.finish_reason == FinishReason::Length {
            warnings.push(format!(
                "the answer stopped at the token limit ({} tokens, -n / max_tokens): raise it to get every object",
                g.tokens.len()
            ));
        }
        Ok(Located {
            objects,
            image: size,
            text: g.text,
            tokens: g.tokens,
            finish_reason: g.finish_reason,
            timings: g.timings,
            warnings,
        })
    }

    /// Parses a `segment` answer and decodes each object's mask if there is a mask decoder.
    fn segment_objects(
        &self,
        text: &str,
        size: ImageSize,
    ) -> Result<(Vec<LocatedObject>, Vec<String>)> {
        let (w, h) = (size.width, size.height);
        let mut parsed = prompt::parse_segments(text, w, h);
        let mut objects = Vec::with_capacity(parsed.objects.len());
        for (i, o) in parsed.objects.iter().enumerate() {
            let mask = self
                .with_mask_decoder(|vae| vae.mask(o, w, h))
                .transpose()?;
            if mask.as_ref().is_some_and(|m| m.area() == 0) {
                let [x1, y1, x2, y2] = mask_box(o.bbox.loc, w, h);
                parsed.warnings.push(format!(
                    "objects[{i}] ({:?}): empty mask (box {x1},{y1},{x2},{y2} in whole pixels)",
                    o.label()
                ));
            }
            objects.push(LocatedObject {
                bbox: o.bbox.clone(),
                segment: Some(ObjectMask {
                    codes: o.codes,
                    mask,
                }),
            });
        }
        if !self.has_mask_decoder() {
            parsed
                .warnings
                .push("no VQ-VAE decoder loaded (--vae): masks not decoded".into());
        }
        Ok((objects, parsed.warnings))
    }
}
