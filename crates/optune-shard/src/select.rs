//! `opt-select`: choose the prompts to regenerate in the next OPTune
//! iteration, the fraction ρ whose responses scored lowest.

use crate::contract::{col, ColumnKind};
use crate::groups::{group_by_prompt, PromptGroup};
use crate::shard::Shard;
use anyhow::{bail, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The per-prompt statistic prompts are ranked by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RankBy {
    /// the prompt's best reward: regenerate where even the best response is poor
    Max,
    /// the mean reward over the prompt's responses
    Mean,
    /// the prompt's worst reward
    Min,
    /// max − min: regenerate where the responses are hard to tell apart
    Gap,
}

impl RankBy {
    fn statistic(self, rewards: impl Iterator<Item = f64> + Clone) -> f64 {
        let max = || rewards.clone().fold(f64::NEG_INFINITY, f64::max);
        let min = || rewards.clone().fold(f64::INFINITY, f64::min);
        let value = match self {
            RankBy::Max => max(),
            RankBy::Min => min(),
            RankBy::Gap => max() - min(),
            RankBy::Mean => {
                let (sum, count) = rewards.clone().fold((0.0, 0usize), |(sum, count), reward| {
                    (sum + reward, count + 1)
                });
                sum / count as f64
            }
        };
        // -0.0 and 0.0 are the same statistic; adding 0.0 turns the former
        // into the latter so the total order used for ranking agrees.
        value + 0.0
    }
}

/// Which prompts to select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// the prompts with the lowest statistic (OPTune)
    Lowest,
    /// a random subset, seeded by --seed (ablation baseline)
    Random,
    /// the prompts with the highest statistic (ablation)
    Highest,
}

#[derive(Clone, Copy, Debug)]
pub struct SelectOptions {
    /// The fraction of prompts to select, 0 < ρ ≤ 1.
    pub rho: f64,
    pub by: RankBy,
    pub strategy: Strategy,
    /// Seeds [`Strategy::Random`].
    pub seed: u64,
}

/// What [`select_prompts`] returns.
#[derive(Debug)]
pub struct Selection {
    /// One row per selected prompt, prompt-level columns only, in the order
    /// of the prompts' first rows in the input.
    pub prompts: Shard,
    /// Every row, all columns, of the prompts not selected, in input order.
    pub rest: Shard,
    /// How many distinct prompts the input held.
    pub prompts_in: usize,
}

/// Parses and checks ρ, for clap: a number with 0 < ρ ≤ 1.
pub fn parse_rho(text: &str) -> Result<f64, String> {
    let rho: f64 = text.trim().parse().map_err(|_| {
        format!(
            "'{text}' is not a number; rho is the fraction of prompts to regenerate, 0 < rho <= 1"
        )
    })?;
    if !(rho > 0.0 && rho <= 1.0) {
        return Err(format!("rho must be in (0, 1] (the fraction of prompts to regenerate; 1 regenerates all), got {rho}"));
    }
    Ok(rho)
}

/// How many of `prompts` prompts a fraction `rho` selects: ⌈ρ·n⌉, at least
/// one. The product is rounded down by a relative 1e-9 before the ceiling,
/// because floating point makes some whole products slightly larger than
/// whole (0.7 × 10 = 7.000000000000001) and the ceiling would then select
/// one prompt too many.
pub fn selected_count(rho: f64, prompts: usize) -> usize {
    let product = rho * prompts as f64;
    let count = (product - product.abs() * 1e-9).ceil().max(1.0) as usize;
    count.min(prompts)
}

/// Ranks the prompts of a scored shard and selects ⌈ρ·prompts⌉ of them.
/// Ties in the statistic are broken by `prompt_id`, and random selection
/// draws one key per prompt in `prompt_id` order, so the result depends on
/// the rows' contents, not on their order.
pub fn select_prompts(scored: &Shard, options: &SelectOptions) -> Result<Selection> {
    scored.require(&[
        (col::PROMPT_ID, ColumnKind::Utf8),
        (col::REWARD, ColumnKind::Float),
    ])?;
    // The selected prompts go back to generation, which needs their text.
    scored.prompt_column()?;
    if scored.num_rows() == 0 {
        bail!(
            "{}: no rows: there are no prompts to select from",
            scored.name()
        );
    }
    let prompt_ids = scored.strings(col::PROMPT_ID)?;
    let rewards = scored.finite_floats(col::REWARD)?;
    let groups = group_by_prompt(&prompt_ids);
    let statistics: Vec<f64> = groups
        .iter()
        .map(|group| {
            options
                .by
                .statistic(group.rows.iter().map(|&row| rewards[row]))
        })
        .collect();

    let ranked = rank(&groups, &statistics, options.strategy, options.seed);
    let mut selected = vec![false; groups.len()];
    for &group in &ranked[..selected_count(options.rho, groups.len())] {
        selected[group] = true;
    }

    let first_rows: Vec<usize> = groups
        .iter()
        .zip(&selected)
        .filter(|(_, &chosen)| chosen)
        .map(|(group, _)| group.rows[0])
        .collect();
    let mut rest_rows: Vec<usize> = groups
        .iter()
        .zip(&selected)
        .filter(|(_, &chosen)| !chosen)
        .flat_map(|(group, _)| group.rows.iter().copied())
        .collect();
    rest_rows.sort_unstable();
    Ok(Selection {
        prompts: scored.prompt_level(&first_rows)?,
        rest: scored.take(&rest_rows)?,
        prompts_in: groups.len(),
    })
}

