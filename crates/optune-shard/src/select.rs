//! `opt-select`: choose the prompts to regenerate in the next OPTune
//! iteration, the fraction ρ whose responses scored lowest.
//!
//! With history (the scored shards of earlier iterations), a prompt is ranked
//! by the rewards of all its rounds, and prompts whose rewards showed no
//! spread in each of their last k rounds can be skipped, with an exploration
//! probability that brings them back (GRESO's pre-rollout filter, Zheng et al.
//! 2025, arXiv 2506.02177; see [`SkipFlat`]).

use crate::contract::{col, ColumnKind};
use crate::groups::{group_by_prompt, require_one_text_per_prompt, PromptGroup};
use crate::shard::Shard;
use anyhow::{bail, ensure, Result};
use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};

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
    /// The fraction of prompts to select, 0 < ρ ≤ 1 (of the prompts not
    /// skipped by [`SelectOptions::skip_flat`]).
    pub rho: f64,
    pub by: RankBy,
    pub strategy: Strategy,
    /// Seeds [`Strategy::Random`] and the exploration draws of [`SkipFlat`].
    pub seed: u64,
    pub skip_flat: Option<SkipFlat>,
}

/// GRESO-style skipping: a prompt whose rewards spread by no more than
/// `tolerance` (max − min) in each of its last `rounds` rounds is not
/// regenerated, unless a draw with probability `explore` brings it back.
///
/// A round is one scored shard (the history in the order given, then the
/// input) in which the prompt has responses not seen in an earlier one:
/// OPTune's scored set of iteration t holds the kept rows of t − 1 unchanged,
/// and those are not a new round. A prompt with fewer rounds is never
/// skipped. GRESO itself skips a prompt that was uninformative in its last z
/// rounds with probability `1 − p_eᶻ` and tunes `p_e` online towards a target
/// rate; this is the fixed-k, fixed-probability form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SkipFlat {
    /// k ≥ 1.
    pub rounds: usize,
    /// The probability, in [0, 1], that a prompt to skip is kept as a candidate.
    pub explore: f64,
    /// The largest reward spread that counts as none, ≥ 0.
    pub tolerance: f64,
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
    /// How many of them [`SkipFlat`] took out of the selection.
    pub skipped: usize,
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

/// `--explore`: a probability, in [0, 1].
pub fn parse_explore(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "'{text}': the probability that a flat prompt stays a candidate must be in [0, 1]"
        )),
    }
}

/// `--flat-tol`: a reward spread, finite and >= 0.
pub fn parse_flat_tol(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!(
            "'{text}': the largest reward spread that counts as none must be a finite number >= 0"
        )),
    }
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
///
/// `history` holds the scored shards of earlier iterations, oldest first.
/// When it is not empty, each prompt of `scored` is ranked by the rewards of
/// all its responses in the history and in `scored` (each response once:
/// see [`SkipFlat`] for what counts as the same response), and
/// [`SelectOptions::skip_flat`] looks at the rounds there. Prompts that are
/// only in the history are ignored.
pub fn select_prompts(
    scored: &Shard,
    history: &[Shard],
    options: &SelectOptions,
) -> Result<Selection> {
    for shard in history.iter().chain([scored]) {
        shard.require(&[
            (col::PROMPT_ID, ColumnKind::Utf8),
            (col::REWARD, ColumnKind::Float),
        ])?;
    }
    // The selected prompts go back to generation, which needs their text: a null is refused
    // here, by its row, not by opt-gen in the selection.
    let prompt_texts = scored.prompt_texts()?;
    if scored.num_rows() == 0 {
        bail!(
            "{}: no rows: there are no prompts to select from",
            scored.name()
        );
    }
    let prompt_ids = scored.strings(col::PROMPT_ID)?;
    let groups = group_by_prompt(&prompt_ids);
    require_one_text_per_prompt(&groups, &prompt_texts, |row| {
        format!("{} row {}", scored.name(), row + 1)
    })?;
    let files: Vec<&Shard> = history.iter().chain([scored]).collect();
    let rounds = reward_rounds(&files)?;
    let rounds_of = |group: &PromptGroup| &rounds[group.prompt_id];
    let statistics: Vec<f64> = groups
        .iter()
        .map(|group| {
            options
                .by
                .statistic(rounds_of(group).iter().flatten().copied())
        })
        .collect();
    let skip = match options.skip_flat {
        Some(rule) => {
            rule.check()?;
            let draws = exploration_draws(&groups, options.seed);
            groups
                .iter()
                .zip(draws)
                .map(|(group, draw)| rule.is_flat(rounds_of(group)) && draw >= rule.explore)
                .collect()
        }
        None => vec![false; groups.len()],
    };

    let ranked: Vec<usize> = rank(&groups, &statistics, options.strategy, options.seed)
        .into_iter()
        .filter(|&group| !skip[group])
        .collect();
    let mut selected = vec![false; groups.len()];
    for &group in &ranked[..selected_count(options.rho, ranked.len())] {
        selected[group] = true;
    }

    // A column of the user's that differs between a prompt's responses stays in --rest only.
    let varying = scored.varying_columns(groups.iter().map(|group| group.rows.as_slice()));
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
        prompts: scored.prompt_level(&first_rows, &varying)?,
        rest: scored.take(&rest_rows)?,
        prompts_in: groups.len(),
        skipped: skip.iter().filter(|&&s| s).count(),
    })
}

