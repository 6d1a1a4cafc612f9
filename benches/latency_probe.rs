//! Paired open-loop latency probe: what a proxy adds to each request, measured against the
//! upstream itself under the same conditions at the same moment.
//!
//! Sequential samples (direct for 10 s, then the proxy for 10 s) cannot resolve a fraction of
//! a millisecond on a shared machine: between two samples the p99 of the upstream alone moves
//! by milliseconds. This probe sends, at each tick of a fixed schedule, one request to every
//! target, so every target lives through the same noise; and it reports, besides each
//! target's own percentiles, the distribution of the per-tick differences (target minus the
//! first, reference, target).
//!
//! ```text
//! latency_probe --rate 5000 --duration 10 --warmup 2 --conns 64 \
//!     --target direct=127.0.0.1:18180 --target spillway=127.0.0.1:18184
//! ```
//!
//! Open loop with latency correction: request `i` is due at `start + i / rate`, and its
//! latency counts from that moment, so a stall of the client or of a target is charged to the
//! requests it delayed (no coordinated omission). The ticks come from a thread of their own
//! (precise sleeps); the requests run on one single-threaded tokio runtime, `GET /` over
//! `--conns` keep-alive HTTP/1.1 connections per target (a request waits for a free one).
//! The client is a plain one (write the request, read a `Content-Length` response) so that
//! it can keep up with the rate on a shared core.
//! Within a tick the targets are sent in turn, the first one alternating, so none is
//! favoured. Everything is bounded: the run ends `duration + warmup` seconds after it starts,
//! plus at most `--drain` seconds for the last responses.
//!
//! The method's floor: pairing the upstream with itself (`--target direct=… --target
//! direct2=…`, the same address) gave +0.001 ms at p50 and +0.004 / +0.016 ms at p99 in two
//! runs at 5000 per second.
//!
//! A benchmark, not a test: `benches/load.sh` builds and runs it. With no `--target` (as under a
//! bare `cargo bench`) it prints its usage and exits.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// What the command line asks for.
struct Options {
    rate: f64,
    duration: f64,
    warmup: f64,
    conns: usize,
    drain: f64,
    targets: Vec<(String, String)>,
}

fn usage() -> &'static str {
    "usage: latency_probe --rate R --duration S [--warmup S] [--conns N] [--drain S] \
     --target NAME=HOST:PORT --target NAME=HOST:PORT ... (the first target is the reference)"
}

