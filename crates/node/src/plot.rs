//! SVG charts: NDCG@k curves (`troupe eval --plot`) and benchmark ratio tables
//! (`troupe plot-ratios`, called by the `bench/` scripts). SVG only, text left to the
//! viewer's fonts, so no font or image library is linked.

use std::path::Path;

use plotters::prelude::*;

/// Colours of the series in order (the status page's branch colours first).
const COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Line chart of `series` (name, y for x = 1, 2, ...) into `path`.
pub fn curves(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), String> {
    let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    if n == 0 {
        return Err("nothing to draw".into());
    }
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1f64..n as f64, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(err)?;
    for (i, (name, ys)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                ys.iter().enumerate().map(|(k, y)| ((k + 1) as f64, *y)),
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Horizontal bars of `rows` (label, ratio) with a reference line at 1.0 (parity with
/// the peer) into `path`.
pub fn ratio_bars(path: &Path, title: &str, rows: &[(String, f64)]) -> Result<(), String> {
    if rows.is_empty() {
        return Err("no rows to draw".into());
    }
    if let Some((l, r)) = rows.iter().find(|(_, r)| !r.is_finite() || *r < 0.0) {
        return Err(format!("ratio of `{l}` is {r}, not a finite number >= 0"));
    }
    let top = rows.iter().map(|(_, r)| *r).fold(1.0f64, f64::max) * 1.15;
    let height = 120 + 36 * rows.len() as u32;
    let root = SVGBackend::new(path, (800, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = rows.len();
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    let longest = labels.iter().map(|l| l.len()).max().unwrap_or(10) as u32;
    // Row i is drawn in segment n-1-i, so the table reads top to bottom.
    let row_of = |seg: usize| n - 1 - seg;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size((longest * 7 + 10).min(380))
        .build_cartesian_2d(0f64..top, (0..n - 1).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("Troupe / peer")
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(seg) if *seg < n => labels[row_of(*seg)].clone(),
            _ => String::new(),
        })
        .draw()
        .map_err(err)?;
    chart
        .draw_series((0..n).map(|seg| {
            let r = rows[row_of(seg)].1;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(seg)),
                    (r, SegmentValue::Exact(seg + 1)),
                ],
                COLOURS[1].filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series((0..n).map(|seg| {
            let r = rows[row_of(seg)].1;
            Text::new(
                format!("{r:.2}"),
                (r + top * 0.01, SegmentValue::CenterOf(seg)),
                ("sans-serif", 13),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
            COLOURS[0].stroke_width(2),
        )))
        .map_err(err)?;
    root.present().map_err(err)
}

/// `troupe plot-ratios`: reads the table, checks every field, draws it.
pub fn ratios_cmd(a: &crate::cli::PlotRatiosArgs) -> crate::exit::CmdResult {
    use crate::exit::CliError;
    let file = a.input.display();
    let text =
        std::fs::read_to_string(&a.input).map_err(|e| CliError::input(format!("{file}: {e}")))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::input(format!("{file}: not JSON: {e}")))?;
    let title = doc["title"].as_str().unwrap_or("Troupe / peer");
    let rows = doc["rows"]
        .as_array()
        .ok_or_else(|| CliError::input(format!("{file}: field `rows` must be a list")))?;
    let mut table = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let label = r["label"]
            .as_str()
            .ok_or_else(|| CliError::input(format!("{file}: rows[{i}].label must be a string")))?;
        let ratio = r["ratio"]
            .as_f64()
            .ok_or_else(|| CliError::input(format!("{file}: rows[{i}].ratio must be a number")))?;
        table.push((label.to_string(), ratio));
    }
    ratio_bars(&a.out, title, &table).map_err(|e| CliError::input(format!("{file}: {e}")))?;
    println!("{} rows drawn in {}", table.len(), a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_every_label() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.svg");
        let series = vec![
            ("ensemble".to_string(), vec![0.1, 0.2, 0.25]),
            ("als".to_string(), vec![0.09, 0.18, 0.2]),
        ];
        curves(&p, "NDCG@k", "k", "NDCG@k", &series).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("ensemble") && svg.contains("als"));
        let p = dir.path().join("r.svg");
        let rows = vec![
            ("ingest batch 1000".to_string(), 0.41),
            ("recommend p50".to_string(), 1.26),
        ];
        ratio_bars(&p, "ratios", &rows).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(
            svg.contains("ingest batch 1000") && svg.contains("1.26"),
            "{svg}"
        );
        assert!(ratio_bars(&p, "x", &[("bad".into(), f64::NAN)]).is_err());
        assert!(curves(&p, "x", "k", "y", &[]).is_err());
    }
}
