//! VADER-style sentiment score (Hutto & Gilbert, ICWSM 2014), re-implemented
//! so that `opt-score` can reward positive text without a model.
//!
//! The lexicon file is VADER's format: `word<TAB>mean valence<TAB>…`, one
//! entry per line; only the first two fields are read. Blank lines and lines
//! starting with `#` are skipped; a later line for the same word replaces an
//! earlier one (the real `vader_lexicon.txt` has a few such repeats).
//!
//! # Rules implemented
//!
//! 1. **Tokens**: the text is split on whitespace and ASCII punctuation is
//!    stripped from both ends of each token, unless fewer than three
//!    characters would remain, in which case the token is kept whole — that
//!    is how emoticons such as `:)` and `:-(` survive (and, as in VADER, why
//!    `No,` does not match the word `no`). Words are looked up in lower case.
//! 2. **Valence**: each token in the lexicon contributes its mean valence;
//!    other tokens, and booster words themselves, contribute 0.
//! 3. **Boosters and dampeners**: a degree adverb ("very", "extremely", …;
//!    "barely", "slightly", …) up to three words before a sentiment word moves
//!    its valence away from (or towards) zero by 0.293, weighted 1, 0.95, 0.9
//!    by distance.
//! 4. **ALL CAPS**: when some but not all tokens are all upper case, an
//!    all-caps sentiment word gains 0.733 in magnitude, and so does an all-caps
//!    booster's effect.
//! 5. **Negation**: each negation word ("not", "never", "isn't", any word with
//!    "n't", …) among the three words before a sentiment word multiplies its
//!    valence by -0.74. "no" directly before a sentiment word scores 0 itself
//!    and negates words one or two after it (three after, when "or"/"nor"
//!    comes between). "without doubt" does not negate.
//! 6. **"never so/this"**: "never so good", "never been this good" multiply the
//!    valence by 1.25 instead of negating it. As in vaderSentiment 3.3.2, the
//!    1.25 also applies to any word directly after "so" or "this" that has a
//!    non-lexicon word three positions back ("I am so happy").
//! 7. **Preceding words in the lexicon** neither boost nor negate: rules 3, 5
//!    and 6 look only at preceding words that have no valence of their own.
//! 8. **"but"**: valences before the first "but" are halved, those after it
//!    multiplied by 1.5.
//! 9. **Punctuation**: each "!" adds 0.292 (at most 4 counted); 2 or 3 "?" add
//!    0.18 each, 4 or more add 0.96. The emphasis adds to the magnitude of a
//!    non-zero sum, in the sum's direction.
//! 10. **Compound score**: `x / sqrt(x² + 15)` of the summed valence, clamped to
//!     [-1, 1]. No tokens or no sentiment → 0.
//!
//! # VADER rules not implemented
//!
//! - Emoji: VADER replaces each emoji with its English description first;
//!   here an emoji is a token with no valence.
//! - Idioms and special phrases ("the shit", "bad ass", "kiss of death",
//!   "yeah right", …).
//! - "kind of" / "sort of" / "just enough" as dampeners ("kind" keeps its
//!   lexicon valence here).
//! - "least" as a negation ("the least compelling").
//! - VADER's "but" pass finds each valence by value, so two words with equal
//!   valences on either side of "but" can be scaled twice or not at all; here
//!   each word is scaled exactly once by its position.
//!
//! The booster and negation word lists follow VADER's (MIT, © 2016 C.J. Hutto).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::truncate;

/// Valence change from a degree adverb ("very" +, "slightly" −).
const BOOSTER_INCREMENT: f64 = 0.293;
/// Booster weight for a degree adverb 1, 2 or 3 words before the sentiment word.
const BOOSTER_WEIGHT_BY_DISTANCE: [f64; 3] = [1.0, 0.95, 0.9];
/// How many preceding words can boost or negate a sentiment word.
const MODIFIER_WINDOW: usize = 3;
const ALL_CAPS_INCREMENT: f64 = 0.733;
const NEGATION_FACTOR: f64 = -0.74;
const NEVER_SO_FACTOR: f64 = 1.25;
const BEFORE_BUT_FACTOR: f64 = 0.5;
const AFTER_BUT_FACTOR: f64 = 1.5;
const EXCLAMATION_INCREMENT: f64 = 0.292;
const MAX_EXCLAMATIONS: usize = 4;
const QUESTION_INCREMENT: f64 = 0.18;
const MAX_QUESTION_EMPHASIS: f64 = 0.96;
/// The `alpha` of VADER's normalisation: roughly the largest summed valence expected.
const NORMALIZATION_ALPHA: f64 = 15.0;

