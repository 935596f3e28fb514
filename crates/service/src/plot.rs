//! SVG charts of a tune or an estimate, drawn with plotters: memory against batch size (the
//! model's parts stacked, each probe's measured device bytes as a point, OOM probes as crosses,
//! the device's limit, and the max, recommended and knee batch sizes marked) and, for a tune,
//! samples/s against batch size on a log2 axis; for an estimate over token ids, the largest
//! batch against sequence length.

use plotters::coord::Shift;
use plotters::prelude::*;

use headroom_engine::frontier::SequencePoint;
use headroom_engine::knee::{self, Knee, StepTime, ThroughputPoint};
use headroom_engine::plan::{MemoryBreakdown, Plan};
use headroom_engine::result::{measured, Outcome, Probe, TuneResult};

const WIDTH: u32 = 960;
const CHART_HEIGHT: u32 = 380;
const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// Sizes at which the memory chart's bands are drawn through the model.
const BAND_SAMPLES: u64 = 96;
/// Points the fitted speed curve is drawn through.
const FIT_SAMPLES: u32 = 96;

/// The unit a memory axis reaching `top_bytes` reads best in, and its size in bytes.
fn memory_unit(top_bytes: f64) -> (&'static str, f64) {
    if top_bytes >= 8.0 * GIB {
        ("GiB", GIB)
    } else {
        ("MiB", MIB)
    }
}

