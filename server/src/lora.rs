//! LoRA adapters as llama-server serves them: `GET /lora-adapters` (the engine's adapters and
//! their global scales), `POST /lora-adapters` (`[{"id", "scale"}]`: new global scales,
//! adapters not listed get 0) and the `"lora"` field of a request, in the same shape, which
//! replaces the global scales for that request alone.

use crate::engine::{Engine, RequestOptions};
use crate::error::ApiError;
use crate::input::body_or_error;
use crate::state::{lock, Shared};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// `[{"id": 0, "scale": 1.0}, …]` as `(id, scale)` pairs; `field` names it in errors. Ids
/// and scales are passed on as sent: their rules are the engine's
/// ([`Engine::check_options`]).
pub fn parse_lora(v: &serde_json::Value, field: &str) -> Result<Vec<(i64, f64)>, ApiError> {
    let items = v.as_array().ok_or_else(|| {
        ApiError::invalid(format!(
            "{field} must be an array of {{\"id\": N, \"scale\": X}}"
        ))
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let id = a.get("id").and_then(|x| x.as_i64()).ok_or_else(|| {
                ApiError::invalid(format!(
                    "{field}[{i}].id: an integer adapter id is required"
                ))
            })?;
            let scale = a.get("scale").and_then(|x| x.as_f64()).ok_or_else(|| {
                ApiError::invalid(format!("{field}[{i}].scale: a number is required"))
            })?;
            Ok((id, scale))
        })
        .collect()
}

/// `GET /lora-adapters`.
pub(crate) async fn list<E: Engine>(State(s): State<Shared<E>>) -> Response {
    if s.engine.get().is_none() {
        return ApiError::loading().into_response();
    }
    Json(lock(&s.lora).clone()).into_response()
}

/// `POST /lora-adapters`: every adapter's global scale, 0 for those not listed.
pub(crate) async fn set<E: Engine>(
    State(s): State<Shared<E>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        let body = body_or_error(body, s.config.max_body)?;
        let engine = s.engine.get().ok_or_else(ApiError::loading)?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("malformed request: {e}")))?;
        let scales = parse_lora(&v, "body")?;
        let asked = RequestOptions {
            lora: Some(scales.clone()),
            ..Default::default()
        };
        engine.check_options(&asked)?;
        let mut global = lock(&s.lora);
        for a in global.iter_mut() {
            a.scale = scales
                .iter()
                .find(|(id, _)| *id == i64::from(a.id))
                .map_or(0.0, |&(_, scale)| scale as f32);
        }
        log::info!("LoRA global scales: {:?}", *global);
        Ok::<_, ApiError>(Json(serde_json::json!({ "success": true })).into_response())
    })();
    r.unwrap_or_else(|e| e.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shape() {
        let v = serde_json::json!([{"id": 1, "scale": 0.5}, {"id": 0, "scale": -1}]);
        assert_eq!(parse_lora(&v, "lora").unwrap(), [(1, 0.5), (0, -1.0)]);
        for (v, needle) in [
            (serde_json::json!({"id": 0}), "lora must be an array"),
            (
                serde_json::json!([{"scale": 1.0}]),
                "lora[0].id: an integer",
            ),
            (serde_json::json!([{"id": 0.5, "scale": 1.0}]), "lora[0].id"),
            (
                serde_json::json!([{"id": 0}]),
                "lora[0].scale: a number is required",
            ),
            (
                serde_json::json!([{"id": 0, "scale": "1"}]),
                "lora[0].scale",
            ),
        ] {
            let e = parse_lora(&v, "lora").unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{v}: {}", e.message);
        }
    }
}
