//! Text -> token windows the model can read, with truncation or overlapping chunks.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::ModelError;

/// What to do with text longer than one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongText {
    Truncate,
    ChunkMax,
    ChunkMean,
}

/// One document, ready for the model.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Token windows, special tokens included, each at most the window length.
    pub windows: Vec<Vec<u32>>,
    /// Tokens of the text itself (special tokens excluded).
    pub token_count: usize,
    /// Part of the text was not read.
    pub truncated: bool,
}

impl Encoded {
    /// The text did not fit one window (it was truncated, or read in several).
    pub fn longer_than_window(&self) -> bool {
        self.truncated || self.windows.len() > 1
    }
}

pub struct TextEncoder {
    tokenizer: Tokenizer,
    /// Special tokens the tokenizer puts before and after a single text (e.g. `[CLS]`, `[SEP]`).
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    window: usize,
}

impl TextEncoder {
    /// Loads `tokenizer.json`, with padding and truncation off (windows are made here).
    pub fn from_file(path: &Path, window: usize) -> Result<Self, ModelError> {
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let probe = tokenizer
            .encode("a", true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let (ids, special) = (probe.get_ids(), probe.get_special_tokens_mask());
        let lead = special.iter().take_while(|&&s| s == 1).count();
        let trail = special.iter().rev().take_while(|&&s| s == 1).count();
        let (prefix, suffix) = (ids[..lead].to_vec(), ids[ids.len() - trail..].to_vec());
        if window <= prefix.len() + suffix.len() {
            return Err(ModelError::Invalid(format!("window of {window} tokens leaves no room for text")));
        }
        Ok(Self { tokenizer, prefix, suffix, window })
    }

    /// Window length in tokens, special tokens included.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Tokenizes a document (title, when given, is read before the body).
    /// `max_chunks` caps the windows when chunking; text beyond them is dropped and flagged.
    pub fn encode(&self, title: Option<&str>, text: &str, long_text: LongText, max_chunks: usize) -> Result<Encoded, ModelError> {
        let joined;
        let input = match title.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => {
                joined = format!("{t}\n{text}");
                joined.as_str()
            }
            None => text,
        };
        let content = self
            .tokenizer
            .encode(input, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let content = content.get_ids();
        let room = self.window - self.prefix.len() - self.suffix.len();
        let wrap = |slice: &[u32]| [self.prefix.as_slice(), slice, self.suffix.as_slice()].concat();
        if content.len() <= room {
            return Ok(Encoded { windows: vec![wrap(content)], token_count: content.len(), truncated: false });
        }
        let (windows, truncated) = match long_text {
            LongText::Truncate => (vec![wrap(&content[..room])], true),
            LongText::ChunkMax | LongText::ChunkMean => {
                // A quarter of each window overlaps the previous one, so a sentence cut at a
                // window edge is read whole in the next.
                let stride = room - room / 4;
                let mut windows = Vec::new();
                let mut start = 0;
                loop {
                    let end = (start + room).min(content.len());
                    windows.push(wrap(&content[start..end]));
                    if end == content.len() || windows.len() == max_chunks.max(1) {
                        break (windows, end < content.len());
                    }
                    start += stride;
                }
            }
        };
        Ok(Encoded { windows, token_count: content.len(), truncated })
    }
}
