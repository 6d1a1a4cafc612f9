//! Open-loop load with a schedule and classes of request, for the shedding benchmark
//! (`benches/shedding.sh`): a constant rate, or a base rate with bursts, and a mix of
//! requests by their priority header; what came back, per class.
//!
//! ```text
//! shed_load --target 127.0.0.1:18084 --path '/delay?ms=20' --rate 1067 \
//!     --burst-rate 2133 --burst-ms 200 --period-ms 1000 --duration 15 --warmup 2 \
//!     --mix critical=0.2,sheddable=0.8 --header x-priority --conns 5000 --timeout 1
//! ```
//!
//! Open loop with latency correction, as oha's `--latency-correction`: the schedule says when
//! each request is due (per millisecond: the rate of that millisecond, with the fractions
//! carried over, so 1067/s is 1 or 2 a millisecond, exactly 1067 a second), and its latency
//! counts from that moment, so a stall of the client or the target is charged to the requests
//! it delayed. Classes are dealt out the same way (20 % critical: exactly every fifth).
//!
//! Each request goes over a keep-alive HTTP/1.1 connection: an idle one if there is one, else
//! a new one, up to `--conns`; past that it waits for one (still timed from its due time).
//! `--timeout` bounds each request from its due time; a request past it counts as a timeout and
//! its connection is closed (a proxy's queued request is then abandoned, as a client that
//! gives up does). The client is a plain one (write the request, read a `Content-Length`
//! response) so that it keeps up with thousands of requests a second on a shared core. It runs
//! on one thread; the schedule comes from a thread of its own (tokio's timer ticks every
//! millisecond). Everything is bounded: the run ends `warmup + duration` seconds after it
//! starts, plus at most `--timeout` for the last answers.
//!
//! Output: one `CLASS` line per class (tab-separated: class, sent, 2xx, 503, other status,
//! timeouts, errors, then p50, p99 and p99.9 of the 2xx latencies in ms, then the smallest,
//! median and largest `Retry-After` of its 503s and how many distinct values they had), and a
//! `TOTAL` line in the same shape, all over the measured part only.
//!
//! A benchmark, not a test: `benches/shedding.sh` builds and runs it. With no `--target` (as
//! under a bare `cargo bench`) it prints its usage and exits.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// What the command line asks for.
struct Options {
    target: String,
    path: String,
    rate: f64,
    burst_rate: f64,
    burst_ms: u64,
    period_ms: u64,
    duration: f64,
    warmup: f64,
    warmup_rate: f64,
    conns: usize,
    timeout: f64,
    header: String,
    /// Class name (the header's value; "" for none) and its share.
    mix: Vec<(String, f64)>,
    /// Where to write one line per measured request (due time, class, outcome, latency).
    trace: Option<String>,
}

fn usage() -> &'static str {
    "usage: shed_load --target HOST:PORT --rate R --duration S [--path P] [--burst-rate B \
     --burst-ms MS --period-ms MS] [--warmup S] [--warmup-rate R] [--conns N] [--timeout S] \
     [--header NAME --mix VALUE=SHARE,VALUE=SHARE...] [--trace FILE]"
}

