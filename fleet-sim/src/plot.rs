//! The picture of a run: three stacked panels over time, sharing the x axis (seconds
//! since the start): agent requests per second, p99 latency of agent requests (ms) per
//! second, and rows `destroying`. Red vertical lines mark the scenario's events (a
//! restart, an outage, a release). No text is drawn (no font is needed); the same
//! series go to a CSV beside the PNG, and the figures are printed.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

pub struct Series {
    pub name: &'static str,
    /// (seconds, value)
    pub points: Vec<(f64, f64)>,
}

pub fn png(path: &Path, panels: &[Series], marks: &[f64], t_end: f64) -> Result<()> {
    let root = BitMapBackend::new(path, (1200, 300 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((panels.len(), 1));
    let colours = [BLUE, GREEN, MAGENTA];
    for (k, (area, s)) in areas.iter().zip(panels).enumerate() {
        let (w, h) = area.dim_in_pixel();
        let (w, h) = (w as f64, h as f64);
        let (left, right, top, bottom) = (40.0, 20.0, 15.0, 20.0);
        let ymax = s.points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
        let x = |t: f64| (left + (t / t_end.max(1e-9)) * (w - left - right)) as i32;
        let y = |v: f64| (h - bottom - (v / ymax) * (h - top - bottom)) as i32;
        let e = |e: DrawingAreaErrorKind<_>| anyhow!("{e}");
        // Axes and a light grid of quarters.
        for q in 0..=4 {
            let gy = y(ymax * q as f64 / 4.0);
            area.draw(&PathElement::new(
                vec![(x(0.0), gy), (x(t_end), gy)],
                RGBColor(225, 225, 225),
            ))
            .map_err(e)?;
        }
        area.draw(&PathElement::new(
            vec![(x(0.0), y(ymax)), (x(0.0), y(0.0)), (x(t_end), y(0.0))],
            BLACK,
        ))
        .map_err(e)?;
        // A tick every 10 s on the time axis.
        let mut t = 0.0;
        while t <= t_end {
            area.draw(&PathElement::new(
                vec![(x(t), y(0.0)), (x(t), y(0.0) + 4)],
                BLACK,
            ))
            .map_err(e)?;
            t += 10.0;
        }
        for m in marks {
            area.draw(&PathElement::new(
                vec![(x(*m), y(ymax)), (x(*m), y(0.0))],
                RED.stroke_width(2),
            ))
            .map_err(e)?;
        }
        let line: Vec<(i32, i32)> = s.points.iter().map(|&(t, v)| (x(t), y(v))).collect();
        area.draw(&PathElement::new(
            line,
            colours[k % colours.len()].stroke_width(2),
        ))
        .map_err(e)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The series as CSV: `seconds,<name>,...` with one row per point of the first series;
/// other series are matched by the nearest earlier point.
pub fn csv(path: &Path, panels: &[Series]) -> Result<()> {
    use std::fmt::Write as _;
    let mut out = String::from("seconds");
    for s in panels {
        let _ = write!(out, ",{}", s.name);
    }
    out.push('\n');
    let Some(first) = panels.first() else {
        return Ok(());
    };
    for &(t, _) in &first.points {
        let _ = write!(out, "{t:.0}");
        for s in panels {
            let v = s
                .points
                .iter()
                .take_while(|p| p.0 <= t + 1e-9)
                .last()
                .map_or(0.0, |p| p.1);
            let _ = write!(out, ",{v:.3}");
        }
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}
