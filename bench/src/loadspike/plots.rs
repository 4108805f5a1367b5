//! The PNGs beside results.json (plotters, bitmap backend): latency over time with the load
//! beneath it, memory and processes over time, and the latency CDF, one colour per policy.
//! Text is drawn with a TrueType font loaded from a file (ab_glyph), DejaVu Sans by default
//! (Debian's fonts-dejavu-core, which scripts/setup.sh installs).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::runner::PolicyRun;

pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 620);

fn colour(policy: &str) -> RGBColor {
    match policy {
        "remote-fork" => RGBColor(0x1f, 0x77, 0xb4),
        "fn-cache" => RGBColor(0xd6, 0x27, 0x28),
        "local-fork" => RGBColor(0x2c, 0xa0, 0x2c),
        "cold" => RGBColor(0x94, 0x67, 0xbd),
        _ => RGBColor(0x55, 0x55, 0x55),
    }
}

/// Registers the font once (plotters keeps a `'static` reference to its bytes).
fn load_font(path: &Path) -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a TrueType font", path.display()))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("loading the plots' font: {e} (install fonts-dejavu-core)"))
}

/// Draws the three plots into `dir`; their paths.
pub fn draw(
    dir: &Path,
    font: &Path,
    runs: &[PolicyRun],
    arrivals: &[Duration],
) -> Result<Vec<PathBuf>> {
    load_font(font)?;
    let paths = [
        dir.join("latency-over-time.png"),
        dir.join("memory-over-time.png"),
        dir.join("latency-cdf.png"),
    ];
    latency_over_time(&paths[0], runs, arrivals).context("latency over time")?;
    memory_over_time(&paths[1], runs).context("memory over time")?;
    cdf(&paths[2], runs).context("latency CDF")?;
    Ok(paths.to_vec())
}

fn latency_range(runs: &[PolicyRun]) -> (f64, f64) {
    let all = runs.iter().flat_map(|r| r.calls.iter());
    let lo = all.clone().map(|c| c.latency_ms).fold(f64::MAX, f64::min);
    let hi = all.map(|c| c.latency_ms).fold(0.0, f64::max);
    if hi <= 0.0 {
        (1.0, 10.0)
    } else {
        ((lo * 0.8).max(0.1), hi * 1.25)
    }
}

fn end_secs(runs: &[PolicyRun], arrivals: &[Duration]) -> f64 {
    let last_sample = runs
        .iter()
        .flat_map(|r| r.samples.last())
        .map(|s| s.t)
        .fold(0.0, f64::max);
    let last_call = arrivals.last().map_or(0.0, Duration::as_secs_f64);
    last_sample.max(last_call).max(1.0)
}

fn latency_over_time(path: &Path, runs: &[PolicyRun], arrivals: &[Duration]) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 * 68 / 100);
    let end = end_secs(runs, arrivals);
    let (lo, hi) = latency_range(runs);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Latency of every call, by when it was sent (x: failed)",
            (FONT, 22),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .y_desc("latency (ms, log)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .draw()?;
    for run in runs {
        let c = colour(&run.policy);
        // Failed calls: a cross at the time they failed after.
        chart.draw_series(
            run.calls
                .iter()
                .filter(|x| !x.ok())
                .map(|x| Cross::new((x.at, x.latency_ms), 4, c.stroke_width(1))),
        )?;
        let series = chart.draw_series(
            run.calls
                .iter()
                .filter(|x| x.ok())
                .map(|x| Circle::new((x.at, x.latency_ms), 2, c.filled())),
        )?;
        if run.round == 0 {
            series
                .label(run.policy.clone())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;

    // The load: calls sent per second (the same arrivals for every policy).
    let seconds = end.ceil() as usize;
    let mut per_sec = vec![0u32; seconds.max(1)];
    for a in arrivals {
        let i = (a.as_secs_f64() as usize).min(per_sec.len() - 1);
        per_sec[i] += 1;
    }
    let peak = f64::from(per_sec.iter().copied().max().unwrap_or(1).max(1));
    let mut load = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)?;
    load.configure_mesh()
        .x_desc("seconds from the start of the replay")
        .y_desc("calls / s")
        .label_style((FONT, 13))
        .draw()?;
    let steps = per_sec.iter().enumerate().flat_map(|(i, &n)| {
        let (x, y) = (i as f64, f64::from(n));
        [(x, y), (x + 1.0, y)]
    });
    load.draw_series(AreaSeries::new(steps, 0.0, BLACK.mix(0.25)).border_style(BLACK))?;
    root.present()?;
    Ok(())
}

fn memory_over_time(path: &Path, runs: &[PolicyRun]) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 * 62 / 100);
    let end = end_secs(runs, &[]);
    let peak = runs
        .iter()
        .flat_map(|r| &r.samples)
        .map(|s| s.pss_mib)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Memory of the function's processes, all hosts (sum of PSS); instances below",
            (FONT, 22),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)?;
    chart
        .configure_mesh()
        .y_desc("PSS (MiB)")
        .label_style((FONT, 13))
        .draw()?;
    for run in runs {
        let c = colour(&run.policy);
        let series = chart.draw_series(LineSeries::new(
            run.samples.iter().map(|s| (s.t, s.pss_mib)),
            c.stroke_width(2),
        ))?;
        if run.round == 0 {
            series
                .label(run.policy.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;

    let most = runs
        .iter()
        .flat_map(|r| &r.samples)
        .map(|s| s.instances)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut procs = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..most as f64 * 1.1)?;
    procs
        .configure_mesh()
        .x_desc("seconds from the start of the replay")
        .y_desc("instances")
        .label_style((FONT, 13))
        .draw()?;
    for run in runs {
        let c = colour(&run.policy);
        procs.draw_series(LineSeries::new(
            run.samples.iter().map(|s| (s.t, s.instances as f64)),
            c.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}

fn cdf(path: &Path, runs: &[PolicyRun]) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = latency_range(runs);
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency CDF", (FONT, 22))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("fraction of calls")
        .label_style((FONT, 13))
        .draw()?;
    // One curve per policy, over all its rounds.
    for group in super::report::by_policy(runs) {
        let policy = group[0].policy.clone();
        let mut xs: Vec<f64> = group
            .iter()
            .flat_map(|r| r.calls.iter())
            .map(|c| c.latency_ms)
            .collect();
        xs.sort_by(f64::total_cmp);
        let n = xs.len() as f64;
        let c = colour(&policy);
        chart
            .draw_series(LineSeries::new(
                xs.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)),
                c.stroke_width(2),
            ))?
            .label(policy)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    root.present()?;
    Ok(())
}
