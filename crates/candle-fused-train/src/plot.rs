//! The loss plot: training loss (and held-out loss) against the optimizer step, an SVG written
//! by `plotters`' SVG backend (no system libraries), atomically.

use std::path::Path;

use candle_core::Result;
use plotters::prelude::*;

use crate::util::{err, write_atomic};

/// Writes `path` (SVG): `train` and `eval` as `(step, loss)` series.
pub fn loss_plot(
    path: &Path,
    title: &str,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
) -> Result<()> {
    const WHAT: &str = "plot";
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(WHAT, e))?;
        let all = train.iter().chain(eval);
        let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in all {
            if y.is_finite() {
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| err(WHAT, e))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(WHAT, e))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(|e| err(WHAT, e))?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
                .map_err(|e| err(WHAT, e))?
                .label("held-out loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| err(WHAT, e))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(WHAT, e))?;
        root.present().map_err(|e| err(WHAT, e))?;
    }
    write_atomic(path, svg.as_bytes())
}
