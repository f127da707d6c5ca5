//! What the server checks from a request's headers, before it reads a byte of the body.
//!
//! In order: the `Host` the client named (a DNS-rebinding page names its own domain, so only this
//! machine's names, IP literals and `--allowed-host` are answered); the page `Origin` a browser
//! sends (only `--cors-origin` pages may call; their preflights are answered here); the API key
//! on `/v1/`, `/tokenize`, `/detokenize` and `/metrics`; for a body, `Content-Type: application/json` (a cross-site page can send
//! `text/plain` without a preflight) and the declared `Content-Length` against `--max-body`.
//! The body itself is then read under a deadline ([`Guard::read_body`]).

use super::ApiError;
use super::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// The server's rules for requests (from `kiln serve`'s flags).
pub struct Guard {
    /// Lower-case host names answered besides IP literals.
    hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) whose pages may call the server.
    origins: Vec<String>,
    api_key: Option<String>,
    max_body: usize,
    /// The limit for multipart uploads (`/v1/images/edits`).
    max_upload: usize,
    body_timeout: Duration,
}

/// The path whose bodies are multipart forms (OpenAI's image edits) instead of JSON.
pub const UPLOAD_PATH: &str = "/v1/images/edits";

impl Guard {
    pub fn new(
        bind_host: &str,
        allowed_hosts: &[String],
        origins: &[String],
        api_key: Option<String>,
        max_body: usize,
        max_upload: usize,
        body_timeout: Duration,
    ) -> Guard {
        let mut hosts: Vec<String> = ["localhost", bind_host]
            .into_iter()
            .map(str::to_string)
            .chain(allowed_hosts.iter().cloned())
            .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
            .collect();
        hosts.dedup();
        Guard {
            hosts,
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            api_key: api_key.filter(|k| !k.is_empty()),
            max_body,
            max_upload,
            body_timeout,
        }
    }

    /// The `Host` header names this machine: an IP literal (a rebinding page cannot make the
    /// browser send one of those for its own domain), `localhost`, the bound name, or an
    /// `--allowed-host`. No header (HTTP/1.0) is allowed: browsers always send one.
    fn check_host(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(raw) = headers.get(header::HOST) else {
            return Ok(());
        };
        let host = raw.to_str().unwrap_or("").to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n),
        };
        if name.parse::<IpAddr>().is_ok() || self.hosts.iter().any(|h| h == name) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "Host '{host}' is not a name of this server (it answers to IP addresses and {}; \
                 add a name with kiln serve --allowed-host)",
                self.hosts.join(", ")
            ),
        ))
    }

    /// The request's `Origin` when it may call (to echo in `Access-Control-Allow-Origin`),
    /// `None` when there is none (not a browser page), an error for any other page.
    fn check_origin(&self, headers: &HeaderMap) -> Result<Option<HeaderValue>, ApiError> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(None);
        };
        let o = origin.to_str().unwrap_or("").to_ascii_lowercase();
        if self.origins.contains(&o) {
            return Ok(Some(origin.clone()));
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "pages from origin '{o}' may not call this server (allow one with kiln serve \
                 --cors-origin ORIGIN)"
            ),
        ))
    }

    /// `Authorization: Bearer KEY` (the scheme in any case, as HTTP allows) when a key is set.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, k)| k.trim());
        match given {
            Some(g) if g == key => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect API key provided.",
            )
            .code("invalid_api_key")),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Missing API key: send the header 'Authorization: Bearer KEY'.",
            )
            .code("invalid_api_key")),
        }
    }

    /// A body is JSON (a multipart form on [`UPLOAD_PATH`]), said so, and no longer than
    /// `--max-body` (`--max-upload`) by its declared length.
    fn check_body_headers(&self, headers: &HeaderMap, path: &str) -> Result<(), ApiError> {
        let ctype = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = ctype.split(';').next().unwrap_or("").trim();
        if path == UPLOAD_PATH {
            if !media.eq_ignore_ascii_case("multipart/form-data") {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    format!(
                        "Content-Type '{ctype}': image edits are multipart forms \
                         ('Content-Type: multipart/form-data; boundary=...')"
                    ),
                ));
            }
        } else if !media.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!(
                    "Content-Type '{ctype}': request bodies are JSON, sent with \
                     'Content-Type: application/json'"
                ),
            ));
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let upload = path == UPLOAD_PATH;
        if declared.is_some_and(|n| n > self.limit(upload) as u64) {
            return Err(self.too_large(upload));
        }
        Ok(())
    }

    fn limit(&self, upload: bool) -> usize {
        if upload {
            self.max_upload
        } else {
            self.max_body
        }
    }

    fn too_large(&self, upload: bool) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than this server accepts ({} bytes; kiln serve \
                 --max-{})",
                self.limit(upload),
                if upload { "upload" } else { "body" }
            ),
        )
    }

    /// The body as UTF-8, read within `--body-timeout` and at most `--max-body` bytes (a
    /// chunked body declares no length).
    pub async fn read_body(&self, body: Body) -> Result<String, ApiError> {
        let bytes = self.read_bytes(body, false).await?;
        String::from_utf8(bytes)
            .map_err(|_| ApiError::bad_request("the request body is not UTF-8 JSON"))
    }

    /// The body's bytes, read within `--body-timeout` and at most `--max-body` bytes
    /// (`--max-upload` for an `upload`).
    pub async fn read_bytes(&self, body: Body, upload: bool) -> Result<Vec<u8>, ApiError> {
        let limit = self.limit(upload);
        let read = async {
            let mut bytes = Vec::new();
            let mut stream = body.into_data_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk
                    .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
                if bytes.len() + chunk.len() > limit {
                    return Err(self.too_large(upload));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(bytes)
        };
        let bytes = tokio::time::timeout(self.body_timeout, read)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "the request body did not arrive within {} s (kiln serve --body-timeout)",
                        self.body_timeout.as_secs_f32()
                    ),
                )
            })??;
        Ok(bytes)
    }
}

/// The answer to a CORS preflight from an allowed origin: the methods and the headers it asked
/// for (OpenAI's client sends its own `x-stainless-*` headers besides `authorization`).
fn preflight(origin: HeaderValue, headers: &HeaderMap) -> Response {
    let asked = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static("authorization, content-type"));
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            ),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, asked),
            (
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            ),
            (header::VARY, HeaderValue::from_static("Origin")),
        ],
    )
        .into_response()
}

/// The middleware: every check that needs only the headers, then the route.
pub async fn check(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let g = &app.guard;
    let h = req.headers();
    let origin = match g.check_host(h).and_then(|_| g.check_origin(h)) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let mut resp = match &origin {
        Some(o)
            if req.method() == Method::OPTIONS
                && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) =>
        {
            return preflight(o.clone(), h)
        }
        _ => {
            let early = (|| {
                let path = req.uri().path();
                if path.starts_with("/v1/")
                    || matches!(path, "/tokenize" | "/detokenize" | "/metrics")
                {
                    g.authorize(h)?;
                }
                if req.method() == Method::POST {
                    g.check_body_headers(h, req.uri().path())?;
                }
                Ok::<_, ApiError>(())
            })();
            match early {
                Ok(()) => next.run(req).await,
                Err(e) => e.into_response(),
            }
        }
    };
    if let Some(o) = origin {
        resp.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        resp.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}