impl SkipFlat {
    fn check(&self) -> Result<()> {
        ensure!(
            self.rounds >= 1,
            "the number of flat rounds to skip after must be at least 1"
        );
        ensure!(
            (0.0..=1.0).contains(&self.explore),
            "the exploration probability must be in [0, 1], got {}",
            self.explore
        );
        ensure!(
            self.tolerance >= 0.0,
            "the reward spread tolerance must be >= 0, got {}",
            self.tolerance
        );
        Ok(())
    }

    /// Whether the last `rounds` of `rounds_of_prompt` each spread by no
    /// more than the tolerance.
    fn is_flat(&self, rounds_of_prompt: &[Vec<f64>]) -> bool {
        rounds_of_prompt.len() >= self.rounds
            && rounds_of_prompt[rounds_of_prompt.len() - self.rounds..]
                .iter()
                .all(|rewards| {
                    let max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let min = rewards.iter().copied().fold(f64::INFINITY, f64::min);
                    max - min <= self.tolerance
                })
    }
}

/// One uniform draw in [0, 1) per group, taken in `prompt_id` order from
/// `seed`'s second ChaCha stream (the first one orders
/// [`Strategy::Random`]), so a prompt's draw depends neither on the row order
/// nor on which other prompts are flat.
fn exploration_draws(groups: &[PromptGroup], seed: u64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| groups[a].prompt_id.cmp(groups[b].prompt_id));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    let mut draws = vec![0.0; groups.len()];
    for group in order {
        draws[group] = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    }
    draws
}

/// The columns that, with `prompt_id` and `reward`, tell one response from
/// another across shards: those of `sample`, `response`, `policy` and `seed`
/// that every shard has.
const RESPONSE_IDENTITY: [&str; 4] = [col::SAMPLE, col::RESPONSE, col::POLICY, col::SEED];

