//! A drill's picture: per-ring requests and errors per second over time,
//! summed over the sandbox's hosts, with the timeline's events marked as
//! vertical lines. Drawn with `plotters`' SVG backend (text as SVG
//! `<text>`, no font files).
//!
//! What it trusts: nothing outside the drill (its own samples). What it
//! bounds: one series per ring the samples name; labels are the drill's
//! own tags.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::timeline::{Event, Sample, Samples};

/// Picture size in pixels.
const WIDTH: u32 = 1100;
const HEIGHT: u32 = 720;

/// Per-second rates of `get` between consecutive samples, per ring.
fn rates(
    samples: &[Sample],
    rings: &[String],
    get: impl Fn(&Sample) -> &BTreeMap<String, u64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    rings
        .iter()
        .map(|ring| {
            let pts = samples
                .windows(2)
                .filter(|w| w[1].t > w[0].t)
                .map(|w| {
                    let a = get(&w[0]).get(ring).copied().unwrap_or(0);
                    let b = get(&w[1]).get(ring).copied().unwrap_or(0);
                    #[allow(clippy::cast_precision_loss)]
                    let d = b.saturating_sub(a) as f64;
                    (w[1].t, d / (w[1].t - w[0].t))
                })
                .collect();
            (ring.clone(), pts)
        })
        .collect()
}

/// Writes the SVG to `path`.
pub fn draw(
    path: &Path,
    title: &str,
    samples: &Samples,
    rings: &[String],
    events: &[Event],
) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("picture: {e}");
    let s = &samples.0;
    let t_end = s
        .last()
        .map_or(1.0, |x| x.t)
        .max(events.iter().map(|e| e.t).fold(1.0, f64::max))
        * 1.02;
    let req = rates(s, rings, |x| &x.requests);
    let errs = rates(s, rings, |x| &x.errors);
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(HEIGHT * 11 / 20);
    for (area, series, label, log_events) in [
        (&top, &req, "requests/s", true),
        (&bottom, &errs, "errors sent/s", false),
    ] {
        let y_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..t_end, 0.0..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("t (s)")
            .y_desc(label)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (ring, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(ring.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        for (k, e) in events.iter().enumerate() {
            let c = RGBColor(90, 90, 90);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(e.t, 0.0), (e.t, y_max)],
                    c.mix(0.6).stroke_width(1),
                )))
                .map_err(|e| err(&e))?;
            if log_events {
                // Staggered so that close events do not overprint.
                #[allow(clippy::cast_precision_loss)]
                let y = y_max * (0.97 - 0.07 * (k % 6) as f64);
                chart
                    .draw_series(std::iter::once(Text::new(
                        e.tag.clone(),
                        (e.t, y),
                        ("sans-serif", 12).into_font().color(&c),
                    )))
                    .map_err(|e| err(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_rings_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        let mut samples = Samples::default();
        for i in 0..10u32 {
            let mut s = Sample {
                t: f64::from(i) * 0.5,
                ..Sample::default()
            };
            s.requests.insert("canary".into(), u64::from(i) * 3);
            s.errors.insert("1pct".into(), u64::from(i / 5));
            samples.push(s);
        }
        let events = vec![Event {
            t: 2.0,
            tag: "halt".into(),
            detail: String::new(),
        }];
        let rings = vec!["canary".to_owned(), "1pct".to_owned()];
        draw(&path, "test", &samples, &rings, &events).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("canary") && svg.contains("halt"));
    }
}
