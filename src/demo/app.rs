//! The built-in sample application behind `spillway demo` (and many tests).
//!
//! A tiny HTTP server (HTTP/1.1, and HTTP/2 with prior knowledge, i.e. h2c, through hyper-util's
//! auto builder) whose endpoints produce every kind of upstream behaviour a proxy has to deal
//! with, on demand:
//!
//! | request                                | answer                                                   |
//! |----------------------------------------|----------------------------------------------------------|
//! | `GET /ok`                              | `200` `ok\n`                                             |
//! | `GET /slow?ms=N`                       | sleeps `N` ms (default [`DEFAULT_SLOW_MS`], capped at [`MAX_SLOW`]), then `200` |
//! | `GET /flaky?p=P`                       | `500` (an app error) with probability `P` (default [`DEFAULT_FLAKY_P`], clamped to `[0, 1]`), else `200` |
//! | `GET /status/NNN`                      | status `NNN` (`200`–`599`) with a short body; anything else `400` |
//! | `GET /stream?chunks=C&interval_ms=I`   | `200` with a chunked body: `C` chunks `I` ms apart (defaults 10 and 100 ms, bounded, see [`MAX_STREAM_CHUNKS`] and [`MAX_STREAM_DURATION`]) |
//! | anything else                          | `404` from the app                                       |
//!
//! The method is not checked (a `POST /ok` is answered like a `GET /ok`) and request bodies are
//! ignored. A query parameter that is present but not a number answers `400`. Every response
//! carries `x-served-by: demo-app` (see [`SERVED_BY`]), so a client of the proxy sees the
//! `x-served-by` chain, and a `text/plain` content type.
//!
//! Start it with [`serve`] on a listener you bound, or with [`DemoApp::bind`] (binds, spawns,
//! and stops when dropped), which is what tests use.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Value of the `x-served-by` header the demo app puts on every response.
pub(super) const SERVED_BY: &str = "demo-app";

/// Name of the header carrying [`SERVED_BY`].
pub(super) const SERVED_BY_HEADER: &str = "x-served-by";

/// Longest sleep `/slow` performs; larger `ms` values are capped to it.
pub(super) const MAX_SLOW: Duration = Duration::from_secs(60);

/// Sleep of `/slow` when no `ms` parameter is given, in milliseconds.
pub(super) const DEFAULT_SLOW_MS: u64 = 1000;

/// Probability of a `500` from `/flaky` when no `p` parameter is given.
pub(super) const DEFAULT_FLAKY_P: f64 = 0.3;

/// Number of chunks `/stream` sends when no `chunks` parameter is given.
pub(super) const DEFAULT_STREAM_CHUNKS: u32 = 10;

/// Pause between two `/stream` chunks when no `interval_ms` parameter is given, in milliseconds.
pub(super) const DEFAULT_STREAM_INTERVAL_MS: u64 = 100;

/// Most chunks one `/stream` response sends; larger `chunks` values are capped to it.
pub(super) const MAX_STREAM_CHUNKS: u32 = 1000;

/// Longest a `/stream` response lasts: the interval is reduced so that
/// `(chunks - 1) × interval_ms` stays within it.
pub(super) const MAX_STREAM_DURATION: Duration = Duration::from_secs(60);

/// How long [`serve`] waits, after its shutdown future completed, for in-flight requests
/// (a long `/slow` or `/stream`) to finish before it closes their connections.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Body type of every demo-app response: a full body, or the `/stream` chunk stream.
pub(super) type DemoBody = UnsyncBoxBody<Bytes, Infallible>;

/// Serves the demo app on `listener` until `shutdown` completes.
///
/// Each accepted connection speaks HTTP/1.1 or, if it starts with the HTTP/2 preface, HTTP/2
/// (h2c with prior knowledge; the HTTP/1.1 `Upgrade: h2c` dance is not supported). When
/// `shutdown` completes, the listener is closed at once, idle connections are closed, and
/// requests in flight get up to [`DRAIN_TIMEOUT`] to finish; whatever is still running after
/// that is cut off. Returns when every connection is gone.
///
/// Failed `accept`s (e.g. `EMFILE`) are logged and retried after a short pause; this function
/// never fails.
pub(super) async fn serve<F>(listener: TcpListener, shutdown: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    serve_with_drain(listener, shutdown, DRAIN_TIMEOUT).await;
}

