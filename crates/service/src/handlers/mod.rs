//! The HTTP handlers, one file per resource: small functions from request to answer, every
//! error a [`Problem`]. Each carries its OpenAPI description ([`utoipa::path`]); the router
//! (`super::router`) registers them and the document from the same list.

pub mod devices;
pub mod estimate;
pub mod health;
pub mod jobs;
pub mod pages;
pub mod tune;

use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::problem::Problem;
use super::AppState;
use headroom_engine::job::{Job, JobSpec};

/// A request body that is a job plus a route's own options `O` beside its members.
#[derive(Deserialize)]
struct JobRequest<O> {
    #[serde(flatten)]
    options: O,
    #[serde(flatten)]
    job: serde_json::Map<String, Value>,
}

/// Reads a JSON body as the route's options `O` and a job, the service's defaults (`headroom`,
/// `search`) filled in where the job gives none: 415 unless it is JSON, 400 unless it parses,
/// 422 naming the field at fault.
fn job_request<O: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    state: &AppState,
) -> Result<(O, Job), Problem> {
    check_json(headers)?;
    parse_job_request(body, state)
}

/// Refuses a body that is not declared JSON.
fn check_json(headers: &HeaderMap) -> Result<(), Problem> {
    if is_json(headers) {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the job as JSON with Content-Type: application/json",
        ))
    }
}

/// A JSON body's route options and validated job (the config's defaults filled in).
fn parse_job_request<O: DeserializeOwned>(
    body: &[u8],
    state: &AppState,
) -> Result<(O, Job), Problem> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object holding a job",
        ));
    }
    // A route's own integers (`memory_bytes`) take `1e9` as the job's do.
    headroom_engine::job::integral_floats_as_integers(&mut value);
    let JobRequest { options, mut job } = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field}: {}", e.inner()),
        )
        .with_field(field)
    })?;
    job.entry("headroom")
        .or_insert_with(|| Value::from(state.config.headroom));
    if !state.config.search.is_empty() {
        let search = job
            .entry("search")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(search) = search {
            for (key, value) in &state.config.search {
                search.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    let job = Job::from_value(Value::Object(job)).map_err(|e| {
        // A field beside the job that no job has may be a misspelt option of this route: name
        // both.
        let mut detail = e.to_string();
        let top_level = !e.field.is_empty() && !e.field.contains(['.', '[']);
        if top_level && !field_names::<JobSpec>().contains(&e.field.as_str()) {
            let own: Vec<String> = field_names::<O>()
                .iter()
                .map(|f| format!("`{f}`"))
                .collect();
            detail.push_str(&format!(
                "; or one of this request's own: {}",
                own.join(", ")
            ));
        }
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail).with_field(e.field)
    })?;
    Ok((options, job))
}

/// The field names serde's derive gives the struct `T`, read without a value: its
/// `deserialize_struct` call names them.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    use serde::forward_to_deserialize_any;

    struct Names(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Names {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(Self::Error::custom("fields read"))
        }

        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut names = Names(&[]);
    let _ = T::deserialize(&mut names);
    names.0
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
}

/// The answer while the devices are still being opened.
fn not_ready() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "devices are still being opened; retry shortly",
    )
    .retry_after(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_s_own_fields_are_read_from_its_options_type() {
        assert_eq!(
            field_names::<tune::TuneOptions>(),
            ["device", "no_cache", "allow_shared", "gpu_uuid"]
        );
        assert_eq!(
            field_names::<estimate::EstimateOptions>(),
            ["gpu", "memory_bytes"]
        );
    }
}