/// Word → mean valence (about -4..4 in VADER's lexicon), scored with VADER's rules.
#[derive(Debug, Clone)]
pub struct SentimentLexicon {
    valences: HashMap<String, f64>,
}

impl SentimentLexicon {
    /// Reads a VADER-format lexicon (`word<TAB>mean<TAB>std<TAB>[ratings]`).
    ///
    /// # Errors
    /// An unreadable file, a line without a tab-separated valence, a valence
    /// that is not a finite number, or no entries at all. Errors name the file
    /// and, for a malformed entry, its 1-based line.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading sentiment lexicon {}", path.display()))?;
        let mut valences = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let location = || format!("{}:{}", path.display(), index + 1);
            let mut fields = line.split('\t');
            let word = fields.next().unwrap_or_default();
            let Some(mean) = fields.next() else {
                bail!(
                    "{}: expected `word<TAB>mean valence`, found {:?}",
                    location(),
                    truncate(line, 80)
                );
            };
            let valence: f64 = match mean.trim().parse() {
                Ok(value) if f64::is_finite(value) => value,
                _ => bail!(
                    "{}: mean valence of {word:?} is not a finite number: {:?}",
                    location(),
                    truncate(mean, 40)
                ),
            };
            valences.insert(word.to_string(), valence);
        }
        if valences.is_empty() {
            bail!("sentiment lexicon {} has no entries", path.display());
        }
        Ok(Self { valences })
    }

    /// VADER compound score of `text` in [-1, 1]; 0 when no word carries sentiment.
    #[must_use]
    pub fn score(&self, text: &str) -> f32 {
        let tokens: Vec<Token> = text
            .split_whitespace()
            .map(|raw| Token::new(raw, &self.valences))
            .collect();
        let all_caps = tokens.iter().filter(|token| token.is_all_caps).count();
        let caps_are_emphasis = all_caps > 0 && all_caps < tokens.len();

        let mut valences: Vec<f64> = (0..tokens.len())
            .map(|index| word_valence(&tokens, index, caps_are_emphasis))
            .collect();
        if let Some(but_index) = tokens.iter().position(|token| token.lower == "but") {
            for (index, valence) in valences.iter_mut().enumerate() {
                if index < but_index {
                    *valence *= BEFORE_BUT_FACTOR;
                } else if index > but_index {
                    *valence *= AFTER_BUT_FACTOR;
                }
            }
        }

        let sum: f64 = valences.iter().sum();
        let emphasis = punctuation_emphasis(text);
        let emphasised = if sum > 0.0 {
            sum + emphasis
        } else if sum < 0.0 {
            sum - emphasis
        } else {
            0.0
        };
        // hypot keeps sqrt(x² + alpha) finite even for absurd lexicon values.
        let compound = emphasised / emphasised.hypot(NORMALIZATION_ALPHA.sqrt());
        compound.clamp(-1.0, 1.0) as f32
    }
}

struct Token {
    lower: String,
    is_all_caps: bool,
    /// `None` when the word is not in the lexicon.
    lexicon_valence: Option<f64>,
}

impl Token {
    fn new(raw: &str, valences: &HashMap<String, f64>) -> Self {
        let stripped = raw.trim_matches(|c: char| c.is_ascii_punctuation());
        let word = if stripped.chars().count() < 3 {
            raw
        } else {
            stripped
        };
        let lower = word.to_lowercase();
        Self {
            is_all_caps: word.chars().any(char::is_uppercase)
                && !word.chars().any(char::is_lowercase),
            lexicon_valence: valences.get(&lower).copied(),
            lower,
        }
    }
}

