//! PaliGemma's task prompts: the text between `<bos>` and the `"\n"` separator, in the
//! format the checkpoints were trained on (big_vision's transfer configs).

/// A task the model was trained on, or a raw prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// `caption <lang>` (short) or `describe <lang>` (long; pt checkpoints).
    Caption {
        /// Language code (`en`, `de`, …).
        lang: String,
        /// Ask for a long description.
        long: bool,
    },
    /// `answer <lang> <question>`.
    Ask {
        #[allow(missing_docs)]
        lang: String,
        #[allow(missing_docs)]
        question: String,
    },
    /// `detect a ; b`.
    Detect(Vec<String>),
    /// `segment a ; b`.
    Segment(Vec<String>),
    /// `ocr`.
    Ocr,
    /// Any prompt text as is.
    Raw(String),
}

impl Task {
    /// Refuses a task that cannot run: a detect / segment task without a single object name.
    pub fn check(&self) -> crate::Result<()> {
        match self {
            Task::Detect(objects) | Task::Segment(objects) => check_objects(objects),
            _ => Ok(()),
        }
    }

    /// The prompt text.
    pub fn prompt(&self) -> String {
        match self {
            Task::Caption { lang, long: false } => format!("caption {lang}"),
            Task::Caption { lang, long: true } => format!("describe {lang}"),
            Task::Ask { lang, question } => format!("answer {lang} {}", question.trim()),
            Task::Detect(objs) => format!("detect {}", join_objects(objs)),
            Task::Segment(objs) => format!("segment {}", join_objects(objs)),
            Task::Ocr => "ocr".into(),
            Task::Raw(p) => p.clone(),
        }
    }
}

/// Refuses a detect / segment request without a single object name (each entry may hold
/// several, separated by `;`).
pub(crate) fn check_objects(objects: &[impl AsRef<str>]) -> crate::Result<()> {
    if objects
        .iter()
        .flat_map(|o| o.as_ref().split(';'))
        .all(|o| o.trim().is_empty())
    {
        return Err(crate::Error::Prompt(
            "no object names given (e.g. \"cat ; dog\")".into(),
        ));
    }
    Ok(())
}

/// Joins object names with PaliGemma's ` ; ` separator (accepts `cat;dog` or `cat ; dog`).
fn join_objects(objs: &[String]) -> String {
    objs.iter()
        .flat_map(|o| o.split(';'))
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .collect::<Vec<_>>()
        .join(" ; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_match_the_training_format() {
        assert_eq!(
            Task::Caption {
                lang: "en".into(),
                long: false
            }
            .prompt(),
            "caption en"
        );
        assert_eq!(
            Task::Caption {
                lang: "de".into(),
                long: true
            }
            .prompt(),
            "describe de"
        );
        assert_eq!(
            Task::Ask {
                lang: "en".into(),
                question: " how many? ".into()
            }
            .prompt(),
            "answer en how many?"
        );
        assert_eq!(
            Task::Detect(vec!["cat;dog".into(), " bird ".into()]).prompt(),
            "detect cat ; dog ; bird"
        );
        assert_eq!(Task::Ocr.prompt(), "ocr");
    }
}
