//! Prompts and preference pairs as the generation and training tools see
//! them, whichever of the accepted layouts a shard uses.
//!
//! The common Hugging Face layouts are read the way transformers and TRL read
//! them:
//!
//! - prompts: `prompt` as text or messages, or a `messages` conversation. A
//!   `messages` list that ends with the assistant's reply (UltraChat's layout,
//!   TRL's conversational language-modelling layout) is the conversation
//!   *before* that reply: the prompt a model should answer.
//! - preference pairs: `prompt`/`chosen`/`rejected` as text or messages;
//!   `chosen`/`rejected` as whole conversations that share their prompt turns;
//!   `chosen`/`rejected` as whole text transcripts without a prompt
//!   (Anthropic HH), split at TRL's `extract_prompt` point (see
//!   [`split_shared_prefix`]).
//! - pair rewards ([`Shard::pair_reward_gaps`]): `reward_gap`,
//!   `chosen_reward`/`rejected_reward`, or UltraFeedback's
//!   `score_chosen`/`score_rejected`.

use crate::contract::{col, describe_type, ColumnKind};
use crate::shard::Shard;
use anyhow::{anyhow, bail, Result};
use arrow::array::{Array, AsArray};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt as written in the shard: raw text (the tool applies no chat
/// template) or a conversation (the tool applies the model's template).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptText {
    Text(String),
    Messages(Vec<Message>),
}

/// A prompt with its id, for the generation tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub prompt_id: String,
    pub text: PromptText,
}

/// One preference pair, for the trainer: the prompt and the two replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferencePair {
    pub prompt: PromptText,
    pub chosen: String,
    pub rejected: String,
}