/// Valence of the token at `index` after the rules that look at its neighbours.
fn word_valence(tokens: &[Token], index: usize, caps_are_emphasis: bool) -> f64 {
    let token = &tokens[index];
    if booster_increment(&token.lower).is_some() {
        return 0.0;
    }
    let Some(lexicon_valence) = token.lexicon_valence else {
        return 0.0;
    };
    let lower_at = |distance: usize| -> Option<&str> {
        let position = index.checked_sub(distance)?;
        Some(tokens[position].lower.as_str())
    };

    let mut valence = lexicon_valence;
    let next_is_sentiment = tokens
        .get(index + 1)
        .is_some_and(|next| next.lexicon_valence.is_some());
    if token.lower == "no" && next_is_sentiment {
        // "no" here negates what follows rather than being negative itself.
        valence = 0.0;
    }
    if lower_at(1) == Some("no")
        || lower_at(2) == Some("no")
        || (lower_at(3) == Some("no") && matches!(lower_at(1), Some("or" | "nor")))
    {
        valence = lexicon_valence * NEGATION_FACTOR;
    }
    if caps_are_emphasis && token.is_all_caps {
        valence += if valence > 0.0 {
            ALL_CAPS_INCREMENT
        } else {
            -ALL_CAPS_INCREMENT
        };
    }

    for distance in 1..=MODIFIER_WINDOW.min(index) {
        let modifier = &tokens[index - distance];
        if modifier.lexicon_valence.is_some() {
            continue;
        }
        if let Some(increment) = booster_increment(&modifier.lower) {
            let mut boost = if valence < 0.0 { -increment } else { increment };
            if caps_are_emphasis && modifier.is_all_caps {
                boost += if valence > 0.0 {
                    ALL_CAPS_INCREMENT
                } else {
                    -ALL_CAPS_INCREMENT
                };
            }
            valence += boost * BOOSTER_WEIGHT_BY_DISTANCE[distance - 1];
        }

        let is_so_or_this = |word: Option<&str>| matches!(word, Some("so" | "this"));
        let never_so =
            modifier.lower == "never" && distance >= 2 && is_so_or_this(lower_at(distance - 1));
        let so_this_three_back = distance == 3 && is_so_or_this(lower_at(1));
        let without_doubt = modifier.lower == "without"
            && (1..distance).any(|between| lower_at(between) == Some("doubt"));
        if never_so || so_this_three_back {
            valence *= NEVER_SO_FACTOR;
        } else if !without_doubt && is_negation(&modifier.lower) {
            valence *= NEGATION_FACTOR;
        }
    }
    valence
}

/// Emphasis from "!" and "?" anywhere in the text, added to the magnitude of the sum.
fn punctuation_emphasis(text: &str) -> f64 {
    let exclamations = text.matches('!').count().min(MAX_EXCLAMATIONS);
    let questions = text.matches('?').count();
    let question_emphasis = match questions {
        0 | 1 => 0.0,
        2 | 3 => questions as f64 * QUESTION_INCREMENT,
        _ => MAX_QUESTION_EMPHASIS,
    };
    exclamations as f64 * EXCLAMATION_INCREMENT + question_emphasis
}

/// Signed valence change of a degree adverb, `None` for other words.
fn booster_increment(lower: &str) -> Option<f64> {
    match lower {
        "absolutely" | "amazingly" | "awfully" | "completely" | "considerable" | "considerably"
        | "decidedly" | "deeply" | "effing" | "enormous" | "enormously" | "entirely"
        | "especially" | "exceptional" | "exceptionally" | "extreme" | "extremely"
        | "fabulously" | "flipping" | "flippin" | "frackin" | "fracking" | "fricking"
        | "frickin" | "frigging" | "friggin" | "fully" | "fuckin" | "fucking" | "fuggin"
        | "fugging" | "greatly" | "hella" | "highly" | "hugely" | "incredible" | "incredibly"
        | "intensely" | "major" | "majorly" | "more" | "most" | "particularly" | "purely"
        | "quite" | "really" | "remarkably" | "so" | "substantially" | "thoroughly" | "total"
        | "totally" | "tremendous" | "tremendously" | "uber" | "unbelievably" | "unusually"
        | "utter" | "utterly" | "very" => Some(BOOSTER_INCREMENT),
        "almost" | "barely" | "hardly" | "kinda" | "kindof" | "kind-of" | "less" | "little"
        | "marginal" | "marginally" | "occasional" | "occasionally" | "partly" | "scarce"
        | "scarcely" | "slight" | "slightly" | "somewhat" | "sorta" | "sortof" | "sort-of" => {
            Some(-BOOSTER_INCREMENT)
        }
        _ => None,
    }
}

fn is_negation(lower: &str) -> bool {
    lower.contains("n't")
        || matches!(
            lower,
            "aint"
                | "arent"
                | "cannot"
                | "cant"
                | "couldnt"
                | "darent"
                | "didnt"
                | "doesnt"
                | "dont"
                | "hadnt"
                | "hasnt"
                | "havent"
                | "isnt"
                | "mightnt"
                | "mustnt"
                | "neither"
                | "neednt"
                | "never"
                | "none"
                | "nope"
                | "nor"
                | "not"
                | "nothing"
                | "nowhere"
                | "oughtnt"
                | "shant"
                | "shouldnt"
                | "uhuh"
                | "uh-uh"
                | "wasnt"
                | "werent"
                | "without"
                | "wont"
                | "wouldnt"
                | "rarely"
                | "seldom"
                | "despite"
        )
}
