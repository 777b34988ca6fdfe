//! How requests reach the Bioloop API (spec E.1): the bearer token, the timeouts, the urllib3
//! retry schedule with `Retry-After`, and the doubt a lost answer leaves about a write.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use reqwest::header::{CONTENT_TYPE, DATE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use tracing::warn;
use url::Url;

use super::HttpConfig;
use crate::registry::{DatasetId, RegistryError};

/// Characters of an error answer quoted in an error message.
const QUOTED_ANSWER: usize = 300;

/// The HTTP client with the base URL, the token and the retry schedule; it knows requests and
/// answers, not datasets.
pub(super) struct Transport {
    client: reqwest::Client,
    base: Url,
    token: String,
    max_retries: u32,
    backoff: Duration,
    backoff_max: Duration,
}

impl Transport {
    pub(super) fn new(config: &HttpConfig) -> anyhow::Result<Transport> {
        let base = normalize_base(config.base_url.clone())?;
        // Several clients share rustls; whichever comes first installs the provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .user_agent(concat!("workers/", env!("CARGO_PKG_VERSION")))
            .build()
            .with_context(|| {
                format!(
                    "cannot build the HTTP client for the dataset registry at {}",
                    redacted(&base)
                )
            })?;
        Ok(Transport {
            client,
            base,
            token: config.token.clone(),
            max_retries: config.max_retries,
            backoff: config.backoff,
            backoff_max: config.backoff_max,
        })
    }

    /// The base URL, ending in `/`.
    pub(super) fn base(&self) -> &Url {
        &self.base
    }

    /// The wait before retry number `retry` (1-based), as urllib3 computes it.
    fn backoff_delay(&self, retry: u32) -> Duration {
        if retry <= 1 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(retry - 1);
        self.backoff
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }

