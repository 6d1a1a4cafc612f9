//! The scripted upstream: a raw TCP upstream that answers each request with the exact bytes a
//! test picks for it, records every request it received (head, decoded body, and on which
//! connection), and counts the connections it accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

use crate::common::STEP;

/// What the scripted upstream does once its reply is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Keep serving requests on the connection.
    KeepOpen,
    /// Close the connection (a FIN; a reset if request bytes were left unread).
    Close,
    /// Keep the connection open but never read from or write to it again.
    Hold,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Written in order, with a short pause between segments so they arrive in separate reads.
    segments: Vec<Vec<u8>>,
    then: Then,
    /// Whether the request body is read (by its framing) before answering.
    read_body: bool,
}

impl Reply {
    fn new(bytes: &[u8], then: Then) -> Reply {
        Reply {
            segments: vec![bytes.to_vec()],
            then,
            read_body: true,
        }
    }

    pub fn keep(bytes: &[u8]) -> Reply {
        Reply::new(bytes, Then::KeepOpen)
    }

    pub fn close(bytes: &[u8]) -> Reply {
        Reply::new(bytes, Then::Close)
    }

    pub fn hold(bytes: &[u8]) -> Reply {
        Reply::new(bytes, Then::Hold)
    }

    /// Answers after reading only the request head.
    pub fn head_only(mut self) -> Reply {
        self.read_body = false;
        self
    }

    /// Another segment, written after a pause.
    pub fn then_send(mut self, bytes: &[u8]) -> Reply {
        self.segments.push(bytes.to_vec());
        self
    }
}

/// One request head as it arrived at the scripted upstream.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub target: String,
    /// Names lowercased, values as sent, in order.
    headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// One request as the scripted upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which accepted connection it came on (1 = the first).
    pub conn: usize,
    pub head: Head,
    /// The body, decoded from its framing (empty when not read).
    pub body: Vec<u8>,
}

type Answer = dyn Fn(&Head) -> Reply + Send + Sync;

struct ScriptState {
    accepted: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    answer: Box<Answer>,
}

/// A raw TCP upstream that answers each request with the bytes `answer` picks for it.
pub struct Script {
    pub addr: SocketAddr,
    state: Arc<ScriptState>,
    _task: AbortOnDropHandle<()>,
}

impl Script {
    pub async fn start(answer: impl Fn(&Head) -> Reply + Send + Sync + 'static) -> Script {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ScriptState {
            accepted: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            answer: Box::new(answer),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Dropped with the accept task: every connection task ends with the upstream.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                let conn = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                conns.spawn(serve(sock, conn, shared.clone()));
            }
        });
        Script {
            addr,
            state,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// A scripted upstream that answers every request the same way.
    pub async fn always(reply: Reply) -> Script {
        Script::start(move |_| reply.clone()).await
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Requests received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn serve(sock: TcpStream, conn: usize, state: Arc<ScriptState>) {
    let mut io = BufReader::new(sock);
    loop {
        let Ok(Ok(Some(head))) = tokio::time::timeout(STEP, read_request_head(&mut io)).await
        else {
            return;
        };
        let reply = (state.answer)(&head);
        let body = if reply.read_body {
            match tokio::time::timeout(STEP, read_request_body(&mut io, &head)).await {
                Ok(Ok(body)) => body,
                _ => return,
            }
        } else {
            Vec::new()
        };
        // Recorded before answering: once the client has the answer, the request is on record.
        state.seen.lock().unwrap().push(Seen { conn, head, body });
        for (i, segment) in reply.segments.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if io.get_mut().write_all(segment).await.is_err() {
                return;
            }
            let _ = io.get_mut().flush().await;
        }
        match reply.then {
            Then::KeepOpen => {}
            Then::Close => {
                let _ = io.get_mut().shutdown().await;
                return;
            }
            Then::Hold => {
                tokio::time::sleep(STEP).await;
                return;
            }
        }
    }
}

/// Reads one line, CRLF included. `None` at the end of the stream.
async fn read_line(io: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    if io.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\r\n") {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    line.truncate(line.len() - 2);
    Ok(Some(line))
}

async fn read_request_head(io: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let Some(first) = read_line(io).await? else {
        return Ok(None);
    };
    let first = String::from_utf8_lossy(&first).into_owned();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let mut headers = Vec::new();
    loop {
        let line = read_line(io)
            .await?
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        if line.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let (name, value) = line
            .split_once(':')
            .ok_or(std::io::ErrorKind::InvalidData)?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Some(Head {
        method,
        target,
        headers,
    }))
}

/// Reads the request body by its framing and returns it decoded (chunked bodies strictly:
/// a malformed chunk is an error, which ends the connection unanswered).
async fn read_request_body(io: &mut BufReader<TcpStream>, head: &Head) -> std::io::Result<Vec<u8>> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    let chunked = head
        .all("transfer-encoding")
        .last()
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(io).await?.ok_or_else(invalid)?;
            let line = String::from_utf8(line).map_err(|_| invalid())?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid())?;
            if size == 0 {
                // Trailer fields, then the empty line.
                while !read_line(io).await?.ok_or_else(invalid)?.is_empty() {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            io.read_exact(&mut body[start..]).await?;
            let mut crlf = [0u8; 2];
            io.read_exact(&mut crlf).await?;
            if &crlf != b"\r\n" {
                return Err(invalid());
            }
        }
    }
    if let Some(len) = head.all("content-length").first() {
        let len: usize = len.parse().map_err(|_| invalid())?;
        body.resize(len, 0);
        io.read_exact(&mut body).await?;
    }
    Ok(body)
}
