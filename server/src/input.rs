//! Where a request's image or video comes from: a `data:` URL or bare base64, a local file under
//! `--allow-files DIR`, or a multipart upload. Remote URLs are refused: devices are often
//! offline, and a server that fetches URLs can be made to probe a network.
//! The body itself is read here too (413 over `--max-body`).

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use base64::Engine as _;
use std::path::Path;

/// What a URL must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// An `image_url`: a still image.
    Image,
    /// A `video_url`: a video file, or an animated GIF / PNG / WebP.
    Video,
}

/// The image named by an OpenAI `image_url` (`field` names it in errors).
pub fn image_from_url(
    url: &str,
    allow_files: Option<&Path>,
    field: &str,
) -> Result<Vec<u8>, ApiError> {
    media_from_url(url, allow_files, field, Media::Image)
}

/// The bytes named by an `image_url` or a `video_url` (vLLM's part for clips): a data URL
/// of that kind, or a file under `--allow-files`.
pub fn media_from_url(
    url: &str,
    allow_files: Option<&Path>,
    field: &str,
    media: Media,
) -> Result<Vec<u8>, ApiError> {
    let url = url.trim();
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("data") if media == Media::Video => video_from_data_url(url, field),
        Some("data") => image_from_data_url(url, field),
        Some("http" | "https") => Err(ApiError::invalid(format!(
            "{field}: remote image URLs are not fetched (the server may be offline): send the image inline as a data:image/...;base64,... URL"
        ))),
        Some("file") => image_from_file(url.trim_start_matches("file://"), allow_files, field),
        Some(s) if s.len() > 1 && !url.starts_with('/') => Err(ApiError::invalid(format!(
            "{field}: unsupported URL scheme {s:?}: send a data:image/...;base64,... URL"
        ))),
        _ => image_from_file(url, allow_files, field),
    }
}

/// `data:[<type>][;base64],<data>`: only base64 data of an image type (or none) is accepted.
fn image_from_data_url(url: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    from_data_url(
        url,
        field,
        "data:image/png;base64,...",
        "an image type",
        |media| media.starts_with("image/"),
    )
}

/// A `video_url`'s data URL: base64 of a video type, or of an image type that can be
/// animated (GIF, PNG, WebP), or untyped.
fn video_from_data_url(url: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let what = "a video type (video/..., or an animated image/gif, image/png, image/webp)";
    from_data_url(url, field, "data:video/mp4;base64,...", what, |media| {
        media.starts_with("video/")
            || ["image/gif", "image/png", "image/apng", "image/webp"].contains(&media)
    })
}

/// The bytes of a base64 data URL whose media type `accepts` (an untyped one and
/// `application/octet-stream` always pass); `example` and `what` word the refusals.
fn from_data_url(
    url: &str,
    field: &str,
    example: &str,
    what: &str,
    accepts: impl Fn(&str) -> bool,
) -> Result<Vec<u8>, ApiError> {
    let (meta, data) = url["data:".len()..].split_once(',').ok_or_else(|| {
        ApiError::invalid(format!(
            "{field}: malformed data URL (no ',' before the data)"
        ))
    })?;
    let mut parts = meta.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::invalid(format!(
            "{field}: the data URL is not base64 (use {example})"
        )));
    }
    if !(media.is_empty() || media == "application/octet-stream" || accepts(&media)) {
        return Err(ApiError::invalid(format!(
            "{field}: the data URL's type {media:?} is not {what}"
        )));
    }
    decode_base64(data, field)
}

