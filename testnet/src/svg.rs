//! A latency histogram and CDF drawn as a hand-written SVG (no plotting crate): two panels
//! with axes, "nice" ticks, labels, bars and a step line, plus p50/p90/p99 markers.

use std::fmt::Write;

use crate::stats::{Percentiles, percentiles};

const WIDTH: f64 = 900.0;
const PANEL_H: f64 = 340.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 55.0;
const BINS: usize = 40;

/// A step of 1, 2 or 5 × 10^k giving about `target` ticks over `[0, max]`.
pub fn nice_step(max: f64, target: usize) -> f64 {
    if max.is_nan() || max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// `max` rounded up to a whole number of [`nice_step`]s (at least one step).
pub fn nice_ceil(max: f64, target: usize) -> f64 {
    let step = nice_step(max, target);
    ((max / step).ceil() * step).max(step)
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

/// Draws axes with ticks into `out` for a panel whose plot area starts at `(x0, y0)`.
#[allow(clippy::too_many_arguments)]
fn axes(
    out: &mut String,
    y0: f64,
    x_max: f64,
    y_max: f64,
    x_label: &str,
    y_label: &str,
    y_fmt: &dyn Fn(f64) -> String,
    title: &str,
) {
    let (pw, ph) = (WIDTH - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    let (x0, yb) = (LEFT, y0 + TOP + ph);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="16" text-anchor="middle" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        y0 + 28.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        r#"<line x1="{x0}" y1="{yb}" x2="{}" y2="{yb}" stroke="black"/><line x1="{x0}" y1="{}" x2="{x0}" y2="{yb}" stroke="black"/>"#,
        x0 + pw,
        y0 + TOP
    );
    let xs = nice_step(x_max, 8);
    let mut t = 0.0;
    while t <= x_max + xs * 1e-9 {
        let x = x0 + t / x_max * pw;
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{yb}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
            yb + 5.0,
            yb + 19.0,
            fmt_num(t)
        );
        t += xs;
    }
    let ys = nice_step(y_max, 5);
    let mut t = 0.0;
    while t <= y_max + ys * 1e-9 {
        let y = yb - t / y_max * ph;
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{y:.1}" x2="{x0}" y2="{y:.1}" stroke="black"/><line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"##,
            x0 - 5.0,
            x0 + pw,
            x0 - 8.0,
            y + 4.0,
            esc(&y_fmt(t))
        );
        t += ys;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}</text>"#,
        x0 + pw / 2.0,
        yb + 40.0,
        esc(x_label)
    );
    let _ = writeln!(
        out,
        r#"<text x="18" y="{}" font-size="13" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        y0 + TOP + ph / 2.0,
        y0 + TOP + ph / 2.0,
        esc(y_label)
    );
}

/// Vertical dashed markers for p50/p90/p99 within a panel.
fn markers(out: &mut String, y0: f64, x_max: f64, p: &Percentiles) {
    let (pw, ph) = (WIDTH - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    for (name, v, color) in [
        ("p50", p.p50, "#2a7"),
        ("p90", p.p90, "#d80"),
        ("p99", p.p99, "#c22"),
    ] {
        let v = v as f64;
        if v > x_max {
            continue;
        }
        let x = LEFT + v / x_max * pw;
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="{color}" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" font-size="11" fill="{color}">{name} {} ms</text>"#,
            y0 + TOP,
            y0 + TOP + ph,
            x + 3.0,
            y0 + TOP
                + 12.0
                + match name {
                    "p50" => 0.0,
                    "p90" => 13.0,
                    _ => 26.0,
                },
            v
        );
    }
}

