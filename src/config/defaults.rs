//! Every value used when the config leaves a setting out, each with the reason it was chosen.
//!
//! Defaults aim at "a sidecar in front of one app that should change nothing until told to":
//! no shedding at realistic loads, no retries, no breaker, generous timeouts.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use super::settings::{
    BreakerSettings, ConcurrencySettings, LimitSettings, MaintenanceSettings, PolicySettings,
    Priority, RetrySettings, Shares, UpstreamProtocol,
};

/// Open client connections per listener: far above what one app behind a sidecar serves, low
/// enough that a flood of connections meets a clear 503 before it exhausts file descriptors
/// or memory (lowered at start to leave headroom below the process's file limit).
pub(crate) const MAX_CONNECTIONS: u32 = 10_000;

/// Request head size: 32 KiB holds any browser's cookies and a long URL; HAProxy and nginx
/// refuse far less by default (16 KiB, 8 KiB per line), and a head beyond this is an attack
/// or a bug, not a request.
pub(crate) const MAX_REQUEST_HEADER_BYTES: u32 = 32 * 1024;

/// Fields per request head: what hyper, HAProxy and Go allow by default.
pub(crate) const MAX_REQUEST_HEADERS: u32 = 100;

/// Header timeout: a new connection must send its first request head, and any head must be
/// complete, within this. Generous for a client on a slow link; short enough that silent
/// connections (slowloris, a port scanner) cannot pile up (nginx: 60 s, HAProxy's
/// `timeout http-request` is commonly 10 s).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Client keep-alive idle timeout: longer than the 5 s of most HTTP clients' pools, so the
/// client closes first (the keep-alive race, seen from the other side); nginx uses 75 s.
pub(crate) const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Upstream body timeout: an app that stops mid-body for this long is not coming back; the
/// client's response is aborted and both connections freed (HAProxy cuts at its 30 s server
/// timeout too). Long enough for any pause a live stream makes between chunks.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle upstream connections kept per endpoint: enough for the concurrency of a busy app
/// (more are only opened under load, and closed as they come back), few enough that a burst
/// does not leave spillway holding hundreds of idle connections and buffers.
pub(crate) const MAX_IDLE: u32 = 64;

/// Soft memory mark: at 80 % of the limit there is room to shed gently (no new connections,
/// idle ones closed) before requests have to be refused.
pub(crate) const MEMORY_SOFT: f64 = 0.8;

/// Hard memory mark: at 90 % new requests are refused too; the last 10 % is the margin for
/// what is already in flight, before the kernel's OOM killer takes the whole pod.
pub(crate) const MEMORY_HARD: f64 = 0.9;

/// Upgrades a route passes on: WebSocket, the one browsers and apps use. Others (h2c above
/// all, which would tunnel requests past the route's policies) only when a route lists them.
pub(crate) const UPGRADES: &[&str] = &["websocket"];

/// The access log is on: one line per request is what operators expect of a proxy.
pub(crate) const ACCESS_LOG_ENABLED: bool = true;

/// Access log sample: every request, as before the setting existed; lower it where the volume
/// costs more than the lines are worth (the always-logged classes still get a line each).
pub(crate) const ACCESS_LOG_SAMPLE: f64 = 1.0;

/// Classes always logged whatever the sample: what an operator needs during an incident.
pub(crate) const ACCESS_LOG_ALWAYS: &[&str] = &["proxy_errors", "5xx", "slow"];

/// What `slow` means for the access log: a second is slow for any request a sidecar serves.
pub(crate) const ACCESS_LOG_SLOW: Duration = Duration::from_secs(1);

