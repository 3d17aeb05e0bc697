//! `--shard K/N`: splitting one tool run into N independent runs (make -j, a Slurm array).
//!
//! Slices are contiguous ranges of the prompts sorted by `prompt_id`, and tools emit their rows
//! in that order, so concatenating the outputs of slices 1..N gives the unsplit run's output.

use anyhow::{bail, Result};

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
}
