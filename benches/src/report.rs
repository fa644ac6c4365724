//! Reports: what each step's [`StepRecorder`] counted, as numbers people
//! compare — a table on stdout, `report.json`, `steps.csv`, and
//! `latency.svg` (latency percentiles and goodput against offered load).
//!
//! Definitions, per step (its measured window only):
//! - *offered* = requests whose intended send time fell in the window, per
//!   second of the window;
//! - *elapsed* = the window, or until the last of its answers came if later
//!   (a backlog drains past the window's end and is still counted);
//! - *achieved* = results per second of elapsed;
//! - *goodput* = results within the deadline per second of elapsed (with no
//!   deadline, every result counts);
//! - percentiles are of the results' latencies from their intended send
//!   times; errors have no latency, and are counted by kind.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::load::{Load, StepPlan, StepRecorder};
use crate::schedule::Arrival;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("encoding the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("drawing {path}: {message}")]
    Plot { path: String, message: String },
}

/// One step's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepReport {
    /// The target, as given.
    pub target: String,
    /// The step's index in the sweep, from 0.
    pub step: usize,
    /// `open` or `closed`.
    pub mode: &'static str,
    /// The open loop's arrival process.
    pub arrival: Option<Arrival>,
    /// The open loop's nominal rate, requests/s.
    pub rate: Option<f64>,
    /// The closed loop's concurrency.
    pub concurrency: Option<u32>,
    /// The measured window, s.
    pub duration_s: f64,
    /// The window, or until its last answer if later, s.
    pub elapsed_s: f64,
    /// The deadline goodput counts against, µs.
    pub deadline_us: Option<u64>,
    pub sent: u64,
    pub ok: u64,
    pub good: u64,
    pub errors: BTreeMap<String, u64>,
    pub offered_rps: f64,
    pub achieved_rps: f64,
    pub goodput_rps: f64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    pub max_us: Option<u64>,
    pub mean_us: Option<f64>,
    /// 99th percentile of how late the client sent (open loop), µs.
    pub send_lag_p99_us: u64,
    /// Share of results served by overflow, of those whose server said.
    pub overflow_share: Option<f64>,
    /// Mean batch size of the results, where the server reported it.
    pub batch_size_mean: Option<f64>,
    /// Results by reported batch size.
    pub batch_sizes: BTreeMap<u32, u64>,
}

impl StepReport {
    /// The figures of one step.
    pub fn new(target: &str, step: usize, plan: &StepPlan, rec: &StepRecorder) -> Self {
        let duration_s = plan.duration.as_secs_f64();
        let elapsed_s = duration_s.max(rec.last_answer.as_secs_f64());
        let per_s = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let h = &rec.latency_us;
        let q = |quantile: f64| (rec.ok > 0).then(|| h.value_at_quantile(quantile));
        let (mode, arrival, rate, concurrency) = match plan.load {
            Load::Closed { concurrency } => ("closed", None, None, Some(concurrency)),
            Load::Open { schedule, .. } => (
                "open",
                Some(schedule.arrival()),
                Some(schedule.rate()),
                None,
            ),
        };
        let batched: u64 = rec.batch_sizes.values().sum();
        let batch_sum: u64 = rec
            .batch_sizes
            .iter()
            .map(|(size, n)| u64::from(*size) * n)
            .sum();
        StepReport {
            target: target.into(),
            step,
            mode,
            arrival,
            rate,
            concurrency,
            duration_s,
            elapsed_s,
            deadline_us: rec
                .deadline()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            sent: rec.sent,
            ok: rec.ok,
            good: rec.good,
            errors: rec.errors.clone(),
            offered_rps: per_s(rec.sent, duration_s),
            achieved_rps: per_s(rec.ok, elapsed_s),
            goodput_rps: per_s(rec.good, elapsed_s),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: (rec.ok > 0).then(|| h.max()),
            mean_us: (rec.ok > 0).then(|| h.mean()),
            send_lag_p99_us: if rec.sent > 0 {
                rec.send_lag_us.value_at_quantile(0.99)
            } else {
                0
            },
            overflow_share: (rec.path_known > 0)
                .then(|| rec.overflow as f64 / rec.path_known as f64),
            batch_size_mean: (batched > 0).then(|| batch_sum as f64 / batched as f64),
            batch_sizes: rec.batch_sizes.clone(),
        }
    }

