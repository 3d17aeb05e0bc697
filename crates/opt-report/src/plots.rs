//! The report's PNG plots, drawn with plotters' bitmap backend and the DejaVu
//! Sans font embedded from the `dejavu` crate (no system font lookup).

use crate::data::{mean, Iteration, Run};
use anyhow::{anyhow, Result};
use plotters::coord::cartesian::Cartesian2d;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 520);

/// Registers the embedded font once per process; plotters' ab_glyph text
/// finds fonts by name only.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the crate: failing here is a build defect.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            panic!("the embedded DejaVu Sans font did not load");
        }
    });
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

fn color(i: usize) -> RGBColor {
    // Okabe–Ito: distinguishable for colour-blind readers.
    const COLORS: [RGBColor; 8] = [
        RGBColor(0, 114, 178),
        RGBColor(230, 159, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(86, 180, 233),
        RGBColor(213, 94, 0),
        RGBColor(240, 228, 66),
        RGBColor(0, 0, 0),
    ];
    COLORS[i % COLORS.len()]
}

/// Integer tick labels for an iteration axis; other ticks stay blank.
fn iteration_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{:.0}", x)
    } else {
        String::new()
    }
}

/// A value axis label with no "-0.0".
fn value_label(y: &f64) -> String {
    let text = format!("{y:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.').to_string();
    if text == "-0" || text.is_empty() {
        "0".to_string()
    } else {
        text
    }
}

fn light() -> RGBColor {
    RGBColor(238, 238, 238)
}

/// A y range covering `values` with a little headroom (a flat series still gets height).
fn padded_range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(1e-3);
    (lo - pad, hi + pad)
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The chart's legend, in a white box.
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
    size: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .label_font((FONT, size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(err)
}

/// A labelled line through `points`.
fn line(
    chart: &mut Chart<'_, '_>,
    points: &[(f64, f64)],
    c: RGBColor,
    label: String,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(points.to_vec(), c.stroke_width(2)))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    Ok(())
}

/// Mean reward per iteration: the fresh samples, all responses, and the held-out evaluation.
pub fn reward_means(run: &Run, path: &Path) -> Result<()> {
    register_font();
    let mut series: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("fresh samples (policy N-1)", Vec::new()),
        ("all responses of the iteration", Vec::new()),
        ("held-out prompts (policy N)", Vec::new()),
    ];
    for it in &run.iterations {
        let x = it.index as f64;
        if let Some(m) = it.fresh.as_deref().and_then(mean) {
            series[0].1.push((x, m));
        }
        if let Some(m) = it.all.as_deref().and_then(mean) {
            series[1].1.push((x, m));
        }
        if let Some(m) = it.eval.as_deref().and_then(mean) {
            series[2].1.push((x, m));
        }
    }
    series.retain(|(_, points)| !points.is_empty());
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .collect();
    let (x_lo, x_hi) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min).min(1.0),
        xs.iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
            .max(1.0),
    );
    let (y_lo, y_hi) = padded_range(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: mean reward per iteration", run.name),
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((x_lo - 0.3)..(x_hi + 0.3), y_lo..y_hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(((x_hi - x_lo) as usize + 1) * 4)
        .x_label_formatter(&iteration_label)
        .x_desc("iteration")
        .y_desc("mean reward")
        .y_label_formatter(&value_label)
        .light_line_style(light())
        .label_style((FONT, 15))
        .draw()
        .map_err(err)?;
    for (i, (label, points)) in series.iter().enumerate() {
        let c = color(i);
        line(&mut chart, points, c, label.to_string())?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 15)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Histograms of the fresh samples' rewards, one panel per iteration, on a common x range.
pub fn reward_histograms(run: &Run, path: &Path) -> Result<()> {
    register_font();
    let panels: Vec<&Iteration> = run
        .trained()
        .filter(|it| it.fresh.as_ref().is_some_and(|f| !f.is_empty()))
        .collect();
    let columns = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(columns).max(1);
    let root = BitMapBackend::new(path, (SIZE.0, 60 + 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(50);
    title
        .titled(
            &format!("{}: reward distribution of the fresh samples", run.name),
            (FONT, 22),
        )
        .map_err(err)?;
    if panels.is_empty() {
        root.present().map_err(err)?;
        return Ok(());
    }
    let all: Vec<f64> = panels
        .iter()
        .flat_map(|it| it.fresh.iter().flatten().copied())
        .collect();
    let (lo, hi) = padded_range(all.iter().copied());
    const BINS: usize = 20;
    let width = (hi - lo) / BINS as f64;
    let counts: Vec<Vec<usize>> = panels
        .iter()
        .map(|it| {
            let mut bins = vec![0usize; BINS];
            for &v in it.fresh.iter().flatten() {
                let b = (((v - lo) / width) as usize).min(BINS - 1);
                bins[b] += 1;
            }
            bins
        })
        .collect();
    let max_count = counts.iter().flatten().copied().max().unwrap_or(1).max(1);
    let areas = body.split_evenly((rows, columns));
    for (k, (it, bins)) in panels.iter().zip(&counts).enumerate() {
        draw_histogram(&areas[k], it, bins, lo, width, max_count, color(0))?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn draw_histogram(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    it: &Iteration,
    bins: &[usize],
    lo: f64,
    width: f64,
    max_count: usize,
    c: RGBColor,
) -> Result<()> {
    let fresh = it.fresh.as_deref().unwrap_or(&[]);
    let hi = lo + width * bins.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "iteration {}: n={}, mean {:.3}",
                it.index,
                fresh.len(),
                mean(fresh).unwrap_or(f64::NAN)
            ),
            (FONT, 15),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(lo..hi, 0.0..(max_count as f64 * 1.1))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(5)
        .y_labels(4)
        .light_line_style(light())
        .x_label_formatter(&value_label)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 12))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            bins.iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(b, &n)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], c.mix(0.75).filled())
                }),
        )
        .map_err(err)?;
    if let Some(m) = mean(fresh) {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(m, 0.0), (m, max_count as f64 * 1.1)],
                color(5).stroke_width(2),
            )))
            .map_err(err)?;
    }
    Ok(())
}

