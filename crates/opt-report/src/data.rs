//! Reading what an OPTune run left on disk: each `iterN/` directory's
//! shards, `timings.csv` and `metrics.csv`, and the run's `run.env`.
//!
//! Everything is optional: a run that stopped half-way, or an iteration that
//! is still running, reports what exists and leaves the rest blank.

use anyhow::{bail, Context, Result};
use optune_shard::Shard;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The stages `timings.csv` records, in pipeline order (`ref`: the reference log-probs, a stage
/// of their own with SHARDS > 1).
const STAGES: [&str; 6] = ["gen", "score", "select", "pairs", "ref", "train"];

/// One row of `timings.csv`: `stage,seconds,rows,tokens`.
#[derive(Clone, Debug)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: Option<f64>,
    pub rows: Option<u64>,
    pub tokens: Option<u64>,
}

/// One optimiser step of `metrics.csv` (the columns the report uses).
#[derive(Clone, Debug)]
pub struct MetricsPoint {
    pub step: f64,
    pub loss: Option<f64>,
    pub margin: Option<f64>,
    pub accuracy: Option<f64>,
}

/// What one `iterN/` directory holds.
#[derive(Clone, Debug, Default)]
pub struct Iteration {
    pub index: u32,
    /// Rewards of the responses generated in this iteration (by policy N−1):
    /// `new_scored.parquet`, or `scored.parquet` where there is no
    /// `new_scored.parquet` (a run of an older pipeline's iteration 1).
    pub fresh: Option<Vec<f64>>,
    /// Rewards of the iteration's full scored set (kept ∪ new).
    pub all: Option<Vec<f64>>,
    /// Rewards of policy N's samples on the held-out prompts (`eval_scored.parquet`).
    pub eval: Option<Vec<f64>>,
    /// Distinct prompts in the full scored set.
    pub prompts: Option<usize>,
    /// Prompts generated anew: `regen.parquet`'s rows, else the fresh rows' distinct prompts.
    pub regenerated: Option<usize>,
    pub pairs: Option<usize>,
    pub gaps: Option<Vec<f64>>,
    pub timings: Vec<StageTiming>,
    pub metrics: Vec<MetricsPoint>,
}

impl Iteration {
    pub fn stage_seconds(&self, stage: &str) -> Option<f64> {
        self.timings
            .iter()
            .find(|t| t.stage == stage)
            .and_then(|t| t.seconds)
    }

    pub fn stage(&self, stage: &str) -> Option<&StageTiming> {
        self.timings.iter().find(|t| t.stage == stage)
    }

    /// Sum of the recorded stage times, `None` when none is recorded.
    pub fn total_seconds(&self) -> Option<f64> {
        let known: Vec<f64> = self.timings.iter().filter_map(|t| t.seconds).collect();
        (!known.is_empty()).then(|| known.iter().sum())
    }

    pub fn last_metrics(&self) -> Option<&MetricsPoint> {
        self.metrics.last()
    }
}

/// A run directory: `run.env` and its `iterN/` directories, in order.
#[derive(Clone, Debug)]
pub struct Run {
    pub dir: PathBuf,
    pub name: String,
    pub settings: BTreeMap<String, String>,
    pub iterations: Vec<Iteration>,
}

impl Run {
    pub fn load(dir: &Path) -> Result<Run> {
        anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
        let mut indices = BTreeSet::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if let Some(index) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_prefix("iter"))
                .and_then(|digits| digits.parse::<u32>().ok())
            {
                indices.insert(index);
            }
        }
        let iterations = indices
            .into_iter()
            .map(|index| load_iteration(&dir.join(format!("iter{index}")), index))
            .collect::<Result<Vec<_>>>()?;
        let name = dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Run {
            dir: dir.to_path_buf(),
            name,
            settings: read_settings(&dir.join("run.env"))?,
            iterations,
        })
    }

    /// The iterations that generated and trained (N ≥ 1; `iter0` only holds
    /// the initial policy's held-out evaluation).
    pub fn trained(&self) -> impl Iterator<Item = &Iteration> {
        self.iterations.iter().filter(|it| it.index >= 1)
    }

    /// The stages of [`STAGES`] this run's tables and plots show: `ref` only where some
    /// iteration recorded it (the pipeline's SHARDS > 1), the others always.
    pub fn stages(&self) -> Vec<&'static str> {
        STAGES
            .into_iter()
            .filter(|&stage| stage != "ref" || self.trained().any(|it| it.stage(stage).is_some()))
            .collect()
    }

    /// ρ: `RHO` in `run.env`, else a `-rhoX` suffix of the directory name.
    pub fn rho(&self) -> Option<f64> {
        if let Some(rho) = self.settings.get("RHO").and_then(|v| v.parse().ok()) {
            return Some(rho);
        }
        self.name
            .rsplit_once("-rho")
            .and_then(|(_, v)| v.parse().ok())
    }

    /// How the run selected prompts, from `run.env`: `--by SELECT_BY`, then SELECT_ARGS, then
    /// `+ history` with SELECT_HISTORY=1 (`make sweep SWEEP_SELECTS=…`); `None` for a run.env
    /// without SELECT_BY.
    pub fn selection(&self) -> Option<String> {
        let by = self.settings.get("SELECT_BY")?;
        let mut selection = format!("--by {by}");
        if let Some(args) = self.settings.get("SELECT_ARGS").filter(|a| !a.is_empty()) {
            selection.push(' ');
            selection.push_str(args);
        }
        if self
            .settings
            .get("SELECT_HISTORY")
            .is_some_and(|h| h == "1")
        {
            selection.push_str(" + history");
        }
        Some(selection)
    }

    /// The initial policy's held-out rewards (`iter0/eval_scored.parquet`).
    pub fn initial_eval(&self) -> Option<&Vec<f64>> {
        self.iterations
            .iter()
            .find(|it| it.index == 0)
            .and_then(|it| it.eval.as_ref())
    }
}

