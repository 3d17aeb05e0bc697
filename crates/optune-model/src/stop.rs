//! Stop strings (vLLM's `stop`): a sequence ends once its text completes one of them, and its
//! response is the text before the first.

use crate::tokenizer::ChatTokenizer;
use anyhow::{bail, Result};

/// Strings that end a sequence when its text completes one of them.
///
/// After each sampled token the text of the sequence's last tokens is searched: a stop string of
/// `b` bytes that ends in the newest token lies within its last `b` tokens that add text (every
/// token but a special one, which decoding skips, decodes to at least one byte), so a window of
/// the longest string's bytes and two such tokens more (one whose first bytes may finish a
/// character, one whose leading space a decoder may drop), with the special tokens among them,
/// finds it in a step that costs the same whatever the length, and a string already in the
/// window would have ended the sequence a token earlier.
pub struct StopStrings<'t> {
    strings: Vec<String>,
    window: usize,
    special: std::collections::HashSet<u32>,
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
            special: tokenizer.special_ids(),
            tokenizer,
        })
    }

    /// Whether the sequence `tokens` ends here: the text of its last tokens holds a stop string.
    /// Asked after each token, it first says so at the token that completes one. A tail the
    /// tokenizer fails to decode ends nothing (the sequence runs on to EOS or its length).
    pub fn end_here(&self, tokens: &[u32]) -> bool {
        let mut texts = 0;
        let start = (0..tokens.len())
            .rev()
            .find(|&i| {
                texts += usize::from(!self.special.contains(&tokens[i]));
                texts == self.window
            })
            .unwrap_or(0);
        let tail = &tokens[start..];
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

    /// Special tokens decode to nothing: a string whose pieces lie on both sides of more of them
    /// than the window's length is still found, at the token that completes it.
    #[test]
    fn special_tokens_between_the_pieces_do_not_hide_a_string() {
        let tokenizer = tokenizer();
        let (im_start, im_end) = (1, 2);
        assert!(tokenizer
            .special_ids()
            .is_superset(&[im_start, im_end].into()));
        let mut tokens = tokenizer.encode("The sea was calm").unwrap();
        tokens.extend([im_start, im_end].repeat(12));
        let before = tokens.len();
        tokens.extend(tokenizer.encode(" this morning").unwrap());
        assert_eq!(
            tokenizer.decode(&tokens).unwrap(),
            "The sea was calm this morning"
        );
        let stop = StopStrings::new(vec!["calm this".into()], &tokenizer).unwrap();
        let first = (before + 1..=tokens.len())
            .find(|&n| {
                tokenizer
                    .decode(&tokens[..n])
                    .unwrap()
                    .contains("calm this")
            })
            .unwrap();
        for n in 1..=first {
            assert_eq!(stop.end_here(&tokens[..n]), n == first, "{n} tokens");
        }
    }
}
