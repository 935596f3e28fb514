//! The router: every route declared once for axum and the OpenAPI document alike, and the
//! layers around them.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::handlers::pages::{missing_page, wants_html};
use crate::middleware::{label_route, observe_request, require_token};
use crate::parsed::ParsedBodies;
use crate::problem::Problem;
use crate::state::AppState;
use crate::{handlers, openapi};

/// Every route, declared once for axum and the OpenAPI document alike. `/tune` and `/jobs` sit
/// behind the bearer token.
fn api_routes(token: &str) -> OpenApiRouter<Arc<AppState>> {
    let token: Arc<str> = token.into();
    let protected = OpenApiRouter::new()
        .routes(routes!(handlers::tune::tune))
        .routes(routes!(handlers::jobs::list_jobs))
        .routes(routes!(handlers::jobs::get_job, handlers::jobs::cancel_job))
        .route_layer(middleware::from_fn(move |request, next| {
            require_token(Arc::clone(&token), request, next)
        }));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(protected)
        .routes(routes!(handlers::estimate::estimate))
        .routes(routes!(handlers::pages::home))
        .routes(routes!(handlers::devices::devices))
        .routes(routes!(handlers::devices::metrics))
        .routes(routes!(handlers::health::livez))
        .routes(routes!(handlers::health::readyz))
}

/// The OpenAPI document of the service, as `/openapi.json` serves it.
pub fn openapi_document() -> serde_json::Value {
    linked(api_routes("").into_openapi())
}

/// The document as JSON, with the links that say how a tune's job is followed: the `id` of
/// `POST /tune`'s 202 is the `id` of `GET` and `DELETE /jobs/{id}` (clients and schemathesis's
/// stateful phase follow them). Written as JSON because utoipa 5.5 writes a link's
/// `operationId` as `operation_id`.
fn linked(document: utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut document = serde_json::to_value(document).expect("the OpenAPI document serialises");
    let link = |operation: &str, description: &str| {
        serde_json::json!({
            "operationId": operation,
            "parameters": {"id": "$response.body#/id"},
            "description": description,
        })
    };
    if let Some(accepted) = document.pointer_mut("/paths/~1tune/post/responses/202") {
        accepted["links"] = serde_json::json!({
            "GetJob": link("get_job", "Follow the job"),
            "CancelJob": link("cancel_job", "Cancel the job"),
        });
    }
    document
}

/// The router with every route and layer.
pub fn router(state: Arc<AppState>) -> Router {
    let (routes, document) = api_routes(&state.config.token).split_for_parts();
    let document = axum::body::Bytes::from(
        serde_json::to_vec(&linked(document)).expect("the OpenAPI document serialises"),
    );
    routes
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], document) }),
        )
        .route_layer(middleware::from_fn(label_route))
        .fallback(|headers: axum::http::HeaderMap| async move {
            let detail = "no such route; see /openapi.json";
            if wants_html(&headers) {
                missing_page(detail)
            } else {
                Problem::new(StatusCode::NOT_FOUND, detail).into_response()
            }
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.body_limit.0 as usize))
        // `POST /tune` bodies parsed before, one set per router (its config's defaults).
        .layer(Extension(Arc::new(ParsedBodies::<
            handlers::tune::ParsedTune,
        >::default())))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            observe_request,
        ))
        .layer(
            // A line per request only at DEBUG: a cluster's polls and Prometheus's scrapes
            // would otherwise pay for one each. Failures and slow requests are logged by
            // `observe_request` at WARN and INFO (tower-http's own ERROR line for every 5xx,
            // a readiness probe's 503 among them, is left at DEBUG).
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(CatchPanicLayer::custom(|_| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server hit a bug handling this request; it has been logged",
            )
            .into_response()
        }))
        .with_state(state)
}
