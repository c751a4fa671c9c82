//! The structured answers: `<loc>` boxes ([`parse_detections`]) and `<loc>` + `<seg>`
//! objects ([`parse_segments`]) in the original image's pixels, their warnings, and each
//! box's score from its tokens' log-probabilities.

/// `<loc>` tokens per axis: `<loc0000>` … `<loc1023>`.
pub const LOC_BINS: u16 = 1024;
/// Entries of the segmentation codebook: `<seg000>` … `<seg127>`.
pub const SEG_CODES: u16 = 128;
/// `<seg>` tokens per segmented object (a 4×4 grid, row-major).
pub const SEG_TOKENS: usize = 16;

/// One detected object: a box in the ORIGINAL image's pixel coordinates.
///
/// The model answers `<locY1><locX1><locY2><locX2> label`: (y_min, x_min, y_max, x_max) as
/// bins 0..=1023 of the squashed square image it saw. Because preprocessing squashes (it does
/// not crop or pad), each axis maps on its own: `x = bin / 1023 · width`,
/// `y = bin / 1023 · height` (big_vision's evaluator, spec §7.1 / D9; Google's demo Space
/// divides by 1024 instead, ≤ 0.1 % of the image size apart). So `<loc1023>` is the far edge.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionBox {
    /// The label the model wrote after the box (trimmed; may be empty, contain spaces or any
    /// Unicode).
    pub label: String,
    /// Left edge, pixels of the original image.
    pub x1: f32,
    /// Top edge, pixels of the original image.
    pub y1: f32,
    /// Right edge (exclusive, like the image width), pixels of the original image.
    pub x2: f32,
    /// Bottom edge (exclusive, like the image height), pixels of the original image.
    pub y2: f32,
    /// Model confidence, if the caller computed one (the parser leaves it `None`; see
    /// `score_boxes`).
    pub score: Option<f32>,
    /// The raw bins in the model's order: `[y1, x1, y2, x2]`, each 0..=1023.
    pub loc: [u16; 4],
}

impl DetectionBox {
    /// A box from raw bins `[y1, x1, y2, x2]` for an image of `width` × `height` pixels.
    pub fn from_loc(loc: [u16; 4], label: impl Into<String>, width: u32, height: u32) -> Self {
        let [x1, y1, x2, y2] = loc_to_pixels(loc, width, height);
        DetectionBox {
            label: label.into(),
            x1,
            y1,
            x2,
            y2,
            score: None,
            loc,
        }
    }

    /// `[x1, y1, x2, y2]` in pixels.
    pub fn rect(&self) -> [f32; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }
}

/// Maps bins `[y1, x1, y2, x2]` (0..=1023 on the squashed square image) to
/// `[x1, y1, x2, y2]` in pixels of a `width` × `height` original: `bin / 1023 · size`.
pub(crate) fn loc_to_pixels(loc: [u16; 4], width: u32, height: u32) -> [f32; 4] {
    let max = f64::from(LOC_BINS - 1);
    let s = |bin: u16, size: u32| (f64::from(bin) / max * f64::from(size)) as f32;
    [
        s(loc[1], width),
        s(loc[0], height),
        s(loc[3], width),
        s(loc[2], height),
    ]
}

/// The boxes parsed from a `detect …` answer, and what was skipped or ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detections {
    /// Valid boxes in the order the model wrote them (repeats kept).
    pub objects: Vec<DetectionBox>,
    /// One line per skipped object or ignored piece of text.
    pub warnings: Vec<String>,
}

/// Sets each box's score to the geometric mean of the model's probabilities for its four
/// loc tokens: how sure the model was of where the box is. `tokens` and `logprobs` are the
/// generation's tokens and their log-probabilities ([`crate::Generation::token_logprobs`]),
/// `loc_token` the id of `<loc0000>`. Boxes are matched in order to the next run of four
/// consecutive loc tokens with their bins, so skipped malformed groups do not shift scores;
/// a box with no such run keeps `None`.
pub(crate) fn score_boxes<'a>(
    boxes: impl IntoIterator<Item = &'a mut DetectionBox>,
    tokens: &[u32],
    logprobs: &[f32],
    loc_token: u32,
) {
    if tokens.len() != logprobs.len() {
        return;
    }
    let bin = |t: u32| {
        t.checked_sub(loc_token)
            .filter(|&b| b < u32::from(LOC_BINS))
            .map(|b| b as u16)
    };
    let mut next = 0;
    for b in boxes {
        let found = (next..tokens.len().saturating_sub(3))
            .find(|&i| (0..4).all(|k| bin(tokens[i + k]) == Some(b.loc[k])));
        if let Some(i) = found {
            let mean = logprobs[i..i + 4].iter().sum::<f32>() / 4.0;
            b.score = Some(mean.exp());
            next = i + 4;
        }
    }
}

