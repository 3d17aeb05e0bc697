//! Grouping a scored shard's rows by prompt.

use crate::prompt::PromptText;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// The rows of one prompt, in input order.
#[derive(Debug, PartialEq)]
pub(crate) struct PromptGroup<'a> {
    pub prompt_id: &'a str,
    pub rows: Vec<usize>,
}

/// Groups row indices by prompt id. Groups come in the order of each
/// prompt's first row, so outputs follow the input's order.
pub(crate) fn group_by_prompt<'a>(prompt_ids: &[&'a str]) -> Vec<PromptGroup<'a>> {
    let mut groups: Vec<PromptGroup<'a>> = Vec::new();
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for (row, &prompt_id) in prompt_ids.iter().enumerate() {
        let index = *index_of.entry(prompt_id).or_insert_with(|| {
            groups.push(PromptGroup {
                prompt_id,
                rows: Vec::new(),
            });
            groups.len() - 1
        });
        groups[index].rows.push(row);
    }
    groups
}

/// Refuses a prompt whose rows disagree on its text. The tools keep one row
/// per prompt (its first), so two texts under one `prompt_id` would otherwise
/// lose one of them without a word: two datasets merged with clashing ids, or
/// a prompt edited between iterations. `texts[row]` is row `row`'s prompt and
/// `locate(row)` names that row for the message.
pub(crate) fn require_one_text_per_prompt(
    groups: &[PromptGroup],
    texts: &[PromptText],
    locate: impl Fn(usize) -> String,
) -> Result<()> {
    for group in groups {
        let first = group.rows[0];
        if let Some(&other) = group.rows.iter().find(|&&row| texts[row] != texts[first]) {
            let forms = match (&texts[first], &texts[other]) {
                (PromptText::Text(_), PromptText::Messages(_))
                | (PromptText::Messages(_), PromptText::Text(_)) => {
                    " (one a text, one a conversation: give every file of one run the same prompt \
                     column)"
                }
                _ => "",
            };
            bail!(
                "prompt_id '{}' has two different prompts: {} and {}{forms}; give each prompt its \
                 own prompt_id",
                group.prompt_id,
                locate(first),
                locate(other)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_first_appearance() {
        let groups = group_by_prompt(&["b", "a", "b", "c", "a"]);
        assert_eq!(
            groups,
            [
                PromptGroup {
                    prompt_id: "b",
                    rows: vec![0, 2]
                },
                PromptGroup {
                    prompt_id: "a",
                    rows: vec![1, 4]
                },
                PromptGroup {
                    prompt_id: "c",
                    rows: vec![3]
                },
            ]
        );
    }

    #[test]
    fn one_text_per_prompt_is_required_and_names_both_rows() {
        let texts = [
            PromptText::Text("hi".into()),
            PromptText::Text("yo".into()),
            PromptText::Text("hi".into()),
            PromptText::Text("bye".into()),
        ];
        let locate = |row: usize| format!("row {}", row + 1);
        let agreeing = group_by_prompt(&["a", "b", "a"]);
        require_one_text_per_prompt(&agreeing, &texts[..3], locate).unwrap();
        let clashing = group_by_prompt(&["a", "b", "a", "a"]);
        let error = require_one_text_per_prompt(&clashing, &texts, locate)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "prompt_id 'a' has two different prompts: row 1 and row 4; give each prompt its own \
             prompt_id"
        );
    }
}
