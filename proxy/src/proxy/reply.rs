//! Answers the proxy writes itself — denied paths, no route, upstream failures — and how a
//! failure maps to a status. They are short plain text and never name an upstream address.

use bytes::Bytes;
use http::{header, Method};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::ErrorSource;

/// An error that makes Pingora answer `code` (through `fail_to_proxy`).
pub(crate) fn err_status(code: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(code), why)
}

/// A short, address-free description of an upstream failure.
pub(crate) fn describe(e: &Error) -> &'static str {
    match e.etype() {
        ErrorType::ConnectRefused => "connection refused",
        ErrorType::ConnectTimedout => "connect timeout",
        ErrorType::ConnectNoRoute => "no route to host",
        ErrorType::ReadTimedout => "upstream read timeout",
        ErrorType::WriteTimedout => "upstream write timeout",
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
            "upstream closed the connection"
        }
        ErrorType::ConnectError | ErrorType::BindError | ErrorType::SocketError => "cannot connect",
        _ => "upstream error",
    }
}

/// The status a failed request is answered with (0: the client is gone, answer nothing).
pub(crate) fn failure_status(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(c) => *c,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if *e.esource() == ErrorSource::Upstream =>
        {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream if body_too_large(e) => 413,
            ErrorSource::Downstream if malformed_body(e) => 400,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                ErrorType::ReadTimedout => 408,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// The client's body grew past `client_max_body_size` (see `listen::conn`).
fn body_too_large(e: &Error) -> bool {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<crate::listen::BodyTooLarge>())
}

/// The client's body broke its framing (the connection reports `InvalidData`, see
/// `listen::conn`): a 400, not a client that went away.
fn malformed_body(e: &Error) -> bool {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

/// The body text for a failure answered with `code`; `cause` names an upstream failure.
pub(crate) fn failure_text(code: u16, cause: &str) -> String {
    match code {
        502 => format!("502 Bad Gateway: upstream unreachable ({cause})"),
        504 => "504 Gateway Timeout: the upstream did not answer in time".to_string(),
        408 => "408 Request Timeout".to_string(),
        400 => "400 Bad Request".to_string(),
        c => format!("{c} {}", reason(c)),
    }
}

/// The canonical reason phrase of a status code.
pub(crate) fn reason(code: u16) -> &'static str {
    http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// Answer a request ourselves (deny, no route, errors).
pub(crate) async fn respond(
    session: &mut Session,
    status: u16,
    text: &str,
    request_id: Option<&(bytes::Bytes, http::HeaderValue)>,
) -> Result<()> {
    if session.req_header().method != Method::HEAD && !session.is_body_empty() {
        // Don't drain an unread (possibly huge) upload just to keep the connection.
        session.set_keepalive(None);
    }
    let body = Bytes::from(format!("{text}\n"));
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if let Some((name, value)) = request_id {
        resp.insert_header(name.clone(), value.clone())?;
    }
    let head_only = session.req_header().method == Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
