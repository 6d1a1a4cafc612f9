//! The admin endpoint: `/metrics`, `/healthz`, `/readyz`, `/config`, `/reload`, and the status
//! page (`/` and `/status.json`, see [`status`]).
//!
//! Served on its own listener (never on the proxy ports), HTTP/1.1 only. The full endpoint
//! (`admin.address`, loopback by default) has everything; the metrics listener
//! (`admin.metrics_address`) only what Prometheus and the kubelet need, so that it can be
//! opened to the cluster while `/reload` and `/config` are not. With `admin.token_file`, the
//! control paths of the full endpoint also need the bearer token ([`crate::token`]).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) mod status;

use crate::reload::Reloader;
use crate::shared::ProcessState;

/// Which paths an admin listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything (`admin.address`).
    Full,
    /// `/metrics`, `/healthz` and `/readyz` only (`admin.metrics_address`).
    Metrics,
}

impl Scope {
    /// How the listener is named in logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scope::Full => "admin",
            Scope::Metrics => "metrics",
        }
    }
}

/// The paths that show or change the config: never on the metrics listener, and behind the
/// Host check and the token on the full one.
const CONTROL: [&str; 4] = ["/", "/status.json", "/config", "/reload"];

/// What the admin endpoint serves from.
struct Admin {
    scope: Scope,
    state: Arc<ProcessState>,
    reloader: Arc<Reloader>,
}

/// Serves the admin endpoint (`scope` says which paths) until `stop` fires. A connection must send each request head
/// within `header_timeout` (the listeners' own), idle time before it included.
pub(crate) async fn serve(
    listener: TcpListener,
    scope: Scope,
    state: Arc<ProcessState>,
    reloader: Arc<Reloader>,
    header_timeout: std::time::Duration,
    stop: CancellationToken,
) {
    let admin = Arc::new(Admin {
        scope,
        state,
        reloader,
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let stop = stop.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// `401` with no body, and the challenges: HTTP Basic first, so that a browser asks for the
/// token (as the password) and then sends it with the status page's requests too.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let h = r.headers_mut();
    for challenge in [
        r#"Basic realm="spillway admin", charset="UTF-8""#,
        r#"Bearer realm="spillway admin""#,
    ] {
        h.append(WWW_AUTHENTICATE, http::HeaderValue::from_static(challenge));
    }
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// Whether a request may use the control endpoints. Its `Host` must name this admin endpoint
/// (its address, `localhost`, a loopback address) or a host `admin.allowed_hosts` lists, and
/// an `Origin` (which browsers send on cross-site requests) must be that same host. A web page
/// the operator's browser opens elsewhere then cannot make it `POST /reload` (cross-site
/// request) or read `/config` (DNS rebinding: the request carries the attacker's host name).
fn host_allowed(admin: &Admin, req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(HOST).and_then(|h| h.to_str().ok()) else {
        // No Host at all: not a browser.
        return true;
    };
    let Ok(host) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    if !allowed_name(admin, host.host()) {
        return false;
    }
    match req.headers().get(http::header::ORIGIN) {
        None => true,
        Some(origin) => origin
            .to_str()
            .ok()
            .and_then(|o| o.parse::<http::Uri>().ok())
            .and_then(|o| o.authority().cloned())
            .is_some_and(|o| o == host),
    }
}

/// Whether `name` (a Host's name part) is one the control endpoints answer to.
fn allowed_name(admin: &Admin, name: &str) -> bool {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let rt = admin.state.runtime.load();
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        if ip.is_loopback() || Some(ip) == rt.settings.admin.map(|a| a.ip()) {
            return true;
        }
    }
    rt.settings
        .admin_allowed_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(bare))
}

async fn route(admin: &Arc<Admin>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    let control = CONTROL.contains(&req.uri().path());
    if control && admin.scope == Scope::Metrics {
        return text(StatusCode::NOT_FOUND, PLAIN, "not found\n");
    }
    if control && !host_allowed(admin, &req) {
        return text(
            StatusCode::FORBIDDEN,
            PLAIN,
            "forbidden: Host is not this admin endpoint\n",
        );
    }
    if control {
        if let Some(token) = &*admin.state.admin_token.load() {
            if !token.accepts(req.headers().get(AUTHORIZATION)) {
                return unauthorized();
            }
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => {
            let mut r = text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                status::page(&status::snapshot(
                    &admin.state,
                    admin.reloader.last_failure(),
                )),
            );
            let h = r.headers_mut();
            h.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            h.insert(
                http::header::CONTENT_SECURITY_POLICY,
                http::HeaderValue::from_static(status::PAGE_CSP),
            );
            h.insert(
                http::header::X_CONTENT_TYPE_OPTIONS,
                http::HeaderValue::from_static("nosniff"),
            );
            r
        }
        (&Method::GET, "/status.json") => {
            let mut r = text(
                StatusCode::OK,
                JSON,
                serde_json::to_vec(&status::snapshot(
                    &admin.state,
                    admin.reloader.last_failure(),
                ))
                .unwrap_or_default(),
            );
            r.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            r
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin.state.metrics.render(),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, PLAIN, "ok\n"),
        (&Method::GET, "/readyz") => {
            if !admin.state.ready.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "draining\n")
            } else if admin.state.pressure.hard() {
                // Alive, but better not sent new traffic until memory is back under the mark.
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "memory pressure\n")
            } else {
                text(StatusCode::OK, PLAIN, "ready\n")
            }
        }
        (&Method::GET, "/config") => {
            let rt = admin.state.runtime.load();
            let body = serde_json::json!({
                "version": rt.version,
                "loaded_at": humantime::format_rfc3339_seconds(rt.loaded_at).to_string(),
                // Why the last refused reload was refused (null if none was since start).
                "last_reload_error": admin.reloader.last_failure(),
                "config": rt.settings,
            });
            text(
                StatusCode::OK,
                JSON,
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        (&Method::POST, "/reload") => {
            let outcome = match admin.reloader.path() {
                // Reading and validating is blocking work: keep it off the async threads.
                Some(_) => {
                    let reloader = admin.reloader.clone();
                    tokio::task::spawn_blocking(move || reloader.reload())
                        .await
                        .ok()
                }
                None => Some(admin.reloader.reload()),
            };
            match outcome {
                Some(Ok(r)) => text(
                    StatusCode::OK,
                    JSON,
                    serde_json::to_vec(
                        &serde_json::json!({"version": r.version, "changed": r.changed}),
                    )
                    .unwrap_or_default(),
                ),
                Some(Err(errors)) => {
                    let list: Vec<_> = errors
                        .0
                        .iter()
                        .map(|e| serde_json::json!({"path": e.path, "message": e.message, "line": e.line, "column": e.column, "hint": e.hint}))
                        .collect();
                    text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        JSON,
                        serde_json::to_vec_pretty(&serde_json::json!({"errors": list}))
                            .unwrap_or_default(),
                    )
                }
                None => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    "reload task failed\n",
                ),
            }
        }
        (_, "/" | "/status.json" | "/metrics" | "/healthz" | "/readyz" | "/config" | "/reload") => {
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                "method not allowed\n",
            )
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}