    fn url(&self, call: &Call) -> Result<Url, RegistryError> {
        let mut url = self.base.join(&call.path).map_err(|err| {
            RegistryError::Invalid(format!(
                "cannot join `{}` onto {}: {err}",
                call.path,
                redacted(&self.base)
            ))
        })?;
        if !call.query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(call.query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    /// Sends `call`, retrying transport failures and 429/502/503. Any other answer is returned
    /// for the caller to judge. When an attempt may have been performed although its answer
    /// was lost, `settled` (if given) is asked before the next attempt whether the write is
    /// already in place; if it is, nothing more is sent.
    pub(super) async fn send(
        &self,
        call: &Call,
        settled: Option<Settled<'_>>,
    ) -> Result<Sent, RegistryError> {
        let url = self.url(call)?;
        let started = Instant::now();
        let mut unsure = false;
        let mut retries = 0u32;
        loop {
            if unsure
                && retries > 0
                && let Some(settled) = settled
                && settled().await?
            {
                return Ok(Sent::AlreadyDone);
            }
            let failure = match self.attempt(call, &url).await {
                Ok(answer) if is_retryable_status(answer.status) => Failure {
                    cause: format!("answered {}", answer.status),
                    // A proxy's 502 may come after the API did the work; 429 and 503 say
                    // the request was turned away.
                    unsure: answer.status == StatusCode::BAD_GATEWAY,
                    retry_after: answer.retry_after,
                },
                Ok(answer) => {
                    return Ok(Sent::Answer(Reply {
                        answer,
                        unsure,
                        started,
                    }));
                }
                Err(err) => Failure {
                    // A request that never connected was never sent.
                    unsure: !err.is_connect(),
                    cause: describe_transport_error(&err),
                    retry_after: None,
                },
            };
            unsure |= failure.unsure;
            if retries >= self.max_retries {
                return Err(RegistryError::Unavailable(anyhow::format_err!(
                    "{} {}: {} (gave up after {retries} retries)",
                    call.method,
                    redacted(&url),
                    failure.cause
                )));
            }
            retries += 1;
            let delay = match failure.retry_after {
                Some(wait) => wait.min(self.backoff_max),
                None => self.backoff_delay(retries),
            };
            warn!(
                method = %call.method,
                path = %call.path,
                retry = retries,
                max_retries = self.max_retries,
                delay_ms = delay.as_millis() as u64,
                cause = %failure.cause,
                "Retrying a request to the dataset registry."
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One request, its whole answer read.
    async fn attempt(&self, call: &Call, url: &Url) -> Result<Answer, reqwest::Error> {
        let mut request = self
            .client
            .request(call.method.clone(), url.clone())
            .bearer_auth(&self.token);
        if let Some(body) = &call.body {
            let content_type = call.content_type.as_deref().unwrap_or("application/json");
            request = request
                .header(CONTENT_TYPE, content_type)
                .body(body.clone());
        }
        let response = request.send().await?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let server_date = response
            .headers()
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
            .map(|d| d.with_timezone(&Utc));
        let body = response.bytes().await?.into();
        Ok(Answer {
            status,
            retry_after,
            server_date,
            body,
        })
    }

    /// The error for an answer the caller did not expect: server errors may pass (the step
    /// is tried again later), client errors will not.
    pub(super) fn unexpected(&self, call: &Call, reply: &Reply) -> RegistryError {
        let url = self
            .url(call)
            .map(|u| redacted(&u))
            .unwrap_or_else(|_| call.path.clone());
        let message = format!(
            "{} {url} answered {}{}",
            call.method,
            reply.answer.status,
            self.quote(&reply.answer.body)
        );
        if reply.answer.status.is_server_error() {
            RegistryError::Unavailable(anyhow::Error::msg(message))
        } else {
            RegistryError::Invalid(message)
        }
    }

    /// The start of an error answer, for the message; the token is blanked should the server
    /// ever echo it.
    pub(super) fn quote(&self, body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        let mut text: String = text.trim().chars().take(QUOTED_ANSWER).collect();
        if !self.token.is_empty() {
            text = text.replace(&self.token, "<redacted>");
        }
        if text.is_empty() {
            text
        } else {
            format!(": {text}")
        }
    }

    pub(super) fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        call: &Call,
        reply: &Reply,
    ) -> Result<T, RegistryError> {
        serde_json::from_slice(&reply.answer.body).map_err(|err| {
            let url = self
                .url(call)
                .map(|u| redacted(&u))
                .unwrap_or_else(|_| call.path.clone());
            RegistryError::Invalid(format!(
                "{} {url}: the answer is not what the Bioloop API sends: {err}",
                call.method
            ))
        })
    }

    /// Sends a call that must succeed; 404 is the dataset `id` missing.
    pub(super) async fn expect_ok(
        &self,
        call: &Call,
        id: Option<DatasetId>,
        settled: Option<Settled<'_>>,
    ) -> Result<Option<Reply>, RegistryError> {
        match self.send(call, settled).await? {
            Sent::AlreadyDone => Ok(None),
            Sent::Answer(reply) if reply.answer.status.is_success() => Ok(Some(reply)),
            Sent::Answer(reply) => match (reply.answer.status, id) {
                (StatusCode::NOT_FOUND, Some(id)) => Err(RegistryError::NotFound(id)),
                _ => Err(self.unexpected(call, &reply)),
            },
        }
    }

    /// Sends a call without a settled check, which always ends in an answer.
    pub(super) async fn answered(
        &self,
        call: &Call,
        id: Option<DatasetId>,
    ) -> Result<Reply, RegistryError> {
        self.expect_ok(call, id, None).await?.ok_or_else(|| {
            RegistryError::Invalid(format!("{} {}: no answer", call.method, call.path))
        })
    }
}

/// Asked before a retry whether the write is in place already.
pub(super) type Settled<'a> =
    &'a (dyn Fn() -> BoxFuture<'a, Result<bool, RegistryError>> + Send + Sync);

/// One request to the API: a path relative to the base URL, never with a leading `/`.
pub(super) struct Call {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    /// The body's type when it is not JSON (a multipart upload).
    content_type: Option<String>,
}

impl Call {
    pub(super) fn get(path: String, query: Vec<(&'static str, String)>) -> Call {
        Call {
            method: Method::GET,
            path,
            query,
            body: None,
            content_type: None,
        }
    }

    pub(super) fn post(path: String, body: &Value) -> Call {
        Call {
            method: Method::POST,
            path,
            query: Vec::new(),
            body: Some(body.to_string().into_bytes()),
            content_type: None,
        }
    }

    pub(super) fn patch(path: String, body: &Value) -> Call {
        Call {
            method: Method::PATCH,
            ..Call::post(path, body)
        }
    }

    /// `PUT path` with a `multipart/form-data` body of one file field, as multer reads it.
    pub(super) fn put_file(path: String, field: &str, file_name: &str, content: &[u8]) -> Call {
        // A boundary that cannot occur in the content.
        let boundary = loop {
            let candidate = format!("workers-{}", uuid::Uuid::new_v4().simple());
            if !content
                .windows(candidate.len())
                .any(|w| w == candidate.as_bytes())
            {
                break candidate;
            }
        };
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
             filename=\"{file_name}\"\r\nContent-Type: text/html\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        Call {
            method: Method::PUT,
            path,
            query: Vec::new(),
            body: Some(body),
            content_type: Some(format!("multipart/form-data; boundary={boundary}")),
        }
    }
}

pub(super) struct Answer {
    pub(super) status: StatusCode,
    retry_after: Option<Duration>,
    pub(super) server_date: Option<DateTime<Utc>>,
    pub(super) body: Vec<u8>,
}

pub(super) struct Reply {
    pub(super) answer: Answer,
    /// An earlier attempt may have been performed although its answer was lost.
    pub(super) unsure: bool,
    /// When the first attempt was sent.
    pub(super) started: Instant,
}

pub(super) enum Sent {
    Answer(Reply),
    /// The settled check found the write in place; nothing was sent again.
    AlreadyDone,
}

/// Why an attempt did not bring an answer for the caller.
struct Failure {
    cause: String,
    unsure: bool,
    retry_after: Option<Duration>,
}

fn is_retryable_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
    )
}

/// `Retry-After` as seconds or as an HTTP date; a date in the past means now.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((when - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// The error and its causes on one line, without the URL (which may hold credentials).
fn describe_transport_error(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `url` without user name and password.
pub(super) fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// Paths are joined like Python's `urljoin`, so the base must end in `/` to keep its path.
fn normalize_base(mut base: Url) -> anyhow::Result<Url> {
    if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
        anyhow::bail!(
            "the dataset registry URL `{}` is not an http or https URL",
            redacted(&base)
        );
    }
    base.set_query(None);
    base.set_fragment(None);
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    Ok(base)
}

/// A value as one path segment: `/`, `?`, `#` and `%` escaped, so an id cannot reach another
/// route.
pub(super) fn path_segment(value: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'/')
        .add(b'?')
        .add(b'#')
        .add(b'%')
        .add(b'\\');
    percent_encoding::utf8_percent_encode(value, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn transport(base: &str) -> anyhow::Result<Transport> {
        Transport::new(&HttpConfig::new(
            Url::parse(base).expect("url"),
            "secret".into(),
        ))
    }

    #[test]
    fn backoff_follows_urllib3() {
        let t = transport("http://localhost:3030").expect("transport");
        let delays: Vec<u64> = (1..=9).map(|n| t.backoff_delay(n).as_secs()).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 120, 120, 120, 120]);
        assert_eq!(t.backoff_delay(64), Duration::from_secs(120));
    }

    #[test]
    fn paths_join_like_urljoin_onto_a_normalized_base() {
        for (base, want) in [
            ("http://h:1", "http://h:1/datasets/7"),
            ("http://h:1/api", "http://h:1/api/datasets/7"),
            ("http://h:1/api/", "http://h:1/api/datasets/7"),
            ("http://h:1/api/?x=1#f", "http://h:1/api/datasets/7"),
        ] {
            let t = transport(base).expect("transport");
            let url = t
                .url(&Call::get("datasets/7".into(), Vec::new()))
                .expect("url");
            assert_eq!(url.as_str(), want, "base {base}");
        }
        assert!(transport("mailto:x@y").is_err());
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().expect("header"));
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));
        let later = (Utc::now() + TimeDelta::seconds(30)).to_rfc2822();
        headers.insert(RETRY_AFTER, later.parse().expect("header"));
        let wait = parse_retry_after(&headers).expect("date");
        assert!(wait > Duration::from_secs(27) && wait <= Duration::from_secs(30));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("header"),
        );
        assert_eq!(parse_retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, "soon".parse().expect("header"));
        assert_eq!(parse_retry_after(&headers), None);
    }
}