impl Shard {
    /// The column prompts are read from: `messages` when present, else
    /// `prompt`.
    pub fn prompt_column(&self) -> Result<&'static str> {
        if self.has_column(col::MESSAGES) {
            Ok(col::MESSAGES)
        } else if self.has_column(col::PROMPT) {
            Ok(col::PROMPT)
        } else {
            bail!(
                "{}: missing required column 'prompt' or 'messages' (found: {})",
                self.name(),
                self.found_columns()
            )
        }
    }

    /// Every row's prompt with its `prompt_id`.
    pub fn prompts(&self) -> Result<Vec<Prompt>> {
        let ids = self.strings(col::PROMPT_ID)?;
        let texts = self.prompt_texts()?;
        Ok(ids
            .into_iter()
            .zip(texts)
            .map(|(prompt_id, text)| Prompt {
                prompt_id: prompt_id.to_string(),
                text,
            })
            .collect())
    }

    /// Every row's prompt, from [`Shard::prompt_column`]. A `prompt` column
    /// may also hold message lists (the Hugging Face conversational layout).
    /// A `messages` conversation that ends with an assistant message loses
    /// that message: the prompt is what comes before the final reply.
    pub fn prompt_texts(&self) -> Result<Vec<PromptText>> {
        let column = self.prompt_column()?;
        let texts = self.texts_or_messages(column)?;
        if column != col::MESSAGES {
            return Ok(texts);
        }
        Ok(texts
            .into_iter()
            .map(|text| match text {
                PromptText::Messages(mut messages) => {
                    if messages.last().is_some_and(|m| m.role == "assistant") {
                        messages.pop();
                    }
                    PromptText::Messages(messages)
                }
                text => text,
            })
            .collect())
    }

    /// A column that holds text or message lists.
    pub fn texts_or_messages(&self, name: &str) -> Result<Vec<PromptText>> {
        let data_type = self.column(name)?.data_type();
        if ColumnKind::Utf8.accepts(data_type) {
            Ok(self
                .strings(name)?
                .into_iter()
                .map(|text| PromptText::Text(text.to_string()))
                .collect())
        } else if ColumnKind::Messages.accepts(data_type) {
            Ok(self
                .messages(name)?
                .into_iter()
                .map(PromptText::Messages)
                .collect())
        } else {
            bail!(
                "{}: column '{name}': expected {} or {}, found {}",
                self.name(),
                ColumnKind::Utf8,
                ColumnKind::Messages,
                describe_type(data_type)
            )
        }
    }

    /// A message-list column's values; a null list, message, role or content
    /// is an error naming its row.
    pub fn messages(&self, name: &str) -> Result<Vec<Vec<Message>>> {
        let lists = self
            .column_of_kind(name, ColumnKind::Messages)?
            .as_list::<i32>();
        let items = lists.values().as_struct();
        let field = |field: &str| {
            items
                .column_by_name(field)
                .map(|values| values.as_string::<i32>())
                .ok_or_else(|| {
                    anyhow!(
                        "{}: column '{name}': messages have no '{field}'",
                        self.name()
                    )
                })
        };
        let (roles, contents) = (field("role")?, field("content")?);
        let offsets = lists.value_offsets();
        (0..lists.len())
            .map(|row| {
                if lists.is_null(row) {
                    return Err(self.null_error(name, row));
                }
                (offsets[row] as usize..offsets[row + 1] as usize)
                    .map(|item| {
                        if items.is_null(item) || roles.is_null(item) || contents.is_null(item) {
                            bail!(
                                "{}: column '{name}': a message at row {} has a null role or content",
                                self.name(),
                                row + 1
                            );
                        }
                        Ok(Message { role: roles.value(item).to_string(), content: contents.value(item).to_string() })
                    })
                    .collect()
            })
            .collect()
    }

    /// Every row as a preference pair, from our pairs shards or the Hugging
    /// Face preference layouts. `chosen`/`rejected` hold text or
    /// conversations; a conversation's reply is its last assistant message
    /// and the messages before it are its prompt. The prompt comes from the
    /// `messages`/`prompt` column when there is one, else from the
    /// conversations, which must then agree on it, else (two texts, as in
    /// Anthropic HH) from the texts' shared start (`split_shared_prefix`).
    pub fn preference_pairs(&self) -> Result<Vec<PreferencePair>> {
        let chosen = self.texts_or_messages(col::CHOSEN)?;
        let rejected = self.texts_or_messages(col::REJECTED)?;
        let explicit_prompts = if self.has_column(col::MESSAGES) || self.has_column(col::PROMPT) {
            Some(self.prompt_texts()?)
        } else {
            None
        };
        chosen
            .into_iter()
            .zip(rejected)
            .enumerate()
            .map(|(row, (chosen, rejected))| {
                let at_row = |message: String| anyhow!("{}: row {}: {message}", self.name(), row + 1);
                if let (None, PromptText::Text(chosen), PromptText::Text(rejected)) = (&explicit_prompts, &chosen, &rejected) {
                    let (prompt, chosen, rejected) = split_shared_prefix(chosen, rejected).ok_or_else(|| at_row(
                        "no prompt: there is no 'prompt' or 'messages' column and 'chosen' and 'rejected' share no start to take as the prompt".into(),
                    ))?;
                    return Ok(PreferencePair {
                        prompt: PromptText::Text(prompt.to_string()),
                        chosen: chosen.to_string(),
                        rejected: rejected.to_string(),
                    });
                }
                let (chosen_context, chosen) = split_final_reply(chosen, col::CHOSEN).map_err(at_row)?;
                let (rejected_context, rejected) = split_final_reply(rejected, col::REJECTED).map_err(at_row)?;
                let prompt = match (&explicit_prompts, chosen_context, rejected_context) {
                    (Some(prompts), _, _) => prompts[row].clone(),
                    (None, Some(chosen_context), Some(rejected_context)) if chosen_context != rejected_context => {
                        return Err(at_row(
                            "'chosen' and 'rejected' differ before their final assistant message, so the prompt is ambiguous".into(),
                        ))
                    }
                    (None, Some(context), _) => PromptText::Messages(context),
                    (None, None, _) => {
                        return Err(at_row(format!(
                            "no prompt: there is no 'prompt' or 'messages' column and 'chosen' holds no messages before its reply (found: {})",
                            self.found_columns()
                        )))
                    }
                };
                Ok(PreferencePair { prompt, chosen, rejected })
            })
            .collect()
    }

    /// The reward gap (chosen − rejected) of each preference pair, from the
    /// first of: a `reward_gap` column; `chosen_reward` − `rejected_reward`
    /// (as `opt-pairs` writes them); UltraFeedback's `score_chosen` −
    /// `score_rejected`. `None` when the shard has none of these (an offline
    /// dataset without scores). One column of a pair without the other, or a
    /// value that is null, NaN or infinite, is an error naming the column
    /// and row.
    pub fn pair_reward_gaps(&self) -> Result<Option<Vec<f64>>> {
        if self.has_column(col::REWARD_GAP) {
            return Ok(Some(self.finite_floats(col::REWARD_GAP)?));
        }
        for (chosen, rejected) in [
            (col::CHOSEN_REWARD, col::REJECTED_REWARD),
            (col::SCORE_CHOSEN, col::SCORE_REJECTED),
        ] {
            match (self.has_column(chosen), self.has_column(rejected)) {
                (true, true) => {
                    let chosen = self.finite_floats(chosen)?;
                    let rejected = self.finite_floats(rejected)?;
                    return Ok(Some(
                        chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect(),
                    ));
                }
                (false, false) => {}
                (true, false) | (false, true) => {
                    let (present, missing) = if self.has_column(chosen) {
                        (chosen, rejected)
                    } else {
                        (rejected, chosen)
                    };
                    bail!(
                        "{}: column '{present}' has no partner '{missing}': the pair's rewards need both",
                        self.name()
                    )
                }
            }
        }
        Ok(None)
    }
}

