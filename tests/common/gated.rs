//! A steerable upstream for the shedding tests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

use super::{spawn_http1, STEP};

/// An HTTP/1.1 upstream (hyper, keep-alive) the test steers while it runs. Every request is
/// recorded on arrival (before any waiting) as `"METHOD /path?query"`, and answered by what its
/// path contains (anywhere, so that `/a/hold` behind a route prefix works too):
///
/// - `/hold…`: waits at a gate until the test lets it through with [`GatedUpstream::release`]
///   (bounded by [`STEP`]), then answers the current status. [`GatedUpstream::held`] is how many
///   wait right now, so "N in flight" is exact without sleeping.
/// - `/slow?ms=N`: waits N ms (at most [`STEP`]), then answers the current status.
/// - `/flaky…`: the first request for a given path and query answers 503, every later one 200.
/// - anything else: the current status ([`GatedUpstream::set_status`]; 200 at start).
///
/// Request bodies are read and dropped; the response body is `upstream <status>\n`.
pub struct GatedUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    state: std::sync::Arc<GatedState>,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

struct GatedState {
    requests: std::sync::Mutex<Vec<String>>,
    status: std::sync::atomic::AtomicU16,
    held: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::Semaphore,
}

/// Counts one request waiting at the gate, also when the proxy gives up on it.
struct HeldGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl GatedUpstream {
    /// Starts one on an ephemeral loopback port.
    pub async fn start() -> GatedUpstream {
        use std::sync::atomic::{AtomicU16, AtomicUsize};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(GatedState {
            requests: std::sync::Mutex::new(Vec::new()),
            status: AtomicU16::new(200),
            held: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let shared = state.clone();
        let task = spawn_http1(listener, move || {
            let state = shared.clone();
            hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                gated_answer(state.clone(), req)
            })
        });
        GatedUpstream {
            addr,
            state,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Status of every later answer that is not `/flaky…`.
    pub fn set_status(&self, status: u16) {
        self.state
            .status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets `n` held requests (present or future) through the gate.
    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// Requests waiting at the gate right now.
    pub fn held(&self) -> usize {
        self.state.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (bounded by [`STEP`]) until exactly `n` requests wait at the gate; returns how many
    /// do, which the caller asserts.
    pub async fn wait_held(&self, n: usize) -> usize {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.held() != n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.held()
    }

    /// Every request received so far, `"METHOD /path?query"`, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Number of requests received so far.
    pub fn total(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits (bounded by [`STEP`]) until at least `n` requests arrived; returns how many did.
    pub async fn wait_total(&self, n: usize) -> usize {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.total() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.total()
    }
}

async fn gated_answer(
    state: std::sync::Arc<GatedState>,
    req: Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    use std::sync::atomic::Ordering::SeqCst;
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    let line = format!("{} {target}", req.method());
    let first_sighting = {
        // Taken and released here, never held across an await.
        let mut requests = state.requests.lock().unwrap();
        let first = !requests
            .iter()
            .any(|r| r.split_once(' ').is_some_and(|(_, t)| t == target));
        requests.push(line);
        first
    };
    let _ = tokio::time::timeout(STEP, req.into_body().collect()).await;
    let status = if path.contains("/hold") {
        state.held.fetch_add(1, SeqCst);
        let _guard = HeldGuard(&state.held);
        if let Ok(Ok(permit)) = tokio::time::timeout(STEP, state.gate.acquire()).await {
            permit.forget();
        }
        state.status.load(SeqCst)
    } else if path.contains("/slow") {
        let ms = target
            .split_once("ms=")
            .and_then(|(_, v)| v.split('&').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms).min(STEP)).await;
        state.status.load(SeqCst)
    } else if path.contains("/flaky") {
        if first_sighting {
            503
        } else {
            200
        }
    } else {
        state.status.load(SeqCst)
    };
    let mut resp = http::Response::new(Full::new(Bytes::from(format!("upstream {status}\n"))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(resp)
}
