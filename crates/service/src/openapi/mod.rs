//! The OpenAPI 3.1 document, generated from the types the handlers use: the routes are
//! declared once (`super::router`, through utoipa-axum) and this module adds what is common to
//! them: the service's description, the bearer scheme, the problem responses, and the request
//! bodies that are a job with a route's options beside it ([`job_with`]). [`schemas`] describes
//! the engine's types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

pub mod schemas;

use crate::problem::Problem;

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

/// The schema of a request body that is a job with the members of `O` (a route's options)
/// beside its own.
pub fn job_with<O: ToSchema>(description: &str) -> RefOr<Schema> {
    let (RefOr::T(Schema::Object(mut request)), RefOr::T(Schema::Object(options))) =
        (schemas::JobSpec::schema(), O::schema())
    else {
        panic!("the job's and the options' schemas are derived objects")
    };
    request.properties.extend(options.properties);
    request.description = Some(description.into());
    RefOr::T(Schema::Object(request))
}

/// Declares `$name`, the schema of a request body that is a job with `$options` beside its
/// members ([`job_with`]), described as `$description`.
macro_rules! job_request_body {
    ($name:ident, $options:ty, $description:expr) => {
        #[doc = $description]
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
                $crate::openapi::job_with::<$options>($description)
            }
        }

        impl utoipa::ToSchema for $name {
            fn schemas(
                schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::Schema>)>,
            ) {
                <$crate::openapi::schemas::JobSpec as utoipa::ToSchema>::schemas(schemas);
                <$options as utoipa::ToSchema>::schemas(schemas);
            }
        }
    };
}
pub(crate) use job_request_body;

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
