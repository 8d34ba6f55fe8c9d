//! What every request of the console passes first: its `Host`, where a POST or a live
//! stream comes from, a permit, a time limit, and the security headers of every answer.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::REQUEST_TIMEOUT;
use crate::Failure;

/// What every request passes through: see the module's documentation.
pub(super) struct Guard {
    /// The `Host` values this console answers to.
    pub(super) hosts: Vec<String>,
    pub(super) permits: Semaphore,
}

/// The `Host` values `--host` NAME admits: `name:port` as given, or a name without a
/// port with the listening port and alone (the default port of a proxy in front).
/// An IPv6 address is written in brackets.
pub(super) fn host_names(given: &str, port: u16) -> Result<Vec<String>, Failure> {
    let h = given.trim().to_ascii_lowercase();
    let bad = || {
        Failure::Usage(format!(
            "--host {given:?}: a name or address, optionally with :port ([v6] in brackets)"
        ))
    };
    if h.is_empty() || h.contains(['/', ' ', '@', '?', '#']) {
        return Err(bad());
    }
    let (name, given_port) = match h.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, "")) if !addr.is_empty() => (format!("[{addr}]"), None),
            Some((addr, rest)) if !addr.is_empty() => {
                let p = rest.strip_prefix(':').ok_or_else(bad)?;
                (
                    format!("[{addr}]"),
                    Some(p.parse::<u16>().map_err(|_| bad())?),
                )
            }
            _ => return Err(bad()),
        },
        None => match h.split_once(':') {
            None => (h.clone(), None),
            Some((name, p)) if !name.is_empty() && !p.contains(':') => {
                (name.to_owned(), Some(p.parse::<u16>().map_err(|_| bad())?))
            }
            _ => return Err(bad()),
        },
    };
    Ok(match given_port {
        Some(p) => vec![format!("{name}:{p}")],
        None => vec![format!("{name}:{port}"), name],
    })
}

/// Refuses a request for another host or a POST from elsewhere, waits for a permit,
/// bounds the time, and adds the security headers to whatever is answered.
pub(super) async fn guarded(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let host = text(header::HOST.as_str());
    // A browser says where a POST comes from: it must be one of this console's pages.
    let cross_site = matches!(text("sec-fetch-site").as_str(), "cross-site" | "same-site");
    // A change, or a live stream (which holds a permit), asked from another site's page.
    let foreign = match request.method() {
        &Method::POST => {
            cross_site
                || matches!(text(header::ORIGIN.as_str()).as_str(),
                    o if !o.is_empty() && o != format!("http://{host}") && o != format!("https://{host}"))
        }
        _ => cross_site && request.uri().path().starts_with("/live/"),
    };
    let mut response = if !guard.hosts.contains(&host) {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers only to its own address",
        )
            .into_response()
    } else if foreign {
        (
            StatusCode::FORBIDDEN,
            "this console takes changes only from its own pages",
        )
            .into_response()
    } else {
        match guard.permits.acquire().await {
            Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            Ok(_permit) => match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
                Ok(r) => r,
                Err(_) => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "handoff took too long to answer",
                )
                    .into_response(),
            },
        }
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_names_are_a_name_or_address_with_an_optional_port() {
        let names = |h: &str| super::host_names(h, 8080).ok();
        assert_eq!(
            names("Console.example"),
            Some(vec![
                "console.example:8080".into(),
                "console.example".into()
            ])
        );
        assert_eq!(
            names("console.example:443"),
            Some(vec!["console.example:443".into()])
        );
        assert_eq!(
            names("[fe80::1]"),
            Some(vec!["[fe80::1]:8080".into(), "[fe80::1]".into()])
        );
        assert_eq!(names("[::1]:9000"), Some(vec!["[::1]:9000".into()]));
        for bad in [
            "", "::1", "fe80::1", "name:abc", "name:1:2", "[::1", "a/b", "[::1]x", ":80",
        ] {
            assert_eq!(names(bad), None, "{bad:?}");
        }
    }
}