fn parse() -> Result<Option<Options>, String> {
    let mut o = Options {
        rate: 0.0,
        duration: 0.0,
        warmup: 2.0,
        conns: 64,
        drain: 5.0,
        targets: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--rate" => o.rate = number(value()?)?,
            "--duration" => o.duration = number(value()?)?,
            "--warmup" => o.warmup = number(value()?)?,
            "--drain" => o.drain = number(value()?)?,
            "--conns" => {
                let v = value()?;
                o.conns = v.parse().map_err(|e| format!("--conns {v}: {e}"))?
            }
            "--target" => {
                let v = value()?;
                let (name, addr) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--target {v}: expected NAME=HOST:PORT"))?;
                o.targets.push((name.to_owned(), addr.to_owned()));
            }
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.targets.is_empty() {
        return Ok(None);
    }
    if o.rate <= 0.0 || o.duration <= 0.0 || o.warmup < 0.0 || o.conns == 0 {
        return Err("--rate, --duration and --conns must be positive".into());
    }
    Ok(Some(o))
}

/// Latencies in microseconds, one slot per measured tick (`u32::MAX`: no answer).
type Samples = RefCell<Vec<u32>>;

/// One request to send: its measured slot (`None` for a warm-up tick) and when it was due.
type Job = (Option<usize>, Instant);

/// One target: its idle connections, requests waiting for one, and what was measured.
struct Target {
    name: String,
    addr: String,
    /// Idle connections' job queues.
    idle: RefCell<Vec<mpsc::UnboundedSender<Job>>>,
    /// Requests due while every connection was busy, oldest first.
    backlog: RefCell<VecDeque<Job>>,
    samples: Samples,
    errors: RefCell<u64>,
}

impl Target {
    /// Hands a due request to an idle connection, or queues it.
    fn dispatch(&self, job: Job) {
        match self.idle.borrow_mut().pop() {
            Some(conn) => {
                let _ = conn.send(job);
            }
            None => self.backlog.borrow_mut().push_back(job),
        }
    }

    /// Records how one request ended: its latency from `due` if it was measured and answered.
    fn record(&self, slot: Option<usize>, due: Instant, ok: bool) {
        if !ok {
            *self.errors.borrow_mut() += 1;
        } else if let Some(i) = slot {
            let us = u32::try_from(due.elapsed().as_micros()).unwrap_or(u32::MAX - 1);
            self.samples.borrow_mut()[i] = us;
        }
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: latency-probe\r\n\r\n";

/// One keep-alive connection: sends `GET /` for each job and reads the whole response
/// (`Content-Length` framed, as the harness's upstream answers). A connection that fails is
/// replaced by a fresh one.
async fn connection(target: Rc<Target>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let mut buf = Vec::with_capacity(4096);
    // Connected before the first tick, so no measured request pays for a handshake.
    let mut stream = open(&target.addr).await.ok();
    loop {
        // Take the oldest waiting request, or wait idle for one.
        let queued = target.backlog.borrow_mut().pop_front();
        let (slot, due) = match queued {
            Some(job) => job,
            None => {
                target.idle.borrow_mut().push(tx.clone());
                match rx.recv().await {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        if stream.is_none() {
            stream = open(&target.addr).await.ok();
        }
        let outcome = match stream.as_mut() {
            Some(s) => exchange(s, &mut buf).await.ok(),
            None => None,
        };
        target.record(slot, due, outcome.is_some());
        // A server that closes after a response (nginx does after 1000 requests per
        // connection) or a failed exchange: reconnect now, before the next request is due.
        if outcome != Some(true) {
            stream = open(&target.addr).await.ok();
        }
    }
}

async fn open(addr: &str) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// One request and its response; `Ok(false)` when the server closes the connection after it.
async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    s.write_all(REQUEST).await?;
    buf.clear();
    loop {
        if s.read_buf(buf).await? == 0 {
            return Err(bad("closed before the response ended"));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = resp.parse(buf).map_err(|_| bad("bad head"))? else {
            continue;
        };
        if resp.code != Some(200) {
            return Err(bad("not a 200"));
        }
        let length: usize = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .ok_or_else(|| bad("no content-length"))?;
        let close = resp.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
        });
        while buf.len() < head + length {
            if s.read_buf(buf).await? == 0 {
                return Err(bad("closed mid-body"));
            }
        }
        return if buf.len() == head + length {
            Ok(!close)
        } else {
            Err(bad("bytes after the response"))
        };
    }
}

/// The `p`-th percentile (nearest rank) of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(us: Option<f64>) -> String {
    us.map_or_else(|| "nan".into(), |v| format!("{:.3}", v / 1000.0))
}

fn main() {
    let options = match parse() {
        Ok(Some(o)) => o,
        Ok(None) => {
            eprintln!("{}", usage());
            return;
        }
        Err(e) => {
            eprintln!("latency_probe: {e}\n{}", usage());
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, run(&options)) {
        eprintln!("latency_probe: {e}");
        std::process::exit(1);
    }
}

async fn run(o: &Options) -> Result<(), String> {
    let period = Duration::from_secs_f64(1.0 / o.rate);
    let warmup_ticks = (o.warmup * o.rate).round() as usize;
    let measured_ticks = (o.duration * o.rate).round() as usize;
    let mut targets = Vec::new();
    for (name, addr) in &o.targets {
        // Fail early on a target that is not there.
        open(addr)
            .await
            .map_err(|e| format!("{name} ({addr}): {e}"))?;
        let t = Rc::new(Target {
            name: name.clone(),
            addr: addr.clone(),
            idle: RefCell::new(Vec::with_capacity(o.conns)),
            backlog: RefCell::new(VecDeque::new()),
            samples: RefCell::new(vec![u32::MAX; measured_ticks]),
            errors: RefCell::new(0),
        });
        for _ in 0..o.conns {
            tokio::task::spawn_local(connection(t.clone()));
        }
        targets.push(t);
    }
    // Let the connection tasks connect and register as idle (bounded).
    let ready = async {
        while targets.iter().any(|t| t.idle.borrow().len() < o.conns) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .map_err(|_| "connections were not all ready within 5 s")?;

    // The schedule, from a thread of its own: tokio's timer has a 1 ms resolution, which at
    // thousands of requests per second would send them in bursts.
    let (tick_tx, mut tick_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let total = warmup_ticks + measured_ticks;
    let ticker = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(10);
        for i in 0..total {
            let due = start + period * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tick_tx.send((i, due)).is_err() {
                return;
            }
        }
    });
    while let Some((i, due)) = tick_rx.recv().await {
        let slot = i.checked_sub(warmup_ticks);
        let n = targets.len();
        for k in 0..n {
            targets[(i + k) % n].dispatch((slot, due));
        }
    }
    ticker.join().map_err(|_| "the ticker thread panicked")?;
    // The last responses: until every connection is idle again, at most `drain` seconds.
    let drained = async {
        while targets
            .iter()
            .any(|t| t.idle.borrow().len() < o.conns || !t.backlog.borrow().is_empty())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs_f64(o.drain), drained).await;

    report(o, &targets);
    Ok(())
}

fn report(o: &Options, targets: &[Rc<Target>]) {
    let pct = |v: &[u32], q| percentile(v, q).map(f64::from);
    println!(
        "paired open loop: {} req/s to each target, {} s measured after {} s warm-up, {} connections per target",
        o.rate, o.duration, o.warmup, o.conns
    );
    println!(
        "{:<10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "target", "answered", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    // Each target's answered latencies, sorted.
    let sorted: Vec<Vec<u32>> = targets
        .iter()
        .map(|t| {
            let mut v: Vec<u32> = t
                .samples
                .borrow()
                .iter()
                .copied()
                .filter(|&x| x != u32::MAX)
                .collect();
            v.sort_unstable();
            v
        })
        .collect();
    for (t, v) in targets.iter().zip(&sorted) {
        println!(
            "{:<10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            t.name,
            v.len(),
            ms(pct(v, 50.0)),
            ms(pct(v, 90.0)),
            ms(pct(v, 99.0)),
            ms(pct(v, 99.9)),
            ms(v.last().map(|&x| f64::from(x))),
            t.errors.borrow()
        );
    }
    let (reference, base) = (&targets[0], &sorted[0]);
    let base_samples = reference.samples.borrow();
    for (t, v) in targets.iter().zip(&sorted).skip(1) {
        let samples = t.samples.borrow();
        let mut diffs: Vec<i64> = base_samples
            .iter()
            .zip(samples.iter())
            .filter(|(a, b)| **a != u32::MAX && **b != u32::MAX)
            .map(|(a, b)| i64::from(*b) - i64::from(*a))
            .collect();
        diffs.sort_unstable();
        let d = |q| percentile(&diffs, q).map(|x| x as f64);
        let added = |q| pct(v, q).zip(pct(base, q)).map(|(a, b)| a - b);
        println!(
            "added by {} (vs {}): p50 {} ms, p99 {} ms (differences of percentiles); per-tick difference p50 {} ms, p99 {} ms",
            t.name,
            reference.name,
            ms(added(50.0)),
            ms(added(99.0)),
            ms(d(50.0)),
            ms(d(99.0)),
        );
        // One machine-readable line per compared target, for scripts: its p50, p99, p99.9,
        // the reference's in the same run, the per-tick differences' p50 and p99, and how
        // many measured requests of each got no answer.
        println!(
            "RESULT\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            t.name,
            ms(pct(v, 50.0)),
            ms(pct(v, 99.0)),
            ms(pct(v, 99.9)),
            ms(pct(base, 50.0)),
            ms(pct(base, 99.0)),
            ms(pct(base, 99.9)),
            ms(d(50.0)),
            ms(d(99.0)),
            samples.len() - v.len(),
            base_samples.len() - base.len(),
        );
    }
}
