//! `opt-pairs`: turn scored responses into one preference pair per prompt,
//! the best response against the worst, and keep the pairs of largest
//! margin on request ([`keep_top_fraction`]).

use crate::concat::concat_shards;
use crate::contract::{col, ColumnKind};
use crate::groups::{group_by_prompt, require_one_text_per_prompt};
use crate::select::selected_count;
use crate::shard::Shard;
use anyhow::{bail, Result};
use arrow::array::{ArrayRef, Float32Array};
use std::collections::HashMap;
use std::sync::Arc;

/// The pairs shard with the counts the summary line reports.
#[derive(Debug)]
pub struct PairShard {
    /// One row per kept prompt, sorted by prompt_id: prompt-level columns,
    /// then `chosen`, `rejected`, `chosen_reward`, `rejected_reward`,
    /// `reward_gap`. (Sorted, like every tool's `--shard` output, so that the
    /// slices of `opt-wdpo --reference-only --shard K/N` concatenate to it.)
    pub shard: Shard,
    pub rows_in: usize,
    pub prompts_in: usize,
    /// Prompts with fewer than two responses.
    pub skipped_single: usize,
    /// Prompts whose responses are all the same text.
    pub skipped_same: usize,
    /// Prompts whose best and worst rewards differ by no more than the
    /// minimum gap.
    pub skipped_gap: usize,
    /// Pairs dropped by [`keep_top_fraction`].
    pub skipped_top_frac: usize,
}

/// Parses and checks `--top-frac`, for clap: a number in (0, 1].
pub fn parse_top_frac(text: &str) -> Result<f64, String> {
    let frac: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if !(frac > 0.0 && frac <= 1.0) {
        return Err(format!(
            "the fraction of pairs to keep must be in (0, 1], got {frac}"
        ));
    }
    Ok(frac)
}

/// Keeps the ⌈frac · pairs⌉ pairs with the largest `reward_gap` (the margin
/// rule of "Less is More", Deng et al. 2025, arXiv 2502.14560), in their
/// order; among equal gaps the lower `prompt_id` is kept. Rounds as
/// `opt-select` does ([`selected_count`]), so at least one pair stays.
pub fn keep_top_fraction(pairs: &mut PairShard, frac: f64) -> Result<()> {
    let shard = &pairs.shard;
    let n = shard.num_rows();
    if n == 0 {
        return Ok(());
    }
    let gaps = shard.finite_floats(col::REWARD_GAP)?;
    let ids = shard.strings(col::PROMPT_ID)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| gaps[b].total_cmp(&gaps[a]).then(ids[a].cmp(ids[b])));
    let mut kept = order[..selected_count(frac, n)].to_vec();
    kept.sort_unstable();
    pairs.skipped_top_frac = n - kept.len();
    pairs.shard = shard.take(&kept)?;
    Ok(())
}

/// Parses and checks `--min-gap`, for clap: a finite number ≥ 0.
pub fn parse_min_gap(text: &str) -> Result<f64, String> {
    let min_gap: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if !(min_gap.is_finite() && min_gap >= 0.0) {
        return Err(format!(
            "the minimum reward gap must be a finite number >= 0, got {min_gap}"
        ));
    }
    Ok(min_gap)
}

/// One scored response, located in its input for error messages.
struct Response<'a> {
    input: usize,
    row: usize,
    prompt_id: &'a str,
    sample: u64,
    text: &'a str,
    reward: f64,
}