/// Renders the latency histogram (top) and CDF (bottom) of `latencies_ms`, titled `title`.
pub fn latency_svg(latencies_ms: &[u64], title: &str) -> String {
    let height = PANEL_H * 2.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let Some(p) = percentiles(latencies_ms) else {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="16" text-anchor="middle">{}: no deliveries, nothing to plot</text></svg>"#,
            WIDTH / 2.0,
            PANEL_H,
            esc(title)
        );
        return out;
    };
    let mut sorted = latencies_ms.to_vec();
    sorted.sort_unstable();
    let (pw, ph) = (WIDTH - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);

    // Histogram over [0, x_max]. A long tail (max above twice p99) would squash the body
    // into one bar, so then the axis ends near p99 and the tail is counted in the title.
    let full_max = nice_ceil((p.max as f64).max(1.0), 8);
    let x_max = if p.max > 2 * p.p99.max(1) {
        nice_ceil((p.p99 as f64 * 1.5).max(1.0), 8)
    } else {
        full_max
    };
    let bin_w = x_max / BINS as f64;
    let mut bins = vec![0usize; BINS];
    let mut beyond = 0usize;
    for &v in &sorted {
        if v as f64 > x_max {
            beyond += 1;
            continue;
        }
        let b = ((v as f64 / bin_w) as usize).min(BINS - 1);
        bins[b] += 1;
    }
    let tail = if beyond > 0 {
        format!(
            ", {beyond} above {} ms not shown, max {} ms",
            fmt_num(x_max),
            p.max
        )
    } else {
        String::new()
    };
    let peak = bins.iter().copied().max().unwrap_or(1).max(1) as f64;
    let y_max = nice_ceil(peak, 5);
    axes(
        &mut out,
        0.0,
        x_max,
        y_max,
        "latency (ms)",
        "deliveries",
        &|v| fmt_num(v),
        &format!("{title}: latency histogram ({} deliveries{tail})", p.count),
    );
    for (i, &c) in bins.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let x = LEFT + i as f64 * bin_w / x_max * pw;
        let h = c as f64 / y_max * ph;
        let _ = writeln!(
            out,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#4a7fc1" stroke="white" stroke-width="0.5"><title>{}–{} ms: {c}</title></rect>"##,
            TOP + ph - h,
            (bin_w / x_max * pw).max(1.0),
            fmt_num(i as f64 * bin_w),
            fmt_num((i + 1) as f64 * bin_w)
        );
    }
    markers(&mut out, 0.0, x_max, &p);

    // CDF: a step line through every distinct latency.
    let y0 = PANEL_H;
    let x_max = full_max;
    axes(
        &mut out,
        y0,
        x_max,
        100.0,
        "latency (ms)",
        "deliveries at or below (%)",
        &|v| format!("{}%", fmt_num(v)),
        &format!("{title}: latency CDF"),
    );
    let n = sorted.len() as f64;
    let (xb, yb) = (LEFT, y0 + TOP + ph);
    let mut points = vec![format!("{xb:.1},{yb:.1}")];
    let mut prev_y = yb;
    let mut i = 0;
    while i < sorted.len() {
        let v = sorted[i];
        while i < sorted.len() && sorted[i] == v {
            i += 1;
        }
        let x = xb + v as f64 / x_max * pw;
        let y = yb - (i as f64 / n) * ph;
        points.push(format!("{x:.1},{prev_y:.1}"));
        points.push(format!("{x:.1},{y:.1}"));
        prev_y = y;
    }
    points.push(format!("{:.1},{prev_y:.1}", xb + pw));
    let _ = writeln!(
        out,
        r##"<polyline points="{}" fill="none" stroke="#4a7fc1" stroke-width="2"/>"##,
        points.join(" ")
    );
    markers(&mut out, y0, x_max, &p);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_step(100.0, 10), 10.0);
        assert_eq!(nice_step(37.0, 8), 5.0);
        assert_eq!(nice_step(0.0, 8), 1.0);
        assert_eq!(nice_ceil(37.0, 8), 40.0);
        assert_eq!(nice_ceil(1.0, 8), 1.0);
    }

    #[test]
    fn draws_both_panels() {
        let lat: Vec<u64> = (0..500).map(|i| 5 + i % 37).collect();
        let svg = latency_svg(&lat, "bench <5 nodes>");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("latency histogram (500 deliveries)"));
        assert!(svg.contains("latency CDF"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("&lt;5 nodes&gt;"));
        assert!(svg.matches("<rect").count() > 10);
        let empty = latency_svg(&[], "x");
        assert!(empty.contains("no deliveries"));
        // A long tail is cut from the histogram and counted.
        let mut tail: Vec<u64> = vec![3; 200];
        tail.push(5_000);
        let svg = latency_svg(&tail, "t");
        assert!(svg.contains("1 above"), "{svg}");
    }
}
