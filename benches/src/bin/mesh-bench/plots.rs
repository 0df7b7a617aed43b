//! The report's plots, as SVG (plotters without its ttf feature: labels
//! are SVG text, so no system font is needed to draw them).

use std::path::Path;

use anyhow::Result;
use plotters::{
    coord::{Shift, types::RangedCoordf64},
    prelude::*,
};

use crate::results::Results;

const MODE_COLORS: [(&str, RGBColor); 3] = [
    ("plaintext", RGBColor(110, 110, 110)),
    ("node", RGBColor(31, 119, 180)),
    ("sidecar", RGBColor(214, 39, 40)),
];

fn color(mode: &str) -> RGBColor {
    MODE_COLORS
        .iter()
        .find(|(m, _)| *m == mode)
        .map_or(BLACK, |(_, c)| *c)
}

pub fn write_all(r: &Results, dir: &Path) -> Result<()> {
    latency(r, &dir.join("latency.svg"))?;
    scale(r, &dir.join("scale.svg"))?;
    churn(r, &dir.join("churn.svg"))
}

/// One line per mode over the percentiles, a panel per rate (log scale).
fn latency(r: &Results, path: &Path) -> Result<()> {
    const QS: [(&str, &str); 4] = [
        ("p50", "p50"),
        ("p90", "p90"),
        ("p99", "p99"),
        ("p999", "p99.9"),
    ];
    let root = SVGBackend::new(path, (1200, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let rates = [
        ("100rps", "100 req/s".to_string()),
        ("1000rps", "1,000 req/s".to_string()),
        (
            "high",
            format!("{:.0} req/s", r.value("latency.high.rate").unwrap_or(0.0)),
        ),
    ];
    let values: Vec<f64> = r
        .figures
        .iter()
        .filter(|(k, _)| {
            k.starts_with("latency.") && QS.iter().any(|(q, _)| k.ends_with(&format!(".{q}")))
        })
        .map(|(_, f)| f.value)
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(1e3)
        * 0.8;
    let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 1.25;
    for (panel, (label, title)) in root.split_evenly((1, 3)).iter().zip(&rates) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("latency at {title}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2f64..3.2f64, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| {
                QS.get(x.round() as usize)
                    .map_or(String::new(), |(_, name)| name.to_string())
            })
            .y_desc("µs from scheduled start")
            .draw()?;
        for mode in &r.modes {
            let points: Vec<(f64, f64)> = QS
                .iter()
                .enumerate()
                .filter_map(|(i, (q, _))| {
                    r.value(&format!("latency.{label}.{mode}.{q}"))
                        .map(|v| (i as f64, v.max(lo)))
                })
                .collect();
            draw_line(&mut chart, mode, points)?;
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// Data-plane memory and CPU per 1,000 requests against pods per node.
fn scale(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let steps = &r.config.scale_steps;
    let max_x = steps.last().copied().unwrap_or(1) as f64 * 1.05;
    for (panel, (figure, title, unit)) in panels.iter().zip([
        ("memory_mib", "data-plane memory", "MiB (sum of RSS)"),
        (
            "cpu_s_per_1k",
            "data-plane CPU per 1,000 requests",
            "CPU seconds",
        ),
    ]) {
        let series: Vec<(&String, Vec<(f64, f64)>)> = r
            .modes
            .iter()
            .filter(|m| *m != "plaintext")
            .map(|m| {
                let points = steps
                    .iter()
                    .filter_map(|s| {
                        r.value(&format!("scale.{s}.{m}.{figure}"))
                            .map(|v| (*s as f64, v))
                    })
                    .collect();
                (m, points)
            })
            .collect();
        let max_y = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.15;
        let mut chart = chart_on(panel, title, 0.0..max_x, 0.0..max_y)?;
        chart
            .configure_mesh()
            .x_desc("pods per node")
            .y_desc(unit)
            .draw()?;
        for (mode, points) in series {
            draw_line(&mut chart, mode, points)?;
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// The capturing agent's RSS and descriptors over the churn.
fn churn(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let samples = &r.churn_samples;
    let max_t = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let rss: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.t_s, s.rss_kib as f64 / 1024.0))
        .collect();
    let fds: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, s.fds as f64)).collect();
    for (panel, (title, unit, points)) in panels.iter().zip([
        ("agent RSS under churn", "MiB", rss),
        ("agent open fds under churn", "fds", fds),
    ]) {
        let max_y = points.iter().map(|(_, y)| *y).fold(0.0, f64::max).max(1.0) * 1.15;
        let mut chart = chart_on(panel, title, 0.0..max_t, 0.0..max_y)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(unit)
            .draw()?;
        chart.draw_series(LineSeries::new(points, color("node").stroke_width(2)))?;
    }
    root.present()?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn chart_on<'a, 'b>(
    panel: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>> {
    Ok(ChartBuilder::on(panel)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)?)
}

fn draw_line<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    mode: &str,
    points: Vec<(f64, f64)>,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    let c = color(mode);
    chart
        .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
        .label(mode.to_string())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    Ok(())
}

fn legend<'a, DB, Y>(chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