fn parse() -> Result<Option<Options>, String> {
    let mut o = Options {
        target: String::new(),
        path: "/delay?ms=20".into(),
        rate: 0.0,
        burst_rate: 0.0,
        burst_ms: 0,
        period_ms: 1000,
        duration: 0.0,
        warmup: 2.0,
        warmup_rate: 0.0,
        conns: 5000,
        timeout: 1.0,
        header: "x-priority".into(),
        mix: Vec::new(),
        trace: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--target" => o.target = value()?,
            "--path" => o.path = value()?,
            "--rate" => o.rate = number(value()?)?,
            "--burst-rate" => o.burst_rate = number(value()?)?,
            "--burst-ms" => o.burst_ms = number(value()?)? as u64,
            "--period-ms" => o.period_ms = number(value()?)? as u64,
            "--duration" => o.duration = number(value()?)?,
            "--warmup" => o.warmup = number(value()?)?,
            "--warmup-rate" => o.warmup_rate = number(value()?)?,
            "--conns" => o.conns = number(value()?)? as usize,
            "--timeout" => o.timeout = number(value()?)?,
            "--header" => o.header = value()?,
            "--trace" => o.trace = Some(value()?),
            "--mix" => {
                for part in value()?.split(',') {
                    let (class, share) = part
                        .split_once('=')
                        .ok_or_else(|| format!("--mix {part}: expected VALUE=SHARE"))?;
                    let share = share
                        .parse::<f64>()
                        .map_err(|e| format!("--mix {part}: {e}"))?;
                    o.mix.push((class.to_owned(), share));
                }
            }
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.target.is_empty() {
        return Ok(None);
    }
    if o.rate <= 0.0 || o.duration <= 0.0 || o.conns == 0 || o.timeout <= 0.0 {
        return Err("--rate, --duration, --conns and --timeout must be positive".into());
    }
    if o.mix.is_empty() {
        o.mix.push((String::new(), 1.0));
    }
    if o.warmup_rate <= 0.0 {
        o.warmup_rate = o.rate / 2.0;
    }
    Ok(Some(o))
}

/// How one measured request ended.
#[derive(Debug, Clone, Copy)]
enum Ended {
    /// A response: its status, its latency from the due time in µs, its `Retry-After`.
    Answered {
        status: u16,
        micros: u64,
        retry_after: Option<u32>,
    },
    TimedOut,
    Failed,
}

/// One request to send: its class, whether it is measured, when it was due (and how many
/// milliseconds into the measured part).
#[derive(Debug, Clone, Copy)]
struct Job {
    class: usize,
    measured: bool,
    due: Instant,
    at_ms: u64,
}

/// The client side: idle connections, how many are open, what was measured.
struct Client {
    target: String,
    /// One request per class, ready to write.
    requests: Vec<Vec<u8>>,
    idle: RefCell<Vec<TcpStream>>,
    open: RefCell<usize>,
    max_open: usize,
    /// Connections being opened or waited for.
    waiting: RefCell<Vec<tokio::sync::oneshot::Sender<TcpStream>>>,
    results: RefCell<Vec<Vec<Ended>>>,
    /// Every measured request as (ms into the measured part, class, outcome), for `--trace`.
    trace: RefCell<Option<Vec<(u64, usize, Ended)>>>,
    timeout: Duration,
}

impl Client {
    /// An idle connection, a new one while under `max_open`, or the next one freed.
    async fn connection(&self) -> std::io::Result<TcpStream> {
        if let Some(s) = self.idle.borrow_mut().pop() {
            return Ok(s);
        }
        if *self.open.borrow() < self.max_open {
            *self.open.borrow_mut() += 1;
            match TcpStream::connect(&self.target).await {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => {
                    *self.open.borrow_mut() -= 1;
                    return Err(e);
                }
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.borrow_mut().push(tx);
        rx.await
            .map_err(|_| std::io::Error::other("client shut down"))
    }

    /// Gives a connection back: to a waiting request, or to the idle ones.
    fn release(&self, mut s: TcpStream) {
        loop {
            let next = self.waiting.borrow_mut().pop();
            match next {
                Some(tx) => match tx.send(s) {
                    Ok(()) => return,
                    Err(back) => s = back,
                },
                None => {
                    self.idle.borrow_mut().push(s);
                    return;
                }
            }
        }
    }

    /// A connection closed: makes room for a new one.
    fn closed(&self) {
        *self.open.borrow_mut() -= 1;
    }

    async fn send(self: Rc<Self>, job: Job) {
        let deadline = tokio::time::Instant::from_std(job.due + self.timeout);
        let attempt = async {
            let mut conn = Conn {
                stream: Some(self.connection().await?),
                client: &self,
            };
            let mut buf = Vec::with_capacity(1024);
            let s = conn.stream.as_mut().expect("set above");
            let (status, retry_after, keep) =
                exchange(s, &self.requests[job.class], &mut buf).await?;
            if keep {
                if let Some(s) = conn.stream.take() {
                    self.release(s);
                }
            }
            Ok::<_, std::io::Error>((status, retry_after))
        };
        let ended = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok((status, retry_after))) => Ended::Answered {
                status,
                micros: job.due.elapsed().as_micros() as u64,
                retry_after,
            },
            Ok(Err(_)) => Ended::Failed,
            Err(_) => {
                // The connection (if it had one) was dropped mid-exchange.
                Ended::TimedOut
            }
        };
        if job.measured {
            self.results.borrow_mut()[job.class].push(ended);
            if let Some(t) = self.trace.borrow_mut().as_mut() {
                t.push((job.at_ms, job.class, ended));
            }
        }
    }
}

/// A connection in use: closed (and counted as closed) on drop unless given back, also when
/// its request times out mid-exchange.
struct Conn<'a> {
    stream: Option<TcpStream>,
    client: &'a Client,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if self.stream.take().is_some() {
            self.client.closed();
        }
    }
}