/// Every prompt's rewards per round, oldest first (see [`SkipFlat`] for
/// rounds). A response seen in an earlier shard (same prompt, reward and
/// identity columns) is a kept copy and does not count again.
fn reward_rounds(files: &[&Shard]) -> Result<HashMap<String, Vec<Vec<f64>>>> {
    let identity: Vec<&str> = RESPONSE_IDENTITY
        .into_iter()
        .filter(|name| files.iter().all(|shard| shard.has_column(name)))
        .collect();
    let mut seen: HashSet<(String, u64, Vec<String>)> = HashSet::new();
    let mut rounds: HashMap<String, Vec<Vec<f64>>> = HashMap::new();
    for shard in files {
        let prompt_ids = shard.strings(col::PROMPT_ID)?;
        let rewards = shard.finite_floats(col::REWARD)?;
        let columns = identity
            .iter()
            .map(|name| Ok(cast(shard.column(name)?, &DataType::Utf8)?))
            .collect::<Result<Vec<_>>>()?;
        let mut new_round: HashMap<&str, Vec<f64>> = HashMap::new();
        for (row, (&prompt_id, &reward)) in prompt_ids.iter().zip(&rewards).enumerate() {
            let key: Vec<String> = columns
                .iter()
                .map(|column| {
                    let column = column.as_string::<i32>();
                    if column.is_null(row) {
                        String::new()
                    } else {
                        column.value(row).to_string()
                    }
                })
                .collect();
            if seen.insert((prompt_id.to_string(), reward.to_bits(), key)) {
                new_round.entry(prompt_id).or_default().push(reward);
            }
        }
        for (prompt_id, round) in new_round {
            rounds.entry(prompt_id.to_string()).or_default().push(round);
        }
    }
    Ok(rounds)
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
            skip_flat: None,
        }
    }

    fn selected_ids(shard: &Shard, options: SelectOptions) -> Vec<String> {
        selected_with_history(shard, &[], options)
    }

    fn selected_with_history(
        shard: &Shard,
        history: &[Shard],
        options: SelectOptions,
    ) -> Vec<String> {
        let selection = select_prompts(shard, history, &options).unwrap();
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
    fn a_column_that_differs_between_responses_stays_in_the_rest() {
        let shard = scored(&[("p1", 0, 0.5), ("p1", 1, 0.2), ("p2", 0, 0.1)])
            .with_column("judge", Shard::string_column(["x", "y", "z"]))
            .unwrap();
        let selection =
            select_prompts(&shard, &[], &options(1.0, RankBy::Max, Strategy::Lowest)).unwrap();
        assert_eq!(
            selection.prompts.column_names(),
            ["prompt_id", "prompt", "note"]
        );
        let half =
            select_prompts(&shard, &[], &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap();
        assert_eq!(half.rest.strings("judge").unwrap(), ["x", "y"]);
    }

    #[test]
    fn a_prompt_id_with_two_prompts_is_refused() {
        let shard = scored(&[("p1", 0, 0.5), ("p2", 0, 0.1), ("p1", 1, 0.2)]);
        let prompts = Shard::string_column(["one", "two", "one, edited"]);
        let shard = shard.with_column(col::PROMPT, prompts).unwrap();
        let err =
            select_prompts(&shard, &[], &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prompt_id 'p1' has two different prompts: scored.parquet row 1 and scored.parquet \
             row 3; give each prompt its own prompt_id"
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
        let selection = select_prompts(
            &six_prompts(),
            &[],
            &options(1.0, RankBy::Max, Strategy::Lowest),
        )
        .unwrap();
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
        let selection = select_prompts(
            &six_prompts(),
            &[],
            &options(0.5, RankBy::Max, Strategy::Lowest),
        )
        .unwrap();
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
        let err =
            select_prompts(&nan, &[], &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: column 'reward': NaN at row 2"
        );
        let empty = scored(&[]);
        let err =
            select_prompts(&empty, &[], &options(0.5, RankBy::Max, Strategy::Lowest)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: no rows: there are no prompts to select from"
        );
    }

    /// testdata/shards/history: three iterations of prompts a, b, c (two samples each); c is
    /// kept (not regenerated) in iteration 2, so the scored set of iteration 2 holds iteration
    /// 1's c rows unchanged.
    ///   a: iter1 (0.5, 0.5)  iter2 (0.2, 0.2)  iter3 (0.9, 0.9)   flat in every round
    ///   b: iter1 (0.0, 1.0)  iter2 (0.4, 0.4)  iter3 (0.3, 0.3)   flat in the last two
    ///   c: iter1 (0.1, 0.1)  [kept]            iter3 (0.1, 0.1)   two rounds, both flat
    fn three_iterations() -> [Shard; 3] {
        [1, 2, 3].map(|i| {
            let path = std::path::Path::new(
                &std::env::var_os("CARGO_MANIFEST_DIR")
                    .expect("cargo test sets CARGO_MANIFEST_DIR"),
            )
            .join(format!(
                "../../testdata/shards/history/scored-iter{i}.jsonl"
            ));
            Shard::read(Some(&path)).unwrap()
        })
    }

    #[test]
    fn history_ranks_by_every_round_and_counts_kept_rows_once() {
        let [first, second, third] = three_iterations();
        let history = [first, second];
        let rounds = reward_rounds(&history.iter().chain([&third]).collect::<Vec<_>>()).unwrap();
        assert_eq!(rounds["a"], [vec![0.5; 2], vec![0.2; 2], vec![0.9; 2]]);
        // c's rows in iteration 2 are iteration 1's, kept: no round of their own.
        assert_eq!(rounds["c"], [vec![0.1; 2], vec![0.1; 2]]);
        // Means over all rounds: a (0.5 + 0.2 + 0.9)/3 = 0.533, b (0.5 + 0.4 + 0.3)/3 = 0.4,
        // c 0.1. The last round alone ranks b (0.3) below a (0.9) too, but c ties b's mean
        // only with history: at ρ = 1/3 the lowest is c either way, at 2/3 {b, c}.
        let mean = |rho| options(rho, RankBy::Mean, Strategy::Lowest);
        assert_eq!(
            selected_with_history(&third, &history, mean(1.0 / 3.0)),
            ["c"]
        );
        assert_eq!(
            selected_with_history(&third, &history, mean(2.0 / 3.0)),
            ["b", "c"]
        );
        // Max over all rounds: a 0.9, b 1.0 (iteration 1), c 0.1: the two lowest are a and c,
        // while the last round alone (a 0.9, b 0.3, c 0.1) gives b and c.
        let max = options(2.0 / 3.0, RankBy::Max, Strategy::Lowest);
        assert_eq!(selected_with_history(&third, &history, max), ["a", "c"]);
        assert_eq!(selected_ids(&third, max), ["b", "c"]);
    }

    fn skipping(rounds: usize, explore: f64, tolerance: f64) -> SelectOptions {
        SelectOptions {
            skip_flat: Some(SkipFlat {
                rounds,
                explore,
                tolerance,
            }),
            ..options(1.0, RankBy::Max, Strategy::Lowest)
        }
    }

    #[test]
    fn prompts_flat_in_their_last_rounds_are_skipped() {
        let [first, second, third] = three_iterations();
        let history = [first, second];
        let select = |options| select_prompts(&third, &history, &options).unwrap();
        // k = 2: a (flat in all three) and c (two flat rounds) are skipped; b was flat in its last
        // two rounds too.
        let selection = select(skipping(2, 0.0, 0.0));
        assert_eq!(selection.skipped, 3);
        assert_eq!(selection.prompts.num_rows(), 0);
        assert_eq!(selection.rest.num_rows(), 6);
        // k = 3: c has only two rounds and b's first round spread 1.0: a alone is skipped.
        let selection = select(skipping(3, 0.0, 0.0));
        assert_eq!(selection.skipped, 1);
        assert_eq!(selection.prompts.strings("prompt_id").unwrap(), ["b", "c"]);
        // A tolerance of 1 makes b's first round flat too.
        assert_eq!(select(skipping(3, 0.0, 1.0)).skipped, 2);
        // Exploration 1 brings every prompt back.
        assert_eq!(select(skipping(2, 1.0, 0.0)).skipped, 0);
        // ρ applies to the prompts not skipped: ⌈0.5 · 2⌉ = 1 of b and c (c: max 0.1 lowest).
        let half = SelectOptions {
            rho: 0.5,
            ..skipping(3, 0.0, 0.0)
        };
        assert_eq!(select(half).prompts.strings("prompt_id").unwrap(), ["c"]);
        // Without history every prompt has one round: k = 1 skips the flat ones (all three in
        // iteration 3, a and c in iteration 1).
        let selection = select_prompts(&third, &[], &skipping(1, 0.0, 0.0)).unwrap();
        assert_eq!(selection.skipped, 3);
        assert_eq!(
            select_prompts(&history[0], &[], &skipping(1, 0.0, 0.0))
                .unwrap()
                .skipped,
            2
        );
    }

    #[test]
    fn exploration_is_seeded_and_independent_of_row_order() {
        // 40 prompts, each flat in its one round.
        let ids: Vec<String> = (0..40).map(|i| format!("q{i:02}")).collect();
        let rows: Vec<(&str, u32, f32)> = ids
            .iter()
            .flat_map(|id| [(id.as_str(), 0, 0.5), (id.as_str(), 1, 0.5)])
            .collect();
        let shard = scored(&rows);
        let kept = |shard: &Shard, seed| {
            let options = SelectOptions {
                seed,
                ..skipping(1, 0.25, 0.0)
            };
            let mut ids: Vec<String> = select_prompts(shard, &[], &options)
                .unwrap()
                .prompts
                .strings("prompt_id")
                .unwrap()
                .into_iter()
                .map(String::from)
                .collect();
            ids.sort();
            ids
        };
        let first = kept(&shard, 5);
        // About a quarter explored: 10 expected, binomial(40, 0.25) within 2..=20 by far.
        assert!((2..=20).contains(&first.len()), "{}", first.len());
        assert_eq!(kept(&shard, 5), first);
        let reversed = shard.take(&(0..80).rev().collect::<Vec<_>>()).unwrap();
        assert_eq!(kept(&reversed, 5), first);
        assert_ne!(kept(&shard, 6), first);
    }

    #[test]
    fn skip_settings_are_checked() {
        for bad in [
            skipping(0, 0.1, 0.0),
            skipping(1, 1.5, 0.0),
            skipping(1, 0.1, -1.0),
        ] {
            assert!(select_prompts(&six_prompts(), &[], &bad).is_err());
        }
        // History shards need prompt_id and reward.
        let no_reward = six_prompts().take(&[0]).unwrap();
        let no_reward = Shard::new(
            "old.parquet",
            arrow::record_batch::RecordBatch::try_from_iter(
                no_reward
                    .batch()
                    .schema()
                    .fields()
                    .iter()
                    .zip(no_reward.batch().columns())
                    .filter(|(f, _)| f.name() != "reward")
                    .map(|(f, c)| (f.name().clone(), c.clone())),
            )
            .unwrap(),
        );
        let err = select_prompts(
            &six_prompts(),
            &[no_reward],
            &options(0.5, RankBy::Max, Strategy::Lowest),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("old.parquet: missing required column 'reward'"),
            "{err}"
        );
    }
}