async fn serve_with_drain<F>(listener: TcpListener, shutdown: F, drain: Duration)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut conns: JoinSet<()> = JoinSet::new();
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "demo app listening");

    let shutdown = shutdown;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Latency matters more than packet count for a test app.
                    let _ = stream.set_nodelay(true);
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service_fn(service))
                        .into_owned();
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        if let Err(err) = conn.await {
                            tracing::debug!(%peer, error = %err, "demo app connection ended with an error");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "demo app: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }

    drop(listener);
    tracing::info!(addr = ?local, in_flight = conns.len(), "demo app shutting down");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!(
            remaining = conns.len(),
            "demo app: drain timeout, closing the remaining connections"
        );
    }
    conns.shutdown().await;
}

/// A demo app running in a background task, stopped by [`DemoApp::stop`] or by dropping it.
#[derive(Debug)]
pub struct DemoApp {
    addr: SocketAddr,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl DemoApp {
    /// Binds `addr` (use `127.0.0.1:0` for a free port) and serves the demo app on it in a
    /// spawned task. Must be called inside a Tokio runtime.
    pub async fn bind(addr: SocketAddr) -> io::Result<DemoApp> {
        let listener = TcpListener::bind(addr).await?;
        DemoApp::spawn(listener)
    }

    /// Serves the demo app on an already bound `listener` in a spawned task.
    pub fn spawn(listener: TcpListener) -> io::Result<DemoApp> {
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // The sender being dropped (DemoApp dropped) also stops the app.
        let task = tokio::spawn(serve(listener, async move {
            let _ = stop_rx.await;
        }));
        Ok(DemoApp {
            addr,
            stop_tx: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The address the app listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (up to [`DRAIN_TIMEOUT`]) and waits
    /// until the app is gone.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        // Dropping `stop_tx` completes the shutdown future; the task drains in the background.
        self.stop_tx.take();
    }
}

async fn service(req: Request<hyper::body::Incoming>) -> Result<Response<DemoBody>, Infallible> {
    Ok(handle(&req).await)
}

/// Answers one request the way the demo app does (routing table in the [module docs](self)).
///
/// Only the request's URI is looked at. Useful to run the demo app in-process, without a socket.
pub(super) async fn handle<B>(req: &Request<B>) -> Response<DemoBody> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let mut resp = match path {
        "/ok" => text(StatusCode::OK, "ok\n"),
        "/slow" => slow(query).await,
        "/flaky" => flaky(query),
        "/stream" => stream(query),
        _ => match path.strip_prefix("/status/") {
            Some(code) => status(code),
            None => text(StatusCode::NOT_FOUND, "not found (demo app)\n"),
        },
    };
    resp.headers_mut()
        .insert(SERVED_BY_HEADER, HeaderValue::from_static(SERVED_BY));
    resp
}

async fn slow(query: &str) -> Response<DemoBody> {
    let ms = match query_param::<u64>(query, "ms") {
        Ok(ms) => ms.unwrap_or(DEFAULT_SLOW_MS),
        Err(msg) => return bad_request(&msg),
    };
    let wait = Duration::from_millis(ms).min(MAX_SLOW);
    tokio::time::sleep(wait).await;
    text(StatusCode::OK, format!("slept {} ms\n", wait.as_millis()))
}

fn flaky(query: &str) -> Response<DemoBody> {
    let p = match query_param::<f64>(query, "p") {
        Ok(p) => p.unwrap_or(DEFAULT_FLAKY_P),
        Err(msg) => return bad_request(&msg),
    };
    if p.is_nan() {
        return bad_request("query parameter p must be a number between 0 and 1");
    }
    let p = p.clamp(0.0, 1.0);
    // random() is in [0, 1): p = 0 never fails, p = 1 always does.
    if rand::random::<f64>() < p {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "flaky: simulated application error\n",
        )
    } else {
        text(StatusCode::OK, "flaky: ok this time\n")
    }
}

fn status(code: &str) -> Response<DemoBody> {
    let parsed = code
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok());
    let Some(status) = parsed else {
        return bad_request("/status/NNN needs a status code between 200 and 599");
    };
    // These must not carry content (RFC 9110 §15.3.5, §15.3.6, §15.4.5).
    if matches!(status.as_u16(), 204 | 205 | 304) {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        return resp;
    }
    let reason = status.canonical_reason().unwrap_or("");
    text(status, format!("{} {reason}\n", status.as_u16()))
}