/// One segmented object: its box and the 16 codebook indices of its mask.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentObject {
    /// The box (and the label, in `bbox.label`).
    pub bbox: DetectionBox,
    /// The `<segNNN>` codes (0..=127), a 4×4 grid in row-major order, for the VQ-VAE decoder.
    pub codes: [u8; SEG_TOKENS],
}

impl SegmentObject {
    /// The label the model wrote.
    pub fn label(&self) -> &str {
        &self.bbox.label
    }
}

/// The objects parsed from a `segment …` answer, and what was skipped or ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Segments {
    /// Valid objects in the order the model wrote them.
    pub objects: Vec<SegmentObject>,
    /// One line per skipped object or ignored piece of text.
    pub warnings: Vec<String>,
}

/// Parses a `detect …` answer into boxes in the original image's pixels (see
/// [`DetectionBox`] for the coordinate convention).
///
/// Grammar: objects `<locY1><locX1><locY2><locX2> label` separated by `;`; whitespace
/// anywhere is allowed; `<seg>` tokens after the box (a `segment` answer) are ignored. A new
/// `<loc>` run after a label also starts a new object (a missing `;`). The parser never fails
/// and never panics; instead:
/// - an object without exactly 4 `<loc>` tokens (truncated, or extra), or with a malformed
///   `<loc…>`/`<seg…>` token (`<loc12>`, `<loc2000>`, a cut-off `<loc`), is skipped with a
///   warning;
/// - an inverted box (y2 < y1 or x2 < x1) is skipped with a warning, and so is an empty one
///   (y2 == y1 or x2 == x1): big_vision's evaluator counts a box as valid only if y2 > y1 and
///   x2 > x1 (spec §7.1), and a zero-area box cannot be drawn;
/// - a box without a label is kept (label `""`) with a warning;
/// - repeated objects are all kept, in order;
/// - text outside any object (before the first box, or a part without `<loc>` tokens) is
///   ignored with a warning, except an empty answer or a bare `none`, which mean "nothing
///   found" and give no objects and no warnings.
pub fn parse_detections(text: &str, image_width: u32, image_height: u32) -> Detections {
    let (raw, mut warnings) = group(text);
    let objects = raw
        .iter()
        .enumerate()
        .filter_map(|(i, o)| check(o, i + 1, false, image_width, image_height, &mut warnings))
        .map(|(b, _)| b)
        .collect();
    Detections { objects, warnings }
}

/// Parses a `segment …` answer: per object 4 `<loc>` tokens, 16 `<segNNN>` tokens, the label;
/// objects separated by `;`. The same rules as [`parse_detections`], and an object without
/// exactly 16 `<seg>` tokens (e.g. truncated by `-n`) is skipped with a warning.
pub fn parse_segments(text: &str, image_width: u32, image_height: u32) -> Segments {
    let (raw, mut warnings) = group(text);
    let objects = raw
        .iter()
        .enumerate()
        .filter_map(|(i, o)| check(o, i + 1, true, image_width, image_height, &mut warnings))
        .map(|(bbox, codes)| SegmentObject { bbox, codes })
        .collect();
    Segments { objects, warnings }
}

/// A lexical piece of a structured answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Item<'a> {
    Loc(u16),
    Seg(u8),
    Sep,
    Text(&'a str),
    /// Something that starts like `<loc`/`<seg` but is not a valid token.
    Bad(&'a str),
}

/// Splits text into `<locNNNN>`, `<segNNN>`, `;` and the text between.
fn lex(text: &str) -> Vec<Item<'_>> {
    let bytes = text.as_bytes();
    let mut items = Vec::new();
    let (mut i, mut start) = (0, 0);
    // `<` and `;` are ASCII, so every index where we cut is a char boundary.
    while i < bytes.len() {
        let special = match bytes[i] {
            b';' => Some((Item::Sep, 1)),
            b'<' => special_token(&text[i..]),
            _ => None,
        };
        match special {
            Some((item, len)) => {
                if start < i {
                    items.push(Item::Text(&text[start..i]));
                }
                items.push(item);
                i += len;
                start = i;
            }
            None => i += 1,
        }
    }
    if start < bytes.len() {
        items.push(Item::Text(&text[start..]));
    }
    items
}

