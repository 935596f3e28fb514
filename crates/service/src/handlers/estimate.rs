//! `POST /estimate`: the memory model's answer for a job on a card of the GPU catalogue, on an
//! amount of memory, or on every card; no probe runs.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::job_request;
use crate::openapi::schemas;
use crate::openapi::{job_request_body, BadRequest, Invalid, TooLarge, UnsupportedType};
use crate::problem::Problem;
use crate::AppState;
use headroom_engine::catalogue::{self, GpuEstimate, MODEL_NOTE};
use headroom_engine::job::MAX_EXACT_INTEGER;

/// What `POST /estimate` takes besides the job; with neither, every card of the catalogue.
#[derive(Debug, Default, PartialEq, Deserialize, ToSchema)]
pub struct EstimateOptions {
    /// A card of the catalogue, e.g. `H100 80GB` or `h100` (case, spaces and dashes ignored).
    #[serde(default)]
    gpu: Option<String>,
    /// Free device memory, bytes, charged exactly instead of a card.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9007199254740992_u64)]
    memory_bytes: Option<u64>,
}

job_request_body!(
    EstimateRequest,
    EstimateOptions,
    "A job, as in examples/, plus the card (`gpu`) or the memory (`memory_bytes`) to estimate \
     for; with neither, every card of the catalogue."
);

/// The estimates, and what they are.
#[derive(Debug, Serialize, ToSchema)]
pub struct EstimateAnswer {
    /// That these are the memory model's predictions, and how near measurements it has been.
    pub note: String,
    /// One per card (or one for the memory given).
    #[schema(value_type = Vec<schemas::GpuEstimate>)]
    pub estimates: Vec<GpuEstimate>,
}

/// `POST /estimate`: what a job would fit on cards it has not run on.
#[utoipa::path(post, path = "/estimate", tag = "tune",
    request_body(content = EstimateRequest, content_type = "application/json",
        description = "A job (as in examples/), and a card or an amount of memory"),
    responses(
        (status = 200, description = "The memory model's largest and recommended batch: a prediction, not a measurement.", body = EstimateAnswer),
        BadRequest, TooLarge, UnsupportedType, Invalid,
    ))]
pub async fn estimate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<EstimateAnswer>, Problem> {
    let (options, job) = job_request::<EstimateOptions>(&headers, &body, &state)?;
    let estimates = match (options.memory_bytes, options.gpu) {
        (Some(bytes), _) if bytes == 0 || bytes > MAX_EXACT_INTEGER => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("memory_bytes: must be in [1, 2^53], got {bytes}"),
            )
            .with_field("memory_bytes"))
        }
        (Some(bytes), _) => vec![catalogue::estimate_free(&job, bytes)],
        (None, Some(name)) => {
            let gpu = catalogue::find(&name).map_err(|reason| {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, reason.to_string()).with_field("gpu")
            })?;
            vec![catalogue::estimate_for(&job, gpu)]
        }
        (None, None) => catalogue::every_gpu(&job),
    };
    Ok(Json(EstimateAnswer {
        note: MODEL_NOTE.to_string(),
        estimates,
    }))
}
