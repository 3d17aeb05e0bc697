//! Prompts and preference pairs as the generation and training tools see
//! them, whichever of the accepted layouts a shard uses.

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
    pub fn prompt_texts(&self) -> Result<Vec<PromptText>> {
        self.texts_or_messages(self.prompt_column()?)
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
    /// Face preference layout. `chosen`/`rejected` hold text or
    /// conversations; a conversation's reply is its last assistant message
    /// and the messages before it are its prompt. The prompt comes from the
    /// `messages`/`prompt` column when there is one, else from the
    /// conversations, which must then agree on it.
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
