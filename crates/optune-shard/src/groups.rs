//! Grouping a scored shard's rows by prompt.

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
}
