//! SentimentLexicon: hand-computed scores on a tiny lexicon, and agreement with
//! vaderSentiment 3.3.2 (scores recorded by scripts/reference/vader_reference.py).

use std::path::{Path, PathBuf};

use optune_reward::SentimentLexicon;

fn testdata(relative: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(relative)
}

fn tiny_lexicon() -> SentimentLexicon {
    SentimentLexicon::load(testdata("lexicon/tiny_lexicon.txt")).expect("tiny lexicon loads")
}

/// Compound score is x / sqrt(x² + 15) of the summed valence x.
#[track_caller]
fn assert_score(lexicon: &SentimentLexicon, text: &str, expected: f32) {
    let score = lexicon.score(text);
    assert!(
        (score - expected).abs() < 1e-5,
        "score({text:?}) = {score}, expected {expected}"
    );
}

#[test]
fn single_positive_word() {
    // good = 2.0 → 2.0 / sqrt(4 + 15) = 0.458831
    assert_score(&tiny_lexicon(), "good", 0.458831);
    // Punctuation at the word's edges is stripped: same score.
    assert_score(&tiny_lexicon(), "(good),", 0.458831);
}

#[test]
fn negated_word() {
    // not good = 2.0 × -0.74 = -1.48 → -1.48 / sqrt(2.1904 + 15) = -0.356959
    assert_score(&tiny_lexicon(), "not good", -0.356959);
    // Any word with n't negates: isn't bad = -2.5 × -0.74 = 1.85 → 1.85 / sqrt(3.4225 + 15) = 0.431020
    assert_score(&tiny_lexicon(), "it isn't bad", 0.431020);
}

#[test]
fn intensifier() {
    // very good = 2.0 + 0.293 = 2.293 → 2.293 / sqrt(5.257849 + 15) = 0.509457
    assert_score(&tiny_lexicon(), "very good", 0.509457);
    // not very good: booster first (2.293), then "not" two words back: × -0.74 = -1.69682
    // → -1.69682 / sqrt(2.879198 + 15) = -0.401293
    assert_score(&tiny_lexicon(), "not very good", -0.401293);
}

#[test]
fn all_caps_emphasis_only_in_mixed_case_text() {
    // Mixed case: GOOD = 2.0 + 0.733 = 2.733 → 2.733 / sqrt(7.469289 + 15) = 0.576561
    assert_score(&tiny_lexicon(), "The food is GOOD", 0.576561);
    // Everything in capitals is no emphasis: 2.0 → 0.458831
    assert_score(&tiny_lexicon(), "THE FOOD IS GOOD", 0.458831);
}

#[test]
fn but_shifts_weight_to_the_second_clause() {
    // good × 0.5 + bad × 1.5 = 1.0 - 3.75 = -2.75 → -2.75 / sqrt(7.5625 + 15) = -0.578947
    assert_score(&tiny_lexicon(), "good but bad", -0.578947);
}

#[test]
fn exclamation_marks_add_emphasis_up_to_four() {
    // good!! = 2.0 + 2 × 0.292 = 2.584 → 2.584 / sqrt(6.677056 + 15) = 0.554999
    assert_score(&tiny_lexicon(), "good!!", 0.554999);
    // Six marks count as four: 2.0 + 4 × 0.292 = 3.168 → 3.168 / sqrt(10.036224 + 15) = 0.633141
    assert_score(&tiny_lexicon(), "good!!!!!!", 0.633141);
}

#[test]
fn question_marks_add_emphasis_from_two() {
    // good?? = 2.0 + 2 × 0.18 = 2.36 → 2.36 / sqrt(5.5696 + 15) = 0.520354
    assert_score(&tiny_lexicon(), "good??", 0.520354);
    // A single question mark adds nothing.
    assert_score(&tiny_lexicon(), "good?", 0.458831);
}

#[test]
fn no_before_a_sentiment_word_negates_it() {
    // "no" scores 0 before a lexicon word; problem = -1.5 × -0.74 = 1.11
    // → 1.11 / sqrt(1.2321 + 15) = 0.275509
    assert_score(&tiny_lexicon(), "no problem", 0.275509);
}

#[test]
fn emoticons_are_kept_as_tokens() {
    // ":)" = 2.0 → 0.458831
    assert_score(&tiny_lexicon(), "thanks :)", 0.458831);
}

