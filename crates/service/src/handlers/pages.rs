//! The status pages: server-rendered HTML with no external asset, so they work on an air-gapped
//! cluster. `GET /` shows the devices (memory, busy, queue) and the recent jobs; a job's page
//! (`GET /jobs/{id}` asked for `text/html`) shows its answer, its two charts and its probes, and
//! refreshes while the job runs.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::devices::{device_statuses, DeviceStatus};
use crate::document::{JobDocument, JobState};
use crate::openapi::Unavailable;
use crate::plot;
use crate::problem::Problem;
use crate::AppState;
use headroom_engine::job::Job;
use headroom_engine::knee::StepTime;
use headroom_engine::result::{Outcome, Probe};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Seconds between refreshes of a page whose job has not finished.
const REFRESH_SECONDS: u32 = 2;

/// While a page is live (`main[data-live]`), its script asks for the page again every
/// [`REFRESH_SECONDS`], counting the asks in `html[data-polls]`. A job's page carries its
/// version (`main[data-etag]`, [`job_etag`]) and is asked for with `If-None-Match`: until a probe
/// finishes or the state changes the answer is a bodiless 304, and the elapsed time
/// (`[data-elapsed]`) counts on in the browser. A new version's `main` is swapped in place (no
/// reload, no lost scroll), counting the swaps in `html[data-refreshes]`; polling stops once
/// the page is no longer live. Without scripts, a meta refresh.
const LIVE_SCRIPT: &str = r#"
(function () {
  const main = document.querySelector("main");
  if (!main || !main.dataset.live) return;
  const every = 1000 * Number(main.dataset.live);
  const root = document.documentElement;
  const count = (name) => { root.dataset[name] = String(Number(root.dataset[name] || 0) + 1); };
  const took = (s) => s < 60 ? s.toFixed(1) + " s"
    : Math.floor(s / 60) + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
  let shown = performance.now();
  const clock = setInterval(() => {
    const since = (performance.now() - shown) / 1000;
    for (const e of main.querySelectorAll("[data-elapsed]")) e.textContent = took(Number(e.dataset.elapsed) + since);
  }, 1000);
  const tick = async () => {
    try {
      const headers = { Accept: "text/html" };
      if (main.dataset.etag) headers["If-None-Match"] = main.dataset.etag;
      const response = await fetch(location.href, { headers, cache: "no-store" });
      count("polls");
      if (response.status === 200) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.querySelector("main");
        if (fresh) {
          main.innerHTML = fresh.innerHTML;
          main.dataset.etag = fresh.dataset.etag || "";
          shown = performance.now();
          count("refreshes");
          if (!fresh.dataset.live) { delete main.dataset.live; clearInterval(clock); return; }
        }
      }
    } catch (e) { /* the service restarting: try again */ }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
})();
"#;