    /// The step's load as a label: `100/s poisson` or `c=8`.
    pub fn load_label(&self) -> String {
        match (self.rate, self.concurrency, self.arrival) {
            (Some(r), _, Some(a)) => format!(
                "{r}/s {}",
                match a {
                    Arrival::Constant => "const",
                    Arrival::Poisson => "poisson",
                }
            ),
            (_, Some(c), _) => format!("c={c}"),
            _ => "-".into(),
        }
    }

    fn errors_label(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// `--compare`: the second target's figure over the first's, per step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ratio {
    pub step: usize,
    pub load: String,
    pub achieved: Option<f64>,
    pub goodput: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

fn ratio(b: f64, a: f64) -> Option<f64> {
    (a > 0.0 && b.is_finite()).then(|| b / a)
}

/// Ratios of `compare` over `base`, step by step.
pub fn ratios(base: &[StepReport], compare: &[StepReport]) -> Vec<Ratio> {
    base.iter()
        .zip(compare)
        .map(|(a, b)| Ratio {
            step: a.step,
            load: a.load_label(),
            achieved: ratio(b.achieved_rps, a.achieved_rps),
            goodput: ratio(b.goodput_rps, a.goodput_rps),
            p50: a
                .p50_us
                .zip(b.p50_us)
                .and_then(|(x, y)| ratio(y as f64, x as f64)),
            p99: a
                .p99_us
                .zip(b.p99_us)
                .and_then(|(x, y)| ratio(y as f64, x as f64)),
        })
        .collect()
}

/// Everything a run measured; `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub tool: String,
    pub command: Vec<String>,
    pub model: String,
    pub steps: Vec<StepReport>,
    pub ratios: Vec<Ratio>,
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |us| format!("{:.3}", us as f64 / 1000.0))
}

/// The human table, one row per step.
pub fn table(steps: &[StepReport]) -> String {
    let mut out = format!(
        "{:<26} {:>16} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}  {}\n",
        "target",
        "load",
        "offered/s",
        "achieved/s",
        "goodput/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "ovfl",
        "batch",
        "errors"
    );
    for s in steps {
        let share = s
            .overflow_share
            .map_or_else(|| "-".into(), |x| format!("{:.0}%", x * 100.0));
        let batch = s
            .batch_size_mean
            .map_or_else(|| "-".into(), |b| format!("{b:.1}"));
        out.push_str(&format!(
            "{:<26} {:>16} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}  {}\n",
            s.target,
            s.load_label(),
            s.offered_rps,
            s.achieved_rps,
            s.goodput_rps,
            ms(s.p50_us),
            ms(s.p90_us),
            ms(s.p99_us),
            ms(s.p999_us),
            ms(s.max_us),
            share,
            batch,
            s.errors_label()
        ));
    }
    out
}

/// The ratio table of `--compare`.
pub fn ratio_table(ratios: &[Ratio]) -> String {
    let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.3}"));
    let mut out = format!(
        "{:>5} {:>16} {:>10} {:>10} {:>8} {:>8}\n",
        "step", "load", "achieved", "goodput", "p50", "p99"
    );
    for r in ratios {
        out.push_str(&format!(
            "{:>5} {:>16} {:>10} {:>10} {:>8} {:>8}\n",
            r.step,
            r.load,
            f(r.achieved),
            f(r.goodput),
            f(r.p50),
            f(r.p99)
        ));
    }
    out
}

/// The CSV columns, in order.
pub const CSV_HEADER: &str = "target,step,mode,rate,concurrency,duration_s,elapsed_s,deadline_us,sent,ok,good,errors,offered_rps,achieved_rps,goodput_rps,p50_us,p90_us,p99_us,p999_us,max_us,mean_us,send_lag_p99_us,overflow_share,batch_size_mean";

