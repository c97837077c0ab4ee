//! The one body type the proxy passes around: a forwarded body (streamed frame by frame, never
//! buffered whole) or a small one of its own, optionally observed: bytes counted, the gRPC
//! status read from trailers, and a callback when the body ends or is dropped.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};

/// What an observed body saw by its end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub bytes: u64,
    pub grpc_status: Option<u32>,
    /// Whether it reached its end (as opposed to an error or being dropped early).
    pub complete: bool,
}

type OnEnd = Box<dyn FnOnce(Seen) + Send + Sync>;

/// What a body's frames fail with: the peer's error, or the proxy's own (an idle timeout).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A stream that went longer than its idle timeout without a frame (Linkerd's
/// `timeout.linkerd.io/idle`); the proxy ends it with this error, which resets it.
#[derive(Debug)]
pub struct IdleTimeout(pub std::time::Duration);

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no data for {:?} (the route's idle timeout)", self.0)
    }
}

impl std::error::Error for IdleTimeout {}

/// An idle timeout and its timer, reset at every frame.
struct Idle {
    limit: std::time::Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// One attempt's copy of a request body kept for retries.
    Replay(ReplayAttempt),
}

pub struct Body {
    kind: Kind,
    /// Kept alive as long as the body (a stream's place on a connection).
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
    seen: Seen,
    /// Shared byte count (a request body counted for its response's record).
    counter: Option<Arc<AtomicU64>>,
    on_end: Option<OnEnd>,
    idle: Option<Idle>,
}

impl Body {
    fn of(kind: Kind) -> Self {
        Self {
            kind,
            _held: None,
            seen: Seen::default(),
            counter: None,
            on_end: None,
            idle: None,
        }
    }

    /// Ends the body with [`IdleTimeout`] if `limit` passes without a frame.
    pub fn idle_timeout(mut self, limit: std::time::Duration) -> Self {
        self.idle = Some(Idle {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        });
        self
    }

    pub fn empty() -> Self {
        Self::of(Kind::Empty)
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::of(Kind::Full(Some(bytes)))
    }

    pub fn incoming(body: Incoming) -> Self {
        Self::of(Kind::Incoming(body))
    }

    /// Counts the data bytes that pass into `counter`.
    pub fn counted(mut self, counter: Arc<AtomicU64>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Keeps `guard` alive until the body is dropped.
    pub fn holding(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self._held = Some(Box::new(guard));
        self
    }

    /// Calls `f` once, when the body ends, fails, or is dropped.
    pub fn on_end(mut self, f: impl FnOnce(Seen) + Send + Sync + 'static) -> Self {
        self.on_end = Some(Box::new(f));
        self
    }

    fn finish(&mut self, complete: bool) {
        if let Some(f) = self.on_end.take() {
            self.seen.complete = complete;
            f(self.seen);
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            Kind::Replay(attempt) => attempt.poll_frame(cx),
        };
        if let Some(idle) = &mut this.idle {
            match &polled {
                Poll::Ready(Some(Ok(_))) => {
                    let next = tokio::time::Instant::now() + idle.limit;
                    idle.timer.as_mut().reset(next);
                }
                Poll::Pending if std::future::Future::poll(idle.timer.as_mut(), cx).is_ready() => {
                    let limit = idle.limit;
                    this.finish(false);
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout(limit)))));
                }
                _ => {}
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.seen.bytes += n;
                    if let Some(c) = &this.counter {
                        c.fetch_add(n, Ordering::Relaxed);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(status) = super::grpc_status(trailers) {
                        this.seen.grpc_status = Some(status);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Incoming(body) => body.is_end_stream(),
            Kind::Replay(attempt) => attempt.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(body) => body.size_hint(),
            Kind::Replay(attempt) => attempt.size_hint(),
        }
    }
}

/// A request body kept, up to a limit, as it is sent, so that the request can be sent again
/// (a retry). Each attempt gets a [`Body`] that gives what was kept, then reads on from the
/// original. Bodies larger than the limit are sent once, and not kept.
#[derive(Clone)]
pub struct Replay(Arc<std::sync::Mutex<ReplayState>>);

struct ReplayState {
    /// The original body until it ends.
    source: Option<Body>,
    /// Its data frames read so far (while within the limit).
    data: Vec<Bytes>,
    trailers: Option<hyper::HeaderMap>,
    bytes: usize,
    limit: usize,
    ended: bool,
    /// Past the limit, or failed: cannot be sent again.
    spoiled: bool,
    /// Attempt bodies alive.
    attempts: usize,
}

pub struct ReplayAttempt {
    state: Arc<std::sync::Mutex<ReplayState>>,
    /// Data frames of `state.data` this attempt has given.
    next: usize,
    trailers_sent: bool,
}