#[test]
fn text_without_sentiment_scores_zero() {
    let lexicon = tiny_lexicon();
    assert_eq!(lexicon.score("the cat sat on the mat"), 0.0);
    // Emphasis only amplifies a non-zero sum.
    assert_eq!(lexicon.score("the cat sat on the mat!!!"), 0.0);
}

#[test]
fn empty_text_scores_zero() {
    let lexicon = tiny_lexicon();
    assert_eq!(lexicon.score(""), 0.0);
    assert_eq!(lexicon.score(" \n\t "), 0.0);
}

#[test]
fn scores_stay_within_bounds() {
    let text = "LOVE LOVE LOVE great excellent happy fun :) nice helpful!!!! so very good";
    let score = tiny_lexicon().score(text);
    assert!(score > 0.95 && score <= 1.0, "score {score}");
}

#[test]
fn load_errors_name_the_file_and_line() {
    let missing = SentimentLexicon::load(testdata("lexicon/no_such_lexicon.txt")).unwrap_err();
    assert!(
        format!("{missing:#}").contains("no_such_lexicon.txt"),
        "{missing:#}"
    );

    let no_valence =
        SentimentLexicon::load(testdata("lexicon/malformed_missing_valence.txt")).unwrap_err();
    let message = no_valence.to_string();
    assert!(
        message.contains("malformed_missing_valence.txt:2:"),
        "{message}"
    );

    let bad_valence =
        SentimentLexicon::load(testdata("lexicon/malformed_valence.txt")).unwrap_err();
    let message = bad_valence.to_string();
    assert!(
        message.contains("malformed_valence.txt:3:") && message.contains("negative"),
        "{message}"
    );
}

#[derive(serde::Deserialize)]
struct ReferenceScores {
    vadersentiment_version: String,
    cases: Vec<ReferenceCase>,
}

#[derive(serde::Deserialize)]
struct ReferenceCase {
    text: String,
    compound: f32,
}

/// vaderSentiment rounds the compound score to 4 decimals.
const REFERENCE_TOLERANCE: f32 = 1e-3;

fn assert_agrees_with_vader(lexicon: &SentimentLexicon) {
    let reference: ReferenceScores = serde_json::from_str(
        &std::fs::read_to_string(testdata("reference/vader_compound.json"))
            .expect("reference scores"),
    )
    .expect("reference JSON");
    assert_eq!(reference.vadersentiment_version, "3.3.2");
    assert!(reference.cases.len() >= 30);
    let mut worst = (0.0_f32, "");
    let mut mismatches = Vec::new();
    for case in &reference.cases {
        let score = lexicon.score(&case.text);
        let difference = (score - case.compound).abs();
        if difference > worst.0 {
            worst = (difference, case.text.as_str());
        }
        if difference > REFERENCE_TOLERANCE {
            mismatches.push(format!(
                "{:?}: ours {score}, vaderSentiment {}",
                case.text, case.compound
            ));
        }
    }
    println!(
        "{} of {} within {REFERENCE_TOLERANCE}; worst difference {:.2e} on {:?}",
        reference.cases.len() - mismatches.len(),
        reference.cases.len(),
        worst.0,
        worst.1
    );
    assert!(
        mismatches.is_empty(),
        "disagreements with vaderSentiment:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn agrees_with_vader_sentiment_on_the_committed_lexicon_subset() {
    let subset =
        SentimentLexicon::load(testdata("lexicon/vader_subset.txt")).expect("vader subset loads");
    assert_agrees_with_vader(&subset);
}

/// Needs the full lexicon: `OPTUNE_VADER_LEXICON=/path/to/vader_lexicon.txt cargo test
/// -p optune-reward -- --ignored`; the file ships as `vaderSentiment/vader_lexicon.txt`
/// in PyPI `vadersentiment==3.3.2` (`pip download --no-deps vadersentiment==3.3.2`, unzip).
#[test]
#[ignore = "needs OPTUNE_VADER_LEXICON=/path/to/vader_lexicon.txt (vadersentiment 3.3.2)"]
fn agrees_with_vader_sentiment_on_the_full_lexicon() {
    let path = std::env::var_os("OPTUNE_VADER_LEXICON")
        .expect("set OPTUNE_VADER_LEXICON to vaderSentiment 3.3.2's vader_lexicon.txt");
    let full = SentimentLexicon::load(path).expect("full VADER lexicon loads");
    assert_agrees_with_vader(&full);
}
