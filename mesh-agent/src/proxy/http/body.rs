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

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
}

pub struct Body {
    kind: Kind,
    /// Kept alive as long as the body (a stream's place on a connection).
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
    seen: Seen,
    /// Shared byte count (a request body counted for its response's record).
    counter: Option<Arc<AtomicU64>>,
    on_end: Option<OnEnd>,
}

impl Body {
    fn of(kind: Kind) -> Self {
        Self {
            kind,
            _held: None,
            seen: Seen::default(),
            counter: None,
            on_end: None,
        }
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(body) => Pin::new(body).poll_frame(cx),
        };
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(body) => body.size_hint(),
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