/// Splits two whole texts that share their prompt (the Anthropic HH layout)
/// into `(prompt, chosen reply, rejected reply)` the way TRL's
/// `extract_prompt` does: the prompt is the longest common prefix, in
/// characters, moved one character back when the character before the first
/// difference is a space, so the replies keep their leading space
/// (`"…Assistant: Yes"` / `"…Assistant: No"` split into `"…Assistant:"`,
/// `" Yes"`, `" No"`). When one text is a prefix of the other (identical
/// replies, which HH holds), TRL's loop ends on the shorter text's last
/// character and so does this: the replies are the texts from there on.
/// `None` when the texts share no start (an empty prompt) or one is empty.
pub fn split_shared_prefix<'a>(
    chosen: &'a str,
    rejected: &'a str,
) -> Option<(&'a str, &'a str, &'a str)> {
    let chosen_chars: Vec<(usize, char)> = chosen.char_indices().collect();
    let shortest = chosen_chars.len().min(rejected.chars().count());
    let first_difference = chosen_chars
        .iter()
        .zip(rejected.chars())
        .position(|(&(_, c), r)| c != r);
    let split = match first_difference {
        Some(i) if i > 0 && chosen_chars[i - 1].1 == ' ' => i - 1,
        Some(i) => i,
        None => shortest.checked_sub(1)?,
    };
    if split == 0 {
        return None;
    }
    // The texts agree on the characters before `split`, so the byte offset is the same in both.
    let at = chosen_chars[split].0;
    Some((&chosen[..at], &chosen[at..], &rejected[at..]))
}

