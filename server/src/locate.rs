//! `POST /v1/detect` and `/v1/segment`: JSON (`image` or `image_url`, `objects`,
//! `max_tokens`) or a multipart upload; the response is what `pali detect --json` /
//! `pali segment --json` prints.

use crate::admit;
use crate::engine::{Engine, LocateRequest, RequestOptions};
use crate::error::ApiError;
use crate::input::{self, body_or_error};
use crate::state::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// `/v1/detect` and `/v1/segment`.
pub(crate) async fn locate_handler<E: Engine>(
    State(state): State<Shared<E>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    locate(state, headers, body, uri.path() == "/v1/segment").await
}

async fn locate<E: Engine>(
    state: Shared<E>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    segment: bool,
) -> Response {
    let r = async {
        let body = body_or_error(body, state.config.max_body)?;
        let ctype = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (image, objects, mut sampling) = if ctype.starts_with("multipart/form-data") {
            locate_form(ctype, body).await?
        } else {
            locate_json(&body, state.config.allow_files.as_deref())?
        };
        state.fill_lora(&mut sampling);
        if let Some(engine) = state.engine.get() {
            engine.check_options(&sampling)?;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let req = LocateRequest {
            image,
            objects,
            segment,
            sampling,
            cancel: cancel.clone(),
        };
        let found = admit::run(&state, &cancel, move |e| e.locate(req)).await?;
        state.record(found.usage, &found.stages);
        Ok::<_, ApiError>(Json(found.json).into_response())
    };
    r.await.unwrap_or_else(|e| e.into_response())
}

/// `{"image": "<base64 or data URL>" | "image_url": "...", "objects": [..] | "a ; b",
/// "max_tokens": N, "lora": [{"id", "scale"}]}`.
fn locate_json(
    body: &[u8],
    allow_files: Option<&std::path::Path>,
) -> Result<(Vec<u8>, Vec<String>, RequestOptions), ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        image: Option<String>,
        image_url: Option<String>,
        objects: Option<Objects>,
        max_tokens: Option<i64>,
        lora: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Objects {
        One(String),
        Many(Vec<String>),
    }
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("malformed request: {e}")))?;
    let image =
        match (&b.image, &b.image_url) {
            (Some(i), None) => input::image_from_inline(i, "image")?,
            (None, Some(u)) => input::image_from_url(u, allow_files, "image_url")?,
            (None, None) => return Err(ApiError::invalid(
                "no image: send \"image\" (base64 or a data URL) or a multipart upload named image",
            )),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "both image and image_url: send one image",
                ))
            }
        };
    let objects = match b.objects {
        None => Vec::new(),
        Some(Objects::One(s)) => vec![s],
        Some(Objects::Many(v)) => v,
    };
    let mut options = max_tokens_only(b.max_tokens)?;
    options.lora = b
        .lora
        .map(|v| crate::lora::parse_lora(&v, "lora"))
        .transpose()?;
    Ok((image, objects, options))
}

/// A multipart upload: one file part `image`, text parts `objects` (repeatable, or `a ; b`)
/// and optionally `max_tokens`.
async fn locate_form(
    ctype: &str,
    body: Bytes,
) -> Result<(Vec<u8>, Vec<String>, RequestOptions), ApiError> {
    let mut form = input::parse_multipart(ctype, body).await?;
    let image = match form.files.len() {
        0 => return Err(ApiError::invalid("no image: add a file part named image")),
        1 => form.files.remove(0).1,
        n => {
            return Err(ApiError::invalid(format!(
                "{n} files uploaded: send one image per request"
            )))
        }
    };
    let objects = form
        .values("objects")
        .into_iter()
        .map(String::from)
        .collect();
    let max_tokens = match form.values("max_tokens").first() {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::invalid(format!("max_tokens = {v:?}: not a number")))?,
        ),
    };
    Ok((image, objects, max_tokens_only(max_tokens)?))
}

fn max_tokens_only(m: Option<i64>) -> Result<RequestOptions, ApiError> {
    Ok(RequestOptions {
        max_tokens: m,
        ..Default::default()
    })
}