/// Standard base64 (padded or not; whitespace and line breaks ignored).
pub fn decode_base64(data: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(clean.as_bytes())
        .map_err(|e| ApiError::invalid(format!("{field}: bad base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(format!("{field}: the image is empty")));
    }
    Ok(bytes)
}

/// An image given inline in JSON: a data URL or bare base64.
pub fn image_from_inline(s: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    if s.trim_start().starts_with("data:") {
        image_from_data_url(s.trim(), field)
    } else {
        decode_base64(s, field)
    }
}

/// A local file, read only when it lies inside `--allow-files DIR` once links are resolved.
fn image_from_file(path: &str, allow: Option<&Path>, field: &str) -> Result<Vec<u8>, ApiError> {
    let Some(dir) = allow else {
        return Err(ApiError::invalid(format!(
            "{field}: local image paths are read only when the server runs with --allow-files DIR; send a data:image/...;base64,... URL"
        )));
    };
    let outside = || {
        ApiError::invalid(format!(
            "{field}: {path:?} is not a file inside the server's --allow-files folder"
        ))
    };
    let real = std::fs::canonicalize(dir.join(path)).map_err(|_| outside())?;
    if !real.starts_with(dir) || !real.is_file() {
        return Err(outside());
    }
    std::fs::read(&real).map_err(|e| ApiError::invalid(format!("{field}: {path:?}: {e}")))
}

/// The request body, or 413 / 400 naming what is wrong with it.
pub(crate) fn body_or_error(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(format!("unreadable request body: {e}"))
        }
    })
}

/// A parsed `multipart/form-data` body: the uploaded files and the text fields.
#[derive(Debug, Default)]
pub struct Form {
    /// `(field name, bytes)` of each file part (and of a text part named `image`).
    pub files: Vec<(String, Vec<u8>)>,
    /// `(field name, value)` of each text part.
    pub fields: Vec<(String, String)>,
}

impl Form {
    /// The values of a text field, in order (a field may repeat).
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Parses a multipart body whose `Content-Type` is `content_type`.
pub async fn parse_multipart(content_type: &str, body: Bytes) -> Result<Form, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::invalid(format!("multipart body: {e}")))?;
    let stream = tokio_stream::once(Ok::<_, std::convert::Infallible>(body));
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    loop {
        let field = mp
            .next_field()
            .await
            .map_err(|e| ApiError::invalid(format!("multipart body: {e}")))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some() || name == "image";
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::invalid(format!("multipart field {name:?}: {e}")))?;
        if is_file {
            form.files.push((name, data.to_vec()));
        } else {
            let text = String::from_utf8(data.to_vec()).map_err(|_| {
                ApiError::invalid(format!("multipart field {name:?} is not UTF-8 text"))
            })?;
            form.fields.push((name, text));
        }
    }
    Ok(form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_and_refusals() {
        let ok = image_from_url("data:image/png;base64,aGVsbG8=", None, "f").unwrap();
        assert_eq!(ok, b"hello");
        assert_eq!(image_from_inline("aGVsbG8", "f").unwrap(), b"hello");
        for (url, needle) in [
            ("https://example.com/cat.jpg", "remote image URLs"),
            ("data:image/png,hello", "not base64"),
            ("data:text/plain;base64,aGVsbG8=", "not an image type"),
            ("data:image/png;base64,@@@@", "bad base64"),
            ("data:image/png;base64", "malformed data URL"),
            ("/etc/passwd", "--allow-files"),
            ("ftp://x/y.png", "unsupported URL scheme"),
        ] {
            let e = image_from_url(url, None, "messages[0].content[1].image_url").unwrap_err();
            assert!(e.message.contains(needle), "{url}: {}", e.message);
            assert!(e.message.contains("messages[0]"), "{}", e.message);
        }
    }

    #[test]
    fn files_only_inside_the_allowed_folder() {
        let dir = std::env::temp_dir().join(format!("pali-input-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("in")).unwrap();
        std::fs::write(dir.join("in/a.png"), b"png").unwrap();
        std::fs::write(dir.join("secret"), b"no").unwrap();
        let allow = std::fs::canonicalize(dir.join("in")).unwrap();
        assert_eq!(image_from_url("a.png", Some(&allow), "f").unwrap(), b"png");
        let abs = allow.join("a.png").display().to_string();
        assert_eq!(
            image_from_url(&format!("file://{abs}"), Some(&allow), "f").unwrap(),
            b"png"
        );
        for bad in ["../secret", "/etc/passwd", "missing.png", "."] {
            let e = image_from_url(bad, Some(&allow), "f").unwrap_err();
            assert!(
                e.message.contains("not a file inside"),
                "{bad}: {}",
                e.message
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
