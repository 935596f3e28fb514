//! `headroom tune --server URL`: sends the job to a running `headroom serve`, then follows the
//! job, printing each probe as the server reports it, until it finishes or `--timeout` passes.
//! A busy server (429, 503) is retried after the `Retry-After` it sends.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use headroom_devices::select::DeviceSpec;
use headroom_engine::job::Job;
use headroom_service::answer::TuneAnswer;
use headroom_service::document::{JobDocument, JobState};
use headroom_service::problem::Problem;

use super::output::probe_line;
use super::CliError;

/// How long to wait between looks at a running job when the server does not say.
const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// Why talking to a server gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The request did not reach the server, or its answer did not come back whole.
    #[error("cannot reach {server}: {source}")]
    Unreachable {
        /// The server's URL.
        server: String,
        /// Why.
        source: Box<ureq::Error>,
    },
    /// The answer is not what the API documents.
    #[error("the server answered {status} with an unexpected body: {source}")]
    UnexpectedBody {
        /// The HTTP status.
        status: u16,
        /// Why it did not parse.
        source: serde_json::Error,
    },
    /// The server stays busy past `--timeout`.
    #[error("the server is busy ({detail}) and --timeout runs out first")]
    Busy {
        /// What the server said.
        detail: String,
    },
    /// `--timeout` passed while the job ran.
    #[error("no answer within --timeout; the job goes on at {server}/jobs/{id}")]
    TimedOut {
        /// The server's URL.
        server: String,
        /// The job's id.
        id: String,
    },
    /// A finished job with neither result nor error.
    #[error("the server reports the job {state} with neither result nor error")]
    Incomplete {
        /// The job's state.
        state: &'static str,
    },
}

/// The server's answer to one request.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self) -> Result<T, RemoteError> {
        serde_json::from_slice(&self.body).map_err(|source| RemoteError::UnexpectedBody {
            status: self.status,
            source,
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

    fn unreachable(&self) -> impl Fn(ureq::Error) -> RemoteError + '_ {
        |source| RemoteError::Unreachable {
            server: self.base.clone(),
            source: Box::new(source),
        }
    }

    fn read(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, RemoteError> {
        let mut response = response.map_err(self.unreachable())?;
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .body_mut()
            .read_to_vec()
            .map_err(self.unreachable())?;
        Ok(Answer {
            status: response.status().as_u16(),
            retry_after,
            body,
        })
    }

    fn post_job(&self, body: &serde_json::Value) -> Result<Answer, RemoteError> {
        let mut post = self
            .agent
            .post(format!("{}/tune", self.base))
            .header("Prefer", "respond-async");
        if let Some(bearer) = &self.bearer {
            post = post.header("Authorization", bearer);
        }
        self.read(post.send_json(body))
    }

    fn get_job(&self, id: &str) -> Result<Answer, RemoteError> {
        let mut get = self.agent.get(format!("{}/jobs/{id}", self.base));
        if let Some(bearer) = &self.bearer {
            get = get.header("Authorization", bearer);
        }
        self.read(get.call())
    }
}

/// Tunes `job` on the server at `server`, on `device` there, waiting up to `timeout`.
pub fn tune_remote(
    server: &str,
    job: &Job,
    target: &Target,
    token: Option<&str>,
    timeout: Duration,
) -> Result<TuneAnswer, CliError> {
    let server = Server::new(server, token);
    let deadline = Instant::now() + timeout;
    let mut body = serde_json::to_value(job).expect("jobs serialise");
    body["device"] = serde_json::Value::from(target.device.to_string());
    if let Some(uuid) = &target.gpu_uuid {
        body["gpu_uuid"] = serde_json::Value::from(uuid.as_str());
    }
    match submit(&server, &body, deadline)? {
        Submitted::Finished(answer) => Ok(*answer),
        Submitted::Refused(problem) => Err(CliError::Refused(problem)),
        Submitted::Accepted(document) => follow(&server, *document, deadline),
    }
}

/// Which of the service's devices a job asks for.
pub struct Target {
    /// `auto`, `host` or `cuda:N`.
    pub device: DeviceSpec,
    /// A GPU by its UUID, in place of `device`.
    pub gpu_uuid: Option<String>,
}

enum Submitted {
    Finished(Box<TuneAnswer>),
    Accepted(Box<JobDocument>),
    Refused(Box<Problem>),
}

/// Posts the job, retrying while the server is busy and says when to come back.
fn submit(
    server: &Server,
    body: &serde_json::Value,
    deadline: Instant,
) -> Result<Submitted, RemoteError> {
    loop {
        let answer = server.post_job(body)?;
        match answer.status {
            200 => return Ok(Submitted::Finished(Box::new(answer.json()?))),
            202 => return Ok(Submitted::Accepted(Box::new(answer.json()?))),
            429 | 503 if answer.retry_after.is_some() => {
                let wait = answer.retry_after.unwrap_or(DEFAULT_POLL);
                let problem: Problem = answer.json()?;
                if Instant::now() + wait > deadline {
                    return Err(RemoteError::Busy {
                        detail: problem.detail,
                    });
                }
                eprintln!("note: {}; retrying in {} s", problem.detail, wait.as_secs());
                std::thread::sleep(wait);
            }
            _ => return Ok(Submitted::Refused(Box::new(answer.json()?))),
        }
    }
}

/// Follows an accepted job until it finishes: its answer, or the problem it ended with.
fn follow(
    server: &Server,
    mut document: JobDocument,
    deadline: Instant,
) -> Result<TuneAnswer, CliError> {
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
            return match (document.state, document.result, document.error) {
                (JobState::Succeeded, Some(answer), _) => Ok(answer),
                (_, _, Some(problem)) => Err(CliError::Refused(Box::new(problem))),
                (state, _, None) => Err(RemoteError::Incomplete {
                    state: state.label(),
                }
                .into()),
            };
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(RemoteError::TimedOut {
                server: server.base.clone(),
                id: document.id,
            }
            .into());
        }
        std::thread::sleep(poll.min(deadline - now));
        let answer = server.get_job(&document.id)?;
        poll = answer.retry_after.unwrap_or(DEFAULT_POLL);
        if answer.status != 200 {
            return Err(CliError::Refused(Box::new(answer.json()?)));
        }
        document = answer.json()?;
    }
}