/// A count as a tick label: `512`, `64k`, `1.5k`, `2M`.
fn short_count(value: f64) -> String {
    let value = value.round();
    let (scaled, suffix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e4 {
        (value / 1e3, "k")
    } else {
        return format!("{}", value as u64);
    };
    let text = format!("{scaled:.1}");
    format!(
        "{}{suffix}",
        text.trim_end_matches('0').trim_end_matches('.')
    )
}

/// A batch size worth a vertical marker: its name, value and colour.
struct Marker {
    name: &'static str,
    batch_size: u64,
    color: RGBColor,
}

const MAX_COLOR: RGBColor = RGBColor(200, 40, 40);
const RECOMMENDED_COLOR: RGBColor = RGBColor(30, 130, 60);
const KNEE_COLOR: RGBColor = RGBColor(120, 60, 170);
const LIMIT_COLOR: RGBColor = RGBColor(90, 90, 90);

/// The model's parts, bottom to top, and their colours.
const PARTS: [(&str, RGBColor); 5] = [
    ("parameters", RGBColor(70, 110, 180)),
    ("gradients", RGBColor(110, 150, 210)),
    ("optimizer state", RGBColor(160, 190, 230)),
    ("batch data", RGBColor(240, 170, 80)),
    ("activations", RGBColor(250, 210, 130)),
];

fn part_values(memory: &MemoryBreakdown) -> [u64; 5] {
    [
        memory.parameters,
        memory.gradients,
        memory.optimizer_state,
        memory.batch_data,
        memory.activations,
    ]
}

type Drawing<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A chart that could not be drawn: plotters' error, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("drawing the chart: {0}")]
pub struct PlotError(String);

fn drawing_error(error: impl std::fmt::Display) -> PlotError {
    PlotError(error.to_string())
}

/// The memory chart: the model's parts stacked from 0 to `x_max`, measured points, the limit.
fn memory_chart(
    area: &Drawing<'_>,
    plan: &Plan,
    limit_bytes: Option<u64>,
    x_max: u64,
    measured: &[(u64, u64)],
    out_of_memory: &[u64],
    markers: &[Marker],
) -> Result<(), PlotError> {
    let limit_or_zero = limit_bytes.unwrap_or(0);
    let top_bytes =
        plan.memory(x_max)
            .map_or(limit_or_zero, |m| m.total)
            .max(limit_or_zero)
            .max(measured.iter().map(|&(_, bytes)| bytes).max().unwrap_or(0)) as f64
            * 1.08;
    let (unit, unit_bytes) = memory_unit(top_bytes);
    let top = top_bytes / unit_bytes;
    let mut chart = ChartBuilder::on(area)
        .caption("Device memory against batch size", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max as f64, 0f64..top)
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .x_desc("batch size")
        .y_desc(unit)
        .x_label_formatter(&|x| short_count(*x))
        .y_label_formatter(&|y| format!("{}", y.round() as u64))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(drawing_error)?;
    // Each part is affine in the batch size only while the step peaks at the same moment; the
    // moment moves (PyTorch's peak leaves the optimizer step for backward as the batch grows),
    // so the bands are drawn through the model at many sizes.
    let sizes: Vec<u64> = (0..=BAND_SAMPLES)
        .map(|k| x_max * k / BAND_SAMPLES)
        .collect();
    let parts: Vec<[u64; 5]> = sizes
        .iter()
        .map(|&batch| {
            plan.memory(batch)
                .map(|m| part_values(&m))
                .unwrap_or([0; 5])
        })
        .collect();
    for (i, (name, color)) in PARTS.iter().enumerate().rev() {
        let band = sizes.iter().zip(&parts).map(|(&batch, values)| {
            (
                batch as f64,
                values[..=i].iter().sum::<u64>() as f64 / unit_bytes,
            )
        });
        chart
            .draw_series(AreaSeries::new(band, 0.0, color.mix(0.9)))
            .map_err(drawing_error)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    let limit = limit_bytes.map_or(top, |bytes| bytes as f64 / unit_bytes);
    if limit_bytes.is_some() {
        chart
            .draw_series(LineSeries::new(
                [(0.0, limit), (x_max as f64, limit)],
                LIMIT_COLOR.stroke_width(2),
            ))
            .map_err(drawing_error)?
            .label("device limit")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], LIMIT_COLOR.stroke_width(2)));
    }
    if !measured.is_empty() {
        // Hollow, so that the close probes of the bisection near the limit stay apart.
        chart
            .draw_series(measured.iter().map(|&(batch, bytes)| {
                Circle::new(
                    (batch as f64, bytes as f64 / unit_bytes),
                    4,
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(drawing_error)?
            .label("measured, fit")
            .legend(|(x, y)| Circle::new((x + 6, y), 4, BLACK.stroke_width(2)));
    }
    // Each OOM where the model puts its demand, above the limit; those past the axis counted.
    let (shown, beyond): (Vec<u64>, Vec<u64>) =
        out_of_memory.iter().partition(|&&batch| batch <= x_max);
    if !out_of_memory.is_empty() {
        let demand = |batch: u64| {
            plan.memory(batch)
                .map_or(limit, |m| (m.total as f64 / unit_bytes).min(top))
        };
        let label = match beyond.len() {
            0 => "out of memory (at the model's demand)".to_string(),
            n => format!("out of memory (at the model's demand; {n} past the axis)"),
        };
        chart
            .draw_series(shown.iter().map(|&batch| {
                Cross::new((batch as f64, demand(batch)), 6, MAX_COLOR.stroke_width(2))
            }))
            .map_err(drawing_error)?
            .label(label)
            .legend(|(x, y)| Cross::new((x + 6, y), 5, MAX_COLOR.stroke_width(2)));
    }
    draw_markers(&mut chart, markers, 0.0, top, |b| b as f64)?;
    draw_legend(&mut chart)
}

/// The legend, at the lower right: the markers' labels run along the top, and the small
/// batches' points lie at the left.
fn draw_legend<'a, X: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
) -> Result<(), PlotError> {
    draw_legend_at(chart, SeriesLabelPosition::LowerRight)
}

fn draw_legend_at<'a, X: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
    position: SeriesLabelPosition,
) -> Result<(), PlotError> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(drawing_error)
}

fn draw_markers<X: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<
        '_,
        SVGBackend<'_>,
        Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
    markers: &[Marker],
    bottom: f64,
    top: f64,
    x: impl Fn(u64) -> f64,
) -> Result<(), PlotError> {
    let (left, right) = {
        let range = chart.x_range();
        (range.start, range.end)
    };
    for (i, marker) in markers.iter().enumerate() {
        let at = x(marker.batch_size);
        let color = marker.color;
        chart
            .draw_series(LineSeries::new(
                [(at, bottom), (at, top)],
                color.stroke_width(2),
            ))
            .map_err(drawing_error)?;
        let label = format!("{} {}", marker.name, marker.batch_size);
        let height = top - (top - bottom) * (0.05 + 0.07 * i as f64);
        // Labels of markers on the right half go to the left of their line.
        let on_right = chart.as_coord_spec().translate(&(at, height)).0
            > chart
                .as_coord_spec()
                .translate(&((left + right) / 2.0, height))
                .0;
        let shift = if on_right {
            -(8 * label.len() as i32) - 4
        } else {
            4
        };
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((at, height))
                    + Text::new(
                        label,
                        (shift, 0),
                        ("sans-serif", 14).into_font().color(&color),
                    ),
            ))
            .map_err(drawing_error)?;
    }
    Ok(())
}

