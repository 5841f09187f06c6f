//! The two report plots, written as plain SVG by hand.
//!
//! Hand-written rather than through plotters: without a font backend plotters cannot lay out
//! text, while a few `<polyline>`s and `<text>`s render the same in every browser.

use crate::report::{KillEvent, Timeline};
use anyhow::Context;
use hdrhistogram::Histogram;
use std::path::Path;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 550.0;
/// The plot area; the margins hold the title, tick labels, axis titles and the legend.
const LEFT: f64 = 90.0;
const RIGHT: f64 = 800.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 450.0;
const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];
const KILL: &str = r##"stroke="#d62728" stroke-width="2" stroke-dasharray="6 4""##;
const BAND: &str = r##"fill="#d62728" fill-opacity="0.15""##;
const KILL_LABEL: &str = r##"fill="#d62728" font-size="12""##;
const GRID: &str = r##"stroke="#e5e5e5""##;
const MIDDLE: &str = r#"text-anchor="middle""#;
const END: &str = r#"text-anchor="end""#;
const BORDER: &str = r#"fill="none" stroke="black""#;
const MID_X: f64 = (LEFT + RIGHT) / 2.0;
const MID_Y: f64 = (TOP + BOTTOM) / 2.0;
const SVG_NS: &str = "http://www.w3.org/2000/svg";

/// Maps data coordinates onto the plot area; values outside the axes are clamped to its edge.
struct Frame {
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        LEFT + (v / self.x_max).clamp(0.0, 1.0) * (RIGHT - LEFT)
    }

    fn y(&self, v: f64) -> f64 {
        BOTTOM - (v / self.y_max).clamp(0.0, 1.0) * (BOTTOM - TOP)
    }
}

/// A round axis maximum and 1-2-5 ticks covering `0..=max`, so labels stay short.
fn nice_ticks(max: f64) -> (f64, Vec<f64>) {
    let max = Some(max)
        .filter(|m| m.is_finite() && *m > 0.0)
        .unwrap_or(1.0);
    let magnitude = 10f64.powf((max / 5.0).log10().floor());
    let steps = [1.0, 2.0, 5.0, 10.0].map(|m| m * magnitude);
    let step = steps.into_iter().find(|s| *s >= max / 5.0);
    let step = step.unwrap_or(steps[3]);
    let n = (max / step).ceil().clamp(1.0, 10.0) as u32;
    let ticks = (0..=n).map(|i| f64::from(i) * step).collect();
    (f64::from(n) * step, ticks)
}