const STYLE: &str = r#"
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #f6f7f9; }
header { background: #1f3a5f; color: #fff; padding: 10px 24px; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
main { max-width: 1100px; margin: 0 auto; padding: 12px 24px 40px; }
h1 { font-size: 22px; margin: 14px 0 6px; } h2 { font-size: 17px; margin: 22px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e3e6ea; }
th { background: #eef1f5; font-weight: 600; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 180px; height: 12px; background: #e3e6ea; border-radius: 6px; overflow: hidden; }
.bar > div { height: 100%; background: #4f79b7; }
.state { padding: 1px 8px; border-radius: 10px; font-size: 13px; color: #fff; }
.queued { background: #8a8f98; } .running { background: #2f6fd6; } .succeeded { background: #2e8b57; }
.failed { background: #c0392b; } .cancelled, .interrupted { background: #b57a00; }
.answer { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px 0; }
.figure { background: #fff; border: 1px solid #e3e6ea; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.figure b { display: block; font-size: 22px; } .figure span { color: #666; font-size: 13px; }
.charts svg { max-width: 100%; height: auto; background: #fff; border: 1px solid #e3e6ea; }
.note { color: #555; } .problem { background: #fdecea; border: 1px solid #f5c2bd; padding: 10px 14px; }
"#;

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// Whether the client asks for HTML rather than JSON (a browser does; curl does not).
pub fn wants_html(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let position = |kind: &str| accept.find(kind);
    match (position("text/html"), position("application/json")) {
        (Some(html), Some(json)) => html < json,
        (Some(_), None) => true,
        _ => false,
    }
}

/// A page; a live one (`refresh`) polls, and one with a version (`etag`) is asked for with it.
fn page(title: &str, refresh: bool, etag: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { noscript { meta http-equiv="refresh" content=(REFRESH_SECONDS); } }
                title { (title) " · headroom" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { a href="/" { "headroom" } " · the largest batch each device holds" }
                @if refresh {
                    main data-live=(REFRESH_SECONDS) data-etag=[etag] { (body) }
                    script { (PreEscaped(LIVE_SCRIPT)) }
                } @else {
                    main { (body) }
                }
            }
        }
    }
}

fn state_badge(state: JobState) -> Markup {
    html! { span class={ "state " (state.label()) } { (state.label()) } }
}

fn devices_table(devices: &[DeviceStatus]) -> Markup {
    html! {
        table id="devices" {
            tr { th { "device" } th { "name" } th { "memory in use" } th {} th { "busy" } th class="n" { "queue" } }
            @for d in devices {
                @let used = d.used_bytes as f64 / d.total_bytes.max(1) as f64;
                tr {
                    td { (d.device) }
                    td { (d.name) }
                    td { div class="bar" title={ (format!("{:.0}%", 100.0 * used)) } {
                        div style={ "width: " (format!("{:.1}", 100.0 * used)) "%" } {}
                    } }
                    td { (human(d.used_bytes)) " of " (human(d.total_bytes)) }
                    td { @if d.busy { "tuning" } @else { "idle" } }
                    td class="n" { (d.queue_length) }
                }
            }
        }
    }
}

fn jobs_table(jobs: &[JobDocument]) -> Markup {
    html! {
        table id="jobs" {
            tr { th { "job" } th { "model" } th { "state" } th { "device" } th { "accepted" } th class="n" { "max" } th class="n" { "recommended" } th class="n" { "knee" } }
            @for job in jobs {
                tr {
                    td { a href={ "/jobs/" (job.id) } { (&job.id[..8]) } }
                    td { (job.model) }
                    td { (state_badge(job.state)) }
                    td { (job.device) }
                    td { (when(&job.created_at)) }
                    @if let Some(r) = &job.result {
                        td class="n" { (r.max_batch_size) }
                        td class="n" { (r.recommended_batch_size) }
                        td class="n" { (r.throughput_batch_size) }
                    } @else {
                        td class="n" { "–" } td class="n" { "–" } td class="n" { "–" }
                    }
                }
            }
        }
    }
}

/// `GET /`: the devices and the recent jobs.
#[utoipa::path(get, path = "/", tag = "health",
    responses(
        (status = 200, description = "The status page: devices and recent jobs, as HTML.", body = String, content_type = "text/html"),
        Unavailable,
    ))]
pub async fn home(State(state): State<Arc<AppState>>) -> Result<Markup, Problem> {
    let devices = device_statuses(&state).await?;
    let mut jobs = state.recent_documents().await;
    jobs.truncate(50);
    let running = jobs.iter().any(|j| !j.state.is_finished());
    Ok(page(
        "status",
        running,
        None,
        html! {
            h1 { "Devices" }
            (devices_table(&devices))
            h2 { "Recent jobs" }
            @if jobs.is_empty() { p class="note" { "No job yet: POST a job to /tune." } }
            @else { (jobs_table(&jobs)) }
            p class="note" { "API: " a href="/openapi.json" { "/openapi.json" } " · metrics: " a href="/metrics" { "/metrics" } }
        },
    ))
}

/// A time of the API (RFC 3339, nanoseconds) as a person reads it: to the second, in UTC.
fn when(rfc3339: &str) -> String {
    OffsetDateTime::parse(rfc3339, &Rfc3339).map_or_else(
        |_| rfc3339.to_string(),
        |t| {
            format!(
                "{}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        },
    )
}

/// Seconds from `start` to `end` (RFC 3339 times), if both read.
fn seconds_between(start: &str, end: &str) -> Option<f64> {
    let parse = |t: &str| OffsetDateTime::parse(t, &Rfc3339).ok();
    parse(start)
        .zip(parse(end))
        .map(|(a, b)| (b - a).as_seconds_f64().max(0.0))
}

/// How long from `start` to `end` (RFC 3339 times): `3.8 s`, `2 min 05 s` (the page's script
/// writes the same).
fn took(start: &str, end: &str) -> String {
    let Some(seconds) = seconds_between(start, end) else {
        return "?".into();
    };
    if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else {
        format!(
            "{} min {:02} s",
            (seconds / 60.0) as u64,
            seconds as u64 % 60
        )
    }
}

/// Where a running job is: its probes so far, the largest size that fitted and the smallest
/// that did not, and how long it has run (or waited), the browser counting on from there.
fn progress(document: &JobDocument) -> Markup {
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let elapsed = |since: &str| {
        let seconds = seconds_between(since, &now).unwrap_or(0.0);
        html! { span data-elapsed=(format!("{seconds:.1}")) { (took(since, &now)) } }
    };
    let Some(started) = &document.started_at else {
        return html! { "Queued for " (elapsed(&document.created_at)) "." };
    };
    let probes = &document.progress.probes;
    let largest_fit = probes
        .iter()
        .filter(|p| p.outcome == Outcome::Fit)
        .map(|p| p.batch_size)
        .max();
    let smallest_oom = probes
        .iter()
        .filter(|p| p.outcome == Outcome::Oom)
        .map(|p| p.batch_size)
        .min();
    html! {
        "Running for " (elapsed(started)) ": " (probes.len()) " probe(s)"
        @if let Some(fit) = largest_fit { ", the largest fit " (fit) }
        @if let Some(oom) = smallest_oom { ", out of memory from " (oom) }
        "."
    }
}

/// The version of a job's page: it changes when the job's state does or a probe finishes (and
/// with the build, whose pages may differ). The elapsed time is not in it: the browser counts it.
pub fn job_etag(document: &JobDocument) -> String {
    format!(
        "W/\"{}-{}-{}-{}\"",
        env!("CARGO_PKG_VERSION"),
        env!("HEADROOM_REVISION"),
        document.state.label(),
        document.progress.probes.len()
    )
}

/// Probes in order of batch size, each with its place in the search (from 1).
fn by_batch_size(probes: &[Probe]) -> Vec<(usize, &Probe)> {
    let mut ordered: Vec<(usize, &Probe)> =
        probes.iter().enumerate().map(|(i, p)| (i + 1, p)).collect();
    ordered.sort_by_key(|(order, p)| (p.batch_size, *order));
    ordered
}

/// The fitted step time in words: its two costs and how they combine.
fn step_time(fit: &StepTime) -> String {
    let combined = if fit.overlap == 1.0 {
        "the two add".to_string()
    } else {
        format!(
            "the fixed cost hides beneath the work, overlap {}",
            fit.overlap
        )
    };
    format!(
        "Fitted step time: {} whatever the batch, {} per sample ({combined}); the knee and the \
         speed chart's line are read from it.",
        short_seconds(fit.fixed_seconds),
        short_seconds(fit.seconds_per_sample),
    )
}

/// Seconds with the unit that reads best: `1.20 ms`, `4.60 µs`.
fn short_seconds(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 1e-3 {
        format!("{:.2} ms", seconds * 1e3)
    } else if seconds >= 1e-6 {
        format!("{:.2} µs", seconds * 1e6)
    } else {
        format!("{:.1} ns", seconds * 1e9)
    }
}

fn figure(id: &str, value: impl maud::Render, label: &str) -> Markup {
    html! { div class="figure" { b id=(id) { (value) } span { (label) } } }
}

/// What a browser gets for a page that is not there: the problem's words, and a way home.
pub fn missing_page(detail: &str) -> Response {
    let body = page(
        "not found",
        false,
        None,
        html! {
            h1 { "Not found" }
            p { (detail) }
            p { a href="/" { "The devices and recent jobs" } }
        },
    );
    (StatusCode::NOT_FOUND, body).into_response()
}

/// A job's page: its answer and charts once it succeeded, its problem if it failed, its probes.
pub fn job_page(spec: Option<&Job>, document: &JobDocument) -> Markup {
    let running = !document.state.is_finished();
    let probes = &document.progress.probes;
    let charts = match (&document.result, spec) {
        (Some(r), Some(spec)) => plot::tune_svg(r, spec.plan()).ok(),
        (None, Some(spec)) if running => plot::progress_svg(spec.plan(), probes).ok().flatten(),
        _ => None,
    };
    page(
        &format!("job {}", &document.id[..8]),
        running,
        Some(&job_etag(document)),
        html! {
            h1 { "Job " (document.id) " " (state_badge(document.state)) }
            @if !document.model.is_empty() { p id="model" { (document.model) } }
            p class="note" { "on " (document.device) " · accepted " (when(&document.created_at))
                @if let Some(t) = &document.finished_at { " · took " (took(&document.created_at, t)) } }
            @if let Some(r) = &document.result {
                div class="answer" {
                    (figure("max-batch-size", r.max_batch_size, &format!("largest batch size (limited by {})", r.limited_by)))
                    (figure("recommended-batch-size", r.recommended_batch_size, &format!("recommended ({}% of the largest)", (r.headroom * 100.0).round())))
                    (figure("throughput-batch-size", r.throughput_batch_size, &match r.throughput_knee {
                        Some(k) if k.low < k.high => format!("throughput knee (could be {}–{})", k.low, k.high),
                        _ => "throughput knee".into(),
                    }))
                    (figure("predicted-max-batch-size", r.predicted_max_batch_size, "the memory model's prediction"))
                    @if let Some(a) = &r.accumulation {
                        (figure("accumulation", format!("{} × {} × {}", a.micro_batch_size, a.steps, a.world_size), &format!("micro batch × steps × GPUs = {}", a.global_batch_size)))
                    }
                }
            }
            @if running { p id="progress" { (progress(document)) } }
            @if let Some(svg) = &charts { div class="charts" { (PreEscaped(svg)) } }
            @if let Some(fit) = document.result.as_ref().and_then(|r| r.throughput_fit) {
                p id="step-time" class="note" { (step_time(&fit)) }
            }
            @if let Some(note) = document.result.as_ref().and_then(|r| r.throughput_note.as_ref()) {
                p class="note" { (note) }
            }
            @if let Some(p) = &document.error {
                div class="problem" { b { (p.title) } ": " (p.detail) }
            }
            h2 { "Probes" }
            table id="probes" {
                tr { th class="n" { "batch size" } th class="n" { "probe" } th { "outcome" } th class="n" { "s/step" } th class="n" { "spread" } th class="n" { "samples/s" } th class="n" { "device memory" } }
                @for (order, probe) in by_batch_size(&document.progress.probes) {
                    tr {
                        td class="n" { (probe.batch_size) }
                        td class="n" { "#" (order) }
                        td { (probe.outcome) }
                        td class="n" { (format!("{:.4}", probe.step_seconds)) }
                        td class="n" { (format!("{:.0}%", probe.step_seconds_spread * 100.0)) }
                        td class="n" { (format!("{:.0}", probe.samples_per_second)) }
                        td class="n" { (human(probe.device_bytes)) }
                    }
                }
            }
            @if running { p class="note" { "The charts and probes refresh every " (REFRESH_SECONDS) " s while the job runs." } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_a_person_reads_them_and_probes_by_batch_size() {
        let start = "2026-12-01T14:38:26.066504218Z";
        assert_eq!(when(start), "2026-12-01 14:38:26 UTC");
        assert_eq!(took(start, "2026-12-01T14:38:29.866504218Z"), "3.8 s");
        assert_eq!(took(start, "2026-12-01T14:40:31.066504218Z"), "2 min 05 s");
        assert_eq!(when("not a time"), "not a time");
        assert_eq!(short_seconds(0.0012), "1.20 ms");
        assert_eq!(short_seconds(4.6e-6), "4.60 µs");
        assert_eq!(short_seconds(2.5), "2.50 s");
        let fit = StepTime {
            fixed_seconds: 1.2e-3,
            seconds_per_sample: 4.6e-6,
            overlap: 1.0,
        };
        assert!(step_time(&fit).starts_with(
            "Fitted step time: 1.20 ms whatever the batch, 4.60 µs per sample (the two add)"
        ));
        let probe = |batch_size| Probe {
            batch_size,
            outcome: headroom_engine::result::Outcome::Fit,
            step_seconds: 0.0,
            step_seconds_spread: 0.0,
            timed_steps: 1,
            samples_per_second: 0.0,
            device_bytes: 0,
        };
        let probes = [probe(64), probe(16), probe(32), probe(16)];
        let order: Vec<(usize, u64)> = by_batch_size(&probes)
            .into_iter()
            .map(|(i, p)| (i, p.batch_size))
            .collect();
        assert_eq!(order, [(2, 16), (4, 16), (3, 32), (1, 64)]);
    }

    #[test]
    fn browsers_get_html_and_clients_json() {
        let accept = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, value.parse().unwrap());
            wants_html(&headers)
        };
        assert!(accept(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(!accept("*/*"));
        assert!(!accept("application/json"));
        assert!(!accept("application/json, text/html"));
        assert!(!wants_html(&HeaderMap::new()));
    }
}
