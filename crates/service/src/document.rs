//! A job as the API shows it and the store keeps it: its state, its probes so far, its answer
//! or error, and its times.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::answer::TuneAnswer;
use crate::openapi::schemas;
use crate::problem::Problem;
use headroom_devices::select::DeviceSpec;
use headroom_engine::result::Probe;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its device.
    Queued,
    /// Probing.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
    /// Running when the service stopped (a crash, a kill, a node drain): the probes it had are
    /// kept; submit it again for an answer.
    Interrupted,
}

impl JobState {
    /// The state as its JSON and metric label spell it.
    pub fn label(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
        }
    }

    /// Whether the job will not change any more.
    pub fn is_finished(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// The probes a job has run so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// Every probe so far, in order.
    #[schema(value_type = Vec<schemas::Probe>)]
    pub probes: Vec<Probe>,
}

/// A job as `GET /jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobDocument {
    /// The job's id.
    pub id: String,
    /// Where it is in its life.
    pub state: JobState,
    /// The device it runs on, e.g. `cuda:0` or `host`.
    #[schema(value_type = String)]
    pub device: DeviceSpec,
    /// What was tuned, in a line: `MLP 1x28x28-128-10 relu, sgd, 32-true, pytorch` (empty for
    /// jobs kept from before jobs carried it).
    #[serde(default)]
    pub model: String,
    /// The job as the service read it, every default filled in.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
    /// While queued: how many jobs on the same device are ahead of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// Probes so far.
    pub progress: Progress,
    /// The result, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schemas::TuneAnswer>)]
    pub result: Option<TuneAnswer>,
    /// The error, once failed or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
    /// RFC 3339 time the job was accepted.
    pub created_at: String,
    /// RFC 3339 time probing began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339 time the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// The error of a job that was running when the service stopped.
pub fn interrupted() -> Problem {
    Problem::typed(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "interrupted",
        "Interrupted",
        "the service stopped while this job ran; its probes so far are kept. Submit the job \
         again for an answer",
    )
}

/// The time now, RFC 3339.
pub(crate) fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("RFC 3339 formats any UTC time")
}