/// Route timeout: long enough for slow but healthy requests, short enough that a hung upstream
/// is reported as a 504 before most clients give up on their own.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// `Retry-After` on generated 503s: long enough to spread a retry storm, short enough that a
/// client comes back soon after a brief overload.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Upstream connect timeout: the app is normally on the same host or pod, where a connection
/// either succeeds in microseconds or is refused; a second means it is not coming.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Upstream idle timeout: below the 5 s keep-alive of Node.js and many app servers, so that
/// spillway retires a pooled connection before the app closes it (the keep-alive race, where a
/// request is sent on a connection the app is closing and fails for no reason of its own).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Upstream protocol: HTTP/1.1 is what almost every app speaks; HTTP/2 must be asked for.
pub(crate) const PROTOCOL: UpstreamProtocol = UpstreamProtocol::Http1;

/// Admin address when `admin` is omitted: loopback only, because metrics and config should not
/// be reachable from outside the pod unless someone decides so.
pub(crate) const ADMIN_ADDRESS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9901));

/// `server_id` when omitted: the product name, so `Via` and `Proxy-Status` still say who
/// answered; set it per instance to tell replicas apart.
pub(crate) const SERVER_ID: &str = "spillway";

/// Name of the listener when there is only one and it has no name: most sidecars have exactly
/// one plain HTTP listener, and naming it is busywork.
pub(crate) const LISTENER_NAME: &str = "http";

/// Path prefix of a route with no `match.path_prefix`: everything.
pub(crate) const PATH_PREFIX: &str = "/";

/// Fixed concurrency limit: high enough never to shed a healthy app by surprise, low enough to
/// stop an unbounded pile-up of requests when the app stalls.
pub(crate) const CONCURRENCY_MAX: u32 = 1000;

/// Lowest adaptive limit when `adaptive.min` is omitted: one request always gets through, so
/// the limit can still learn that the upstream recovered.
pub(crate) const ADAPTIVE_MIN: u32 = 1;

/// Highest adaptive limit when `adaptive.max` is omitted: the same ceiling as the fixed default.
pub(crate) const ADAPTIVE_MAX: u32 = CONCURRENCY_MAX;

/// Queue length: zero, so that overload is shed at once with a 503 rather than turned into
/// latency the caller did not ask for.
pub(crate) const QUEUE: u32 = 0;

/// Longest wait in the queue: a queued request should wait about as long as a slow request
/// takes, not until its client has given up.
pub(crate) const QUEUE_TIMEOUT: Duration = Duration::from_millis(100);

/// Queue delay target: CoDel's recommended 5 ms. A queue whose shortest wait stays above it
/// for a whole interval is not absorbing a burst but standing, and waiting in it only adds
/// latency; a few milliseconds is well under the latency of a typical request, so a queue
/// that merely smooths arrivals never reaches it.
pub(crate) const QUEUE_TARGET: Duration = Duration::from_millis(5);

/// Interval over which the shortest queue wait is taken: CoDel's 100 ms, a few round trips of
/// a typical request. A queue that drains within about an interval is never taken for standing.
pub(crate) const QUEUE_INTERVAL: Duration = Duration::from_millis(100);

/// Share of the limit `sheddable` requests may fill: half, so that under overload the other
/// half is kept for the requests that matter, while a quiet upstream still serves sheddable
/// work at full speed.
pub(crate) const SHARE_SHEDDABLE: f64 = 0.5;

/// Share of the limit `normal` requests may fill: 90 %, keeping the last tenth for `critical`
/// requests, which then get in even when normal traffic alone would fill the limit.
pub(crate) const SHARE_NORMAL: f64 = 0.9;

/// The class of a route's requests: `normal`, so that a config that says nothing about
/// priorities treats every request alike (and without a priority header, every request of a
/// route has one class, which may fill the whole limit).
pub(crate) const PRIORITY: Priority = Priority::Normal;

/// Circuit breaker off: opening a breaker turns errors into refusals, which should be a choice.
pub(crate) const BREAKER_ENABLED: bool = false;

/// Breaker window: long enough to hold a meaningful sample, short enough to react within
/// seconds.
pub(crate) const BREAKER_WINDOW: Duration = Duration::from_secs(10);