fn throughput_chart(
    area: &Drawing<'_>,
    throughput: &[ThroughputPoint],
    fit: Option<StepTime>,
    knee: Option<Knee>,
    markers: &[Marker],
) -> Result<(), PlotError> {
    let points: Vec<(f64, f64)> = throughput
        .iter()
        .map(|p| (p.batch_size.max(1) as f64, p.samples_per_second))
        .collect();
    let (aside, kept): (Vec<_>, Vec<_>) = throughput
        .iter()
        .map(|p| {
            (
                p.set_aside,
                (p.batch_size.max(1) as f64, p.samples_per_second),
            )
        })
        .partition(|(aside, _)| *aside);
    let x_min = points
        .iter()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .min(x_max_of(&points))
        / 1.5;
    let x_max = x_max_of(&points) * 1.5;
    let y_max = throughput
        .iter()
        .map(|p| p.samples_per_second * (1.0 + p.spread / 2.0))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Training speed against batch size", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min.max(0.5)..x_max).log_scale().base(2.0), 0f64..y_max)
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .x_desc("batch size (log2)")
        .y_desc("samples/s")
        .x_label_formatter(&|x| short_count(*x))
        .y_label_formatter(&|y| short_count(*y))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(drawing_error)?;
    // The range the knee could lie in, shaded behind the measurements.
    if let Some(knee) = knee.filter(|k| k.low < k.high) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (knee.low.max(1) as f64, 0.0),
                    (knee.high.max(1) as f64, y_max),
                ],
                KNEE_COLOR.mix(0.12).filled(),
            )))
            .map_err(drawing_error)?;
    }
    // Each measurement with its steps' spread, and the fitted curve the knee is read from.
    let measured = RGBColor(40, 90, 160);
    chart
        .draw_series(throughput.iter().map(|p| {
            let x = p.batch_size.max(1) as f64;
            let half = p.samples_per_second * p.spread / 2.0;
            PathElement::new(
                vec![
                    (x, (p.samples_per_second - half).max(0.0)),
                    (x, p.samples_per_second + half),
                ],
                measured.mix(0.5).stroke_width(1),
            )
        }))
        .map_err(drawing_error)?;
    chart
        .draw_series(
            kept.iter()
                .map(|&(_, p)| Circle::new(p, 4, measured.filled())),
        )
        .map_err(drawing_error)?
        .label("measured (median, spread)")
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, measured.filled()));
    if !aside.is_empty() {
        chart
            .draw_series(
                aside
                    .iter()
                    .map(|&(_, p)| Circle::new(p, 5, MAX_COLOR.stroke_width(2))),
            )
            .map_err(drawing_error)?
            .label("set aside (far from the curve the others draw)")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, MAX_COLOR.stroke_width(2)));
    }
    // The fitted step time drawn smoothly across the sizes measured (results from before it
    // have only its value at each point).
    let fitted: Vec<(f64, f64)> = match fit {
        Some(fit) => {
            let (from, to) = (x_min * 1.5, x_max / 1.5);
            (0..=FIT_SAMPLES)
                .map(|i| (from.ln() + (to / from).ln() * i as f64 / FIT_SAMPLES as f64).exp())
                .map(|b| (b, fit.samples_per_second(b)))
                .collect()
        }
        None => throughput
            .iter()
            .map(|p| (p.batch_size.max(1) as f64, p.fitted_samples_per_second))
            .collect(),
    };
    chart
        .draw_series(LineSeries::new(
            fitted,
            RGBColor(20, 20, 20).stroke_width(2),
        ))
        .map_err(drawing_error)?
        .label("fitted step time")
        .legend(|(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 20, y)],
                RGBColor(20, 20, 20).stroke_width(2),
            )
        });
    draw_legend(&mut chart)?;
    draw_markers(&mut chart, markers, 0.0, y_max, |b| b.max(1) as f64)
}

fn x_max_of(points: &[(f64, f64)]) -> f64 {
    points.iter().map(|p| p.0).fold(2.0, f64::max)
}

fn markers(result: &TuneResult) -> Vec<Marker> {
    vec![
        Marker {
            name: "max",
            batch_size: result.max_batch_size,
            color: MAX_COLOR,
        },
        Marker {
            name: "recommended",
            batch_size: result.recommended_batch_size,
            color: RECOMMENDED_COLOR,
        },
        Marker {
            name: "knee",
            batch_size: result.throughput_batch_size,
            color: KNEE_COLOR,
        },
    ]
}

