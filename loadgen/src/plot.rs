//! `--plot FILE.svg`: latency by percentile, throughput over time and latency over time,
//! drawn with plotters from a finished report (`--from-json` draws a saved one again).
//!
//! The output is SVG: its text is SVG `<text>` elements that the viewer renders with its
//! own sans-serif font, so no font file is embedded and no font parser is compiled in
//! (plotters' PNG backend needs one to draw text, and the one it offers, `ab_glyph` with
//! `ttf-parser`, is unmaintained: RUSTSEC-2026-0192). plotters lays text out with its
//! built-in estimate of glyph widths, close enough for labels and titles. The module is
//! behind the `plot` feature (on by default): `courier demo` uses this library without
//! it, so the server's dependencies hold no plotting crate.

use std::path::{Path, PathBuf};

use crate::LoadReport;
use plotters::prelude::*;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 1100;
/// The percentile axis runs to 99.9999% (six nines).
const NINES_MAX: f64 = 6.0;

/// Why a plot was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// plotters failed while drawing; holds its description.
    #[error("drawing the plot: {0}")]
    Draw(String),
    /// The file's name does not end in `.svg` (the plot is SVG, whatever the name says).
    #[error("{0}: the plot is SVG; name the file FILE.svg")]
    NotSvg(PathBuf),
    /// The SVG could not be written.
    #[error("writing {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// plotters' description of the failure.
        reason: String,
    },
}

/// Percentile (0..100) to "nines" (0 at 0%, 1 at 90%, 2 at 99% ...).
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(10f64.powf(-NINES_MAX));
    -rest.log10()
}

fn nines_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if *x < 0.5 {
        "0%".to_string()
    } else {
        let s = format!("{p:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}%")
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

/// Draws `report` into an SVG file at `path`.
pub fn write_svg(report: &LoadReport, path: &Path) -> Result<(), PlotError> {
    if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        return Err(PlotError::NotSvg(path.to_path_buf()));
    }
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let title = format!(
        "courier-loadgen: {} loop{}, {:.0} msgs/s accepted, p99 {:.2} ms, max {:.2} ms",
        if report.mode.is_empty() {
            "closed"
        } else {
            &report.mode
        },
        if report.target_rate > 0.0 {
            format!(" at {:.0} msgs/s", report.target_rate)
        } else {
            String::new()
        },
        report.msgs_per_sec,
        report.latency_us.p99 as f64 / 1e3,
        report.latency_us.max as f64 / 1e3,
    );
    let root = root.titled(&title, ("sans-serif", 24)).map_err(draw_err)?;
    let panels = root.split_evenly((3, 1));

    // 1. Latency by percentile.
    let curve: Vec<(f64, f64)> = report
        .latency_curve
        .iter()
        .filter(|p| p.percentile < 100.0)
        .map(|p| (nines(p.percentile), p.latency_us as f64 / 1e3))
        .collect();
    let y_max = curve.iter().map(|p| p.1).fold(0.0, f64::max).max(0.001) * 1.1;
    let x_max = curve
        .iter()
        .map(|p| p.0)
        .fold(1.0, f64::max)
        .ceil()
        .min(NINES_MAX);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(
            "latency by percentile (from intended send time in open loop)",
            ("sans-serif", 20),
        )
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels((x_max as usize) + 1)
        .x_label_formatter(&nines_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(LineSeries::new(curve.iter().copied(), BLUE.stroke_width(2)))
        .map_err(draw_err)?;

    // 2. Throughput over time.
    let tl = &report.timeline;
    let mut prev = 0.0;
    // The last interval is the drain, often a few milliseconds: as a rate it says
    // nothing, so intervals under half a second are left out of this panel.
    let rates: Vec<(f64, f64, f64)> = tl
        .iter()
        .filter_map(|s| {
            let dt = s.t_secs - prev;
            prev = s.t_secs;
            (dt >= 0.5).then(|| (s.t_secs, s.sent as f64 / dt, s.accepted as f64 / dt))
        })
        .collect();
    let t_max = tl.last().map_or(1.0, |s| s.t_secs).max(1.0);
    let r_max = rates.iter().map(|r| r.1.max(r.2)).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("throughput over time (per second)", ("sans-serif", 20))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..t_max, 0.0..r_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("msgs/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(LineSeries::new(
            rates.iter().map(|r| (r.0, r.1)),
            RED.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("sent")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            rates.iter().map(|r| (r.0, r.2)),
            GREEN.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("accepted")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw_err)?;

    // 3. p99 and max per second.
    let l_max = tl
        .iter()
        .map(|s| s.max_us as f64 / 1e3)
        .fold(0.001, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption(
            "latency over time (answers of each second)",
            ("sans-serif", 20),
        )
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..t_max, 0.0..l_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    for (name, color, f) in [
        (
            "p50",
            BLUE,
            (|s: &crate::report::Second| s.p50_us) as fn(&_) -> u64,
        ),
        ("p99", MAGENTA, |s| s.p99_us),
        ("max", BLACK, |s| s.max_us),
    ] {
        chart
            .draw_series(LineSeries::new(
                tl.iter().map(|s| (s.t_secs, f(s) as f64 / 1e3)),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(|e| PlotError::Write {
        path: path.to_path_buf(),
        reason: format!("{e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_axis_counts_nines() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), NINES_MAX);
        assert_eq!(nines_label(&2.0), "99%");
        assert_eq!(nines_label(&0.0), "0%");
        assert_eq!(nines_label(&4.0), "99.99%");
    }

    fn example() -> LoadReport {
        serde_json::from_str(include_str!("../../docs/loadgen-example.json")).unwrap()
    }

    #[test]
    fn the_example_report_draws_as_svg_with_text_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("example.svg");
        write_svg(&example(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        for title in [
            "latency by percentile",
            "throughput over time",
            "latency over time",
        ] {
            assert!(svg.contains(title), "{title} missing");
        }
        assert!(
            svg.lines().any(|l| l.trim() == "99.9%"),
            "the percentile axis is labelled"
        );
        let curves = svg.matches("<polyline").count();
        assert!(curves >= 6, "{curves} curves, 6 expected");
    }

    #[test]
    fn a_plot_file_not_named_svg_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("open.png");
        let err = write_svg(&example(), &png).unwrap_err();
        assert!(matches!(err, PlotError::NotSvg(_)), "{err}");
        assert!(err.to_string().contains("FILE.svg"), "{err}");
        assert!(!png.exists());
    }
}
