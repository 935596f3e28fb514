//! `headroom tune --server URL`: sends the job to a running `headroom serve`, then follows the
//! job, printing each probe as the server reports it, until it finishes or `--timeout` passes.
//! A busy server (429, 503) is retried after the `Retry-After` it sends.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::output::probe_line;
use super::{fail, PlotFile, TuneOutput, EXIT_DOES_NOT_FIT, EXIT_FAILURE, EXIT_INVALID};
use crate::device::select::DeviceSpec;
use crate::job::Job;
use crate::result::TuneResult;
use crate::service::jobs::{JobDocument, JobState};
use crate::service::problem::Problem;

/// How long to wait between looks at a running job when the server does not say.
const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// The server's answer to one request.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "the server answered {} with an unexpected body: {e}",
                self.status
            )
        })
    }
}

/// A session with one server: its address, token and HTTP agent.
struct Server {
    base: String,
    bearer: Option<String>,
    agent: ureq::Agent,
}

impl Server {
    fn new(base: &str, token: Option<&str>) -> Server {
        Server {
            base: base.trim_end_matches('/').to_string(),
            bearer: token.map(|t| format!("Bearer {t}")),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }

    fn read(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, String> {
        let mut response = response.map_err(|e| format!("cannot reach {}: {e}", self.base))?;
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .body_mut()
            .read_to_vec()
            .map_err(|e| format!("cannot read the answer of {}: {e}", self.base))?;
        Ok(Answer {
            status: response.status().as_u16(),
            retry_after,
            body,
        })
    }

    fn post_job(&self, body: &serde_json::Value) -> Result<Answer, String> {
        let mut post = self
            .agent
            .post(format!("{}/tune", self.base))
            .header("Prefer", "respond-async");
        if let Some(bearer) = &self.bearer {
            post = post.header("Authorization", bearer);
        }
        self.read(post.send_json(body))
    }

    fn get_job(&self, id: &str) -> Result<Answer, String> {
        let mut get = self.agent.get(format!("{}/jobs/{id}", self.base));
        if let Some(bearer) = &self.bearer {
            get = get.header("Authorization", bearer);
        }
        self.read(get.call())
    }
}

/// Tunes `job` on the server at `server`, on `device` there.
pub fn tune_remote_command(
    server: &str,
    job: &Job,
    device: DeviceSpec,
    token: Option<&str>,
    output: &TuneOutput,
    timeout: Duration,
) -> ExitCode {
    let plot = match output.plot.clone().map(PlotFile::create).transpose() {
        Ok(plot) => plot,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    let server = Server::new(server, token);
    let deadline = Instant::now() + timeout;
    let mut body = serde_json::to_value(job).expect("jobs serialise");
    body["device"] = serde_json::Value::from(device.to_string());
    let outcome = submit(&server, &body, deadline).and_then(|submitted| match submitted {
        Submitted::Finished(result) => Ok(Ok(*result)),
        Submitted::Refused(problem) => Ok(Err(problem)),
        Submitted::Accepted(document) => follow(&server, *document, deadline),
    });
    match outcome {
        Ok(Ok(result)) => output.deliver(&result, job, plot),
        Ok(Err(problem)) => remote_problem(&problem),
        Err(message) => fail(EXIT_FAILURE, message),
    }
}

enum Submitted {
    Finished(Box<TuneResult>),
    Accepted(Box<JobDocument>),
    Refused(Problem),
}

/// Posts the job, retrying while the server is busy and says when to come back.
fn submit(
    server: &Server,
    body: &serde_json::Value,
    deadline: Instant,
) -> Result<Submitted, String> {
    loop {
        let answer = server.post_job(body)?;
        match answer.status {
            200 => return Ok(Submitted::Finished(Box::new(answer.json()?))),
            202 => return Ok(Submitted::Accepted(Box::new(answer.json()?))),
            429 | 503 if answer.retry_after.is_some() => {
                let wait = answer.retry_after.unwrap_or(DEFAULT_POLL);
                let problem: Problem = answer.json()?;
                if Instant::now() + wait > deadline {
                    return Err(format!(
                        "the server is busy ({}) and --timeout runs out first",
                        problem.detail
                    ));
                }
                eprintln!("note: {}; retrying in {} s", problem.detail, wait.as_secs());
                std::thread::sleep(wait);
            }
            _ => return Ok(Submitted::Refused(answer.json()?)),
        }
    }
}

/// Follows an accepted job until it finishes: its result, or the problem it ended with.
fn follow(
    server: &Server,
    mut document: JobDocument,
    deadline: Instant,
) -> Result<Result<TuneResult, Problem>, String> {
    let mut shown = 0;
    let mut last_state = None;
    let mut poll = DEFAULT_POLL;
    loop {
        if last_state != Some(document.state) {
            let position = document
                .queue_position
                .map_or(String::new(), |p| format!(", {p} job(s) ahead"));
            eprintln!(
                "job {} {} on {}{position}",
                document.id,
                document.state.label(),
                document.device
            );
            last_state = Some(document.state);
        }
        for probe in document.progress.probes.iter().skip(shown) {
            eprintln!("{}", probe_line(probe));
        }
        shown = document.progress.probes.len();
        if document.state.is_finished() {
            return Ok(match (document.state, document.result, document.error) {
                (JobState::Succeeded, Some(result), _) => Ok(result),
                (_, _, Some(problem)) => Err(problem),
                (state, _, None) => Err(Problem::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    format!(
                        "the server reports the job {} with neither result nor error",
                        state.label()
                    ),
                )),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "no answer within --timeout; the job goes on at {}/jobs/{}",
                server.base, document.id
            ));
        }
        std::thread::sleep(poll.min(deadline - now));
        let answer = server.get_job(&document.id)?;
        poll = answer.retry_after.unwrap_or(DEFAULT_POLL);
        if answer.status != 200 {
            let problem: Problem = answer.json()?;
            return Err(remote_message(&problem));
        }
        document = answer.json()?;
    }
}

fn remote_message(problem: &Problem) -> String {
    format!("the server answered: {}", problem.detail)
}

fn remote_problem(problem: &Problem) -> ExitCode {
    let code = if problem.problem_type.ends_with("/does-not-fit") {
        EXIT_DOES_NOT_FIT
    } else if matches!(problem.status, 400 | 413 | 415 | 422) {
        EXIT_INVALID
    } else {
        EXIT_FAILURE
    };
    fail(code, remote_message(problem))
}