/// One request and its response: status, `Retry-After`, whether the connection stays open.
async fn exchange(
    s: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, Option<u32>, bool)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    s.write_all(request).await?;
    loop {
        if s.read_buf(buf).await? == 0 {
            return Err(bad("closed before the response ended"));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = resp.parse(buf).map_err(|_| bad("bad head"))? else {
            continue;
        };
        let status = resp.code.unwrap_or(0);
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| bad("no content-length"))?;
        let retry_after = header("retry-after").and_then(|v| v.trim().parse().ok());
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        while buf.len() < head + length {
            if s.read_buf(buf).await? == 0 {
                return Err(bad("closed mid-body"));
            }
        }
        return if buf.len() == head + length {
            Ok((status, retry_after, !close))
        } else {
            Err(bad("bytes after the response"))
        };
    }
}

/// The `p`-th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn main() {
    let options = match parse() {
        Ok(Some(o)) => o,
        Ok(None) => {
            eprintln!("{}", usage());
            return;
        }
        Err(e) => {
            eprintln!("shed_load: {e}\n{}", usage());
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, run(&options)) {
        eprintln!("shed_load: {e}");
        std::process::exit(1);
    }
}

/// Requests due in millisecond `ms` (from the start of the measured part), by rate.
fn rate_at(o: &Options, ms: u64) -> f64 {
    if o.burst_ms > 0 && o.period_ms > 0 && ms % o.period_ms < o.burst_ms {
        o.burst_rate
    } else {
        o.rate
    }
}