fn load_iteration(dir: &Path, index: u32) -> Result<Iteration> {
    let read = |name: &str| -> Result<Option<Shard>> {
        let path = dir.join(name);
        if path.is_file() {
            Ok(Some(
                Shard::read(Some(&path)).with_context(|| format!("reading {}", path.display()))?,
            ))
        } else {
            Ok(None)
        }
    };
    let rewards = |shard: &Shard| -> Result<Vec<f64>> {
        shard
            .finite_floats("reward")
            .with_context(|| format!("{}: column 'reward'", shard.name()))
    };

    let mut it = Iteration {
        index,
        ..Default::default()
    };
    let scored = read("scored.parquet")?;
    let new_scored = read("new_scored.parquet")?;
    if let Some(scored) = &scored {
        it.all = Some(rewards(scored)?);
        it.prompts = Some(distinct(scored, "prompt_id")?);
    }
    match (&new_scored, &scored) {
        (Some(new), _) => {
            it.fresh = Some(rewards(new)?);
            it.regenerated = Some(distinct(new, "prompt_id")?);
        }
        (None, Some(scored)) if index == 1 => {
            it.fresh = it.all.clone();
            it.regenerated = Some(distinct(scored, "prompt_id")?);
        }
        _ => {}
    }
    if let Some(regen) = read("regen.parquet")? {
        it.regenerated = Some(regen.num_rows());
    }
    if let Some(eval) = read("eval_scored.parquet")? {
        it.eval = Some(rewards(&eval)?);
    }
    if let Some(pairs) = read("pairs.parquet")? {
        it.pairs = Some(pairs.num_rows());
        if pairs.has_column("reward_gap") {
            it.gaps = Some(pairs.floats("reward_gap")?);
        }
    }
    it.timings = read_timings(&dir.join("timings.csv"))?;
    it.metrics = read_metrics(&dir.join("metrics.csv"))?;
    Ok(it)
}

fn distinct(shard: &Shard, column: &str) -> Result<usize> {
    Ok(shard
        .strings(column)?
        .into_iter()
        .collect::<BTreeSet<_>>()
        .len())
}

/// `KEY=VALUE` lines; blank lines and `#` comments skipped. A missing file is empty.
fn read_settings(path: &Path) -> Result<BTreeMap<String, String>> {
    if !path.is_file() {
        return Ok(BTreeMap::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// A CSV's header and rows, each field trimmed, and each row's line in the file.
type Table = (Vec<String>, Vec<Vec<String>>, Vec<u64>);

/// Reads a CSV with a header; a missing file gives `None`.
fn read_csv(path: &Path) -> Result<Option<Table>> {
    if !path.is_file() {
        return Ok(None);
    }
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let header = reader
        .headers()
        .with_context(|| format!("parsing the header of {}", path.display()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let (mut rows, mut lines) = (Vec::new(), Vec::new());
    for record in reader.records() {
        let record = record.with_context(|| format!("parsing {}", path.display()))?;
        lines.push(record.position().map_or(0, |p| p.line()));
        rows.push(record.iter().map(|f| f.trim().to_string()).collect());
    }
    Ok(Some((header, rows, lines)))
}

fn field<'a>(header: &[String], row: &'a [String], name: &str) -> Option<&'a str> {
    let at = header.iter().position(|h| h == name)?;
    row.get(at).map(String::as_str).filter(|v| !v.is_empty())
}

/// The number in column `name` of the table's row `index` (`None` when the field is empty or
/// absent); a field that holds no finite number is an error naming the file, line and column:
/// a report that quietly left it out would understate what it sums.
fn number<T: std::str::FromStr>(
    path: &Path,
    (header, rows, lines): &Table,
    index: usize,
    name: &str,
) -> Result<Option<T>> {
    let Some(text) = field(header, &rows[index], name) else {
        return Ok(None);
    };
    let finite = text.parse::<f64>().is_ok_and(f64::is_finite);
    match text.parse::<T>() {
        Ok(value) if finite => Ok(Some(value)),
        _ => bail!(
            "{} line {}: column '{name}': {text:?} is not a finite number of the column's kind",
            path.display(),
            lines[index]
        ),
    }
}

fn read_timings(path: &Path) -> Result<Vec<StageTiming>> {
    let Some(table) = read_csv(path)? else {
        return Ok(Vec::new());
    };
    let mut timings = Vec::new();
    for (index, row) in table.1.iter().enumerate() {
        let Some(stage) = field(&table.0, row, "stage") else {
            continue;
        };
        timings.push(StageTiming {
            stage: stage.to_string(),
            seconds: number(path, &table, index, "seconds")?,
            rows: number(path, &table, index, "rows")?,
            tokens: number(path, &table, index, "tokens")?,
        });
    }
    Ok(timings)
}

fn read_metrics(path: &Path) -> Result<Vec<MetricsPoint>> {
    let Some(table) = read_csv(path)? else {
        return Ok(Vec::new());
    };
    (0..table.1.len())
        .map(|index| {
            let number = |name| number::<f64>(path, &table, index, name);
            Ok(MetricsPoint {
                step: number("step")?.unwrap_or((index + 1) as f64),
                loss: number("loss")?,
                margin: number("rewards/margins")?,
                accuracy: number("rewards/accuracies")?,
            })
        })
        .collect()
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}