/// The axis end of a memory chart of `probes` (10% past the first OOM, or the largest size
/// otherwise), the fitted probes' sizes and device bytes, and the OOM probes' sizes.
fn probe_marks(probes: &[Probe], largest: u64) -> (u64, Vec<(u64, u64)>, Vec<u64>) {
    let out_of_memory: Vec<u64> = probes
        .iter()
        .filter(|p| p.outcome == Outcome::Oom)
        .map(|p| p.batch_size)
        .collect();
    let first_oom = out_of_memory.iter().copied().min();
    let x_max = (first_oom.unwrap_or(largest).max(largest) as f64 * 1.1)
        .ceil()
        .max(2.0) as u64;
    let fitted = probes
        .iter()
        .filter(|p| p.outcome == Outcome::Fit)
        .map(|p| (p.batch_size, p.device_bytes))
        .collect();
    (x_max, fitted, out_of_memory)
}

/// The memory chart above the speed chart, as one SVG document.
fn stacked(
    draw: impl FnOnce(&Drawing<'_>, &Drawing<'_>) -> Result<(), PlotError>,
) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 2 * CHART_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error)?;
        let (upper, lower) = root.split_vertically(CHART_HEIGHT);
        draw(&upper, &lower)?;
        root.present().map_err(drawing_error)?;
    }
    Ok(svg)
}

/// Both charts of a tune, as one SVG document.
pub fn tune_svg(result: &TuneResult, plan: &Plan) -> Result<String, PlotError> {
    let (x_max, measured, out_of_memory) = probe_marks(&result.probes, result.max_batch_size);
    let markers = markers(result);
    stacked(|upper, lower| {
        memory_chart(
            upper,
            plan,
            Some(result.device.free_bytes),
            x_max,
            &measured,
            &out_of_memory,
            &markers,
        )?;
        throughput_chart(
            lower,
            &result.throughput,
            result.throughput_fit,
            result.throughput_knee,
            &markers,
        )
    })
}

/// Both charts of a running tune from its probes so far: no limit or knee yet, the speed of
/// every size that fitted with the curve fitted through them. `None` before a probe fitted.
pub fn progress_svg(plan: &Plan, probes: &[Probe]) -> Result<Option<String>, PlotError> {
    let reading = knee::read(&measured(probes));
    let throughput = reading.curve();
    let Some(largest) = throughput.iter().map(|p| p.batch_size).max() else {
        return Ok(None);
    };
    let (x_max, fitted, out_of_memory) = probe_marks(probes, largest);
    stacked(|upper, lower| {
        memory_chart(upper, plan, None, x_max, &fitted, &out_of_memory, &[])?;
        throughput_chart(lower, &throughput, reading.step_time(), None, &[])
    })
    .map(Some)
}

/// The memory chart of an estimate for `memory_bytes` free.
pub fn estimate_svg(
    plan: &Plan,
    memory_bytes: u64,
    predicted: u64,
    recommended: u64,
    sequence_lengths: &[SequencePoint],
) -> Result<String, PlotError> {
    let markers = [
        Marker {
            name: "predicted max",
            batch_size: predicted,
            color: MAX_COLOR,
        },
        Marker {
            name: "recommended",
            batch_size: recommended,
            color: RECOMMENDED_COLOR,
        },
    ];
    let x_max = (predicted as f64 * 1.1).ceil().max(2.0) as u64;
    let memory = |area: &Drawing<'_>| {
        memory_chart(area, plan, Some(memory_bytes), x_max, &[], &[], &markers)
    };
    if !sequence_lengths.is_empty() {
        return stacked(|upper, lower| {
            memory(upper)?;
            sequence_chart(lower, sequence_lengths)
        });
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, CHART_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error)?;
        memory(&root)?;
        root.present().map_err(drawing_error)?;
    }
    Ok(svg)
}

