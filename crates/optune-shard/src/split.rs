//! `--shard K/N`: splitting one tool run into N independent runs (make -j, a Slurm array).
//!
//! Slices are contiguous ranges of the prompts sorted by `prompt_id`, and tools emit their rows
//! in that order, so concatenating the outputs of slices 1..N gives the unsplit run's output.

use crate::contract::col;
use crate::shard::Shard;
use anyhow::{bail, ensure, Result};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The K-th (1-based) of N slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub index: usize,
    pub count: usize,
}

impl SliceSpec {
    pub const WHOLE: SliceSpec = SliceSpec { index: 1, count: 1 };

    /// Parses `K/N` with 1 ≤ K ≤ N (for clap's `value_parser`).
    pub fn parse(text: &str) -> Result<SliceSpec, String> {
        let parsed = text.split_once('/').and_then(|(k, n)| {
            Some((
                k.trim().parse::<usize>().ok()?,
                n.trim().parse::<usize>().ok()?,
            ))
        });
        match parsed {
            Some((index, count)) if index >= 1 && index <= count => Ok(SliceSpec { index, count }),
            _ => Err(format!("'{text}': expected K/N with 1 <= K <= N, e.g. 2/4")),
        }
    }

    /// Which of `keys` (one per group, e.g. prompt ids) fall in this slice, as indices into
    /// `keys` sorted by key. Duplicate keys are an error naming the key.
    pub fn select(&self, keys: &[&str]) -> Result<Vec<usize>> {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].cmp(keys[b]));
        if let Some(w) = order.windows(2).find(|w| keys[w[0]] == keys[w[1]]) {
            bail!(
                "duplicate prompt_id '{}' (rows {} and {})",
                keys[w[0]],
                w[0] + 1,
                w[1] + 1
            );
        }
        let start = (self.index - 1) * keys.len() / self.count;
        let end = self.index * keys.len() / self.count;
        Ok(order[start..end].to_vec())
    }
}

impl SliceSpec {
    /// The rows (of a shard with several rows per prompt, given their prompt_ids) whose prompt
    /// falls in this slice of the sorted distinct prompt_ids: sorted by prompt_id, in input
    /// order within one, so that the slices of an input sorted by prompt_id concatenate to it.
    pub fn rows(&self, prompt_ids: &[&str]) -> Result<Vec<usize>> {
        let mut distinct: Vec<&str> = prompt_ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let chosen: HashSet<&str> = self
            .select(&distinct)?
            .into_iter()
            .map(|i| distinct[i])
            .collect();
        let mut rows: Vec<usize> = (0..prompt_ids.len())
            .filter(|&r| chosen.contains(prompt_ids[r]))
            .collect();
        rows.sort_by(|&a, &b| prompt_ids[a].cmp(prompt_ids[b]));
        Ok(rows)
    }
}

/// Checks that `slices`, in order, are the outputs of `--shard 1/N` … `N/N` of one tool run over
/// `whole`, so that concatenating them loses and repeats nothing: slice K holds exactly the
/// prompt_ids that `--shard K/N` selects from `whole`'s distinct prompt_ids, and every prompt has
/// the same number of rows per row of `whole` (opt-gen's --n, 1 for opt-score). Returns that
/// number. Errors name the slice's file and a prompt_id that is missing, foreign or miscounted.
pub fn check_slices(whole: &Shard, slices: &[Shard]) -> Result<usize> {
    ensure!(
        !slices.is_empty(),
        "no slices to check against {}",
        whole.name()
    );
    let whole_counts = row_counts(whole)?;
    let distinct: Vec<&str> = whole_counts
        .keys()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rows_per_row: Option<(usize, &str, &str)> = None;
    for (k, slice) in slices.iter().enumerate() {
        let spec = SliceSpec {
            index: k + 1,
            count: slices.len(),
        };
        let expected: BTreeSet<&str> = spec
            .select(&distinct)?
            .into_iter()
            .map(|i| distinct[i])
            .collect();
        let counts = row_counts(slice)?;
        let found: BTreeSet<&str> = counts.keys().copied().collect();
        let at = |what: String| {
            format!(
                "{} (slice {}/{} of {}): {what}",
                slice.name(),
                spec.index,
                spec.count,
                whole.name()
            )
        };
        if let Some(missing) = expected.difference(&found).next() {
            bail!(at(format!("prompt_id '{missing}' is missing")));
        }
        if let Some(foreign) = found.difference(&expected).next() {
            let owner = if whole_counts.contains_key(foreign) {
                "belongs to another slice"
            } else {
                "is not in the input"
            };
            bail!(at(format!("prompt_id '{foreign}' {owner}")));
        }
        for id in &expected {
            let (have, of) = (counts[id], whole_counts[id]);
            match rows_per_row {
                None if have % of == 0 => rows_per_row = Some((have / of, id, slice.name())),
                Some((ratio, _, _)) if have == ratio * of => {}
                _ => {
                    let expectation = match rows_per_row {
                        Some((ratio, first, name)) => format!(
                            "expected {} ({ratio} per input row, as prompt_id '{first}' has in {name})",
                            ratio * of
                        ),
                        None => "not a multiple of its input rows".to_string(),
                    };
                    bail!(at(format!(
                        "prompt_id '{id}' has {have} rows for {of} input rows: {expectation}"
                    )));
                }
            }
        }
    }
    Ok(rows_per_row.map_or(0, |(ratio, _, _)| ratio))
}