/// Recognises `<locNNNN>` (0..=1023), `<segNNN>` (0..=127), or a malformed token starting
/// with `<loc`/`<seg` (then its ASCII-alphanumeric run and a `>` if present). Returns the
/// item and its length in bytes.
fn special_token(s: &str) -> Option<(Item<'_>, usize)> {
    let (digits, max) = if s.starts_with("<loc") {
        (4, LOC_BINS - 1)
    } else if s.starts_with("<seg") {
        (3, SEG_CODES - 1)
    } else {
        return None;
    };
    let body = &s.as_bytes()[4..];
    let run = body
        .iter()
        .take(12)
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    let closed = body.get(run) == Some(&b'>');
    let len = 4 + run + usize::from(closed);
    let value = (closed && run == digits && body[..run].iter().all(u8::is_ascii_digit))
        .then(|| std::str::from_utf8(&body[..run]).ok()?.parse::<u16>().ok())
        .flatten()
        .filter(|&v| v <= max);
    let item = match value {
        Some(v) if digits == 4 => Item::Loc(v),
        Some(v) => Item::Seg(v as u8),
        None => Item::Bad(&s[..len]),
    };
    Some((item, len))
}

/// One object as written, before validation.
#[derive(Debug, Default)]
struct RawObject<'a> {
    locs: Vec<u16>,
    segs: Vec<u8>,
    label: String,
    bad: Vec<&'a str>,
}

impl RawObject<'_> {
    fn has_label(&self) -> bool {
        !self.label.trim().is_empty()
    }
}

/// Groups lexed items into objects; text outside objects becomes warnings.
fn group(text: &str) -> (Vec<RawObject<'_>>, Vec<String>) {
    let mut objects = Vec::new();
    let mut stray: Vec<&str> = Vec::new();
    let mut cur: Option<RawObject> = None;
    for item in lex(text) {
        // A token after a label starts the next object (the `;` was left out).
        let starts_new = match item {
            Item::Loc(_) => cur
                .as_ref()
                .is_some_and(|o| o.has_label() || !o.segs.is_empty()),
            Item::Seg(_) | Item::Bad(_) => cur.as_ref().is_some_and(RawObject::has_label),
            Item::Sep | Item::Text(_) => false,
        };
        if starts_new || item == Item::Sep {
            objects.extend(cur.take());
        }
        match item {
            Item::Loc(v) => cur.get_or_insert_with(Default::default).locs.push(v),
            Item::Seg(v) => cur.get_or_insert_with(Default::default).segs.push(v),
            Item::Bad(t) => cur.get_or_insert_with(Default::default).bad.push(t),
            Item::Text(t) => match cur.as_mut() {
                Some(o) => o.label.push_str(t),
                None if !t.trim().is_empty() => stray.push(t.trim()),
                None => {}
            },
            Item::Sep => {}
        }
    }
    objects.extend(cur);
    let mut warnings = Vec::new();
    let nothing =
        objects.is_empty() && matches!(stray.as_slice(), [t] if t.eq_ignore_ascii_case("none"));
    if !nothing {
        for t in stray {
            warnings.push(format!("ignored text outside any object: {:?}", shorten(t)));
        }
    }
    (objects, warnings)
}

/// Validates one object; `n` is its 1-based position in the answer.
fn check(
    o: &RawObject,
    n: usize,
    need_segs: bool,
    width: u32,
    height: u32,
    warnings: &mut Vec<String>,
) -> Option<(DetectionBox, [u8; SEG_TOKENS])> {
    let label = o.label.trim();
    let name = if label.is_empty() {
        "no label".to_string()
    } else {
        format!("{:?}", shorten(label))
    };
    let mut skip = |why: String| {
        warnings.push(format!("object {n} ({name}): {why}; skipped"));
        None
    };
    if let Some(bad) = o.bad.first() {
        return skip(format!("malformed token {bad:?}"));
    }
    let Ok(loc) = <[u16; 4]>::try_from(o.locs.as_slice()) else {
        return skip(format!("{} <loc> tokens instead of 4", o.locs.len()));
    };
    let [y1, x1, y2, x2] = loc;
    if y2 < y1 || x2 < x1 {
        return skip(format!(
            "inverted box (y {y1}..{y2}, x {x1}..{x2} in <loc> bins)"
        ));
    }
    if y2 == y1 || x2 == x1 {
        return skip(format!(
            "empty box (y {y1}..{y2}, x {x1}..{x2} in <loc> bins)"
        ));
    }
    let mut codes = [0u8; SEG_TOKENS];
    if need_segs {
        if o.segs.len() != SEG_TOKENS {
            return skip(format!(
                "{} <seg> tokens instead of {SEG_TOKENS}",
                o.segs.len()
            ));
        }
        codes.copy_from_slice(&o.segs);
    }
    if label.is_empty() {
        warnings.push(format!("object {n}: no label after the box; kept"));
    }
    Some((DetectionBox::from_loc(loc, label, width, height), codes))
}