/// Pairs each prompt's highest-rewarded response (`chosen`) with its
/// lowest-rewarded one whose text differs (`rejected`), over the rows of all
/// `inputs`. Among equal rewards the lower `sample` is taken for either role.
/// A prompt is kept only when `chosen_reward − rejected_reward > min_gap`, so
/// with the default 0 a prompt whose rewards are all equal is skipped, as is a
/// prompt with a single response or with one text in all its responses. The
/// rows of one `prompt_id` must agree on its prompt.
pub fn build_pairs(inputs: &[Shard], min_gap: f64) -> Result<PairShard> {
    let mut responses = Vec::new();
    let mut prompt_texts = Vec::new();
    for (input, shard) in inputs.iter().enumerate() {
        shard.require(&[
            (col::PROMPT_ID, ColumnKind::Utf8),
            (col::SAMPLE, ColumnKind::UInt),
            (col::RESPONSE, ColumnKind::Utf8),
            (col::REWARD, ColumnKind::Float),
        ])?;
        // A pair without its prompt would reach opt-wdpo as a transcript to split; a null
        // prompt is refused here, by its row, not by the next tool.
        prompt_texts.extend(shard.prompt_texts()?);
        let prompt_ids = shard.strings(col::PROMPT_ID)?;
        let samples = shard.uints(col::SAMPLE)?;
        let texts = shard.strings(col::RESPONSE)?;
        let rewards = shard.finite_floats(col::REWARD)?;
        for (row, (((prompt_id, sample), text), reward)) in prompt_ids
            .into_iter()
            .zip(samples)
            .zip(texts)
            .zip(rewards)
            .enumerate()
        {
            // The pairs shard holds rewards and their gaps as f32: beyond half its range a gap
            // could be written as infinity.
            if reward.abs() > f64::from(f32::MAX) / 2.0 {
                bail!(
                    "{}: column '{}': {reward:e} at row {} is too large: rewards and their gaps \
                     are written as f32, so |reward| must stay within 1.7e38",
                    shard.name(),
                    col::REWARD,
                    row + 1
                );
            }
            responses.push(Response {
                input,
                row,
                prompt_id,
                sample,
                text,
                reward,
            });
        }
    }
    let locate =
        |response: &Response| format!("{} row {}", inputs[response.input].name(), response.row + 1);

    let mut first_seen: HashMap<(&str, u64), usize> = HashMap::new();
    for (index, response) in responses.iter().enumerate() {
        if let Some(&earlier) = first_seen.get(&(response.prompt_id, response.sample)) {
            bail!(
                "duplicate response (prompt_id '{}', sample {}): {} and {}",
                response.prompt_id,
                response.sample,
                locate(&responses[earlier]),
                locate(response)
            );
        }
        first_seen.insert((response.prompt_id, response.sample), index);
    }
    if responses.is_empty() {
        let names: Vec<&str> = inputs.iter().map(Shard::name).collect();
        bail!(
            "{}: no rows: there are no responses to pair",
            names.join(", ")
        );
    }

    // Row i of the merged shard is responses[i]: both follow the inputs in order.
    let merged = concat_shards(inputs)?;
    let prompt_ids: Vec<&str> = responses
        .iter()
        .map(|response| response.prompt_id)
        .collect();
    let mut groups = group_by_prompt(&prompt_ids);
    require_one_text_per_prompt(&groups, &prompt_texts, |row| locate(&responses[row]))?;
    groups.sort_by(|a, b| a.prompt_id.cmp(b.prompt_id));
    let (mut skipped_single, mut skipped_same, mut skipped_gap) = (0, 0, 0);
    // The rows of each prompt that becomes a pair.
    let mut paired: Vec<&[usize]> = Vec::new();
    // Rows of the merged shard, which are indices into `responses`.
    let mut chosen_rows: Vec<usize> = Vec::new();
    let mut rejected_rows: Vec<usize> = Vec::new();
    for group in &groups {
        if group.rows.len() < 2 {
            skipped_single += 1;
            continue;
        }
        let members = || group.rows.iter().copied();
        let by_reward =
            |a: &usize, b: &usize| responses[*a].reward.total_cmp(&responses[*b].reward);
        let by_sample = |a: &usize, b: &usize| responses[*a].sample.cmp(&responses[*b].sample);
        // Distinct samples (checked above) make these orders total.
        let Some(best) = members().max_by(|a, b| by_reward(a, b).then(by_sample(b, a))) else {
            continue;
        };
        // A response identical to the chosen one teaches nothing (its DPO gradient is zero up
        // to rounding, which AdamW scales up to full steps), whatever reward noise says.
        let Some(worst) = members()
            .filter(|&row| responses[row].text != responses[best].text)
            .min_by(|a, b| by_reward(a, b).then(by_sample(a, b)))
        else {
            skipped_same += 1;
            continue;
        };
        // Rewards are finite (checked above), so this comparison is total.
        if responses[best].reward - responses[worst].reward <= min_gap {
            skipped_gap += 1;
            continue;
        }
        paired.push(group.rows.as_slice());
        chosen_rows.push(best);
        rejected_rows.push(worst);
    }
    let chosen: Vec<&Response> = chosen_rows.iter().map(|&row| &responses[row]).collect();
    let rejected: Vec<&Response> = rejected_rows.iter().map(|&row| &responses[row]).collect();

    let rewards = |side: &[&Response]| -> ArrayRef {
        Arc::new(Float32Array::from_iter_values(
            side.iter().map(|response| response.reward as f32),
        ))
    };
    let gaps: ArrayRef = Arc::new(Float32Array::from_iter_values(
        chosen
            .iter()
            .zip(&rejected)
            .map(|(c, r)| (c.reward - r.reward) as f32),
    ));
    // A column of the user's that differs between the responses of a paired prompt goes with
    // each side.
    let varying = merged.varying_columns(paired.iter().copied());
    let first_rows: Vec<usize> = paired.iter().map(|rows| rows[0]).collect();
    let mut shard = merged
        .prompt_level(&first_rows, &varying)?
        .with_column(
            col::CHOSEN,
            Shard::string_column(chosen.iter().map(|response| response.text)),
        )?
        .with_column(
            col::REJECTED,
            Shard::string_column(rejected.iter().map(|response| response.text)),
        )?
        .with_column(col::CHOSEN_REWARD, rewards(&chosen))?
        .with_column(col::REJECTED_REWARD, rewards(&rejected))?
        .with_column(col::REWARD_GAP, gaps)?;
    if !varying.is_empty() {
        for (side, rows) in [(col::CHOSEN, &chosen_rows), (col::REJECTED, &rejected_rows)] {
            let taken = merged.take(rows)?;
            for name in &varying {
                let side_name = format!("{side}_{name}");
                // Side columns are named apart, so one that is there came with the input.
                if shard.has_column(&side_name) {
                    bail!(
                        "column '{name}' differs between the responses of one prompt, so the \
                         pairs give it as {side_name}, but the input already has a column \
                         '{side_name}': rename one of them"
                    );
                }
                shard = shard.with_column(&side_name, taken.column(name)?.clone())?;
            }
        }
    }
    Ok(PairShard {
        shard,
        rows_in: responses.len(),
        prompts_in: groups.len(),
        skipped_single,
        skipped_same,
        skipped_gap,
        skipped_top_frac: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::scored;

    fn pairs_of(pairs: &PairShard) -> Vec<(String, String, String, f64)> {
        let shard = &pairs.shard;
        let ids = shard.strings(col::PROMPT_ID).unwrap();
        let chosen = shard.strings(col::CHOSEN).unwrap();
        let rejected = shard.strings(col::REJECTED).unwrap();
        let gaps = shard.floats(col::REWARD_GAP).unwrap();
        (0..shard.num_rows())
            .map(|row| {
                (
                    ids[row].into(),
                    chosen[row].into(),
                    rejected[row].into(),
                    (gaps[row] * 1e4).round() / 1e4,
                )
            })
            .collect()
    }

    fn pair(id: &str, chosen: u32, rejected: u32, gap: f64) -> (String, String, String, f64) {
        (
            id.into(),
            format!("{id} response {chosen}"),
            format!("{id} response {rejected}"),
            gap,
        )
    }

    #[test]
    fn responses_without_their_prompts_are_refused() {
        let full = scored(&[("a", 0, 0.5), ("a", 1, 0.9)]);
        let batch = full.batch();
        let without = batch.project(&[0, 2, 3, 4, 5]).unwrap();
        assert!(without.schema().column_with_name("prompt").is_none());
        let err = build_pairs(&[Shard::new("scored.parquet", without)], 0.0).unwrap_err();
        assert!(
            err.to_string()
                .contains("scored.parquet: missing required column 'prompt' or 'messages'"),
            "{err}"
        );
        assert!(build_pairs(&[full], 0.0).is_ok());
    }

    #[test]
    fn pairs_best_against_worst_and_counts_skips() {
        let shard = scored(&[
            ("a", 0, 0.5),
            ("a", 1, 0.9),
            ("a", 2, -0.5),
            ("b", 0, 0.25),
            ("c", 0, 0.1),
            ("c", 1, 0.1),
            ("d", 0, -1.0),
            ("d", 1, 1.0),
        ]);
        let pairs = build_pairs(&[shard], 0.0).unwrap();
        assert_eq!(
            pairs_of(&pairs),
            [pair("a", 1, 2, 1.4), pair("d", 1, 0, 2.0)]
        );
        assert_eq!(
            (
                pairs.rows_in,
                pairs.prompts_in,
                pairs.skipped_single,
                pairs.skipped_gap
            ),
            (8, 4, 1, 1)
        );
        assert_eq!(
            pairs.shard.column_names(),
            [
                "prompt_id",
                "prompt",
                "note",
                "chosen",
                "rejected",
                "chosen_reward",
                "rejected_reward",
                "reward_gap"
            ]
        );
        assert_eq!(
            pairs.shard.floats(col::CHOSEN_REWARD).unwrap(),
            [0.9f32 as f64, 1.0]
        );
        assert_eq!(
            pairs.shard.floats(col::REJECTED_REWARD).unwrap(),
            [-0.5, -1.0]
        );
    }

    /// `scored` with the `response` and `prompt` columns replaced.
    fn with_texts(shard: Shard, responses: &[&str], prompts: &[&str]) -> Shard {
        shard
            .with_column(
                col::RESPONSE,
                Shard::string_column(responses.iter().copied()),
            )
            .unwrap()
            .with_column(col::PROMPT, Shard::string_column(prompts.iter().copied()))
            .unwrap()
    }

    #[test]
    fn rejected_is_the_worst_response_that_differs_from_chosen() {
        let shard = with_texts(
            scored(&[
                ("a", 0, 0.9),
                ("a", 1, 0.1),
                ("a", 2, 0.5),
                ("b", 0, 0.7),
                ("b", 1, 0.2),
            ]),
            &["same", "same", "other", "twin", "twin"],
            &["pa", "pa", "pa", "pb", "pb"],
        );
        let pairs = build_pairs(&[shard], 0.0).unwrap();
        assert_eq!(
            pairs_of(&pairs),
            [("a".into(), "same".into(), "other".into(), 0.4)]
        );
        assert_eq!((pairs.skipped_same, pairs.skipped_gap), (1, 0));
    }

    #[test]
    fn a_column_that_differs_between_responses_goes_with_each_side() {
        let shard = scored(&[("a", 0, 0.9), ("a", 1, 0.1), ("b", 0, 0.7), ("b", 1, 0.2)])
            .with_column(
                "judge",
                Shard::string_column(["good", "bad", "fine", "poor"]),
            )
            .unwrap();
        let pairs = build_pairs(&[shard], 0.0).unwrap().shard;
        assert_eq!(
            pairs.column_names(),
            [
                "prompt_id",
                "prompt",
                "note",
                "chosen",
                "rejected",
                "chosen_reward",
                "rejected_reward",
                "reward_gap",
                "chosen_judge",
                "rejected_judge"
            ]
        );
        assert_eq!(pairs.strings("chosen_judge").unwrap(), ["good", "fine"]);
        assert_eq!(pairs.strings("rejected_judge").unwrap(), ["bad", "poor"]);
    }

    #[test]
    fn a_side_column_that_would_replace_one_of_the_inputs_is_refused() {
        let shard = scored(&[("a", 0, 0.9), ("a", 1, 0.1)])
            .with_column("judge", Shard::string_column(["good", "bad"]))
            .unwrap()
            .with_column("chosen_judge", Shard::string_column(["mine", "mine"]))
            .unwrap();
        let err = build_pairs(&[shard], 0.0).unwrap_err().to_string();
        assert!(
            err.contains("the input already has a column 'chosen_judge'"),
            "{err}"
        );
    }

    #[test]
    fn a_prompt_id_with_two_prompts_is_refused() {
        let kept = scored(&[("a", 0, 0.1), ("b", 0, 0.2)]);
        let new = Shard::new(
            "new.parquet",
            with_texts(scored(&[("a", 1, 0.7)]), &["r"], &["edited"]).into_batch(),
        );
        let err = build_pairs(&[kept, new], 0.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prompt_id 'a' has two different prompts: scored.parquet row 1 and new.parquet row 1; \
             give each prompt its own prompt_id"
        );
    }

    #[test]
    fn ties_prefer_the_lower_sample() {
        let shard = scored(&[("a", 3, 1.0), ("a", 1, 1.0), ("a", 2, 0.0), ("a", 0, 0.0)]);
        let pairs = build_pairs(&[shard], 0.0).unwrap();
        assert_eq!(pairs_of(&pairs), [pair("a", 1, 0, 1.0)]);
    }

    #[test]
    fn min_gap_is_exclusive() {
        let shard = scored(&[("a", 0, 1.0), ("a", 1, 0.5), ("b", 0, 1.0), ("b", 1, 0.0)]);
        let pairs = build_pairs(std::slice::from_ref(&shard), 0.5).unwrap();
        assert_eq!(pairs_of(&pairs), [pair("b", 0, 1, 1.0)]);
        assert_eq!(pairs.skipped_gap, 1);
        assert_eq!(build_pairs(&[shard], 0.49).unwrap().shard.num_rows(), 2);
    }

    #[test]
    fn merges_prompts_across_shards_and_sorts_them() {
        let kept = scored(&[("c", 0, 0.5), ("a", 0, 0.1), ("a", 1, 0.2), ("b", 0, 0.3)]);
        let new = Shard::new(
            "new.parquet",
            scored(&[("b", 1, 0.7), ("c", 1, 0.4)]).into_batch(),
        );
        let pairs = build_pairs(&[kept, new], 0.0).unwrap();
        assert_eq!(
            pairs_of(&pairs),
            [
                pair("a", 1, 0, 0.1),
                pair("b", 1, 0, 0.4),
                pair("c", 0, 1, 0.1)
            ]
        );
        assert_eq!(
            (pairs.rows_in, pairs.prompts_in, pairs.skipped_single),
            (6, 3, 0)
        );
    }

    #[test]
    fn duplicates_across_shards_name_both_places() {
        let kept = scored(&[("a", 0, 0.1), ("b", 1, 0.2)]);
        let new = Shard::new(
            "new.parquet",
            scored(&[("c", 0, 0.7), ("b", 1, 0.5)]).into_batch(),
        );
        let err = build_pairs(&[kept, new], 0.0).unwrap_err();
        assert_eq!(err.to_string(), "duplicate response (prompt_id 'b', sample 1): scored.parquet row 2 and new.parquet row 2");
    }

    #[test]
    fn bad_rewards_and_empty_inputs_are_errors() {
        let infinite = scored(&[("a", 0, f32::INFINITY)]);
        let err = build_pairs(&[infinite], 0.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: column 'reward': inf at row 1"
        );
        let err = build_pairs(&[scored(&[])], 0.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "scored.parquet: no rows: there are no responses to pair"
        );
    }

    #[test]
    fn top_fraction_keeps_the_largest_gaps_in_order() {
        // Gaps: a 0.4, b 1.5, c 0.4, d 2.0, e 0.1.
        let shard = scored(&[
            ("a", 0, 0.5),
            ("a", 1, 0.1),
            ("b", 0, 1.0),
            ("b", 1, -0.5),
            ("c", 0, 0.9),
            ("c", 1, 0.5),
            ("d", 0, -1.0),
            ("d", 1, 1.0),
            ("e", 0, 0.2),
            ("e", 1, 0.1),
        ]);
        let ids = |frac: f64| {
            let mut pairs = build_pairs(std::slice::from_ref(&shard), 0.0).unwrap();
            keep_top_fraction(&mut pairs, frac).unwrap();
            let kept: Vec<String> = pairs
                .shard
                .strings(col::PROMPT_ID)
                .unwrap()
                .into_iter()
                .map(String::from)
                .collect();
            (kept, pairs.skipped_top_frac)
        };
        // ⌈0.4 · 5⌉ = 2: d and b, in input order.
        assert_eq!(ids(0.4), (vec!["b".to_string(), "d".into()], 3));
        // ⌈0.6 · 5⌉ = 3: a and c tie at 0.4 for the third place; a, the lower id, stays.
        assert_eq!(ids(0.6), (vec!["a".to_string(), "b".into(), "d".into()], 2));
        assert_eq!(ids(1.0).1, 0);
        // At least one pair stays.
        assert_eq!(ids(1e-9), (vec!["d".to_string()], 4));
    }

    #[test]
    fn top_frac_must_be_a_fraction() {
        assert_eq!(parse_top_frac("0.1"), Ok(0.1));
        for bad in ["0", "1.5", "NaN", "-0.2"] {
            assert!(
                parse_top_frac(bad)
                    .unwrap_err()
                    .contains("must be in (0, 1]"),
                "{bad}"
            );
        }
    }

    #[test]
    fn min_gap_must_be_finite_and_not_negative() {
        assert_eq!(parse_min_gap("0.25"), Ok(0.25));
        for bad in ["-1", "NaN", "inf"] {
            assert!(
                parse_min_gap(bad)
                    .unwrap_err()
                    .contains("finite number >= 0"),
                "{bad}"
            );
        }
    }
}
