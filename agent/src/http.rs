//! Serving HTTP to callers railnet does not trust, within bounds.
//!
//! The webhook (any pod can reach its Service), the controller's and the
//! agent's `/metrics` (on the node's address) answer whoever connects.
//! Whatever those callers do — connect and say nothing, send a header a
//! byte a second, open connections by the hundred — the server keeps
//! answering the API server and Prometheus: every connection has a
//! handshake deadline, a header deadline, a deadline per request and a
//! lifetime; connections beyond a cap are closed at once; a failing
//! `accept` (out of file descriptors) backs off instead of spinning.

use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// The bounds of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; more are closed as they arrive.
    pub connections: usize,
    /// From accept to a finished TLS handshake.
    pub handshake: Duration,
    /// To receive a request's whole header (one request per connection:
    /// no keep-alive, see [`serve`]).
    pub header: Duration,
    /// From a request's header to its answer (its body read included).
    pub request: Duration,
    /// A connection is closed (after the request in flight) this long
    /// after it was opened, however busy.
    pub lifetime: Duration,
}

impl Default for Limits {
    /// What the API server and Prometheus need with room to spare: they
    /// open a few connections and send a request as soon as they connect.
    fn default() -> Self {
        Self {
            connections: 64,
            handshake: Duration::from_secs(5),
            header: Duration::from_secs(5),
            request: Duration::from_secs(10),
            lifetime: Duration::from_secs(300),
        }
    }
}

/// What turns an accepted TCP connection into the stream HTTP is spoken
/// on: nothing for plain HTTP, a TLS handshake for the webhook.
pub trait Handshake: Send + Sync + 'static {
    /// The stream after the handshake.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Does the handshake (bounded by the caller).
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Plain HTTP.
pub struct Plain;

impl Handshake for Plain {
    type Stream = TcpStream;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

impl Handshake for tokio_rustls::TlsAcceptor {
    type Stream = tokio_rustls::server::TlsStream<TcpStream>;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<Self::Stream> {
        self.accept(tcp).await
    }
}

/// An answer with `status`, a content type and a body.
pub fn reply(status: u16, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", kind)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

/// Serves `handler` on `listener` within `limits` until the task is
/// dropped.
pub async fn serve<H, F, Fut>(listener: TcpListener, limits: Limits, handshake: H, handler: F)
where
    H: Handshake,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handshake = Arc::new(handshake);
    let open = Arc::new(Semaphore::new(limits.connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, most likely: accepting again at
                // once would spin; the connections that exist end within
                // their deadlines.
                tracing::warn!(error = %e, "accept failed; again in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!(%peer, cap = limits.connections, "too many connections; closed");
            drop(tcp);
            continue;
        };
        let (handshake, handler) = (handshake.clone(), handler.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream =
                match tokio::time::timeout(limits.handshake, handshake.handshake(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no handshake in time; closed");
                        return;
                    }
                };
            let service = service_fn(move |req| {
                let answer = handler(req);
                async move {
                    Ok::<_, Infallible>(
                        tokio::time::timeout(limits.request, answer)
                            .await
                            .unwrap_or_else(|_| {
                                reply(503, "text/plain", "the request took too long\n")
                            }),
                    )
                }
            });
            // One request per connection (`Connection: close`): an idle
            // keep-alive connection is closed by the header deadline, and a
            // client that sends its next request just then (the API server
            // calling the webhook a few seconds after the last pod) gets
            // "use of closed network connection" for a POST it will not
            // retry — a pod refused for nothing. Seen in the cluster test.
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .title_case_headers(true)
                .header_read_timeout(limits.header)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(limits.lifetime) => {}
            }
            conn.as_mut().graceful_shutdown();
            // Elapsed: the connection is dropped (closed) here anyway.
            let _ = tokio::time::timeout(limits.request, conn).await;
        });
    }
}