/// Wall time per stage, stacked, one bar per iteration.
pub fn wall_times(run: &Run, path: &Path) -> Result<()> {
    register_font();
    let iterations: Vec<&Iteration> = run.trained().filter(|it| !it.timings.is_empty()).collect();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (first, last) = match (iterations.first(), iterations.last()) {
        (Some(a), Some(b)) => (a.index as f64, b.index as f64),
        _ => (1.0, 1.0),
    };
    let top = iterations
        .iter()
        .filter_map(|it| it.total_seconds())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: wall time per stage", run.name), (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((first - 0.6)..(last + 0.6), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(((last - first) as usize + 1) * 4)
        .x_label_formatter(&iteration_label)
        .x_desc("iteration")
        .y_desc("seconds")
        .y_label_formatter(&value_label)
        .light_line_style(light())
        .label_style((FONT, 15))
        .draw()
        .map_err(err)?;
    let stages = run.stages();
    for (s, stage) in stages.iter().enumerate() {
        let c = color(s);
        let bars: Vec<Rectangle<(f64, f64)>> = iterations
            .iter()
            .filter_map(|it| {
                let below: f64 = stages[..s]
                    .iter()
                    .filter_map(|st| it.stage_seconds(st))
                    .sum();
                let height = it.stage_seconds(stage)?;
                let x = it.index as f64;
                Some(Rectangle::new(
                    [(x - 0.3, below), (x + 0.3, below + height)],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(*stage)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight, 15)?;
    root.present().map_err(err)?;
    Ok(())
}

/// DPO reward margins and loss over the optimiser steps, one line per iteration.
pub fn dpo_margins(run: &Run, path: &Path) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (SIZE.0, SIZE.1 + 120)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2 + 60);
    panel(run, &top, "DPO reward margin (rewards/margins)", |p| {
        p.margin
    })?;
    panel(run, &bottom, "DPO loss", |p| p.loss)?;
    root.present().map_err(err)?;
    Ok(())
}

fn panel(
    run: &Run,
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    value: impl Fn(&crate::data::MetricsPoint) -> Option<f64>,
) -> Result<()> {
    let lines: Vec<(u32, Vec<(f64, f64)>)> = run
        .trained()
        .map(|it| {
            (
                it.index,
                it.metrics
                    .iter()
                    .filter_map(|p| Some((p.step, value(p)?)))
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let max_step = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1.0, f64::max);
    let (lo, hi) = padded_range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{}: {title}", run.name), (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(0.8..max_step + 0.2, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("optimiser step within the iteration")
        .x_label_formatter(&iteration_label)
        .y_label_formatter(&value_label)
        .light_line_style(light())
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    for (k, (index, points)) in lines.iter().enumerate() {
        let c = color(k);
        line(&mut chart, points, c, format!("iteration {index}"))?;
    }
    if !lines.is_empty() {
        legend(&mut chart, SeriesLabelPosition::UpperLeft, 13)?;
    }
    Ok(())
}

/// The sweep: mean fresh reward per iteration for each ρ (left) and the
/// generation and total wall time per ρ (right).
pub fn sweep(runs: &[crate::data::Run], path: &Path) -> Result<()> {
    register_font();
    // Runs of several selections are told apart by their names.
    let one_selection = runs
        .iter()
        .all(|run| run.selection() == runs[0].selection());
    let label = |run: &crate::data::Run, prefix: &str| match run.rho() {
        Some(r) if one_selection => format!("{prefix}{r}"),
        _ => run.name.clone(),
    };
    let root = BitMapBackend::new(path, (SIZE.0 + 300, SIZE.1)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 * 3 / 5 + 180);

    let lines: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|run| {
            let label = label(run, "rho ");
            let points = run
                .trained()
                .filter_map(|it| Some((it.index as f64, mean(it.fresh.as_deref()?)?)))
                .collect();
            (label, points)
        })
        .collect();
    let last = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1.0, f64::max);
    let (lo, hi) = padded_range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let mut chart = ChartBuilder::on(&left)
        .caption("mean reward of the fresh samples", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(0.7..last + 0.3, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels((last as usize) * 4)
        .x_label_formatter(&iteration_label)
        .x_desc("iteration")
        .y_label_formatter(&value_label)
        .light_line_style(light())
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    for (k, (label, points)) in lines.iter().enumerate() {
        let c = color(k);
        line(&mut chart, points, c, label.clone())?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 13)?;

    // Right: seconds per run, generation and the rest stacked.
    let bars: Vec<(String, f64, f64)> = runs
        .iter()
        .map(|run| {
            let label = label(run, "");
            let gen: f64 = run.trained().filter_map(|it| it.stage_seconds("gen")).sum();
            let total: f64 = run.trained().filter_map(|it| it.total_seconds()).sum();
            (label, gen, total)
        })
        .collect();
    let top = bars.iter().map(|b| b.2).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&right)
        .caption("wall time per run", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.6..(bars.len() as f64 - 0.4), 0.0..top)
        .map_err(err)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let rho_label = move |x: &f64| -> String {
        if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
            names.get(x.round() as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 4 + 1)
        .x_label_formatter(&rho_label)
        .x_desc("rho")
        .y_desc("seconds")
        .y_label_formatter(&value_label)
        .light_line_style(light())
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    let (gen_color, rest_color) = (color(0), color(4));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [(i as f64 - 0.3, 0.0), (i as f64 + 0.3, b.1)],
                gen_color.filled(),
            )
        }))
        .map_err(err)?
        .label("generation")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], gen_color.filled()));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [(i as f64 - 0.3, b.1), (i as f64 + 0.3, b.2)],
                rest_color.filled(),
            )
        }))
        .map_err(err)?
        .label("score, select, pairs, train")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], rest_color.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 13)?;
    root.present().map_err(err)?;
    Ok(())
}
