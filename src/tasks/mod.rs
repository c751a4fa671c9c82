//! Stage 4, the tasks: prompts ([`prompt`]), answer parsing ([`parse`]), the task calls on a
//! [`crate::Model`] (caption, ask, answer, detect, segment) and their results ([`result`]),
//! whose JSON every front end prints.

pub mod parse;
pub mod prompt;
pub mod result;
mod run;

pub use parse::{
    parse_detections, parse_segments, DetectionBox, Detections, SegmentObject, Segments,
};
pub use prompt::Task;
pub use result::{to_json, Answer, Located, LocatedObject, ObjectMask, TextAnswer};