fn stream(query: &str) -> Response<DemoBody> {
    let chunks = match query_param::<u32>(query, "chunks") {
        Ok(c) => c
            .unwrap_or(DEFAULT_STREAM_CHUNKS)
            .clamp(1, MAX_STREAM_CHUNKS),
        Err(msg) => return bad_request(&msg),
    };
    let interval_ms = match query_param::<u64>(query, "interval_ms") {
        Ok(i) => i.unwrap_or(DEFAULT_STREAM_INTERVAL_MS),
        Err(msg) => return bad_request(&msg),
    };
    let max_interval =
        MAX_STREAM_DURATION.as_millis() as u64 / u64::from(chunks.saturating_sub(1).max(1));
    let interval = Duration::from_millis(interval_ms.min(max_interval));

    // Chunk 1 goes out at once, every further one after `interval`.
    let frames = futures_util::stream::unfold(1u32, move |n| async move {
        if n > chunks {
            return None;
        }
        if n > 1 {
            tokio::time::sleep(interval).await;
        }
        let data = Bytes::from(format!("chunk {n}/{chunks}\n"));
        Some((Ok::<_, Infallible>(Frame::data(data)), n + 1))
    });
    let mut resp = Response::new(UnsyncBoxBody::new(StreamBody::new(frames)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Looks up `name` in a query string (no percent-decoding: the demo app only takes numbers).
/// `Ok(None)` when absent or empty, `Err` with a message when present but not a `T`.
fn query_param<T: std::str::FromStr>(query: &str, name: &str) -> Result<Option<T>, String> {
    let raw = query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v);
    match raw {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<T>()
            .map(Some)
            .map_err(|_| format!("query parameter {name}={v} is not a valid number")),
    }
}

fn bad_request(msg: &str) -> Response<DemoBody> {
    text(StatusCode::BAD_REQUEST, format!("bad request: {msg}\n"))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<DemoBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn empty() -> DemoBody {
    Full::new(Bytes::new()).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const LOCALHOST: &str = "127.0.0.1:0";
    /// Upper bound on any single test step, so a bug cannot hang the test run.
    const STEP: Duration = Duration::from_secs(10);

    async fn start() -> DemoApp {
        DemoApp::bind(LOCALHOST.parse().unwrap())
            .await
            .expect("bind 127.0.0.1:0")
    }

    /// One HTTP/1.1 request on a fresh connection; returns status, headers and the whole body.
    async fn get(addr: SocketAddr, path_and_query: &str) -> (Response<()>, Bytes) {
        let fut = async {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(path_and_query)
                .header("host", addr.to_string())
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            split(resp).await
        };
        tokio::time::timeout(STEP, fut)
            .await
            .expect("request timed out")
    }

    async fn split(resp: Response<Incoming>) -> (Response<()>, Bytes) {
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), bytes)
    }

    fn served_by(resp: &Response<()>) -> &str {
        resp.headers()
            .get(SERVED_BY_HEADER)
            .expect("x-served-by on every response")
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn ok_answers_200_with_served_by() {
        let app = start().await;
        let (resp, body) = get(app.local_addr(), "/ok").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&body[..], b"ok\n");
        assert_eq!(served_by(&resp), "demo-app");
        app.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_are_404_from_the_app() {
        let app = start().await;
        for path in ["/", "/nope", "/ok/", "/status", "/okay?x=1"] {
            let (resp, _) = get(app.local_addr(), path).await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(served_by(&resp), "demo-app", "{path}");
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn status_echoes_valid_codes_and_rejects_others() {
        let app = start().await;
        for code in [
            200u16, 201, 204, 304, 404, 418, 429, 500, 502, 503, 504, 599,
        ] {
            let (resp, body) = get(app.local_addr(), &format!("/status/{code}")).await;
            assert_eq!(resp.status().as_u16(), code);
            assert_eq!(served_by(&resp), "demo-app");
            if matches!(code, 204 | 304) {
                assert!(body.is_empty(), "{code} must have no body");
            } else {
                assert!(
                    String::from_utf8_lossy(&body).starts_with(&code.to_string()),
                    "{code}: {body:?}"
                );
            }
        }
        for bad in [
            "100", "101", "199", "600", "999", "abc", "", "20x", "-1", "65536",
        ] {
            let (resp, _) = get(app.local_addr(), &format!("/status/{bad}")).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "/status/{bad}");
            assert_eq!(served_by(&resp), "demo-app");
        }
        app.stop().await;
    }

    #[tokio::test]
    async fn slow_sleeps_about_the_requested_time() {
        let app = start().await;
        let t0 = Instant::now();
        let (resp, body) = get(app.local_addr(), "/slow?ms=150").await;
        let took = t0.elapsed();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&body[..], b"slept 150 ms\n");
        assert!(took >= Duration::from_millis(150), "took {took:?}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let (resp, _) = get(app.local_addr(), "/slow?ms=soon").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        app.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn slow_is_capped_at_60s_and_defaults_to_1s() {
        // Paused clock: tokio auto-advances time while everything is idle, so this is instant.
        let req = Request::get("/slow?ms=3600000").body(()).unwrap();
        let t0 = tokio::time::Instant::now();
        let resp = handle(&req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(t0.elapsed(), MAX_SLOW);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"slept 60000 ms\n");

        let t0 = tokio::time::Instant::now();
        let resp = handle(&Request::get("/slow").body(()).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(t0.elapsed(), Duration::from_millis(DEFAULT_SLOW_MS));
    }

    #[tokio::test]
    async fn flaky_follows_p_and_clamps_it() {
        async fn count_500(uri: &str, n: usize) -> usize {
            let mut errors = 0;
            for _ in 0..n {
                let resp = handle(&Request::get(uri).body(()).unwrap()).await;
                assert_eq!(resp.headers()[SERVED_BY_HEADER], SERVED_BY);
                match resp.status() {
                    StatusCode::OK => {}
                    StatusCode::INTERNAL_SERVER_ERROR => errors += 1,
                    other => panic!("{uri}: unexpected {other}"),
                }
            }
            errors
        }
        assert_eq!(count_500("/flaky?p=0", 200).await, 0);
        assert_eq!(count_500("/flaky?p=-3", 200).await, 0);
        assert_eq!(count_500("/flaky?p=1", 200).await, 200);
        assert_eq!(count_500("/flaky?p=7.5", 200).await, 200);
        // Default p = 0.3: expect ~1200 of 4000; the bounds are > 10 standard deviations away.
        let n = count_500("/flaky", 4000).await;
        assert!((900..=1500).contains(&n), "{n} errors of 4000 with p = 0.3");
        let n = count_500("/flaky?p=0.5&x=1", 4000).await;
        assert!(
            (1650..=2350).contains(&n),
            "{n} errors of 4000 with p = 0.5"
        );

        for bad in ["/flaky?p=often", "/flaky?p=NaN"] {
            let resp = handle(&Request::get(bad).body(()).unwrap()).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        // Over the network too.
        let app = start().await;
        let (resp, body) = get(app.local_addr(), "/flaky?p=1").await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(served_by(&resp), "demo-app");
        assert!(!body.is_empty());
        app.stop().await;
    }

    #[tokio::test]
    async fn stream_is_chunked_and_paced() {
        let app = start().await;
        let fut = async {
            let mut s = TcpStream::connect(app.local_addr()).await.unwrap();
            s.write_all(b"GET /stream?chunks=4&interval_ms=50 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let t0 = Instant::now();
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.unwrap();
            (t0.elapsed(), String::from_utf8(raw).unwrap())
        };
        let (took, raw) = tokio::time::timeout(STEP, fut)
            .await
            .expect("stream timed out");
        let lower = raw.to_ascii_lowercase();
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert!(lower.contains("transfer-encoding: chunked\r\n"), "{raw}");
        assert!(lower.contains("x-served-by: demo-app\r\n"), "{raw}");
        for n in 1..=4 {
            assert!(raw.contains(&format!("chunk {n}/4\n")), "{raw}");
        }
        assert!(raw.ends_with("0\r\n\r\n"), "{raw}");
        assert!(
            took >= Duration::from_millis(150),
            "3 intervals of 50 ms, took {took:?}"
        );
        app.stop().await;
    }

    #[tokio::test]
    async fn stream_defaults_and_bounds() {
        let app = start().await;
        let (resp, body) = get(app.local_addr(), "/stream?interval_ms=0").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(body.lines().count(), DEFAULT_STREAM_CHUNKS as usize);
        assert!(body.ends_with("chunk 10/10\n"), "{body}");

        let (resp, body) = get(app.local_addr(), "/stream?chunks=5000&interval_ms=0").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            MAX_STREAM_CHUNKS as usize
        );

        let (resp, _) = get(app.local_addr(), "/stream?chunks=lots").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        app.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn stream_total_duration_is_bounded() {
        let resp = handle(
            &Request::get("/stream?chunks=3&interval_ms=3600000")
                .body(())
                .unwrap(),
        )
        .await;
        let t0 = tokio::time::Instant::now();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            3
        );
        assert!(t0.elapsed() <= MAX_STREAM_DURATION, "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn speaks_h2c_with_prior_knowledge() {
        let app = start().await;
        let fut = async {
            let stream = TcpStream::connect(app.local_addr()).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let uri = format!("http://{}/status/503", app.local_addr());
            let resp = sender
                .send_request(Request::get(uri).body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            split(resp).await
        };
        let (resp, body) = tokio::time::timeout(STEP, fut)
            .await
            .expect("h2 request timed out");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(served_by(&resp), "demo-app");
        assert_eq!(&body[..], b"503 Service Unavailable\n");
        app.stop().await;
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests_on_one_connection() {
        let app = start().await;
        let fut = async {
            let stream = TcpStream::connect(app.local_addr()).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            for path in [
                "/ok",
                "/status/404",
                "/nope",
                "/stream?chunks=2&interval_ms=1",
                "/ok",
            ] {
                sender.ready().await.unwrap();
                let req = Request::get(path)
                    .header("host", "demo")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let (resp, _) = split(sender.send_request(req).await.unwrap()).await;
                assert_eq!(served_by(&resp), "demo-app");
            }
        };
        tokio::time::timeout(STEP, fut)
            .await
            .expect("keep-alive requests timed out");
        app.stop().await;
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish_and_stops_accepting() {
        let app = start().await;
        let addr = app.local_addr();
        let slow = tokio::spawn(async move { get(addr, "/slow?ms=300").await });
        tokio::time::sleep(Duration::from_millis(100)).await; // the request is in flight
        let t0 = Instant::now();
        tokio::time::timeout(STEP, app.stop())
            .await
            .expect("stop took too long");
        assert!(
            t0.elapsed() < DRAIN_TIMEOUT,
            "drained in {:?}",
            t0.elapsed()
        );
        let (resp, body) = slow.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&body[..], b"slept 300 ms\n");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener must be closed after stop"
        );
    }

    #[tokio::test]
    async fn shutdown_cuts_off_requests_after_the_drain_timeout() {
        let drain = Duration::from_millis(200);
        let listener = TcpListener::bind(LOCALHOST).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_with_drain(
            listener,
            async move {
                let _ = rx.await;
            },
            drain,
        ));
        let client = tokio::spawn(async move {
            tokio::time::timeout(STEP, get_result(addr, "/slow?ms=60000")).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await; // the request is in flight
        let _ = tx.send(());
        let t0 = Instant::now();
        tokio::time::timeout(STEP, server)
            .await
            .expect("server did not stop")
            .unwrap();
        let waited = t0.elapsed();
        assert!(
            waited >= drain && waited < Duration::from_secs(5),
            "server stopped after {waited:?}"
        );
        let outcome = client.await.unwrap().expect("client must not hang");
        assert!(
            outcome.is_err(),
            "the cut-off request must fail, not succeed"
        );
    }

    /// Like [`get`], but returns the client error instead of panicking.
    async fn get_result(addr: SocketAddr, path: &str) -> Result<StatusCode, hyper::Error> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "demo")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok(status)
    }
}
