//! Per-optimiser-step metrics, named as TRL names them, written as CSV.

use anyhow::{Context, Result};
use candle_core::Tensor;
use optune_train::loss::PairLosses;
use std::io::Write;
use std::path::Path;

const HEADER: &str =
    "step,epoch,loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies,\
logps/chosen,logps/rejected,weight/mean,weight/max,kl,grad_norm,lr,tokens_per_s,seconds";

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    /// Epochs done by the end of the step, as TRL logs them: the epoch's index plus the share of
    /// its micro-batches run (0.5, 1.0, 1.5, … for two steps an epoch).
    pub epoch: f64,
    pub loss: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub margin: f64,
    pub accuracy: f64,
    pub chosen_logp: f64,
    pub rejected_logp: f64,
    pub weight_mean: f64,
    /// The largest pair weight of the step: 1 under --weight-norm batch only when the weights
    /// are all equal, so it shows how far the weighting leans on the widest gaps.
    pub weight_max: f64,
    pub kl: Option<f64>,
    pub grad_norm: f32,
    #[serde(with = "exact_text")]
    pub lr: f64,
    pub tokens_per_s: f64,
    pub seconds: f64,
}

/// A float in the training state as its shortest exact text (`{:e}`, as metrics.csv prints `lr`):
/// serde_json, built without its `float_roundtrip` feature, may read a number back one unit in
/// the last place off, and a resumed run's metrics.csv would then differ from an uninterrupted
/// one's in the last digits of `lr`. A state that wrote the number itself still reads.
mod exact_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{value:e}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Number(f64),
        }
        match Written::deserialize(deserializer)? {
            Written::Text(text) => text.parse().map_err(D::Error::custom),
            Written::Number(number) => Ok(number),
        }
    }
}

impl MetricsRow {
    fn csv_line(&self) -> String {
        let kl = self.kl.map(|k| format!("{k:.6}")).unwrap_or_default();
        format!(
            "{},{:.4},{:.6},{:.6},{:.6},{:.6},{:.4},{:.4},{:.4},{:.4},{:.4},{kl},{:.6},{:e},{:.1},{:.3}",
            self.step,
            self.epoch,
            self.loss,
            self.chosen_reward,
            self.rejected_reward,
            self.margin,
            self.accuracy,
            self.chosen_logp,
            self.rejected_logp,
            self.weight_mean,
            self.weight_max,
            self.grad_norm,
            self.lr,
            self.tokens_per_s,
            self.seconds
        )
    }
}

/// Sums over the micro-batches of one optimiser step.
#[derive(Default)]
pub struct StepMetrics {
    pairs: usize,
    batches: usize,
    loss: f64,
    chosen_reward: f64,
    rejected_reward: f64,
    correct: usize,
    chosen_logp: f64,
    rejected_logp: f64,
    weight: f64,
    weight_max: f64,
    kl: Option<f64>,
    tokens: usize,
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach().to_dtype(candle_core::DType::F32)?.to_vec1()?)
}

impl StepMetrics {
    #[allow(clippy::too_many_arguments)]
    pub fn add_batch(
        &mut self,
        losses: &PairLosses,
        chosen_logps: &Tensor,
        rejected_logps: &Tensor,
        weights: &[f32],
        loss: f32,
        kl: Option<f32>,
        tokens: usize,
    ) -> Result<()> {
        let chosen = values(&losses.chosen_rewards)?;
        let rejected = values(&losses.rejected_rewards)?;
        self.pairs += chosen.len();
        self.batches += 1;
        self.loss += loss as f64;
        self.chosen_reward += chosen.iter().map(|&x| x as f64).sum::<f64>();
        self.rejected_reward += rejected.iter().map(|&x| x as f64).sum::<f64>();
        self.correct += chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count();
        self.chosen_logp += values(chosen_logps)?.iter().map(|&x| x as f64).sum::<f64>();
        self.rejected_logp += values(rejected_logps)?
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        self.weight += weights.iter().map(|&w| w as f64).sum::<f64>();
        let widest = weights.iter().fold(0f32, |max, &w| max.max(w));
        self.weight_max = self.weight_max.max(widest as f64);
        if let Some(kl) = kl {
            self.kl = Some(self.kl.unwrap_or(0.0) + kl as f64);
        }
        self.tokens += tokens;
        Ok(())
    }