/// A tick label with just enough decimals for the tick step.
fn label(v: f64, step: f64) -> String {
    let decimals = (-step.log10()).ceil().max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn esc(s: &str) -> String {
    let s = s.replace('&', "&amp;").replace('<', "&lt;");
    s.replace('>', "&gt;").replace('"', "&quot;")
}

fn text(x: f64, y: f64, attrs: &str, body: &str) -> String {
    let body = esc(body);
    format!("<text x=\"{x:.1}\" y=\"{y:.1}\" {attrs}>{body}</text>\n")
}

fn line(x1: f64, y1: f64, x2: f64, y2: f64, attrs: &str) -> String {
    format!("<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" {attrs}/>\n")
}

fn rect(x: f64, y: f64, w: f64, h: f64, attrs: &str) -> String {
    format!("<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" {attrs}/>\n")
}

/// A line through `points` (data coordinates); nothing for no points.
fn polyline(f: &Frame, points: &[(f64, f64)], color: &str) -> String {
    if points.is_empty() {
        return String::new();
    }
    let xy = |&(x, y): &(f64, f64)| format!("{:.1},{:.1}", f.x(x), f.y(y));
    let xy: Vec<String> = points.iter().map(xy).collect();
    let style = format!(r#"fill="none" stroke="{color}" stroke-width="2""#);
    format!("<polyline points=\"{}\" {style}/>\n", xy.join(" "))
}

/// Canvas, title, axis titles, grid and tick labels; the caller adds data, legend and `</svg>`.
fn axes(titles: [&str; 3], f: &Frame, x_ticks: &[(f64, String)], y_ticks: &[f64]) -> String {
    let [title, x_title, y_title] = titles;
    let mut s = format!("<svg xmlns=\"{SVG_NS}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" ");
    s += "font-family=\"Helvetica, Arial, sans-serif\" font-size=\"13\">\n";
    s += &rect(0.0, 0.0, WIDTH, HEIGHT, r#"fill="white""#);
    let bold = format!(r#"{MIDDLE} font-size="17" font-weight="bold""#);
    s += &text(MID_X, 30.0, &bold, title);
    s += &text(MID_X, BOTTOM + 45.0, MIDDLE, x_title);
    let turn = format!("transform=\"rotate(-90 22 {MID_Y})\" {MIDDLE}");
    s += &text(22.0, MID_Y, &turn, y_title);
    let y_step = y_ticks.get(1).copied().unwrap_or(1.0);
    for &v in y_ticks {
        s += &line(LEFT, f.y(v), RIGHT, f.y(v), GRID);
        s += &text(LEFT - 8.0, f.y(v) + 4.0, END, &label(v, y_step));
    }
    for (v, tick) in x_ticks {
        s += &line(f.x(*v), TOP, f.x(*v), BOTTOM, GRID);
        s += &text(f.x(*v), BOTTOM + 20.0, MIDDLE, tick);
    }
    s + &rect(LEFT, TOP, RIGHT - LEFT, BOTTOM - TOP, BORDER)
}

fn stroke(color: &str) -> String {
    format!(r#"stroke="{color}" stroke-width="3""#)
}

/// A legend sample of a line style.
fn swatch(attrs: &str) -> String {
    line(0.0, 0.0, 28.0, 0.0, attrs)
}

/// A one-row legend under the x-axis title, where it can never cover the data.
fn legend(entries: &[(String, String)]) -> String {
    let (mut s, mut x, y) = (String::new(), LEFT, HEIGHT - 18.0);
    for (swatch, name) in entries {
        s += &format!("<g transform=\"translate({x} {})\">{swatch}</g>\n", y - 4.0);
        s += &text(x + 36.0, y, "", name);
        x += 66.0 + 7.5 * name.chars().count() as f64;
    }
    s
}

fn no_data() -> String {
    text(
        MID_X,
        MID_Y,
        r##"text-anchor="middle" font-size="22" fill="#888""##,
        "no data",
    )
}

fn write_svg(path: &Path, svg: String) -> anyhow::Result<()> {
    std::fs::write(path, svg + "</svg>\n").with_context(|| format!("writing {}", path.display()))
}

/// The classic HdrHistogram percentile plot: x is decades of 1/(1-p), so the tail gets as much
/// room as the median and a slow 0.1 % shows up instead of hiding in a flat line.
pub fn latency_percentiles_svg(
    path: &Path,
    series: &[(&str, &Histogram<u64>)],
) -> anyhow::Result<()> {
    // In decades: at least to 99.99 %, further only with enough samples to mean something.
    let most = series.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    let x_max = (most.max(1) as f64).log10().ceil().clamp(4.0, 6.0);
    let (y_max, y_ticks) = nice_ticks(max_of(series.iter().map(|(_, h)| ms(h.max()))));
    let f = Frame { x_max, y_max };
    let names = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"];
    let x_ticks = (0..=x_max as u8).zip(names);
    let x_ticks: Vec<(f64, String)> = x_ticks.map(|(i, n)| (f64::from(i), n.into())).collect();
    let titles = ["Latency by percentile", "percentile", "latency (ms)"];
    let mut svg = axes(titles, &f, &x_ticks, &y_ticks);
    let mut entries = Vec::new();
    for ((name, h), color) in series.iter().zip(COLORS.iter().cycle()) {
        if h.is_empty() {
            continue;
        }
        let point = |q: f64, us: u64| ((-(1.0 - q).log10()).min(x_max), ms(us));
        let quantiles = h.iter_quantiles(5);
        let points: Vec<_> = quantiles
            .map(|v| point(v.quantile_iterated_to(), v.value_iterated_to()))
            .collect();
        svg += &polyline(&f, &points, color);
        entries.push((swatch(&stroke(color)), format!("{name} (n = {})", h.len())));
    }
    if entries.is_empty() {
        svg += &no_data();
    }
    write_svg(path, svg + &legend(&entries))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn max_of(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, f64::max)
}

/// Messages per second between consecutive timeline samples, as `(start_s, end_s, rate)`.
fn rates(timeline: &Timeline) -> Vec<(f64, f64, f64)> {
    let step = |w: &[(f64, u64)]| {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        let dt = t1 - t0;
        (dt.is_finite() && dt > 0.0).then(|| (t0, t1, c1.saturating_sub(c0) as f64 / dt))
    };
    timeline.samples.windows(2).filter_map(step).collect()
}

/// The failover gap after a kill in seconds; 0 when unknown, so the marker still shows.
fn gap_s(k: &KillEvent) -> f64 {
    let valid = k.failover_ms.filter(|ms| ms.is_finite() && *ms > 0.0);
    valid.unwrap_or(0.0) / 1000.0
}

/// Throughput over time with each kill and its failover gap, so the cost of a failover is visible.
pub fn throughput_svg(path: &Path, timeline: &Timeline, kills: &[KillEvent]) -> anyhow::Result<()> {
    let steps = rates(timeline);
    let kills: Vec<&KillEvent> = kills.iter().filter(|k| k.t_s.is_finite()).collect();
    let kill_ends = kills.iter().map(|k| k.t_s + gap_s(k));
    let (x_max, x_values) = nice_ticks(max_of(steps.iter().map(|s| s.1).chain(kill_ends)));
    let x_step = x_values.get(1).copied().unwrap_or(1.0);
    let x_ticks: Vec<(f64, String)> = x_values.iter().map(|&v| (v, label(v, x_step))).collect();
    let (y_max, y_ticks) = nice_ticks(max_of(steps.iter().map(|s| s.2)) * 1.1);
    let f = Frame { x_max, y_max };
    let titles = ["Throughput", "time since start (s)", "messages/s"];
    let mut svg = axes(titles, &f, &x_ticks, &y_ticks);
    for (i, k) in kills.iter().enumerate() {
        let (x0, x1) = (f.x(k.t_s), f.x(k.t_s + gap_s(k)));
        svg += &rect(x0, TOP, x1 - x0, BOTTOM - TOP, BAND);
        svg += &line(x0, TOP, x0, BOTTOM, &format!(r#"class="kill" {KILL}"#));
        // Labels of faults close together would overlap: stagger them over four rows inside
        // the plot area.
        let row = (i % 4) as f64;
        svg += &text(x0 + 3.0, TOP + 12.0 + 12.0 * row, KILL_LABEL, k.kind.trim());
    }
    let points: Vec<_> = steps
        .iter()
        .flat_map(|&(t0, t1, r)| [(t0, r), (t1, r)])
        .collect();
    svg += &polyline(&f, &points, COLORS[0]);
    if points.is_empty() {
        svg += &no_data();
    }
    let mut entries = vec![(swatch(&stroke(COLORS[0])), "messages/s".to_string())];
    if !kills.is_empty() {
        entries.push((swatch(KILL), "kill".into()));
        entries.push((rect(0.0, -6.0, 28.0, 12.0, BAND), "failover gap".into()));
    }
    write_svg(path, svg + &legend(&entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values_us: impl Iterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_max(60_000_000, 3).expect("valid bounds");
        values_us.for_each(|v| h.saturating_record(v));
        h
    }

    #[test]
    fn latency_plot_has_one_line_per_series_and_survives_empty_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let latency = histogram((1..20_000u64).map(|i| 2_000 + (i * 7919) % 50_000 + i / 100));
        let wait = histogram((1..20_000u64).map(|i| (i * 104_729) % 20_000));
        let path = dir.path().join("latency.svg");
        latency_percentiles_svg(&path, &[("latency", &latency), ("queue wait", &wait)])
            .expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.contains("<svg") && svg.contains("99.99%"));
        assert_eq!(svg.matches("<polyline").count(), 2);

        let empty = histogram(std::iter::empty());
        latency_percentiles_svg(&path, &[("latency", &empty)]).expect("empty plot");
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .contains("no data"));
    }

    #[test]
    fn throughput_plot_marks_every_kill() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 2000 msgs/s, stalled from 10 s to 12 s by the first kill.
        let committed = |i: u64| 500 * i.min(40) + 500 * i.saturating_sub(48);
        let samples = (0..=120u64)
            .map(|i| (i as f64 * 0.25, committed(i)))
            .collect();
        let kills = [
            KillEvent {
                t_s: 10.0,
                kind: "leader kill".into(),
                failover_ms: Some(1800.0),
            },
            KillEvent {
                t_s: 20.0,
                kind: "leader kill".into(),
                failover_ms: None,
            },
        ];
        let path = dir.path().join("throughput.svg");
        throughput_svg(&path, &Timeline { samples }, &kills).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.contains("<svg") && !svg.contains("no data"));
        assert_eq!(svg.matches(r#"class="kill""#).count(), kills.len());

        throughput_svg(&path, &Timeline { samples: vec![] }, &[]).expect("empty plot");
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .contains("no data"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_ticks(9.3), (10.0, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]));
        assert_eq!(nice_ticks(0.0).0, 1.0);
        assert_eq!(nice_ticks(f64::NAN).0, 1.0);
        assert_eq!(label(0.4, 0.2), "0.4");
    }
}
