//! `opt-report`: the Markdown report and PNG plots of an OPTune run, or the
//! table of a ρ sweep over several runs.

mod data;
mod plots;

use anyhow::{bail, Context, Result};
use clap::Parser;
use data::{mean, median, Iteration, Run};
use optune_shard::cli::{run_tool, Summary};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const TOOL: &str = "opt-report";

/// Report on an OPTune run: rewards, pairs, stage wall times and DPO margins per iteration.
///
/// RUN_DIR is a directory written by the pipeline (`make iterN`): `run.env`
/// and one `iterN/` per iteration holding `scored.parquet` (every response of
/// the iteration, kept ∪ new), `new_scored.parquet` (the responses generated
/// anew), `regen.parquet`, `pairs.parquet`,
/// `timings.csv` (stage,seconds,rows,tokens), `metrics.csv` (opt-wdpo's
/// per-step metrics) and, when the pipeline evaluates on held-out prompts,
/// `eval_scored.parquet` (`iter0/` then holds the initial policy's). Missing
/// files leave blanks, so a run can be reported while it is going on.
///
/// Writes the Markdown report to -o and its PNG plots to --plots: mean reward
/// per iteration, reward histograms, stacked wall time per stage, DPO margins
/// and loss over the steps. Each file appears only once complete, and the plots
/// only once all of them are drawn: a failure leaves the previous ones.
///
/// With --sweep, RUN_DIR... are runs of one pipeline at different ρ
/// (`make sweep`): the report is one table of the final reward and the wall
/// times per ρ, with the speedup over the ρ = 1 run, and one plot.
#[derive(Debug, Parser)]
#[command(
    name = TOOL,
    version,
    after_help = "Examples:\n  \
      opt-report runs/smollm2-sentiment -o runs/smollm2-sentiment/report.md\n  \
      opt-report --sweep runs/demo-rho0.5 runs/demo-rho0.7 runs/demo-rho1.0 -o runs/demo-sweep.md"
)]
struct Cli {
    /// Run directories (one, or several with --sweep)
    #[arg(value_name = "RUN_DIR", required = true)]
    runs: Vec<PathBuf>,

    /// Compare several runs of different ρ instead of reporting on one
    #[arg(long)]
    sweep: bool,

    /// Markdown file to write [default: RUN_DIR/report.md; with --sweep, stdout]
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,

    /// Directory for the PNG plots [default: `plots/` beside the report; with
    /// --sweep, DIR/sweep.png, else REPORT_STEM.png beside the -o report, else ./sweep.png]
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,

    /// Write the Markdown only, no plots
    #[arg(long)]
    no_plots: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_tool(TOOL, || if cli.sweep { sweep(&cli) } else { single(&cli) })
}

fn single(cli: &Cli) -> Result<()> {
    if cli.runs.len() != 1 {
        bail!(
            "one RUN_DIR expected ({} given); use --sweep to compare runs",
            cli.runs.len()
        );
    }
    let run = Run::load(&cli.runs[0])?;
    let output = cli
        .output
        .clone()
        .unwrap_or_else(|| run.dir.join("report.md"));
    let report_dir = optune_fs::parent_of(&output);
    let mut plot_files = Vec::new();
    if !cli.no_plots {
        let dir = cli
            .plots
            .clone()
            .unwrap_or_else(|| report_dir.join("plots"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // (title, file name, what draws it)
        type Plot = (&'static str, &'static str, fn(&Run, &Path) -> Result<()>);
        let jobs: [Plot; 4] = [
            (
                "Mean reward per iteration",
                "reward_mean.png",
                plots::reward_means,
            ),
            (
                "Reward distribution of the fresh samples",
                "reward_hist.png",
                plots::reward_histograms,
            ),
            ("Wall time per stage", "wall_time.png", plots::wall_times),
            (
                "DPO margins and loss over the steps",
                "dpo_margins.png",
                plots::dpo_margins,
            ),
        ];
        let run = &run;
        let drawings: Vec<Drawing> = jobs
            .iter()
            .map(|&(_, file, draw)| -> Drawing {
                (dir.join(file), Box::new(move |path| draw(run, path)))
            })
            .collect();
        draw_plots(drawings)?;
        for (title, file, _) in jobs {
            plot_files.push((title, link(&report_dir, &dir.join(file))));
        }
    }
    let markdown = run_markdown(&run, &plot_files);
    write_atomic(&output, &markdown)?;
    Summary::new(TOOL)
        .field("run", run.dir.display())
        .field("iterations", run.trained().count())
        .field("plots", plot_files.len())
        .field("output", output.display())
        .print();
    Ok(())
}

fn sweep(cli: &Cli) -> Result<()> {
    let runs = cli
        .runs
        .iter()
        .map(|dir| Run::load(dir))
        .collect::<Result<Vec<_>>>()?;
    let mut plot = None;
    if !cli.no_plots {
        let path = match (&cli.plots, &cli.output) {
            (Some(dir), _) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                dir.join("sweep.png")
            }
            (None, Some(out)) => out.with_extension("png"),
            (None, None) => PathBuf::from("sweep.png"),
        };
        draw_plots(vec![(path.clone(), Box::new(|at| plots::sweep(&runs, at)))])?;
        let base = cli
            .output
            .as_deref()
            .map(optune_fs::parent_of)
            .unwrap_or_else(|| PathBuf::from("."));
        plot = Some(link(&base, &path));
    }
    let markdown = sweep_markdown(&runs, plot.as_deref());
    match &cli.output {
        Some(path) => write_atomic(path, &markdown)?,
        None => print!("{markdown}"),
    }
    Summary::new(TOOL)
        .field("sweep_runs", runs.len())
        .field(
            "output",
            cli.output
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into()),
        )
        .print();
    Ok(())
}