impl Replay {
    pub fn new(body: Body, limit: usize) -> Replay {
        let ended = body.is_end_stream();
        Replay(Arc::new(std::sync::Mutex::new(ReplayState {
            source: (!ended).then_some(body),
            data: Vec::new(),
            trailers: None,
            bytes: 0,
            limit,
            ended,
            spoiled: false,
            attempts: 0,
        })))
    }

    /// The body of the next attempt.
    pub fn attempt(&self) -> Body {
        if let Ok(mut s) = self.0.lock() {
            s.attempts += 1;
        }
        Body::of(Kind::Replay(ReplayAttempt {
            state: self.0.clone(),
            next: 0,
            trailers_sent: false,
        }))
    }

    /// Whether another attempt would send the whole body: everything read so far was kept,
    /// and either the body has ended or no earlier attempt is still reading it.
    pub fn can_replay(&self) -> bool {
        self.0
            .lock()
            .is_ok_and(|s| !s.spoiled && (s.ended || s.attempts == 0))
    }
}

impl Drop for ReplayAttempt {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.attempts -= 1;
        }
    }
}

impl ReplayAttempt {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut guard) = self.state.lock() else {
            return Poll::Ready(None);
        };
        let s = &mut *guard;
        if let Some(data) = s.data.get(self.next) {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if s.ended {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(t) = &s.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    s.bytes += data.len();
                    if s.bytes > s.limit {
                        s.spoiled = true;
                        s.data = Vec::new();
                    }
                    if !s.spoiled {
                        s.data.push(data.clone());
                    }
                    self.next = s.data.len();
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    self.trailers_sent = true;
                }
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                self.trailers_sent = true;
            }
            Poll::Ready(Some(Err(_))) => s.spoiled = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.state.lock().is_ok_and(|s| {
            s.ended && self.next >= s.data.len() && (self.trailers_sent || s.trailers.is_none())
        })
    }

    fn size_hint(&self) -> SizeHint {
        let Ok(s) = self.state.lock() else {
            return SizeHint::default();
        };
        match (&s.source, s.ended, s.spoiled) {
            (_, true, false) => {
                let left: usize = s.data.iter().skip(self.next).map(Bytes::len).sum();
                SizeHint::with_exact(left as u64)
            }
            (Some(source), false, _) if self.next == 0 && s.data.is_empty() => source.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// The gRPC status a response declares in its headers (trailers-only), to be seen at its end
/// unless trailers say otherwise.
pub fn with_header_grpc_status(mut body: Body, status: Option<u32>) -> Body {
    body.seen.grpc_status = status;
    body
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use std::sync::Mutex;

    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn counts_and_reports_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let counter = Arc::new(AtomicU64::new(0));
        let body = Body::full(Bytes::from_static(b"hello"))
            .counted(counter.clone())
            .on_end(move |s| log.lock().unwrap().push(s));
        assert_eq!(body.size_hint().exact(), Some(5));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(counter.load(Ordering::Relaxed), 5);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].complete);
        assert_eq!(seen[0].bytes, 5);
    }

    #[tokio::test]
    async fn a_replayed_body_gives_every_attempt_the_same_bytes() {
        let replay = Replay::new(Body::full(Bytes::from_static(b"abcd")), 16);
        assert!(replay.can_replay(), "nothing read yet, no attempt alive");
        let first = replay.attempt();
        assert_eq!(first.size_hint().exact(), Some(4));
        assert!(!replay.can_replay(), "the first attempt is still reading");
        assert_eq!(&first.collect().await.unwrap().to_bytes()[..], b"abcd");
        assert!(replay.can_replay());
        let again = replay.attempt();
        assert_eq!(again.size_hint().exact(), Some(4));
        assert_eq!(&again.collect().await.unwrap().to_bytes()[..], b"abcd");
        // An attempt dropped before reading anything leaves the body whole for the next.
        let fresh = Replay::new(Body::full(Bytes::from_static(b"xy")), 16);
        drop(fresh.attempt());
        assert!(fresh.can_replay());
        assert_eq!(
            &fresh.attempt().collect().await.unwrap().to_bytes()[..],
            b"xy"
        );
        // Past the limit: sent once, never again.
        let big = Replay::new(Body::full(Bytes::from(vec![7u8; 32])), 16);
        let sent = big.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(sent.len(), 32);
        assert!(!big.can_replay());
    }

    #[test]
    fn a_dropped_body_reports_what_it_saw() {
        let seen = Arc::new(Mutex::new(None));
        let log = seen.clone();
        let body = with_header_grpc_status(Body::empty(), Some(14))
            .on_end(move |s| *log.lock().unwrap() = Some(s));
        drop(body);
        let s = seen.lock().unwrap().unwrap();
        assert_eq!((s.grpc_status, s.complete), (Some(14), true));
    }
}