async fn run(o: &Options) -> Result<(), String> {
    let requests = o
        .mix
        .iter()
        .map(|(class, _)| {
            let mut r = format!("GET {} HTTP/1.1\r\nHost: shed-load\r\n", o.path);
            if !class.is_empty() {
                r.push_str(&format!("{}: {class}\r\n", o.header));
            }
            r.push_str("\r\n");
            r.into_bytes()
        })
        .collect();
    let client = Rc::new(Client {
        target: o.target.clone(),
        requests,
        idle: RefCell::new(Vec::new()),
        open: RefCell::new(0),
        max_open: o.conns,
        waiting: RefCell::new(Vec::new()),
        results: RefCell::new(vec![Vec::new(); o.mix.len()]),
        trace: RefCell::new(o.trace.as_ref().map(|_| Vec::new())),
        timeout: Duration::from_secs_f64(o.timeout),
    });
    TcpStream::connect(&o.target)
        .await
        .map_err(|e| format!("{}: {e}", o.target))?;

    // The schedule, per millisecond, from a thread of its own.
    let warmup_ms = (o.warmup * 1000.0).round() as u64;
    let total_ms = warmup_ms + (o.duration * 1000.0).round() as u64;
    let shares: Vec<f64> = o.mix.iter().map(|(_, s)| *s).collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Job>>();
    let schedule = {
        let rates: Vec<f64> = (0..total_ms)
            .map(|ms| match ms.checked_sub(warmup_ms) {
                None => o.warmup_rate,
                Some(m) => rate_at(o, m),
            })
            .collect();
        std::thread::spawn(move || {
            let start = Instant::now() + Duration::from_millis(10);
            let mut carry = 0.0;
            let mut class_carry = vec![0.0; shares.len()];
            for (ms, rate) in rates.iter().enumerate() {
                let due = start + Duration::from_millis(ms as u64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                carry += rate / 1000.0;
                let n = carry.floor() as usize;
                carry -= n as f64;
                let mut jobs = Vec::with_capacity(n);
                for _ in 0..n {
                    // Deal classes out by their shares: the one furthest behind goes next.
                    for (c, s) in class_carry.iter_mut().zip(&shares) {
                        *c += s;
                    }
                    let class = (0..shares.len())
                        .max_by(|a, b| class_carry[*a].total_cmp(&class_carry[*b]))
                        .unwrap_or(0);
                    class_carry[class] -= 1.0;
                    jobs.push(Job {
                        class,
                        measured: ms as u64 >= warmup_ms,
                        due,
                        at_ms: (ms as u64).saturating_sub(warmup_ms),
                    });
                }
                if tx.send(jobs).is_err() {
                    return;
                }
            }
        })
    };
    while let Some(jobs) = rx.recv().await {
        for job in jobs {
            tokio::task::spawn_local(client.clone().send(job));
        }
    }
    schedule
        .join()
        .map_err(|_| "the schedule thread panicked")?;
    // Every request ends by its timeout: wait that long (plus a little) for the last ones.
    tokio::time::sleep(Duration::from_secs_f64(o.timeout) + Duration::from_millis(200)).await;
    report(o, &client.results.borrow());
    if let (Some(path), Some(trace)) = (&o.trace, client.trace.borrow().as_ref()) {
        let mut text = String::from("ms\tclass\tstatus\tlatency_ms\n");
        for (at, class, ended) in trace {
            let (status, latency) = match ended {
                Ended::Answered { status, micros, .. } => (
                    status.to_string(),
                    format!("{:.2}", *micros as f64 / 1000.0),
                ),
                Ended::TimedOut => ("timeout".into(), "-".into()),
                Ended::Failed => ("error".into(), "-".into()),
            };
            text.push_str(&format!("{at}\t{}\t{status}\t{latency}\n", o.mix[*class].0));
        }
        std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

fn report(o: &Options, results: &[Vec<Ended>]) {
    let mut all = Vec::new();
    for ((class, _), ended) in o.mix.iter().zip(results) {
        let name = if class.is_empty() { "all" } else { class };
        println!("{}", line("CLASS", name, ended));
        all.extend_from_slice(ended);
    }
    println!("{}", line("TOTAL", "total", &all));
}

/// `KIND name sent 2xx 503 other timeouts errors p50 p99 p99.9 ra_min ra_median ra_max ra_distinct`
fn line(kind: &str, name: &str, ended: &[Ended]) -> String {
    let (mut ok, mut c503, mut other, mut timeouts, mut failed) = (0, 0, 0, 0, 0);
    let mut lat = Vec::new();
    let mut retry_after = Vec::new();
    for e in ended {
        match *e {
            Ended::Answered {
                status,
                micros,
                retry_after: ra,
            } => match status {
                200..=299 => {
                    ok += 1;
                    lat.push(micros);
                }
                503 => {
                    c503 += 1;
                    retry_after.extend(ra);
                }
                _ => other += 1,
            },
            Ended::TimedOut => timeouts += 1,
            Ended::Failed => failed += 1,
        }
    }
    lat.sort_unstable();
    retry_after.sort_unstable();
    let ms =
        |v: Option<u64>| v.map_or_else(|| "nan".into(), |us| format!("{:.2}", us as f64 / 1000.0));
    let distinct: BTreeMap<u32, ()> = retry_after.iter().map(|v| (*v, ())).collect();
    let ra = |i: Option<&u32>| i.map_or_else(|| "-".into(), u32::to_string);
    format!(
        "{kind}\t{name}\t{}\t{ok}\t{c503}\t{other}\t{timeouts}\t{failed}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        ended.len(),
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0)),
        ms(percentile(&lat, 99.9)),
        ra(retry_after.first()),
        ra(retry_after.get(retry_after.len() / 2)),
        ra(retry_after.last()),
        distinct.len(),
    )
}