/// `path` as the report links it: relative to the report's directory when below it.
fn link(report_dir: &Path, path: &Path) -> String {
    let strip = |p: &Path| {
        p.strip_prefix("./")
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let (dir, file) = (strip(report_dir), strip(path));
    if dir == Path::new(".") {
        return file.display().to_string();
    }
    match file.strip_prefix(&dir) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => std::fs::canonicalize(&file)
            .unwrap_or(file)
            .display()
            .to_string(),
    }
}

/// What draws a plot to a given path.
type Draw<'a> = Box<dyn Fn(&Path) -> Result<()> + 'a>;

/// A plot's file, and what draws it.
type Drawing<'a> = (PathBuf, Draw<'a>);

/// Draws every plot to a staging file beside its own ([`optune_fs::staging_file`], ending in
/// `.png`: plotters picks the image format by the extension) and moves them into place once all
/// are drawn, so a failure leaves the previous report's plots as they were, not half a set of
/// new ones (the staging files of an unfinished set are removed as they drop).
fn draw_plots(drawings: Vec<Drawing>) -> Result<()> {
    let mut staged = Vec::with_capacity(drawings.len());
    for (path, draw) in &drawings {
        let staging = optune_fs::staging_file(path, ".png")?;
        draw(staging.path()).with_context(|| format!("drawing {}", path.display()))?;
        staged.push((staging, path));
    }
    for (staging, path) in staged {
        staging
            .persist(path)
            .with_context(|| format!("moving {} into place", path.display()))?;
    }
    Ok(())
}

/// Writes beside the target and renames, so a reader never sees half a report.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = optune_fs::parent_of(path);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    optune_fs::write_bytes_atomically(path, text.as_bytes())
}

fn num(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".to_string(),
    }
}

fn count(value: Option<impl std::fmt::Display>) -> String {
    value
        .map(|v| v.to_string())
        .unwrap_or_else(|| "–".to_string())
}

