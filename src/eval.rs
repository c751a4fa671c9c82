//! Task metrics over a labelled image set (`pali eval`): exact match for captions and
//! answers, mean IoU and recall at IoU 0.5 for detection.
//!
//! A set is a JSON Lines file; each line is `{"image": "img.png", "prompt": "caption en",
//! "answer": "a red circle"}` with `image` relative to the file's folder. The task is the
//! prompt's first word (`caption`, `answer`, `detect`, …) unless the line names it with
//! `"task": "…"` (to report, say, `detect colour shape` apart from `detect shape`).

use crate::tasks::{parse_detections, DetectionBox};
use crate::{Error, GenerateOptions, Model, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One labelled example.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct EvalItem {
    /// Image path (relative to the set file's folder).
    pub image: PathBuf,
    /// Prompt text.
    pub prompt: String,
    /// Expected answer (for detection: the expected loc-token text).
    pub answer: String,
    /// Name the metrics are reported under (default: the prompt's first word).
    #[serde(default)]
    pub task: Option<String>,
}

/// Reads a JSON Lines set, resolving image paths against its folder.
pub fn read_set(path: &Path) -> Result<Vec<EvalItem>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let mut item: EvalItem = serde_json::from_str(l)
                .map_err(|e| Error::Io(format!("{}:{}: {e}", path.display(), i + 1)))?;
            item.image = dir.join(&item.image);
            Ok(item)
        })
        .collect()
}

/// Metrics of one task.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TaskMetrics {
    /// Examples.
    pub n: usize,
    /// Fraction of predictions equal to the answer (after trimming).
    pub exact_match: f64,
    /// Detection only: mean over expected boxes of the IoU with the best matching predicted
    /// box of the same label (0 when none).
    pub mean_iou: Option<f64>,
    /// Detection only: fraction of expected boxes matched at IoU ≥ 0.5.
    pub recall_at_50: Option<f64>,
}

/// Intersection over union of two boxes.
pub fn iou(a: &DetectionBox, b: &DetectionBox) -> f64 {
    let ix = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0) as f64;
    let iy = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0) as f64;
    let inter = ix * iy;
    let area = |d: &DetectionBox| ((d.x2 - d.x1).max(0.0) * (d.y2 - d.y1).max(0.0)) as f64;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// IoUs of each expected box with its best unused same-label prediction (greedy, in order).
pub(crate) fn match_boxes(expected: &[DetectionBox], predicted: &[DetectionBox]) -> Vec<f64> {
    let mut used = vec![false; predicted.len()];
    expected
        .iter()
        .map(|e| {
            let best = predicted
                .iter()
                .enumerate()
                .filter(|(i, p)| !used[*i] && p.label == e.label)
                .map(|(i, p)| (i, iou(e, p)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((i, v)) => {
                    used[i] = true;
                    v
                }
                None => 0.0,
            }
        })
        .collect()
}

/// Accumulates predictions per task.
#[derive(Debug, Default)]
pub(crate) struct Scorer {
    tasks: BTreeMap<String, (usize, usize, Vec<f64>)>,
}

impl Scorer {
    /// Records one prediction. Boxes are compared in a unit square (the model's frame).
    pub fn add(&mut self, item: &EvalItem, prediction: &str) {
        let first_word = item.prompt.split_whitespace().next().unwrap_or("");
        let task = item.task.clone().unwrap_or_else(|| first_word.to_string());
        let e = self.tasks.entry(task).or_default();
        e.0 += 1;
        if prediction.trim() == item.answer.trim() {
            e.1 += 1;
        }
        if first_word == "detect" {
            let want = parse_detections(&item.answer, 1, 1).objects;
            let got = parse_detections(prediction, 1, 1).objects;
            e.2.extend(match_boxes(&want, &got));
        }
    }

    /// Metrics per task.
    pub fn report(&self) -> BTreeMap<String, TaskMetrics> {
        self.tasks
            .iter()
            .map(|(task, (n, exact, ious))| {
                let det = !ious.is_empty();
                let m = TaskMetrics {
                    n: *n,
                    exact_match: *exact as f64 / (*n).max(1) as f64,
                    mean_iou: det.then(|| ious.iter().sum::<f64>() / ious.len() as f64),
                    recall_at_50: det.then(|| {
                        ious.iter().filter(|&&v| v >= 0.5).count() as f64 / ious.len() as f64
                    }),
                };
                (task.clone(), m)
            })
            .collect()
    }
}

/// Runs the model on every item (greedy) and scores the answers.
pub fn evaluate(
    model: &Model,
    items: &[EvalItem],
    opts: &GenerateOptions,
) -> Result<BTreeMap<String, TaskMetrics>> {
    let mut scorer = Scorer::default();
    for item in items {
        let img = crate::image::load_image(&item.image, crate::MAX_IMAGE_PIXELS)?;
        let g = model.generate(&img, &item.prompt, opts, &mut |_| {})?;
        scorer.add(item, &g.text);
    }
    Ok(scorer.report())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(prompt: &str, answer: &str) -> EvalItem {
        EvalItem {
            image: PathBuf::new(),
            prompt: prompt.into(),
            answer: answer.into(),
            task: None,
        }
    }

    #[test]
    fn exact_match_and_detection_metrics() {
        let mut s = Scorer::default();
        s.add(&item("caption en", "a red circle"), "a red circle");
        s.add(&item("caption en", "a red circle"), "a blue circle");
        // Expected one box [0, 0, 512, 512] bins ≈ quarter; predicted the same box shifted
        // by half its width: IoU = 1/3.
        let want = "<loc0000><loc0000><loc0512><loc0512> circle";
        s.add(
            &item("detect circle", want),
            "<loc0000><loc0256><loc0512><loc0768> circle",
        );
        s.add(&item("detect circle", want), want);
        s.add(
            &item("detect circle", want),
            "<loc0000><loc0000><loc0512><loc0512> square",
        );
        let r = s.report();
        assert_eq!(r["caption"].n, 2);
        assert!((r["caption"].exact_match - 0.5).abs() < 1e-9);
        let d = &r["detect"];
        assert_eq!(d.n, 3);
        let expected_iou = (1.0 / 3.0 + 1.0 + 0.0) / 3.0;
        assert!(
            (d.mean_iou.unwrap() - expected_iou).abs() < 1e-3,
            "{:?}",
            d.mean_iou
        );
        assert!((d.recall_at_50.unwrap() - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn each_expected_box_is_matched_once() {
        let b = |x1: f32, label: &str| DetectionBox {
            label: label.into(),
            x1,
            y1: 0.0,
            x2: x1 + 1.0,
            y2: 1.0,
            score: None,
            loc: [0; 4],
        };
        let want = [b(0.0, "a"), b(0.0, "a")];
        let got = [b(0.0, "a")];
        assert_eq!(match_boxes(&want, &got), vec![1.0, 0.0]);
    }
}