/// Splits a reply into the conversation before it (`None` for plain text or
/// a conversation that is only the reply) and the reply's text.
fn split_final_reply(
    value: PromptText,
    column: &str,
) -> Result<(Option<Vec<Message>>, String), String> {
    match value {
        PromptText::Text(text) => Ok((None, text)),
        PromptText::Messages(mut messages) => {
            let last_reply = messages
                .iter()
                .rposition(|message| message.role == "assistant")
                .ok_or_else(|| format!("'{column}' has no assistant message"))?;
            messages.truncate(last_reply + 1);
            let reply = messages
                .pop()
                .map(|message| message.content)
                .unwrap_or_default();
            Ok(((!messages.is_empty()).then_some(messages), reply))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(jsonl: &str) -> Shard {
        Shard::from_bytes("prefs.jsonl", jsonl.as_bytes().to_vec(), None).unwrap()
    }

    fn message(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn prompts_prefer_messages_over_text() {
        let shard = shard(concat!(
            r#"{"prompt_id": "a", "prompt": "ignored", "messages": [{"role": "user", "content": "hi"}]}"#,
            "\n",
        ));
        assert_eq!(
            shard.prompts().unwrap(),
            [Prompt {
                prompt_id: "a".into(),
                text: PromptText::Messages(vec![message("user", "hi")])
            }]
        );
    }

    #[test]
    fn prompts_read_text() {
        let shard = shard(r#"{"prompt_id": "a", "prompt": "Say hi"}"#);
        assert_eq!(
            shard.prompt_texts().unwrap(),
            [PromptText::Text("Say hi".into())]
        );
    }

    #[test]
    fn prompts_need_a_prompt_column() {
        let err = shard(r#"{"prompt_id": "a", "text": "x"}"#)
            .prompts()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "prefs.jsonl: missing required column 'prompt' or 'messages' (found: prompt_id, text)"
        );
    }

    #[test]
    fn pairs_with_text_columns() {
        let shard =
            shard(r#"{"prompt": "Q", "chosen": "good", "rejected": "bad", "chosen_reward": 1.0}"#);
        assert_eq!(
            shard.preference_pairs().unwrap(),
            [PreferencePair {
                prompt: PromptText::Text("Q".into()),
                chosen: "good".into(),
                rejected: "bad".into()
            }]
        );
    }

    #[test]
    fn pairs_from_full_conversations_take_the_shared_prefix_as_prompt() {
        let shard = shard(concat!(
            r#"{"chosen": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],"#,
            r#" "rejected": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}"#,
        ));
        let expected_prompt =
            PromptText::Messages(vec![message("system", "S"), message("user", "Q")]);
        assert_eq!(
            shard.preference_pairs().unwrap(),
            [PreferencePair {
                prompt: expected_prompt,
                chosen: "good".into(),
                rejected: "bad".into()
            }]
        );
    }

    #[test]
    fn pairs_with_an_explicit_conversational_prompt() {
        let shard = shard(concat!(
            r#"{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],"#,
            r#" "rejected": [{"role": "assistant", "content": "bad"}]}"#,
        ));
        let pairs = shard.preference_pairs().unwrap();
        assert_eq!(
            pairs[0].prompt,
            PromptText::Messages(vec![message("user", "Q")])
        );
        assert_eq!(
            (pairs[0].chosen.as_str(), pairs[0].rejected.as_str()),
            ("good", "bad")
        );
    }

    #[test]
    fn pairs_with_disagreeing_or_missing_prompts_are_errors() {
        let disagreeing = shard(concat!(
            r#"{"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "good"}],"#,
            r#" "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "bad"}]}"#,
        ));
        let err = disagreeing.preference_pairs().unwrap_err().to_string();
        assert!(
            err.starts_with("prefs.jsonl: row 1: 'chosen' and 'rejected' differ"),
            "{err}"
        );
        let no_prompt = shard(r#"{"chosen": "good", "rejected": "bad"}"#);
        let err = no_prompt.preference_pairs().unwrap_err().to_string();
        assert!(err.starts_with("prefs.jsonl: row 1: no prompt"), "{err}");
        let no_reply = shard(
            r#"{"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "bad"}"#,
        );
        let err = no_reply.preference_pairs().unwrap_err().to_string();
        assert_eq!(err, "prefs.jsonl: row 1: 'chosen' has no assistant message");
    }

    #[test]
    fn a_conversation_ending_with_the_reply_is_prompted_without_it() {
        // UltraChat: `prompt` text, `messages` ending with the reference answer.
        let shard = shard(concat!(
            r#"{"prompt_id": "a", "prompt": "Q", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#,
            "\n",
            r#"{"prompt_id": "b", "prompt": "Q1", "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},"#,
            r#" {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}"#,
            "\n",
            r#"{"prompt_id": "c", "prompt": "Q1", "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},"#,
            r#" {"role": "user", "content": "Q2"}]}"#,
        ));
        let multi_turn = vec![
            message("user", "Q1"),
            message("assistant", "A1"),
            message("user", "Q2"),
        ];
        assert_eq!(
            shard.prompt_texts().unwrap(),
            [
                PromptText::Messages(vec![message("user", "Q")]),
                PromptText::Messages(multi_turn.clone()),
                // Already ends with the user's turn: unchanged.
                PromptText::Messages(multi_turn),
            ]
        );
    }

    #[test]
    fn a_prompt_column_keeps_a_final_assistant_message() {
        // Only a `messages` conversation holds its reply; a `prompt` that ends with the assistant
        // is a prompt to continue.
        let shard = shard(
            r#"{"prompt_id": "a", "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}]}"#,
        );
        assert_eq!(
            shard.prompt_texts().unwrap(),
            [PromptText::Messages(vec![
                message("user", "Q"),
                message("assistant", "The answer is")
            ])]
        );
    }

    fn text_pair(prompt: &str, chosen: &str, rejected: &str) -> PreferencePair {
        PreferencePair {
            prompt: PromptText::Text(prompt.into()),
            chosen: chosen.into(),
            rejected: rejected.into(),
        }
    }

    #[test]
    fn transcripts_without_a_prompt_split_at_their_shared_start() {
        // Anthropic HH. Expected splits as TRL 0.25's extract_prompt gives them.
        let shard = shard(concat!(
            r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: Yes, sure.", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}"#,
            "\n",
            r#"{"chosen": "Q: café? A: oui", "rejected": "Q: café? A: non"}"#,
            "\n",
            r#"{"chosen": "Q:x", "rejected": "Q:y"}"#,
        ));
        assert_eq!(
            shard.preference_pairs().unwrap(),
            [
                text_pair("\n\nHuman: Hi\n\nAssistant:", " Yes, sure.", " No."),
                text_pair("Q: café? A:", " oui", " non"),
                text_pair("Q:", "x", "y"),
            ]
        );
    }

    #[test]
    fn shared_prefix_follows_trl_at_the_edges() {
        // One text a prefix of the other, or both the same: TRL's loop ends on the shorter
        // text's last character.
        assert_eq!(
            split_shared_prefix("Q: same", "Q: same"),
            Some(("Q: sam", "e", "e"))
        );
        assert_eq!(
            split_shared_prefix("Q: ab", "Q: abc"),
            Some(("Q: a", "b", "bc"))
        );
        // No shared start, or a shared start that is only the space before the replies.
        assert_eq!(split_shared_prefix("Yes", "No"), None);
        assert_eq!(split_shared_prefix(" Yes", " No"), None);
        assert_eq!(split_shared_prefix("", "No"), None);
        // Characters, not bytes: é is two bytes.
        assert_eq!(split_shared_prefix("éa", "éb"), Some(("é", "a", "b")));
    }

    #[test]
    fn reward_gaps_come_from_any_reward_layout() {
        let gaps = |jsonl: &str| shard(jsonl).pair_reward_gaps().unwrap();
        assert_eq!(
            gaps(
                r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "reward_gap": 0.5, "chosen_reward": 9, "rejected_reward": 0}"#
            ),
            Some(vec![0.5])
        );
        assert_eq!(
            gaps(
                r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_reward": 2.5, "rejected_reward": -1}"#
            ),
            Some(vec![3.5])
        );
        // UltraFeedback-binarized
        assert_eq!(
            gaps(
                r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 5.5}"#
            ),
            Some(vec![2.5])
        );
        assert_eq!(
            gaps(r#"{"prompt": "Q", "chosen": "a", "rejected": "b"}"#),
            None
        );
        let err = shard(r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8.0}"#)
            .pair_reward_gaps()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "prefs.jsonl: column 'score_chosen' has no partner 'score_rejected': the pair's rewards need both"
        );
        let err = shard(concat!(
            r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 1}"#,
            "\n",
            r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": null, "score_rejected": 1}"#,
        ))
        .pair_reward_gaps()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "prefs.jsonl: column 'score_chosen': null at row 2"
        );
    }

    #[test]
    fn null_messages_name_the_row() {
        let shard = shard(concat!(
            r#"{"prompt_id": "a", "messages": [{"role": "user", "content": "hi"}]}"#,
            "\n",
            r#"{"prompt_id": "b", "messages": [{"role": "user"}]}"#,
        ));
        let err = shard.prompts().unwrap_err().to_string();
        assert_eq!(
            err,
            "prefs.jsonl: column 'messages': a message at row 2 has a null role or content"
        );
    }
}