/// One CSV row per step. Error kinds are `kind=n` joined by `;`; kinds and
/// target URLs hold no comma or quote, so no field needs quoting.
pub fn csv(steps: &[StepReport]) -> String {
    let opt = |x: Option<String>| x.unwrap_or_default();
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for s in steps {
        let fields = [
            s.target.replace([',', '"'], "_"),
            s.step.to_string(),
            s.mode.into(),
            opt(s.rate.map(|r| r.to_string())),
            opt(s.concurrency.map(|c| c.to_string())),
            format!("{:.3}", s.duration_s),
            format!("{:.3}", s.elapsed_s),
            opt(s.deadline_us.map(|d| d.to_string())),
            s.sent.to_string(),
            s.ok.to_string(),
            s.good.to_string(),
            if s.errors.is_empty() {
                String::new()
            } else {
                s.errors_label()
            },
            format!("{:.3}", s.offered_rps),
            format!("{:.3}", s.achieved_rps),
            format!("{:.3}", s.goodput_rps),
            opt(s.p50_us.map(|v| v.to_string())),
            opt(s.p90_us.map(|v| v.to_string())),
            opt(s.p99_us.map(|v| v.to_string())),
            opt(s.p999_us.map(|v| v.to_string())),
            opt(s.max_us.map(|v| v.to_string())),
            opt(s.mean_us.map(|v| format!("{v:.1}"))),
            s.send_lag_p99_us.to_string(),
            opt(s.overflow_share.map(|v| format!("{v:.4}"))),
            opt(s.batch_size_mean.map(|v| format!("{v:.3}"))),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let io = |source| ReportError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)
}

/// Writes `report.json`, `steps.csv` and `latency.svg` into `dir` (made if
/// missing) and returns their paths.
pub fn write_files(dir: &Path, run: &RunReport) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let json = dir.join("report.json");
    write(&json, serde_json::to_string_pretty(run)?.as_bytes())?;
    let csv_path = dir.join("steps.csv");
    write(&csv_path, csv(&run.steps).as_bytes())?;
    let svg = dir.join("latency.svg");
    plot(&svg, &run.steps)?;
    Ok(vec![json, csv_path, svg])
}

/// Draws latency percentiles (log scale) and achieved rate and goodput
/// against offered load, one series per target.
pub fn plot(path: &Path, steps: &[StepReport]) -> Result<(), ReportError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| ReportError::Plot {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut targets: Vec<&str> = Vec::new();
    for s in steps {
        if !targets.contains(&s.target.as_str()) {
            targets.push(&s.target);
        }
    }
    let x_max = steps.iter().map(|s| s.offered_rps).fold(1.0, f64::max) * 1.05;
    let lat: Vec<f64> = steps
        .iter()
        .flat_map(|s| [s.p50_us, s.max_us])
        .flatten()
        .map(|us| us as f64 / 1000.0)
        .collect();
    let y_min = lat.iter().copied().fold(f64::INFINITY, f64::min);
    let (y_min, y_max) = if y_min.is_finite() {
        (
            (y_min / 1.5).max(0.001),
            lat.iter().copied().fold(0.0, f64::max) * 1.5,
        )
    } else {
        (0.01, 1000.0)
    };
    let rate_max = steps
        .iter()
        .map(|s| s.achieved_rps.max(s.goodput_rps))
        .fold(1.0, f64::max)
        * 1.1;

    let root = SVGBackend::new(path, (1280, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(640);
    let mut lat_chart = ChartBuilder::on(&left)
        .caption("latency from intended send time", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(|e| err(&e))?;
    lat_chart
        .configure_mesh()
        .x_desc("offered load (requests/s)")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| err(&e))?;
    let mut rate_chart = ChartBuilder::on(&right)
        .caption("achieved and goodput", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..rate_max)
        .map_err(|e| err(&e))?;
    rate_chart
        .configure_mesh()
        .x_desc("offered load (requests/s)")
        .y_desc("requests/s")
        .draw()
        .map_err(|e| err(&e))?;

    type Pick = fn(&StepReport) -> Option<u64>;
    type Rate = fn(&StepReport) -> f64;
    let percentiles: [(&str, Pick); 4] = [
        ("p50", |s| s.p50_us),
        ("p90", |s| s.p90_us),
        ("p99", |s| s.p99_us),
        ("p99.9", |s| s.p999_us),
    ];
    for (ti, target) in targets.iter().enumerate() {
        let mine: Vec<&StepReport> = steps.iter().filter(|s| s.target == *target).collect();
        let prefix = if targets.len() > 1 {
            format!("{target} ")
        } else {
            String::new()
        };
        for (pi, (name, pick)) in percentiles.iter().enumerate() {
            let color = Palette99::pick(ti * 6 + pi).to_rgba();
            let points: Vec<(f64, f64)> = mine
                .iter()
                .filter_map(|s| pick(s).map(|us| (s.offered_rps, us as f64 / 1000.0)))
                .collect();
            lat_chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("{prefix}{name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            lat_chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        let series: [(&str, Rate); 2] = [
            ("achieved", |s| s.achieved_rps),
            ("goodput", |s| s.goodput_rps),
        ];
        for (k, (name, pick)) in series.iter().enumerate() {
            let color = Palette99::pick(ti * 6 + 4 + k).to_rgba();
            let points: Vec<(f64, f64)> = mine.iter().map(|s| (s.offered_rps, pick(s))).collect();
            rate_chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("{prefix}{name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            rate_chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    lat_chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    rate_chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests;