/// At most 60 characters of `s`, with `…` when cut.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(v: impl AsRef<[u16]>) -> String {
        v.as_ref().iter().map(|b| format!("<loc{b:04}>")).collect()
    }

    fn segs(n: usize) -> String {
        (0..n).map(|i| format!("<seg{:03}>", i * 7 % 128)).collect()
    }

    fn close(a: [f32; 4], b: [f32; 4]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3)
    }

    #[test]
    fn full_range_box_covers_a_non_square_image() {
        let d = parse_detections(&format!("{} cat", loc([0, 0, 1023, 1023])), 640, 480);
        assert_eq!(d.warnings, Vec::<String>::new());
        assert_eq!(d.objects.len(), 1);
        let b = &d.objects[0];
        assert_eq!(b.label, "cat");
        assert_eq!(b.rect(), [0.0, 0.0, 640.0, 480.0]);
        assert_eq!(b.loc, [0, 0, 1023, 1023]);
        assert_eq!(b.score, None);
    }

    #[test]
    fn mid_box_maps_each_axis_by_its_own_size() {
        // (ymin, xmin, ymax, xmax) = (256, 512, 768, 900) on 640 wide × 480 high.
        let d = parse_detections(&format!("{} dog", loc([256, 512, 768, 900])), 640, 480);
        let b = &d.objects[0];
        let want = [
            512.0 / 1023.0 * 640.0, // 320.3128
            256.0 / 1023.0 * 480.0, // 120.1173
            900.0 / 1023.0 * 640.0, // 563.0499
            768.0 / 1023.0 * 480.0, // 360.3519
        ];
        assert!(close(b.rect(), want), "{:?}", b.rect());
        assert!(close(b.rect(), [320.3128, 120.1173, 563.0499, 360.3519]));
        // Transposed image: the same bins give transposed pixels.
        let t = parse_detections(&format!("{} dog", loc([512, 256, 900, 768])), 480, 640);
        let r = t.objects[0].rect();
        assert!(close([r[1], r[0], r[3], r[2]], want));
    }

    #[test]
    fn several_objects_repeats_and_labels_with_spaces_or_unicode() {
        let text = format!(
            "{} cat ; {} hot dog;{} cat ; {}  Straßenbahn 🚋  ",
            loc([10, 20, 30, 40]),
            loc([1, 2, 3, 4]),
            loc([10, 20, 30, 40]),
            loc([100, 100, 200, 300])
        );
        let d = parse_detections(&text, 100, 100);
        assert_eq!(d.warnings, Vec::<String>::new());
        let labels: Vec<&str> = d.objects.iter().map(|o| o.label.as_str()).collect();
        assert_eq!(labels, ["cat", "hot dog", "cat", "Straßenbahn 🚋"]);
        assert_eq!(d.objects[0], d.objects[2]);
        // A missing `;` between objects: the next <loc> run starts a new one.
        let d = parse_detections(
            &format!("{} a {} b", loc([1, 1, 2, 2]), loc([3, 3, 4, 4])),
            9,
            9,
        );
        assert_eq!(d.objects.len(), 2);
        assert_eq!(d.objects[1].label, "b");
    }

    #[test]
    fn empty_and_none_answers_have_no_objects_and_no_warnings() {
        for text in ["", "   ", "none", " None\n"] {
            let d = parse_detections(text, 10, 10);
            assert_eq!(d, Detections::default(), "{text:?}");
            assert_eq!(parse_segments(text, 10, 10), Segments::default());
        }
    }

    #[test]
    fn text_around_the_tokens_is_ignored_with_a_warning() {
        let d = parse_detections(
            &format!("Sure! Here: {} cat ; and more text", loc([0, 0, 512, 512])),
            1023,
            1023,
        );
        assert_eq!(d.objects.len(), 1);
        assert_eq!(d.objects[0].label, "cat");
        assert_eq!(d.objects[0].rect(), [0.0, 0.0, 512.0, 512.0]);
        assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
        assert!(d.warnings[0].contains("Sure! Here:"));
        assert!(d.warnings[1].contains("and more text"));
        // A plain-text answer (e.g. a caption from a model that cannot detect).
        let d = parse_detections("a cat on a mat", 10, 10);
        assert!(d.objects.is_empty());
        assert_eq!(d.warnings.len(), 1);
    }

    #[test]
    fn truncated_and_malformed_groups_are_skipped_with_warnings() {
        let good = loc([1, 2, 3, 4]);
        for (bad, why) in [
            (
                "<loc0001><loc0002><loc0003> cat".to_string(),
                "3 <loc> tokens",
            ),
            ("<loc0001> cat".to_string(), "1 <loc> tokens"),
            (
                format!("{}<loc0005> cat", loc([1, 2, 3, 4])),
                "5 <loc> tokens",
            ),
            (
                "<loc0001><loc0002><loc0003><loc12> cat".into(),
                "malformed token \"<loc12>\"",
            ),
            (
                "<loc0001><loc0002><loc0003><loc2000> cat".into(),
                "\"<loc2000>\"",
            ),
            (
                "<loc0001><loc0002><loc0003><locabcd> cat".into(),
                "\"<locabcd>\"",
            ),
            (
                "<loc0001><loc0002><loc0003><loc0004 cat".into(),
                "\"<loc0004\"",
            ),
            ("<loc0001><loc0002><loc0003><loc".into(), "\"<loc\""),
            ("<loc0001><loc0002><loc00".into(), "\"<loc00\""),
        ] {
            let d = parse_detections(&format!("{good} ok ; {bad}"), 100, 50);
            assert_eq!(d.objects.len(), 1, "{bad}");
            assert_eq!(d.objects[0].label, "ok");
            assert_eq!(d.warnings.len(), 1, "{bad}: {:?}", d.warnings);
            assert!(
                d.warnings[0].starts_with("object 2 ") && d.warnings[0].contains(why),
                "{bad}: {:?}",
                d.warnings
            );
            assert!(d.warnings[0].ends_with("skipped"));
        }
        // Cut off right after the first object's label and a `;`.
        let d = parse_detections(&format!("{good} ok ;"), 100, 50);
        assert_eq!((d.objects.len(), d.warnings.len()), (1, 0));
        // Cut off inside the second object's first token.
        let d = parse_detections(&format!("{good} ok ; <lo"), 100, 50);
        assert_eq!(d.objects.len(), 1);
        assert!(d.warnings[0].contains("<lo"), "{:?}", d.warnings);
    }

    #[test]
    fn inverted_and_empty_boxes_are_skipped() {
        for (l, why) in [
            ([30, 0, 10, 100], "inverted"),
            ([0, 50, 100, 40], "inverted"),
            ([10, 0, 10, 100], "empty"),
            ([0, 7, 100, 7], "empty"),
        ] {
            let d = parse_detections(&format!("{} cat", loc(l)), 100, 100);
            assert!(d.objects.is_empty(), "{l:?}");
            assert!(d.warnings[0].contains(why), "{:?}", d.warnings);
        }
        // The smallest valid box: one bin each way.
        assert_eq!(parse_detections(&loc([5, 5, 6, 6]), 9, 9).objects.len(), 1);
    }

    #[test]
    fn a_box_without_label_is_kept_with_a_warning() {
        let d = parse_detections(
            &format!("{} ; {}", loc([0, 0, 9, 9]), loc([1, 1, 9, 9])),
            9,
            9,
        );
        assert_eq!(d.objects.len(), 2);
        assert_eq!(d.objects[0].label, "");
        assert_eq!(d.warnings.len(), 2);
        assert!(d.warnings[0].contains("no label"));
    }

    #[test]
    fn segmentation_answers_give_boxes_and_16_codes() {
        let text = format!(
            "{}{} cat ; {}{} big dog",
            loc([0, 0, 1023, 1023]),
            segs(16),
            loc([256, 512, 768, 900]),
            segs(16)
        );
        let s = parse_segments(&text, 640, 480);
        assert_eq!(s.warnings, Vec::<String>::new());
        assert_eq!(s.objects.len(), 2);
        assert_eq!(s.objects[0].label(), "cat");
        assert_eq!(s.objects[1].label(), "big dog");
        assert_eq!(s.objects[0].bbox.rect(), [0.0, 0.0, 640.0, 480.0]);
        let want: Vec<u8> = (0..16).map(|i| (i * 7 % 128) as u8).collect();
        assert_eq!(s.objects[1].codes.to_vec(), want);
        assert!(close(
            s.objects[1].bbox.rect(),
            [320.3128, 120.1173, 563.0499, 360.3519]
        ));
        // Detection parsing of the same answer keeps the boxes and ignores the codes.
        let d = parse_detections(&text, 640, 480);
        assert_eq!(d.objects.len(), 2);
        assert!(d.warnings.is_empty());
    }

    #[test]
    fn segmentation_with_missing_or_bad_codes_is_skipped() {
        let ok = format!("{}{} ok", loc([0, 0, 9, 9]), segs(16));
        for (bad, why) in [
            (
                format!("{}{} cat", loc([0, 0, 9, 9]), segs(15)),
                "15 <seg> tokens",
            ),
            (
                format!("{}{} cat", loc([0, 0, 9, 9]), segs(17)),
                "17 <seg> tokens",
            ),
            (format!("{} cat", loc([0, 0, 9, 9])), "0 <seg> tokens"),
            (
                format!("{}{}<seg128> cat", loc([0, 0, 9, 9]), segs(15)),
                "\"<seg128>\"",
            ),
            (
                format!("{}{}<seg01", loc([0, 0, 9, 9]), segs(10)),
                "\"<seg01\"",
            ),
            (
                format!("{}{} cat", loc([0, 0, 9]), segs(16)),
                "3 <loc> tokens",
            ),
        ] {
            let s = parse_segments(&format!("{ok} ; {bad}"), 640, 480);
            assert_eq!(s.objects.len(), 1, "{bad}");
            assert_eq!(s.warnings.len(), 1, "{bad}: {:?}", s.warnings);
            assert!(s.warnings[0].contains(why), "{bad}: {:?}", s.warnings);
        }
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let samples = [
            "<",
            "<l",
            "<loc",
            "<seg",
            "<loc>",
            "<seg>",
            ";;;;",
            "<loc0001;>",
            "<<loc0001>>",
            "é<loc0001>ü<loc0002>€<loc0003>😀<loc0004>ß",
            "<loc0001><seg001><loc0002>",
            "<seg001><seg002> x",
            "\u{0}<loc9999>",
            "<locé>",
            "<seg12é",
        ];
        for s in samples {
            let _ = parse_detections(s, 0, 0);
            let _ = parse_segments(s, u32::MAX, 1);
        }
        // Every prefix of a valid answer (a generation cut at any byte).
        let text = format!(
            "{}{} Straßenbahn ; {}{} 🚋",
            loc([1, 2, 3, 4]),
            segs(16),
            loc([5, 6, 7, 8]),
            segs(16)
        );
        for (i, _) in text.char_indices() {
            let _ = parse_detections(&text[..i], 7, 5);
            let _ = parse_segments(&text[..i], 7, 5);
        }
    }

    #[test]
    fn scores_follow_the_boxes_loc_tokens() {
        let loc = 1000u32;
        let t = |bin: u32| loc + bin;
        // "<loc10><loc20><loc30><loc40> a ; <loc1><loc2> b ; <loc5><loc6><loc7><loc8> c"
        // The middle group is truncated (the parser skips it); label tokens are 7 and 8.
        let tokens = [
            t(10),
            t(20),
            t(30),
            t(40),
            7,
            8,
            t(1),
            t(2),
            7,
            8,
            t(5),
            t(6),
            t(7),
            t(8),
            7,
        ];
        let lp = [
            -0.1, -0.2, -0.3, -0.4, -5.0, -5.0, -9.0, -9.0, -5.0, -5.0, -1.0, -1.0, -1.0, -1.0,
            -5.0,
        ];
        let mut boxes = vec![
            DetectionBox::from_loc([10, 20, 30, 40], "a", 100, 100),
            DetectionBox::from_loc([5, 6, 7, 8], "c", 100, 100),
            DetectionBox::from_loc([900, 901, 902, 903], "never generated", 100, 100),
        ];
        score_boxes(&mut boxes, &tokens, &lp, loc);
        assert!((boxes[0].score.unwrap() - (-0.25f32).exp()).abs() < 1e-6);
        assert!((boxes[1].score.unwrap() - (-1.0f32).exp()).abs() < 1e-6);
        assert_eq!(boxes[2].score, None);
        // Mismatched lengths: nothing is scored.
        let mut b = vec![DetectionBox::from_loc([10, 20, 30, 40], "a", 1, 1)];
        score_boxes(&mut b, &tokens, &lp[..3], loc);
        assert_eq!(b[0].score, None);
    }
}