    /// Adds another replica's sums for the same step.
    pub fn merge(&mut self, other: StepMetrics) {
        self.pairs += other.pairs;
        self.batches += other.batches;
        self.loss += other.loss;
        self.chosen_reward += other.chosen_reward;
        self.rejected_reward += other.rejected_reward;
        self.correct += other.correct;
        self.chosen_logp += other.chosen_logp;
        self.rejected_logp += other.rejected_logp;
        self.weight += other.weight;
        self.weight_max = self.weight_max.max(other.weight_max);
        self.kl = match (self.kl, other.kl) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.tokens += other.tokens;
    }

    pub fn finish(
        &self,
        step: u64,
        epoch: f64,
        grad_norm: f32,
        lr: f64,
        seconds: f64,
    ) -> MetricsRow {
        let n = self.pairs.max(1) as f64;
        let chosen_reward = self.chosen_reward / n;
        let rejected_reward = self.rejected_reward / n;
        MetricsRow {
            step,
            epoch,
            loss: self.loss / self.batches.max(1) as f64,
            chosen_reward,
            rejected_reward,
            margin: chosen_reward - rejected_reward,
            accuracy: self.correct as f64 / n,
            chosen_logp: self.chosen_logp / n,
            rejected_logp: self.rejected_logp / n,
            weight_mean: self.weight / n,
            weight_max: self.weight_max,
            kl: self.kl.map(|k| k / self.batches.max(1) as f64),
            grad_norm,
            lr,
            tokens_per_s: self.tokens as f64 / seconds.max(1e-9),
            seconds,
        }
    }
}

/// The rows so far; with an explicit path, also appended to that file as each step ends.
pub struct MetricsLog {
    rows: Vec<MetricsRow>,
    live: Option<std::fs::File>,
}

impl MetricsLog {
    pub fn new(path: Option<&Path>) -> Result<Self> {
        let live = match path {
            Some(p) => {
                let mut f = std::fs::File::create(p)
                    .with_context(|| format!("creating {}", p.display()))?;
                writeln!(f, "{HEADER}")?;
                Some(f)
            }
            None => None,
        };
        Ok(Self {
            rows: Vec::new(),
            live,
        })
    }

    pub fn push(&mut self, row: MetricsRow) -> Result<()> {
        if let Some(f) = &mut self.live {
            writeln!(f, "{}", row.csv_line())?;
            f.flush()?;
        }
        self.rows.push(row);
        Ok(())
    }

    /// Starts from the rows of a resumed run (rewriting the live file with them).
    pub fn restore(&mut self, rows: Vec<MetricsRow>) -> Result<()> {
        if let Some(f) = &mut self.live {
            for row in &rows {
                writeln!(f, "{}", row.csv_line())?;
            }
            f.flush()?;
        }
        self.rows = rows;
        Ok(())
    }

    pub fn rows(&self) -> &[MetricsRow] {
        &self.rows
    }

    pub fn last(&self) -> Option<&MetricsRow> {
        self.rows.last()
    }

    pub fn to_csv(&self) -> Result<String> {
        let mut out = String::from(HEADER);
        out.push('\n');
        for row in &self.rows {
            out.push_str(&row.csv_line());
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The learning rates of a warm-up and a linear decay read back from the training state
    /// exactly, so a resumed metrics.csv prints them as the uninterrupted run does.
    #[test]
    fn a_learning_rate_survives_the_training_state_exactly() {
        let row = |lr: f64| MetricsRow {
            step: 1,
            epoch: 0.5,
            loss: 0.0,
            chosen_reward: 0.0,
            rejected_reward: 0.0,
            margin: 0.0,
            accuracy: 0.0,
            chosen_logp: 0.0,
            rejected_logp: 0.0,
            weight_mean: 1.0,
            weight_max: 1.0,
            kl: None,
            grad_norm: 0.0,
            lr,
            tokens_per_s: 0.0,
            seconds: 0.0,
        };
        for peak in [5e-7, 1e-6, 5e-5, 1e-3] {
            for steps in [7u32, 12, 100, 999] {
                for step in 0..steps {
                    let lr = peak * f64::from(steps - step) / f64::from(steps);
                    let text = serde_json::to_string(&row(lr)).unwrap();
                    let read: MetricsRow = serde_json::from_str(&text).unwrap();
                    assert_eq!(
                        read.lr.to_bits(),
                        lr.to_bits(),
                        "{lr:e} read as {:e}",
                        read.lr
                    );
                }
            }
        }
        // A state written before lr was text still reads.
        let text = serde_json::to_string(&row(0.25))
            .unwrap()
            .replace("\"2.5e-1\"", "0.25");
        let read: MetricsRow = serde_json::from_str(&text).unwrap();
        assert_eq!(read.lr, 0.25);
    }
}