/// The largest and the recommended batch of sequences at each sequence length (log2), each
/// point labelled with the tokens its batch holds.
fn sequence_chart(area: &Drawing<'_>, points: &[SequencePoint]) -> Result<(), PlotError> {
    let x_min = points.first().map_or(1.0, |p| p.sequence_length as f64) / 1.5;
    let x_max = points.last().map_or(2.0, |p| p.sequence_length as f64) * 1.5;
    let y_max = points
        .iter()
        .map(|p| p.predicted_max_batch_size as f64)
        .fold(1.0, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("Largest batch against sequence length", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min.max(0.5)..x_max).log_scale().base(2.0), 0f64..y_max)
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .x_desc("tokens a sequence (log2)")
        .y_desc("sequences a batch")
        .x_label_formatter(&|x| short_count(*x))
        .y_label_formatter(&|y| short_count(*y))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(drawing_error)?;
    for (name, color, batch) in [
        (
            "predicted max",
            MAX_COLOR,
            (|p: &SequencePoint| p.predicted_max_batch_size) as fn(&SequencePoint) -> u64,
        ),
        ("recommended", RECOMMENDED_COLOR, |p: &SequencePoint| {
            p.recommended_batch_size
        }),
    ] {
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.sequence_length as f64, batch(p) as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(drawing_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(drawing_error)?;
    }
    chart
        .draw_series(points.iter().map(|p| {
            Text::new(
                format!("{} tokens", short_count(p.tokens as f64)),
                (
                    p.sequence_length as f64,
                    p.predicted_max_batch_size as f64 + y_max * 0.03,
                ),
                ("sans-serif", 13),
            )
        }))
        .map_err(drawing_error)?;
    // Lengths fall from the upper left: the upper right is free.
    draw_legend_at(&mut chart, SeriesLabelPosition::UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_units_read_at_a_glance() {
        let labels: Vec<String> = [
            16.0,
            512.0,
            9999.0,
            65_536.0,
            1_500.0,
            2_000_000.0,
            30_128_117.0,
        ]
        .iter()
        .map(|&v| short_count(v))
        .collect();
        assert_eq!(
            labels,
            ["16", "512", "9999", "65.5k", "1500", "2M", "30.1M"]
        );
        assert_eq!(memory_unit(256.0 * MIB).0, "MiB");
        assert_eq!(memory_unit(80.0 * GIB).0, "GiB");
    }
    use headroom_devices::host::HostDevice;
    use std::ops::ControlFlow;

    #[test]
    fn a_tune_draws_both_charts_with_its_numbers() {
        let job = headroom_engine::Job::from_json(r#"{"model": {"input_shape": [64], "hidden_layers": [32], "num_classes": 4}, "optimizer": {"name": "adam"}, "search": {"max": 4096}}"#).unwrap();
        let mut device = HostDevice::new(4 << 20);
        let result =
            headroom_engine::search::tune(&job, &mut device, &mut |_| ControlFlow::Continue(()))
                .unwrap();
        let svg = tune_svg(&result, job.plan()).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{}",
            &svg[..80]
        );
        for text in [
            "Device memory against batch size",
            "Training speed against batch size",
            "activations",
            "device limit",
            &format!("max {}", result.max_batch_size),
            &format!("recommended {}", result.recommended_batch_size),
            &format!("knee {}", result.throughput_batch_size),
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        let estimate = estimate_svg(job.plan(), 4 << 20, 1000, 800, &[]).unwrap();
        assert!(estimate.contains("predicted max 1000") && estimate.contains("recommended 800"));
        assert!(!estimate.contains("sequence length"));
    }

    #[test]
    fn an_estimate_over_tokens_draws_its_sequence_lengths() {
        let job = headroom_engine::Job::from_json(
            r#"{"model": {"tokens": {"sequence_length": 256, "vocab_size": 100},
                "num_classes": 100, "layers": [{"embedding": {"embedding_dim": 16}},
                {"positional_embedding": {"max_positions": 1024}},
                {"self_attention": {"num_heads": 2, "causal": true}},
                {"linear": {"out_features": 100}}]}, "optimizer": {"name": "adamw"}}"#,
        )
        .unwrap();
        let e = headroom_engine::estimate::estimate(
            &job,
            64 << 20,
            headroom_engine::plan::Allocator::Exact,
        )
        .unwrap();
        assert_eq!(e.sequence_lengths.len(), 4);
        let svg = estimate_svg(
            job.plan(),
            e.memory_bytes,
            e.predicted_max_batch_size,
            e.recommended_batch_size,
            &e.sequence_lengths,
        )
        .unwrap();
        assert!(svg.contains("Largest batch against sequence length"));
        for p in &e.sequence_lengths {
            let tokens = format!("{} tokens", short_count(p.tokens as f64));
            assert!(svg.contains(&tokens), "{tokens} missing");
        }
    }
}
