//! ferry-reports: plots (PNG and SVG through plotters) from numbers other crates
//! computed: throughput curves, Gantt timelines of traces, predicted-vs-measured
//! scatters.
//!
//! Must never: compute a metric of its own; it draws what `ferry-core` computed.
//! Fonts are bundled (DejaVu Sans, `fonts/`), so plots need no system font.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
    #[error("nothing to plot: {0}")]
    Empty(String),
}

impl ferry_core::Classify for ReportError {
    fn kind(&self) -> ferry_core::ErrorKind {
        match self {
            ReportError::Core(e) => e.kind(),
            ReportError::Exists(_) => ferry_core::ErrorKind::Usage,
            ReportError::Draw { .. } => ferry_core::ErrorKind::Environment,
            ReportError::Empty(_) => ferry_core::ErrorKind::Internal,
        }
    }
}

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; failing to parse it is a build defect, caught by the tests.
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .unwrap_or_else(|_| panic!("bundled DejaVuSans.ttf does not parse"));
    });
}

/// A line series: a name and (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One bar in a Gantt chart.
pub struct Bar {
    pub row: usize,
    pub start_ms: f64,
    pub end_ms: f64,
    /// Index into the legend's categories (colour).
    pub category: usize,
}

/// A point of a predicted-vs-measured scatter.
pub struct ScatterPoint {
    pub predicted: f64,
    pub measured: f64,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Creates the folder and checks every file to be drawn in it before any drawing:
/// none may be a symbolic link, and none may exist unless `force`.
pub fn prepare(dir: &Path, stems: &[&str], force: bool) -> Result<(), ReportError> {
    ferry_core::atomic::refuse_symlink(dir)?;
    if dir.exists() && !dir.is_dir() {
        return Err(ferry_core::CoreError::invalid(format!(
            "{} is a file; the plots go into a folder of that name (give another name, or remove the file)",
            dir.display()
        ))
        .into());
    }
    std::fs::create_dir_all(dir).map_err(|source| ferry_core::CoreError::io(dir, source))?;
    for stem in stems {
        for ext in ["png", "svg"] {
            let path = dir.join(format!("{stem}.{ext}"));
            if !force && path.exists() {
                return Err(ReportError::Exists(path));
            }
            ferry_core::atomic::check_output_path(&path, true)?;
        }
    }
    Ok(())
}

/// Draws `$body` (with `$root` bound to the drawing area) into `<stem>.png` and
/// `<stem>.svg`, expanding the body once per backend; evaluates to both paths. Each
/// file is drawn under a temporary name and renamed into place once complete.
macro_rules! both {
    ($dir:expr, $stem:expr, $size:expr, |$root:ident| $body:block) => {{
        register_font();
        let png = $dir.join(format!("{}.png", $stem));
        let svg = $dir.join(format!("{}.svg", $stem));
        {
            let file = ferry_core::atomic::AtomicFile::create(&png, true)?;
            let area = BitMapBackend::new(file.temp_path(), $size).into_drawing_area();
            area.fill(&WHITE).map_err(|e| draw_error(&png, e))?;
            let $root = &area;
            let drawn: Result<(), String> = (|| $body)();
            drawn.map_err(|message| ReportError::Draw { path: png.clone(), message })?;
            area.present().map_err(|e| draw_error(&png, e))?;
            drop(area);
            file.commit()?;
        }
        {
            let file = ferry_core::atomic::AtomicFile::create(&svg, true)?;
            let area = SVGBackend::new(file.temp_path(), $size).into_drawing_area();
            area.fill(&WHITE).map_err(|e| draw_error(&svg, e))?;
            let $root = &area;
            let drawn: Result<(), String> = (|| $body)();
            drawn.map_err(|message| ReportError::Draw { path: svg.clone(), message })?;
            area.present().map_err(|e| draw_error(&svg, e))?;
            drop(area);
            file.commit()?;
        }
        Ok(vec![png, svg])
    }};
}

fn draw_error(path: &Path, error: impl std::fmt::Display) -> ReportError {
    ReportError::Draw { path: path.to_path_buf(), message: error.to_string() }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn padded_range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    if log {
        return (lo / 1.5, hi * 1.5);
    }
    let span = (hi - lo).max(hi.abs() * 0.1).max(1e-9);
    ((lo - 0.05 * span).min(0.0f64.max(lo - 0.05 * span)), hi + 0.1 * span)
}

/// A line chart with markers; `log_x` for batch sizes and budgets.
pub fn line_chart(
    dir: &Path,
    stem: &str,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> Result<Vec<PathBuf>, ReportError> {
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(ReportError::Empty(title.to_string()));
    }
    let (x0, x1) = padded_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), log_x);
    let (_, y1) = padded_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), false);
    macro_rules! draw_body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
                .map_err(text)?;
            for (i, s) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                    .map_err(text)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(text)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font((FONT, 15))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(text)?;
            Ok(())
        }};
    }
    both!(dir, stem, (900, 560), |root| {
        let mut builder = ChartBuilder::on(root);
        builder.caption(title, (FONT, 24)).margin(15).x_label_area_size(50).y_label_area_size(70);
        if log_x {
            draw_body!(builder.build_cartesian_2d((x0..x1).log_scale(), 0.0..y1).map_err(text)?)
        } else {
            draw_body!(builder.build_cartesian_2d(x0..x1, 0.0..y1).map_err(text)?)
        }
    })
}

