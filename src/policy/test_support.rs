//! Mock upstreams for the policy tests: scripted replies, call counting, controllable latency.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::Service;

use crate::error::{ProxyError, UpstreamError};

/// A request with the given method and body (the body decides whether it can be replayed).
pub(crate) fn request(method: &str, body: &str) -> Request<String> {
    Request::builder()
        .method(method)
        .uri("http://app.test/x")
        .body(body.to_owned())
        .unwrap()
}

/// A GET carrying `x-id: id`, so a mock can tell requests apart.
pub(crate) fn request_with_id(id: usize) -> Request<String> {
    Request::builder()
        .uri("http://app.test/x")
        .header("x-id", id.to_string())
        .body(String::new())
        .unwrap()
}

/// One scripted answer of [`CountingService`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reply {
    /// How long until the answer; `None` never answers.
    pub(crate) delay: Option<Duration>,
    /// Status of the response, or the error.
    pub(crate) outcome: Result<u16, UpstreamError>,
}

impl Reply {
    /// An immediate response with `status`.
    pub(crate) fn status(status: u16) -> Self {
        Reply {
            delay: Some(Duration::ZERO),
            outcome: Ok(status),
        }
    }
    /// An immediate error.
    pub(crate) fn error(e: UpstreamError) -> Self {
        Reply {
            delay: Some(Duration::ZERO),
            outcome: Err(e),
        }
    }
    /// A 200 after `delay`.
    pub(crate) fn ok_after(delay: Duration) -> Self {
        Reply {
            delay: Some(delay),
            outcome: Ok(200),
        }
    }
    /// Never answers.
    pub(crate) fn hang() -> Self {
        Reply {
            delay: None,
            outcome: Ok(200),
        }
    }
}

struct Script {
    calls: AtomicUsize,
    replies: Mutex<VecDeque<Reply>>,
    default: Reply,
    seen: Mutex<Vec<(String, String)>>,
}

/// A mock upstream: answers with scripted replies (then a default), counts calls and records
/// each request's method and `x-id` header in arrival order.
#[derive(Clone)]
pub(crate) struct CountingService {
    script: Arc<Script>,
}

impl CountingService {
    /// Answers every request with `default`.
    pub(crate) fn new(default: Reply) -> Self {
        CountingService {
            script: Arc::new(Script {
                calls: AtomicUsize::new(0),
                replies: Mutex::new(VecDeque::new()),
                default,
                seen: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Answers every request with an immediate 200.
    pub(crate) fn ok() -> Self {
        Self::new(Reply::status(200))
    }

    /// Queues `reply` for the next call not yet scripted.
    pub(crate) fn push(&self, reply: Reply) -> &Self {
        self.script.replies.lock().unwrap().push_back(reply);
        self
    }

    /// How many times the service was called.
    pub(crate) fn calls(&self) -> usize {
        self.script.calls.load(Ordering::SeqCst)
    }

    /// `x-id` headers of the calls so far, in call order.
    pub(crate) fn seen_ids(&self) -> Vec<String> {
        self.script
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Methods of the calls so far, in call order.
    pub(crate) fn seen_methods(&self) -> Vec<String> {
        self.script
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }
}

/// The boxed future every mock returns.
pub(crate) type MockFuture =
    Pin<Box<dyn Future<Output = Result<Response<String>, ProxyError>> + Send>>;

impl Service<Request<String>> for CountingService {
    type Response = Response<String>;
    type Error = ProxyError;
    type Future = MockFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        self.script.calls.fetch_add(1, Ordering::SeqCst);
        let id = req
            .headers()
            .get("x-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        self.script
            .seen
            .lock()
            .unwrap()
            .push((req.method().to_string(), id));
        let reply = self
            .script
            .replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(self.script.default);
        Box::pin(async move {
            match reply.delay {
                Some(d) if !d.is_zero() => tokio::time::sleep(d).await,
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
            match reply.outcome {
                Ok(status) => {
                    let mut resp = Response::new(String::new());
                    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                    Ok(resp)
                }
                Err(e) => Err(ProxyError::Upstream(e)),
            }
        })
    }
}

/// An app with a hard capacity: `workers` requests are served at once, each taking
/// `service_time`; the rest wait in the app's own FIFO queue (like a worker pool behind an accept
/// backlog). Records the latency of every answered call.
#[derive(Clone)]
pub(crate) struct CapacityApp {
    /// The app's workers; a test takes some away by acquiring and holding them.
    pub(crate) workers: Arc<tokio::sync::Semaphore>,
    service_time: Arc<Mutex<Duration>>,
    /// Each request takes `service_time × (1 ± spread)`, uniformly, from a seeded generator so
    /// that runs repeat.
    spread: f64,
    rng: Arc<Mutex<u64>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

impl CapacityApp {
    /// `workers` × `service_time`.
    pub(crate) fn new(workers: usize, service_time: Duration) -> Self {
        CapacityApp {
            workers: Arc::new(tokio::sync::Semaphore::new(workers)),
            service_time: Arc::new(Mutex::new(service_time)),
            spread: 0.0,
            rng: Arc::new(Mutex::new(0x9E37_79B9_7F4A_7C15)),
            latencies: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Makes service times vary uniformly by `±spread` (0.5: from half to one and a half).
    pub(crate) fn with_spread(mut self, spread: f64) -> Self {
        self.spread = spread;
        self
    }

    fn service_time(&self) -> Duration {
        let base = *self.service_time.lock().unwrap();
        if self.spread == 0.0 {
            return base;
        }
        // xorshift64*: plenty for spreading test latencies, and seeded.
        let mut state = self.rng.lock().unwrap();
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let unit = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - self.spread + 2.0 * self.spread * unit)
    }

    /// Changes how long each request takes from now on.
    pub(crate) fn set_service_time(&self, d: Duration) {
        *self.service_time.lock().unwrap() = d;
    }

    /// Takes the latencies recorded so far.
    pub(crate) fn take_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.latencies.lock().unwrap())
    }
}

impl Service<Request<String>> for CapacityApp {
    type Response = Response<String>;
    type Error = ProxyError;
    type Future = MockFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<String>) -> Self::Future {
        let app = self.clone();
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            let _worker = app.workers.acquire().await.unwrap();
            let d = app.service_time();
            tokio::time::sleep(d).await;
            app.latencies.lock().unwrap().push(start.elapsed());
            Ok(Response::new(String::new()))
        })
    }
}

/// The `q`-quantile (0..=1) of `samples` (sorted in place).
pub(crate) fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    assert!(!samples.is_empty());
    samples.sort();
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[idx]
}

/// A future polled by hand, so a test can look at it between clock advances.
pub(crate) struct Manual<F: Future>(Pin<Box<F>>);

impl<F: Future> Manual<F> {
    /// Wraps `f` without polling it.
    pub(crate) fn new(f: F) -> Self {
        Manual(Box::pin(f))
    }

    /// Polls once: the output if ready.
    pub(crate) fn poll_once(&mut self) -> Option<F::Output> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match self.0.as_mut().poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }
}