fn run_markdown(run: &Run, plots: &[(&str, String)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# OPTune run `{}`\n", run.name);
    let trained: Vec<&Iteration> = run.trained().collect();
    if trained.is_empty() {
        let _ = writeln!(
            md,
            "No iteration directories (`iter1/`, …) under `{}` yet.\n",
            run.dir.display()
        );
    }
    if !run.settings.is_empty() {
        let keys = [
            "PIPELINE",
            "POLICY",
            "PROMPTS_FILE",
            "PROMPTS",
            "N",
            "MAX_NEW_TOKENS",
            "TEMPERATURE",
            "TOP_P",
            "RHO",
            "REF",
            "SCORE_ARGS",
            "TRAIN_ARGS",
        ];
        let shown: Vec<String> = keys
            .iter()
            .filter_map(|k| run.settings.get(*k).map(|v| format!("{k}={v}")))
            .collect();
        if !shown.is_empty() {
            let _ = writeln!(md, "Settings (`run.env`): `{}`\n", shown.join("` `"));
        }
    }
    let _ = writeln!(
        md,
        "*Fresh* samples are the responses generated in the iteration, by the policy of the \
         iteration before (iteration 1: the initial policy, on every prompt; later: only the \
         prompts opt-select picked). *All* is the iteration's full scored set: the fresh samples \
         plus the rows kept from before. *Held-out* is the reward of policy N's own samples on \
         prompts never trained on (when the pipeline evaluates).\n"
    );

    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| iteration | prompts regenerated | fresh samples | fresh mean | fresh median | all mean | all median | held-out mean | pairs | mean reward gap | wall s | DPO margin (last step) | DPO accuracy (last step) |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    if let Some(initial) = run.initial_eval() {
        let _ = writeln!(
            md,
            "| 0 (initial policy) | | | | | | | {} | | | | | |",
            num(mean(initial), 4)
        );
    }
    for it in &trained {
        let fresh = it.fresh.as_deref();
        let all = it.all.as_deref();
        let last = it.last_metrics();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            it.index,
            count(it.regenerated),
            count(fresh.map(<[f64]>::len)),
            num(fresh.and_then(mean), 4),
            num(fresh.and_then(median), 4),
            num(all.and_then(mean), 4),
            num(all.and_then(median), 4),
            num(it.eval.as_deref().and_then(mean), 4),
            count(it.pairs),
            num(it.gaps.as_deref().and_then(mean), 4),
            num(it.total_seconds(), 1),
            num(last.and_then(|m| m.margin), 4),
            num(last.and_then(|m| m.accuracy), 3),
        );
    }
    md.push('\n');
    if let (Some(first), Some(last)) = (trained.first(), trained.last()) {
        if first.index != last.index {
            if let (Some(a), Some(b)) = (
                first.fresh.as_deref().and_then(mean),
                last.fresh.as_deref().and_then(mean),
            ) {
                let _ = writeln!(
                    md,
                    "Mean reward of the fresh samples: {a:.4} in iteration {} → {b:.4} in iteration {} ({:+.4}).\n",
                    first.index,
                    last.index,
                    b - a
                );
            }
        }
    }

    let _ = writeln!(md, "## Wall time per stage (seconds)\n");
    let stages = run.stages();
    let _ = writeln!(
        md,
        "| iteration | {} | total | generated tokens | generation tok/s |",
        stages.join(" | ")
    );
    let _ = writeln!(md, "|---:|{}---:|---:|---:|", "---:|".repeat(stages.len()));
    let mut totals = vec![0.0; stages.len()];
    for it in &trained {
        let cells: Vec<String> = stages.iter().map(|s| num(it.stage_seconds(s), 1)).collect();
        for (t, s) in totals.iter_mut().zip(&stages) {
            *t += it.stage_seconds(s).unwrap_or(0.0);
        }
        let gen = it.stage("gen");
        let tokens = gen.and_then(|g| g.tokens);
        let rate = match (tokens, gen.and_then(|g| g.seconds)) {
            (Some(t), Some(s)) if s > 0.0 => Some(t as f64 / s),
            _ => None,
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            it.index,
            cells.join(" | "),
            num(it.total_seconds(), 1),
            count(tokens),
            num(rate, 1)
        );
    }
    if trained.len() > 1 {
        let cells: Vec<String> = totals.iter().map(|t| format!("{t:.1}")).collect();
        let _ = writeln!(
            md,
            "| all | {} | {:.1} | | |",
            cells.join(" | "),
            totals.iter().sum::<f64>()
        );
    }
    md.push('\n');

    if !plots.is_empty() {
        let _ = writeln!(md, "## Plots\n");
        for (title, file) in plots {
            let _ = writeln!(md, "![{title}]({file})\n");
        }
    }

    for it in &trained {
        let _ = writeln!(md, "## Iteration {}\n", it.index);
        let _ = writeln!(md, "| stage | seconds | rows | tokens |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for t in &it.timings {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                t.stage,
                num(t.seconds, 2),
                count(t.rows),
                count(t.tokens)
            );
        }
        if it.timings.is_empty() {
            let _ = writeln!(md, "| (no timings.csv yet) | | | |");
        }
        md.push('\n');
        let mut facts = Vec::new();
        if let Some(p) = it.prompts {
            facts.push(format!("{p} prompts in the scored set"));
        }
        if let Some(r) = it.regenerated {
            facts.push(format!("{r} generated anew"));
        }
        if let Some(p) = it.pairs {
            facts.push(format!("{p} pairs"));
        }
        if let Some(last) = it.last_metrics() {
            facts.push(format!(
                "{} optimiser steps, last loss {}, margin {}, accuracy {}",
                it.metrics.len(),
                num(last.loss, 4),
                num(last.margin, 4),
                num(last.accuracy, 3)
            ));
        }
        if !facts.is_empty() {
            let _ = writeln!(md, "{}.\n", facts.join("; "));
        }
    }
    md
}

