//! The OpenAPI 3.1 document, generated from the types the handlers use: the routes are
//! declared once (`super::router`, through utoipa-axum) and this module adds what is common to
//! them: the service's description, the bearer scheme, the problem responses, and the
//! `TuneRequest` schema, which is the job's schema with the service's options beside it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

use super::handlers::estimate::EstimateOptions;
use super::handlers::tune::TuneOptions;
use super::problem::Problem;
use crate::job::JobSpec;

/// What the routes have in common.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "headroom",
        description = "Finds the largest training batch size a device can hold for a model by \
                       running real training steps, and answers with a safe one. Every error is \
                       an RFC 9457 problem document (`application/problem+json`).",
    ),
    modifiers(&BearerToken),
    tags(
        (name = "tune", description = "Tuning a job"),
        (name = "jobs", description = "Following and cancelling jobs"),
        (name = "devices", description = "Devices, telemetry and metrics"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The bearer token of `/tune` and `/jobs`, when the service is configured with one.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The service's `token` setting; only required when it is set",
                    ))
                    .build(),
            ),
        );
    }
}

/// The job's schema with the members of `O` beside its own: a body that is a job plus a
/// route's options.
fn job_with<O: PartialSchema>(description: &str) -> RefOr<Schema> {
    let (RefOr::T(Schema::Object(mut request)), RefOr::T(Schema::Object(options))) =
        (JobSpec::schema(), O::schema())
    else {
        panic!("the job's and the options' schemas are derived objects")
    };
    request.properties.extend(options.properties);
    request.description = Some(description.into());
    RefOr::T(Schema::Object(request))
}

/// The body of `POST /tune`: every member of a job, and the service's options.
pub struct TuneRequest;

impl PartialSchema for TuneRequest {
    fn schema() -> RefOr<Schema> {
        job_with::<TuneOptions>("A job, as in examples/, plus where and how to run it.")
    }
}

impl ToSchema for TuneRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        JobSpec::schemas(schemas);
        TuneOptions::schemas(schemas);
    }
}

/// The body of `POST /estimate`: every member of a job, and a card or an amount of memory.
pub struct EstimateRequest;

impl PartialSchema for EstimateRequest {
    fn schema() -> RefOr<Schema> {
        job_with::<EstimateOptions>(
            "A job, as in examples/, plus the card (`gpu`) or the memory (`memory_bytes`) to \
             estimate for; with neither, every card of the catalogue.",
        )
    }
}

impl ToSchema for EstimateRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        JobSpec::schemas(schemas);
        EstimateOptions::schemas(schemas);
    }
}

/// The body is not valid JSON.
#[derive(IntoResponses)]
#[response(status = 400, content_type = "application/problem+json")]
pub struct BadRequest(pub Problem);

/// The service has a token, and the request did not send it as `Authorization: Bearer <token>`.
#[derive(IntoResponses)]
#[response(status = 401, content_type = "application/problem+json",
    headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
pub struct Unauthorized(pub Problem);

/// No such job: ids are UUIDs, and finished jobs are kept for the configured history.
#[derive(IntoResponses)]
#[response(status = 404, content_type = "application/problem+json")]
pub struct NotFound(pub Problem);

/// The job had already finished.
#[derive(IntoResponses)]
#[response(status = 409, content_type = "application/problem+json")]
pub struct Conflict(pub Problem);

/// The GPU is computing for other processes (send `allow_shared` to probe it anyway), or the job
/// was cancelled while the request waited.
#[derive(IntoResponses)]
#[response(status = 409, content_type = "application/problem+json")]
pub struct Cancelled(pub Problem);

/// The body is larger than the service's `body_limit`.
#[derive(IntoResponses)]
#[response(status = 413, content_type = "application/problem+json")]
pub struct TooLarge(pub Problem);

/// The body is not sent as `application/json`.
#[derive(IntoResponses)]
#[response(status = 415, content_type = "application/problem+json")]
pub struct UnsupportedType(pub Problem);

/// The job is invalid (`field` names the member at fault), the model does not fit at batch size 1
/// (type `.../does-not-fit`), or the device asked for is not served here.
#[derive(IntoResponses)]
#[response(status = 422, content_type = "application/problem+json")]
pub struct Invalid(pub Problem);

/// The device's queue is full.
#[derive(IntoResponses)]
#[response(status = 429, content_type = "application/problem+json",
    headers(("Retry-After" = u64, description = "Seconds to wait before trying again")))]
pub struct Busy(pub Problem);

/// The devices are still being opened, the service is shutting down, or the device faulted
/// (type `.../device-fault`) or its limit kept moving (type `.../unstable-limit`).
#[derive(IntoResponses)]
#[response(status = 503, content_type = "application/problem+json",
    headers(("Retry-After" = u64, description = "When present: seconds to wait before trying again")))]
pub struct Unavailable(pub Problem);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tune_request_is_a_job_with_the_options_beside_it() {
        let RefOr::T(Schema::Object(request)) = TuneRequest::schema() else {
            panic!("an object")
        };
        let RefOr::T(Schema::Object(job)) = JobSpec::schema() else {
            panic!("an object")
        };
        let names: Vec<&String> = request.properties.keys().collect();
        for member in job.properties.keys() {
            assert!(names.contains(&member), "{member} missing");
        }
        for option in ["device", "no_cache", "allow_shared"] {
            assert!(request.properties.contains_key(option), "{option} missing");
        }
        assert_eq!(request.required, job.required);
        assert!(request.additional_properties.is_some());
    }
}