/// Group indices, the ones to select first at the front.
fn rank(groups: &[PromptGroup], statistics: &[f64], strategy: Strategy, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    let by_id = |a: usize, b: usize| groups[a].prompt_id.cmp(groups[b].prompt_id);
    match strategy {
        Strategy::Lowest => {
            order.sort_by(|&a, &b| statistics[a].total_cmp(&statistics[b]).then(by_id(a, b)))
        }
        Strategy::Highest => {
            order.sort_by(|&a, &b| statistics[b].total_cmp(&statistics[a]).then(by_id(a, b)))
        }
        Strategy::Random => {
            order.sort_by(|&a, &b| by_id(a, b));
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut keys = vec![0u64; groups.len()];
            for &group in &order {
                keys[group] = rng.next_u64();
            }
            order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(by_id(a, b)));
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::scored;

    /// Six prompts × two samples, in an order that is not the prompt order.
    /// Per prompt (max, mean, min, gap):
    ///   p1 (0.9, 0.5,  0.1, 0.8)    p2 (0.3, 0.25, 0.2, 0.1)
    ///   p3 (0.6, 0.6,  0.6, 0.0)    p4 (-0.5, -0.75, -1.0, 0.5)
    ///   p5 (0.3, 0.0, -0.3, 0.6)    p6 (2.0, 1.5,  1.0, 1.0)
    fn six_prompts() -> Shard {
        scored(&[
            ("p1", 0, 0.9),
            ("p2", 0, 0.3),
            ("p1", 1, 0.1),
            ("p3", 0, 0.6),
            ("p2", 1, 0.2),
            ("p3", 1, 0.6),
            ("p4", 0, -0.5),
            ("p4", 1, -1.0),
            ("p5", 0, 0.3),
            ("p5", 1, -0.3),
            ("p6", 0, 2.0),
            ("p6", 1, 1.0),
        ])
    }

    fn options(rho: f64, by: RankBy, strategy: Strategy) -> SelectOptions {
        SelectOptions {
            rho,
            by,
            strategy,
            seed: 0,
        }
    }

    fn selected_ids(shard: &Shard, options: SelectOptions) -> Vec<String> {
        let selection = select_prompts(shard, &options).unwrap();
        selection
            .prompts
            .strings("prompt_id")
            .unwrap()
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn ranks_by_each_statistic() {
        let shard = six_prompts();
        // Output follows the input's prompt order, not the rank.
        assert_eq!(
            selected_ids(&shard, options(0.5, RankBy::Max, Strategy::Lowest)),
            ["p2", "p4", "p5"]
        );
        assert_eq!(
            selected_ids(&shard, options(0.5, RankBy::Mean, Strategy::Lowest)),
            ["p2", "p4", "p5"]
        );
        assert_eq!(
            selected_ids(&shard, options(0.5, RankBy::Min, Strategy::Lowest)),
            ["p1", "p4", "p5"]
        );
        assert_eq!(
            selected_ids(&shard, options(0.5, RankBy::Gap, Strategy::Lowest)),
            ["p2", "p3", "p4"]
        );
        assert_eq!(
            selected_ids(&shard, options(0.3, RankBy::Mean, Strategy::Lowest)),
            ["p4", "p5"]
        );
        assert_eq!(
            selected_ids(&shard, options(0.3, RankBy::Min, Strategy::Lowest)),
            ["p4", "p5"]
        );
    }

    #[test]
    fn highest_takes_the_top_of_the_ranking() {
        let shard = six_prompts();
        assert_eq!(
            selected_ids(&shard, options(0.3, RankBy::Max, Strategy::Highest)),
            ["p1", "p6"]
        );
        assert_eq!(
            selected_ids(&shard, options(0.3, RankBy::Gap, Strategy::Highest)),
            ["p1", "p6"]
        );
    }

    #[test]
    fn ties_break_by_prompt_id() {
        // p2 and p5 both have max 0.3: at rho 1/3 (2 prompts), p4 (-0.5) and then p2 win.
        let shard = six_prompts();
        assert_eq!(
            selected_ids(&shard, options(1.0 / 3.0, RankBy::Max, Strategy::Lowest)),
            ["p2", "p4"]
        );
        // Reversing the rows changes nothing.
        let reversed = shard.take(&(0..12).rev().collect::<Vec<_>>()).unwrap();
        assert_eq!(
            selected_ids(&reversed, options(1.0 / 3.0, RankBy::Max, Strategy::Lowest)),
            ["p4", "p2"]
        );
    }

    #[test]
    fn random_is_seeded_and_independent_of_row_order() {
        let shard = six_prompts();
        let pick = |shard: &Shard, seed| {
            let mut ids = selected_ids(
                shard,
                SelectOptions {
                    seed,
                    ..options(0.5, RankBy::Max, Strategy::Random)
                },
            );
            ids.sort();
            ids
        };
        let first = pick(&shard, 1);
        assert_eq!(first.len(), 3);
        assert_eq!(pick(&shard, 1), first);
        let reversed = shard.take(&(0..12).rev().collect::<Vec<_>>()).unwrap();
        assert_eq!(pick(&reversed, 1), first);
        let seeds_differ = (2..10).any(|seed| pick(&shard, seed) != first);
        assert!(seeds_differ, "eight other seeds all chose {first:?}");
    }

    #[test]
    fn rho_one_selects_everything_and_keeps_nothing() {
        let selection =
            select_prompts(&six_prompts(), &options(1.0, RankBy::Max, Strategy::Lowest)).unwrap();
        assert_eq!(
            selection.prompts.strings("prompt_id").unwrap(),
            ["p1", "p2", "p3", "p4", "p5", "p6"]
        );
        assert_eq!(selection.rest.num_rows(), 0);
        assert_eq!(selection.rest.column_names(), six_prompts().column_names());
        assert_eq!(selection.prompts_in, 6);
    }

    #[test]
    fn tiny_rho_selects_one_prompt() {
        assert_eq!(
            selected_ids(&six_prompts(), options(1e-9, RankBy::Max, Strategy::Lowest)),
            ["p4"]
        );
    }

    #[test]
    fn rest_holds_the_other_prompts_rows_in_input_order() {
        let selection =
            select_prompts(&six_prompts(), &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap();
        assert_eq!(
            selection.rest.strings("prompt_id").unwrap(),
            ["p1", "p1", "p3", "p3", "p6", "p6"]
        );
        assert_eq!(selection.rest.uints("sample").unwrap(), [0, 1, 0, 1, 0, 1]);
        assert_eq!(selection.rest.column_names(), six_prompts().column_names());
        assert_eq!(
            selection.prompts.column_names(),
            ["prompt_id", "prompt", "note"]
        );
    }

    #[test]
    fn ceiling_ignores_rounding_error() {
        assert_eq!(0.07 * 100.0, 7.000000000000001);
        assert_eq!(selected_count(0.07, 100), 7);
        assert_eq!(selected_count(0.7, 10), 7);
        assert_eq!(selected_count(0.28, 25), 7);
        assert_eq!(selected_count(0.7, 11), 8);
        assert_eq!(selected_count(0.5, 3), 2);
        assert_eq!(selected_count(1.0, 7), 7);
        assert_eq!(selected_count(1e-12, 7), 1);
        assert_eq!(selected_count(0.7000001, 10), 8);
    }

    #[test]
    fn ceiling_matches_exact_arithmetic_for_percentages() {
        for percent in 1..=100usize {
            for prompts in 1..=300usize {
                let exact = (percent * prompts).div_ceil(100);
                let rho = percent as f64 / 100.0;
                assert_eq!(
                    selected_count(rho, prompts),
                    exact,
                    "rho {rho}, {prompts} prompts"
                );
            }
        }
    }

    #[test]
    fn rho_must_be_a_fraction() {
        assert_eq!(parse_rho("0.7"), Ok(0.7));
        assert_eq!(parse_rho("1"), Ok(1.0));
        for bad in ["0", "1.5", "NaN", "nan", "-0.1", "inf"] {
            let err = parse_rho(bad).unwrap_err();
            assert!(err.contains("rho must be in (0, 1]"), "{bad}: {err}");
        }
        assert!(parse_rho("seven")
            .unwrap_err()
            .starts_with("'seven' is not a number"));
    }

    #[test]
    fn bad_rewards_are_errors() {
        let nan = scored(&[("a", 0, 1.0), ("a", 1, f32::NAN)]);
        let err = select_prompts(&nan, &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: column 'reward': NaN at row 2"
        );
        let empty = scored(&[]);
        let err = select_prompts(&empty, &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: no rows: there are no prompts to select from"
        );
    }
}