/// Fewest requests in the window before the breaker may open, so that two failures out of two
/// requests at night do not cut a route off.
pub(crate) const BREAKER_MIN_REQUESTS: u32 = 20;

/// Failure ratio that opens the breaker: a majority of failures means the upstream is broken,
/// not unlucky.
pub(crate) const BREAKER_FAILURE_RATIO: f64 = 0.5;

/// How long the breaker stays open before probing: gives a restarting app time to come up.
pub(crate) const BREAKER_OPEN_FOR: Duration = Duration::from_secs(10);

/// Probes let through while half-open: more than one, so a single lucky request does not close
/// the breaker; few enough not to swamp a recovering app.
pub(crate) const BREAKER_HALF_OPEN_REQUESTS: u32 = 3;

/// Status codes that count as failures: the ones meaning "the upstream could not serve", not
/// "the request was wrong" (4xx) or "the handler has a bug" (500).
pub(crate) const BREAKER_FAILURE_CODES: [u16; 3] = [502, 503, 504];

/// Maintenance off.
pub(crate) const MAINTENANCE_ENABLED: bool = false;

/// Retries off: retrying is only safe when the operator knows the route is idempotent.
pub(crate) const RETRY_ATTEMPTS: u32 = 0;

/// Base retry backoff: long enough to skip a momentary blip (a connection being replaced),
/// short against typical route timeouts.
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Retry budget: retries may add at most 20% load, so that they cannot multiply an overload.
pub(crate) const RETRY_BUDGET: f64 = 0.2;

/// Retries allowed per second whatever the traffic: one, as Finagle and Linkerd do. Without a
/// floor a quiet route never retries (a budget of 0.2 needs five requests in the window before
/// the first retry), and one retry a second cannot multiply an outage.
pub(crate) const RETRY_MIN_PER_SECOND: f64 = 1.0;

/// How long readiness fails before listeners close: about one readiness-probe period plus
/// endpoint propagation, so load balancers stop sending before spillway stops accepting.
pub(crate) const DRAIN_DELAY: Duration = Duration::from_secs(5);

/// How long in-flight requests get after that: the default route timeout, so a request that
/// started just before shutdown can still finish (set the orchestrator's grace period above
/// `drain_delay + drain_timeout`).
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// ALPN offered by TLS listeners: HTTP/2 preferred, HTTP/1.1 for everything else.
pub(crate) const TLS_ALPN: [&str; 2] = ["h2", "http/1.1"];

/// The effective policy of a route when neither `defaults` nor the route set anything.
pub(crate) fn policy() -> PolicySettings {
    PolicySettings {
        timeout: TIMEOUT,
        retry_after: RETRY_AFTER,
        concurrency: ConcurrencySettings {
            limit: LimitSettings::Fixed(CONCURRENCY_MAX),
            queue: QUEUE,
            queue_timeout: QUEUE_TIMEOUT,
            queue_target: QUEUE_TARGET,
            queue_interval: QUEUE_INTERVAL,
            shares: Shares {
                sheddable: SHARE_SHEDDABLE,
                normal: SHARE_NORMAL,
            },
        },
        circuit_breaker: BreakerSettings {
            enabled: BREAKER_ENABLED,
            window: BREAKER_WINDOW,
            min_requests: BREAKER_MIN_REQUESTS,
            failure_ratio: BREAKER_FAILURE_RATIO,
            open_for: BREAKER_OPEN_FOR,
            half_open_requests: BREAKER_HALF_OPEN_REQUESTS,
            failure_codes: BREAKER_FAILURE_CODES.to_vec(),
        },
        maintenance: MaintenanceSettings {
            enabled: MAINTENANCE_ENABLED,
            retry_after: RETRY_AFTER,
        },
        retries: RetrySettings {
            attempts: RETRY_ATTEMPTS,
            backoff: RETRY_BACKOFF,
            budget: RETRY_BUDGET,
            min_per_second: RETRY_MIN_PER_SECOND,
        },
        priority: PRIORITY,
        priority_header: None,
    }
}
