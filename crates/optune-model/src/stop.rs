//! Stop strings (vLLM's `stop`): a sequence ends once its text completes one of them, and its
//! response is the text before the first.

use crate::tokenizer::ChatTokenizer;
use anyhow::{bail, Result};

/// Strings that end a sequence when its text completes one of them.
///
/// After each sampled token the text of the sequence's last tokens is searched: a stop string of
/// `b` bytes that ends in the newest token lies within its last `b` tokens (a token decodes to at
/// least one byte), so a window of the longest string's bytes and two tokens more (one whose
/// first bytes may finish a character, one whose leading space a decoder may drop) finds it in
/// a step that costs the same whatever the length, and a string already in the window would have
/// ended the sequence a token earlier.
pub struct StopStrings<'t> {
    strings: Vec<String>,
    window: usize,
    tokenizer: &'t ChatTokenizer,
}

impl<'t> StopStrings<'t> {
    /// Refuses an empty string (it would end every sequence at once).
    pub fn new(strings: Vec<String>, tokenizer: &'t ChatTokenizer) -> Result<Self> {
        if strings.iter().any(String::is_empty) {
            bail!("an empty stop string would end every response before its first token");
        }
        let longest = strings.iter().map(String::len).max().unwrap_or(0);
        Ok(Self {
            strings,
            window: longest + 2,
            tokenizer,
        })
    }

    /// Whether the sequence `tokens` ends here: the text of its last tokens holds a stop string.
    /// Asked after each token, it first says so at the token that completes one. A tail the
    /// tokenizer fails to decode ends nothing (the sequence runs on to EOS or its length).
    pub fn end_here(&self, tokens: &[u32]) -> bool {
        let tail = &tokens[tokens.len().saturating_sub(self.window)..];
        match self.tokenizer.decode(tail) {
            Ok(text) => self.strings.iter().any(|s| text.contains(s.as_str())),
            Err(_) => false,
        }
    }

    /// `text` before the first stop string in it (all of it when there is none).
    pub fn cut<'s>(&self, text: &'s str) -> &'s str {
        let first = (self.strings.iter())
            .filter_map(|s| text.find(s.as_str()))
            .min();
        &text[..first.unwrap_or(text.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;
    use crate::tokenizer::ChatTokenizer;

    fn tokenizer() -> ChatTokenizer {
        let dir = optune_testkit::workspace_root().join("testdata/models/tiny-llama");
        ChatTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn a_string_is_found_when_its_last_token_comes_and_cut_before() {
        let tokenizer = tokenizer();
        let text = "The sea was calm this morning, and the fishing boats left the harbour early.";
        let tokens = tokenizer.encode(text).unwrap();
        let stop = StopStrings::new(vec!["fishing".into(), "zebra".into()], &tokenizer).unwrap();
        // The first prefix of tokens whose text holds the string is the first to end there.
        let first = (1..=tokens.len())
            .find(|&n| tokenizer.decode(&tokens[..n]).unwrap().contains("fishing"))
            .unwrap();
        for n in 1..=first {
            assert_eq!(stop.end_here(&tokens[..n]), n == first, "{n} tokens");
        }
        assert_eq!(stop.cut(text), "The sea was calm this morning, and the ");
        assert_eq!(stop.cut("no stop here"), "no stop here");
        // The earliest of several.
        let both = StopStrings::new(vec!["boats".into(), "calm".into()], &tokenizer).unwrap();
        assert_eq!(both.cut(text), "The sea was ");
        assert!(StopStrings::new(vec![String::new()], &tokenizer).is_err());
    }
}