/// Where the sweep report's comparison of measured and predicted speedups starts.
const SPEEDUP_HEADING: &str = "## Iteration speedup: measured and predicted";

/// The iteration speedup over ρ = 1 when only generation, the share `g` of a ρ = 1 iteration,
/// shrinks in proportion to ρ and every other stage keeps its time.
fn predicted_speedup(rho: f64, g: f64) -> f64 {
    1.0 / (1.0 - (1.0 - rho) * g)
}

fn sweep_markdown(runs: &[Run], plot: Option<&str>) -> String {
    struct Row<'a> {
        run: &'a Run,
        rho: Option<f64>,
        iterations: usize,
        final_fresh: Option<f64>,
        final_all: Option<f64>,
        final_eval: Option<f64>,
        gen_total: f64,
        total: f64,
        later_iters: usize,
        later_gen: f64,
        later_total: f64,
    }
    let rows: Vec<Row> = runs
        .iter()
        .map(|run| {
            let trained: Vec<&Iteration> = run.trained().collect();
            let last = trained.last();
            let later: Vec<&&Iteration> = trained.iter().filter(|it| it.index >= 2).collect();
            Row {
                run,
                rho: run.rho(),
                iterations: trained.len(),
                final_fresh: last.and_then(|it| mean(it.fresh.as_deref()?)),
                final_all: last.and_then(|it| mean(it.all.as_deref()?)),
                final_eval: last.and_then(|it| mean(it.eval.as_deref()?)),
                gen_total: trained
                    .iter()
                    .filter_map(|it| it.stage_seconds("gen"))
                    .sum(),
                total: trained.iter().filter_map(|it| it.total_seconds()).sum(),
                later_iters: later.len(),
                later_gen: later.iter().filter_map(|it| it.stage_seconds("gen")).sum(),
                later_total: later.iter().filter_map(|it| it.total_seconds()).sum(),
            }
        })
        .collect();
    let per_iter = |total: f64, n: usize| (n > 0).then(|| total / n as f64);
    let vanilla = rows
        .iter()
        .find(|r| r.rho.is_some_and(|rho| (rho - 1.0).abs() < 1e-9));
    let speedup = |mine: Option<f64>, theirs: Option<f64>| match (mine, theirs) {
        (Some(m), Some(t)) if m > 0.0 => Some(t / m),
        _ => None,
    };
    let times = |v: Option<f64>| match v {
        Some(v) => format!("{v:.2}×"),
        None => "–".to_string(),
    };
    let iter_speedups: Vec<Option<f64>> = rows
        .iter()
        .map(|r| {
            speedup(
                per_iter(r.later_total, r.later_iters),
                vanilla.and_then(|v| per_iter(v.later_total, v.later_iters)),
            )
        })
        .collect();
    let selection = |run: &Run| {
        run.selection()
            .map(|s| format!("`{s}`"))
            .unwrap_or_else(|| "–".into())
    };
    let rho = |r: &Row| r.rho.map(|v| v.to_string()).unwrap_or_else(|| "?".into());

    let mut md = String::new();
    let _ = writeln!(md, "# OPTune ρ sweep\n");
    let _ = writeln!(
        md,
        "Each run is the same pipeline with a different ρ, the fraction of prompts regenerated \
         from iteration 2 on (ρ = 1: vanilla online DPO), or a different selection (opt-select's \
         arguments; `+ history`: it also read the earlier iterations' scored sets). Iteration 1 \
         generates for every prompt whatever ρ, so the per-iteration times of iterations ≥ 2 are \
         where the selection acts; speedups are the first ρ = 1 run's seconds divided by this \
         run's.\n"
    );
    let _ = writeln!(
        md,
        "| ρ | selection | run | iterations | final fresh mean reward | final all mean reward | final held-out mean reward | generation s (all iterations) | total s (all iterations) | generation s per iteration ≥ 2 | s per iteration ≥ 2 | generation speedup (iter ≥ 2) | iteration speedup (iter ≥ 2) | total speedup |"
    );
    let _ = writeln!(
        md,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (r, iter_speedup) in rows.iter().zip(&iter_speedups) {
        let gen_iter = per_iter(r.later_gen, r.later_iters);
        let _ = writeln!(
            md,
            "| {} | {} | `{}` | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            rho(r),
            selection(r.run),
            r.run.name,
            r.iterations,
            num(r.final_fresh, 4),
            num(r.final_all, 4),
            num(r.final_eval, 4),
            r.gen_total,
            r.total,
            num(gen_iter, 1),
            num(per_iter(r.later_total, r.later_iters), 1),
            times(speedup(
                gen_iter,
                vanilla.and_then(|v| per_iter(v.later_gen, v.later_iters))
            )),
            times(*iter_speedup),
            times(speedup(Some(r.total), vanilla.map(|v| v.total))),
        );
    }
    md.push('\n');
    if vanilla.is_none() {
        let _ = writeln!(md, "No ρ = 1 run among these: no speedups.\n");
    }
    if let Some(plot) = plot {
        let _ = writeln!(md, "![rho sweep]({plot})\n");
    }

    // `make sweep` prints this section from its heading to the end of the report.
    let _ = writeln!(md, "{SPEEDUP_HEADING}\n");
    let share = |r: &Row| (r.later_total > 0.0).then(|| r.later_gen / r.later_total);
    let g = vanilla.and_then(share);
    match (vanilla, g) {
        (Some(v), Some(g)) => {
            let _ = writeln!(
                md,
                "g = {g:.3}: the generation share of an iteration in the ρ = 1 run `{}`, its \
                 generation seconds over its iteration seconds, summed over iterations ≥ 2; an \
                 iteration's seconds are the sum of the stages in its `timings.csv` (gen, score, \
                 select, pairs, ref, train; training includes loading the models, and the \
                 reference pass unless it is the ref stage of its own (SHARDS > 1); the \
                 held-out evaluation is not part of an iteration). If only generation shrinks with ρ, an iteration at ρ takes 1 − (1 − ρ)·g of a ρ = 1 \
                 iteration, so the predicted speedup is 1 / (1 − (1 − ρ)·g).\n",
                v.run.name
            );
        }
        _ => {
            let _ = writeln!(
                md,
                "No ρ = 1 run with timed iterations ≥ 2 among these: no generation share g, no \
                 prediction.\n"
            );
        }
    }
    let _ = writeln!(
        md,
        "| ρ | selection | run | generation share (iter ≥ 2) | measured iteration speedup (iter ≥ 2) | predicted 1 / (1 − (1 − ρ)·g) |"
    );
    let _ = writeln!(md, "|---:|---|---|---:|---:|---:|");
    for (r, iter_speedup) in rows.iter().zip(&iter_speedups) {
        let predicted = r.rho.zip(g).map(|(rho, g)| predicted_speedup(rho, g));
        let _ = writeln!(
            md,
            "| {} | {} | `{}` | {} | {} | {} |",
            rho(r),
            selection(r.run),
            r.run.name,
            num(share(r), 3),
            times(*iter_speedup),
            times(predicted),
        );
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "For comparison, the OPTune paper (Chen et al. 2024, arXiv 2406.07657) reports 1.27–1.56× \
         faster training than vanilla online DPO (Zephyr-7B policy, UltraChat prompts, GPUs), \
         close to the prediction for g ≈ 0.7 (1.27× at ρ = 0.7, 1.54× at ρ = 0.5).\n"
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::StageTiming;

    /// A plot that cannot be drawn leaves the previous set of plots and no staging file; a set
    /// that draws replaces it.
    #[test]
    fn a_failed_plot_leaves_the_previous_set() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
        std::fs::write(&a, "old a").unwrap();
        let writes =
            |text: &'static str| -> Draw { Box::new(move |path| Ok(std::fs::write(path, text)?)) };
        let failing: Draw = Box::new(|_| anyhow::bail!("no data"));
        let err = draw_plots(vec![(a.clone(), writes("new a")), (b.clone(), failing)]).unwrap_err();
        assert!(format!("{err:#}").contains("drawing"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old a");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        draw_plots(vec![
            (a.clone(), writes("new a")),
            (b.clone(), writes("new b")),
        ])
        .unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "new a");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new b");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    }

    /// A run at `rho` whose iterations took `stages` (stage, seconds) each.
    fn fixture_run(name: &str, rho: &str, stages: &[&[(&str, f64)]]) -> Run {
        let iterations = stages
            .iter()
            .zip(1..)
            .map(|(timings, index)| Iteration {
                index,
                timings: timings
                    .iter()
                    .map(|&(stage, seconds)| StageTiming {
                        stage: stage.to_string(),
                        seconds: Some(seconds),
                        rows: None,
                        tokens: None,
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Run {
            dir: PathBuf::from(name),
            name: name.to_string(),
            settings: [("RHO".to_string(), rho.to_string())].into(),
            iterations,
        }
    }

    /// With SHARDS > 1 the reference log-probs are a stage of their own: the table has its
    /// column, and the "all" row adds up to the iterations' totals.
    #[test]
    fn the_wall_time_table_holds_the_reference_stage() {
        let iteration: &[(&str, f64)] =
            &[("gen", 10.0), ("pairs", 1.0), ("ref", 4.0), ("train", 5.0)];
        let md = run_markdown(&fixture_run("x", "0.7", &[iteration, iteration]), &[]);
        assert!(
            md.contains("| iteration | gen | score | select | pairs | ref | train | total |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | 10.0 | – | – | 1.0 | 4.0 | 5.0 | 20.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| all | 20.0 | 0.0 | 0.0 | 2.0 | 8.0 | 10.0 | 40.0 |"),
            "{md}"
        );
        // Without it (SHARDS=1) the column is left out.
        let unsplit: &[(&str, f64)] = &[("gen", 10.0), ("train", 9.0)];
        let md = run_markdown(&fixture_run("y", "0.7", &[unsplit]), &[]);
        assert!(
            md.contains("| iteration | gen | score | select | pairs | train | total |"),
            "{md}"
        );
    }

    #[test]
    fn the_papers_generation_share_predicts_its_speedups() {
        // The paper's 1.27× at ρ = 0.7 and 1.56× at ρ = 0.5 fit g ≈ 0.7.
        assert!((predicted_speedup(0.7, 0.7) - 1.266).abs() < 1e-3);
        assert!((predicted_speedup(0.5, 0.7) - 1.538).abs() < 1e-3);
        assert_eq!(predicted_speedup(1.0, 0.7), 1.0);
        assert_eq!(predicted_speedup(0.3, 0.0), 1.0);
    }

    #[test]
    fn sweep_predicts_from_the_rho_one_runs_generation_share() {
        let iter1: &[(&str, f64)] = &[("gen", 80.0), ("score", 2.0), ("train", 38.0)];
        // ρ = 1, iterations 2 and 3: 60 s of generation in 100 s (select 1 + pairs 1 + train 36
        // + score 2 s), so g = 0.6; the generation of iteration 1 does not count.
        let full: &[(&str, f64)] = &[
            ("gen", 60.0),
            ("score", 2.0),
            ("select", 1.0),
            ("pairs", 1.0),
            ("train", 36.0),
        ];
        // ρ = 0.5: half the generation, the other stages as at ρ = 1: 70 s, as predicted.
        let half: &[(&str, f64)] = &[
            ("gen", 30.0),
            ("score", 2.0),
            ("select", 1.0),
            ("pairs", 1.0),
            ("train", 36.0),
        ];
        let runs = [
            fixture_run("x-rho0.5", "0.5", &[iter1, half, half]),
            fixture_run("x-rho1.0", "1.0", &[iter1, full, full]),
        ];
        let md = sweep_markdown(&runs, None);
        let section = &md[md.find(SPEEDUP_HEADING).expect("the section")..];
        assert!(section.contains("g = 0.600: "), "{section}");
        // 1 / (1 − 0.5 · 0.6) = 1 / 0.7 and 100 s / 70 s both give 1.43×.
        assert!(
            section.contains("| 0.5 | – | `x-rho0.5` | 0.429 | 1.43× | 1.43× |"),
            "{section}"
        );
        assert!(
            section.contains("| 1 | – | `x-rho1.0` | 0.600 | 1.00× | 1.00× |"),
            "{section}"
        );
    }

    #[test]
    fn sweep_without_a_timed_rho_one_iteration_predicts_nothing() {
        let only_iter1: &[(&str, f64)] = &[("gen", 10.0), ("train", 10.0)];
        let runs = [
            fixture_run("x-rho0.5", "0.5", &[only_iter1]),
            fixture_run("x-rho1.0", "1.0", &[only_iter1]),
        ];
        let md = sweep_markdown(&runs, None);
        assert!(md.contains("no generation share g"), "{md}");
        assert!(md.contains("| 0.5 | – | `x-rho0.5` | – | – | – |"), "{md}");
    }
}