/// Rows per prompt_id.
fn row_counts(shard: &Shard) -> Result<HashMap<&str, usize>> {
    let mut counts = HashMap::new();
    for id in shard.strings(col::PROMPT_ID)? {
        *counts.entry(id).or_insert(0) += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_partition_the_sorted_keys() {
        let keys = ["d", "a", "c", "b", "e"];
        let all: Vec<usize> = (1..=3)
            .flat_map(|k| SliceSpec { index: k, count: 3 }.select(&keys).unwrap())
            .collect();
        assert_eq!(all, SliceSpec::WHOLE.select(&keys).unwrap());
        assert_eq!(all, vec![1, 3, 2, 0, 4]);
    }

    #[test]
    fn rows_keep_prompts_together_and_concatenate_to_the_sorted_input() {
        let ids = ["b", "a", "c", "a", "b", "d"];
        let slices: Vec<Vec<usize>> = (1..=3)
            .map(|k| SliceSpec { index: k, count: 3 }.rows(&ids).unwrap())
            .collect();
        // Distinct ids a b c d: slices {a}, {b}, {c, d}.
        assert_eq!(slices, [vec![1, 3], vec![0, 4], vec![2, 5]]);
        assert_eq!(SliceSpec::WHOLE.rows(&ids).unwrap(), [1, 3, 0, 4, 2, 5]);
    }

    #[test]
    fn parse_rejects_out_of_range() {
        assert_eq!(
            SliceSpec::parse("2/4"),
            Ok(SliceSpec { index: 2, count: 4 })
        );
        for bad in ["0/4", "5/4", "x", "1/0", "1-2"] {
            assert!(SliceSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_keys_are_named() {
        let err = SliceSpec::WHOLE.select(&["a", "b", "a"]).unwrap_err();
        assert!(err.to_string().contains("duplicate prompt_id 'a'"), "{err}");
    }

    fn shard(name: &str, ids: &[&str]) -> Shard {
        let batch = arrow::array::RecordBatch::try_from_iter([(
            col::PROMPT_ID,
            Shard::string_column(ids.iter().copied()),
        )])
        .unwrap();
        Shard::new(name, batch)
    }

    #[test]
    fn slices_that_partition_the_input_pass_with_their_rows_per_input_row() {
        let prompts = shard("prompts", &["c", "a", "b", "d", "e"]);
        // --shard 1/2 takes a, b; 2/2 takes c, d, e; two samples each.
        let first = shard("1", &["a", "a", "b", "b"]);
        let second = shard("2", &["c", "c", "d", "d", "e", "e"]);
        assert_eq!(check_slices(&prompts, &[first, second]).unwrap(), 2);
        // Responses in, the same rows out (opt-score): one per input row.
        let responses = shard("responses", &["b", "a", "b", "a"]);
        let slices = [shard("1", &["a", "a"]), shard("2", &["b", "b"])];
        assert_eq!(check_slices(&responses, &slices).unwrap(), 1);
    }

    #[test]
    fn a_dropped_remainder_a_repeat_or_a_stale_slice_is_named() {
        let prompts = shard("prompts", &["a", "b", "c", "d", "e"]);
        let error = |slices: &[Shard]| check_slices(&prompts, slices).unwrap_err().to_string();
        let dropped = error(&[
            shard("1.parquet", &["a", "b"]),
            shard("2.parquet", &["c", "d"]),
        ]);
        assert!(
            dropped.contains("2.parquet (slice 2/2 of prompts): prompt_id 'e' is missing"),
            "{dropped}"
        );
        let repeated = error(&[shard("1", &["a", "b", "c"]), shard("2", &["c", "d", "e"])]);
        assert!(
            repeated.contains("prompt_id 'c' belongs to another slice"),
            "{repeated}"
        );
        // A slice of a 3-way split among 2.
        let stale = error(&[shard("1", &["a"]), shard("2", &["b", "c", "d", "e"])]);
        assert!(
            stale.contains("1 (slice 1/2 of prompts): prompt_id 'b' is missing"),
            "{stale}"
        );
        let foreign = error(&[shard("1", &["a", "b"]), shard("2", &["c", "d", "e", "x"])]);
        assert!(
            foreign.contains("prompt_id 'x' is not in the input"),
            "{foreign}"
        );
        let short = error(&[
            shard("1", &["a", "a", "b", "b"]),
            shard("2", &["c", "c", "d", "e", "e"]),
        ]);
        assert!(
            short.contains("prompt_id 'd' has 1 rows for 1 input rows: expected 2 (2 per input row, as prompt_id 'a' has in 1)"),
            "{short}"
        );
    }
}