/// A Gantt chart: one row per `rows` entry, bars coloured by category.
pub fn gantt(
    dir: &Path,
    stem: &str,
    title: &str,
    rows: &[String],
    categories: &[String],
    bars: &[Bar],
) -> Result<Vec<PathBuf>, ReportError> {
    if bars.is_empty() {
        return Err(ReportError::Empty(title.to_string()));
    }
    let start = bars.iter().map(|b| b.start_ms).fold(f64::MAX, f64::min);
    let end = bars.iter().map(|b| b.end_ms).fold(f64::MIN, f64::max);
    let span = (end - start).max(1e-6);
    let height = 160 + 50 * rows.len() as u32;
    both!(dir, stem, (1000, height.max(320)), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(150)
            .build_cartesian_2d(0.0..span * 1.02, 0.0..rows.len() as f64)
            .map_err(text)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("time since the step began (ms)")
            .y_labels(rows.len() * 2 + 1)
            .y_label_formatter(&|y: &f64| {
                let index = y.floor() as usize;
                if (y - y.floor() - 0.5).abs() < 0.26 && index < rows.len() {
                    rows[rows.len() - 1 - index].clone()
                } else {
                    String::new()
                }
            })
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()
            .map_err(text)?;
        for (category, name) in categories.iter().enumerate() {
            let color = PALETTE[category % PALETTE.len()];
            chart
                .draw_series(bars.iter().filter(|b| b.category == category).map(|b| {
                    let y = (rows.len() - 1 - b.row) as f64;
                    Rectangle::new(
                        [
                            (b.start_ms - start, y + 0.15),
                            ((b.end_ms - start).max(b.start_ms - start + span * 0.001), y + 0.85),
                        ],
                        color.filled(),
                    )
                }))
                .map_err(text)?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(text)?;
        Ok(())
    })
}

/// Predicted against measured on equal axes, with the y = x line and a ±`band` (fraction) band.
pub fn scatter_with_band(
    dir: &Path,
    stem: &str,
    title: &str,
    unit: &str,
    points: &[ScatterPoint],
    band: f64,
) -> Result<Vec<PathBuf>, ReportError> {
    if points.is_empty() {
        return Err(ReportError::Empty(title.to_string()));
    }
    let max = points.iter().flat_map(|p| [p.predicted, p.measured]).fold(0.0, f64::max) * 1.15;
    both!(dir, stem, (700, 700), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(15)
            .x_label_area_size(55)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max, 0.0..max)
            .map_err(text)?;
        chart
            .configure_mesh()
            .x_desc(format!("predicted ({unit})"))
            .y_desc(format!("measured ({unit})"))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()
            .map_err(text)?;
        let band_color = RGBColor(200, 220, 240);
        chart
            .draw_series(std::iter::once(Polygon::new(
                // Between y = (1 + band)·x and y = (1 − band)·x, kept inside the square so
                // the upper edge is not clipped away.
                vec![(0.0, 0.0), (max / (1.0 + band), max), (max, max), (max, max * (1.0 - band))],
                band_color.filled(),
            )))
            .map_err(text)?
            .label(format!("±{:.0} %", band * 100.0))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], band_color.filled()));
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.0), (max, max)], BLACK.stroke_width(1)))
            .map_err(text)?
            .label("measured = predicted")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart
            .draw_series(points.iter().map(|p| Circle::new((p.predicted, p.measured), 5, PALETTE[0].filled())))
            .map_err(text)?
            .label("plan")
            .legend(|(x, y)| Circle::new((x + 8, y), 5, PALETTE[0].filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(text)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_png_and_svg_with_the_bundled_font() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![Series { name: "ferry".into(), points: vec![(1.0, 2.0), (2.0, 3.5), (4.0, 5.0)] }];
        let files = line_chart(dir.path(), "curve", "Throughput", "batch", "tokens/s", &series, true).unwrap();
        for file in &files {
            assert!(std::fs::metadata(file).unwrap().len() > 1000, "{file:?} is too small");
        }
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.contains("tokens/s") && svg.contains("Throughput"));
        let bars = vec![
            Bar { row: 0, start_ms: 0.0, end_ms: 2.0, category: 0 },
            Bar { row: 1, start_ms: 1.0, end_ms: 3.0, category: 1 },
        ];
        gantt(
            dir.path(),
            "gantt",
            "Step",
            &["disk".into(), "compute".into()],
            &["read".into(), "compute".into()],
            &bars,
        )
        .unwrap();
        let points = vec![ScatterPoint { predicted: 1.0, measured: 1.1 }];
        scatter_with_band(dir.path(), "scatter", "Validation", "tokens/s", &points, 0.1).unwrap();
        // Refuses to overwrite without force.
        assert!(matches!(prepare(dir.path(), &["curve"], false), Err(ReportError::Exists(_))));
        prepare(dir.path(), &["curve"], true).unwrap();
    }
}
