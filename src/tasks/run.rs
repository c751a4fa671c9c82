//! The tasks as library calls on a [`Model`]: [`Model::run`], the one call every front end
//! makes (any [`Task`], text or located objects), and the conveniences beside it:
//! [`Model::caption`], [`Model::ask`], [`Model::answer`] (any task as text),
//! [`Model::detect`], [`Model::segment`] and [`Model::locate`].

use super::parse;
use super::prompt::Task;
use super::result::{Answer, Located, LocatedObject, ObjectMask, TextAnswer};
use crate::image::ImageSize;
use crate::image::{Clip, ClipPlan, RgbImage};
use crate::mask::mask_box;
use crate::model::{EncodedImage, Model};
use crate::options::{FinishReason, GenerateOptions};
use crate::{Error, Result};

/// The object names of a detect / segment call, as the task holds them.
fn names(objects: &[impl AsRef<str>]) -> Vec<String> {
    objects.iter().map(|o| o.as_ref().to_string()).collect()
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

    /// The one top-level call: runs `task` on one or more images (several: one prompt about
    /// all of them, their tokens in order, as HF's processor lays out a list of images and
    /// big_vision a clip's frames) — detect and segment tasks as located objects
    /// ([`Answer::Located`]), every other task as text ([`Answer::Text`], streamed to
    /// `on_text` as it is generated). What `pali … --json`, `pali serve` and the C
    /// library's `pali_run` print is this answer's JSON ([`crate::tasks::to_json`]).
    ///
    /// Refused before any image is encoded: a task that cannot run, bad options, a prompt
    /// that does not fit the context ([`Model::check_context`]), and detect / segment on
    /// images of different sizes (the boxes would have no one frame).
    pub fn run(
        &self,
        images: &[RgbImage],
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        self.check_images(images, task, opts)?;
        self.run_encoded(
            self.encode_images_with(images, &opts.lora)?,
            task,
            opts,
            on_text,
        )
    }

    /// What [`Model::run`] refuses before encoding anything.
    fn check_images(&self, images: &[RgbImage], task: &Task, opts: &GenerateOptions) -> Result<()> {
        task.check()?;
        self.check_options(opts)?;
        if let (Task::Detect(_) | Task::Segment(_), [first, rest @ ..]) = (task, images) {
            if let Some(other) = rest.iter().find(|i| i.size() != first.size()) {
                return Err(Error::Prompt(format!(
                    "detect and segment on several images need them of one size (boxes are in \
                     one image's pixels): {}x{} and {}x{}",
                    first.width, first.height, other.width, other.height
                )));
            }
        }
        self.check_context(images.len(), &task.prompt(), opts)
    }

    /// [`Model::run`] on a clip: its frames as one prompt, and its frame indices and
    /// warnings (a short clip's repeated frames) in the answer. The frames' pixels are freed
    /// once they are encoded, before the decoder runs.
    pub fn run_clip(
        &self,
        clip: Clip,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        self.check_images(&clip.frames, task, opts)?;
        let encoded = self.encode_images_with(&clip.frames, &opts.lora)?;
        let Clip {
            frames,
            indices,
            warnings,
            ..
        } = clip;
        drop(frames);
        let mut answer = self.run_encoded(encoded, task, opts, on_text)?;
        answer.set_clip(indices, warnings);
        Ok(answer)
    }

    /// [`Model::run_clip`] on a clip whose frames are chosen but not decoded yet: a task,
    /// options or K frames that cannot run (K × tokens per frame + the prompt over the
    /// context) are refused before any frame is decoded; then the frames are decoded and
    /// run. What a front end that receives a clip file calls.
    pub fn run_clip_plan(
        &self,
        plan: ClipPlan,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        task.check()?;
        self.check_options(opts)?;
        self.check_context(plan.indices.len(), &task.prompt(), opts)?;
        let clip = plan.decode(crate::MAX_IMAGE_PIXELS)?;
        self.run_clip(clip, task, opts, on_text)
    }

    /// [`Model::run`] on an image already through the vision tower
    /// ([`Model::encode_image_with`] with the same adapters); its features are freed once the
    /// prefix is built.
    pub fn run_encoded(
        &self,
        image: EncodedImage,
        task: &Task,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        task.check()?;
        let n_images = image.n_images;
        Ok(match task {
            Task::Detect(_) | Task::Segment(_) => {
                Answer::Located(self.locate_encoded(image, task, opts)?)
            }
            _ => {
                let g = self.generate_encoded(image, &task.prompt(), opts, on_text)?;
                Answer::Text(TextAnswer {
                    n_images,
                    ..g.into()
                })
            }
        })
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
        Ok(self.generate(image, &task.prompt(), opts, on_text)?.into())
    }

    /// Finds objects (`detect a ; b`): boxes in the image's pixels, each scored by the
    /// model's confidence in its four `<loc>` tokens. Object names may also contain `;`.
    pub fn detect(
        &self,
        image: &RgbImage,
        objects: &[impl AsRef<str>],
        opts: &GenerateOptions,
    ) -> Result<Located> {
        self.locate(image, &Task::Detect(names(objects)), opts)
    }

    /// Segments objects (`segment a ; b`): boxes, mask codes and, when the model was loaded
    /// with a mask decoder ([`crate::ModelPaths::mask_decoder`]), each object's mask.
    pub fn segment(
        &self,
        image: &RgbImage,
        objects: &[impl AsRef<str>],
        opts: &GenerateOptions,
    ) -> Result<Located> {
        self.locate(image, &Task::Segment(names(objects)), opts)
    }

    /// Runs a [`Task::Detect`] or [`Task::Segment`] (any other task is an
    /// [`Error::Prompt`]): the objects in the image's pixels.
    pub fn locate(&self, image: &RgbImage, task: &Task, opts: &GenerateOptions) -> Result<Located> {
        task.check()?;
        self.check_options(opts)?;
        self.locate_encoded(self.encode_image_with(image, &opts.lora)?, task, opts)
    }

    fn locate_encoded(
        &self,
        image: EncodedImage,
        task: &Task,
        opts: &GenerateOptions,
    ) -> Result<Located> {
        let segment = match task {
            Task::Detect(_) => false,
            Task::Segment(_) => true,
            other => {
                return Err(Error::Prompt(format!(
                    "{:?} is not a detect or segment task",
                    other.prompt()
                )))
            }
        };
        // Scores need each token's log-probability.
        let opts = GenerateOptions {
            logprobs: true,
            ..opts.clone()
        };
        let (size, n_images) = (image.size, image.n_images);
        let g = self.generate_encoded(image, &task.prompt(), &opts, &mut |_| {})?;
        let (mut objects, mut warnings) = if segment {
            self.segment_objects(&g.text, size)?
        } else {
            let d = parse::parse_detections(&g.text, size.width, size.height);
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
            parse::score_boxes(boxes, &g.tokens, &g.token_logprobs, loc);
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
            n_images,
            frames: Vec::new(),
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
        let mut parsed = parse::parse_segments(text, w, h);
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
