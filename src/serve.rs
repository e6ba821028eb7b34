//! Serving connections: hyper directly (not `axum::serve`), for what axum does not offer.
//!
//! - A connection whose request headers have not all arrived within [`Limits::header_timeout`]
//!   of the server starting to wait for them (a new connection, or an idle kept-alive one) is
//!   closed: slow clients cannot hold connections open.
//! - At most [`Limits::max_connections`] are open at once, WebSockets included, so the server
//!   never runs out of file descriptors. When all are taken, a new connection takes the place
//!   of the oldest one that has not yet sent a request (the connections a slow-headers attack
//!   holds), so a health check still gets through; if every connection is in use, the new one
//!   is closed at once.
//! - On shutdown, the listener stops and every connection finishes its current request.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` is cancelled. Returns the (closed) tracker of
/// the connections still finishing, to wait on.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> TaskTracker {
    let admission = Arc::new(Admission {
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        waiting: Mutex::new(VecDeque::new()),
        max: limits.max_connections,
    });
    let connections = TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    // Out of file descriptors, most often: wait a moment, keep serving the
                    // connections already open.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let permit = match Arc::clone(&admission.permits).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if admission.evict_oldest_waiting() => None,
            Err(_) => {
                tracing::warn!(
                    max = limits.max_connections,
                    "every connection is in use; closing a new one"
                );
                continue;
            }
        };
        // Streaming sends many small frames: Nagle's algorithm would hold each one back for
        // the previous one's acknowledgement.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        let admission = Arc::clone(&admission);
        let app = app.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let permit = match permit {
                Some(permit) => permit,
                // The evicted connection's place, free as soon as its task has ended.
                None => match Arc::clone(&admission.permits).acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let place = admission.wait_for_request();
            serve_connection(tcp, permit, app, limits.header_timeout, &place, stop).await;
            place.served.store(true, Ordering::Relaxed);
        });
    }
    drop(listener);
    connections.close();
    connections
}

async fn serve_connection(
    tcp: TcpStream,
    permit: OwnedSemaphorePermit,
    app: Router,
    header_timeout: Duration,
    place: &Waiting,
    stop: CancellationToken,
) {
    let served = Arc::clone(&place.served);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        served.store(true, Ordering::Relaxed);
        let mut app = app.clone();
        async move {
            Ok::<_, Infallible>(
                tower_service::Service::call(&mut app, request)
                    .await
                    .unwrap_or_else(|never| match never {}),
            )
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let io = TokioIo::new(Counted {
        inner: tcp,
        _permit: permit,
    });
    let connection = builder.serve_connection(io, service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            return;
        }
        // Dropping it closes the socket.
        _ = place.evict.cancelled() => return,
        _ = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Who may connect: the places, and the connections that have not sent a request yet, oldest
/// first.
struct Admission {
    permits: Arc<Semaphore>,
    waiting: Mutex<VecDeque<Waiting>>,
    max: usize,
}

#[derive(Clone)]
struct Waiting {
    /// Set at its first request (and when it ends): no longer evictable.
    served: Arc<AtomicBool>,
    evict: CancellationToken,
}

impl Admission {
    fn wait_for_request(&self) -> Waiting {
        let place = Waiting {
            served: Arc::new(AtomicBool::new(false)),
            evict: CancellationToken::new(),
        };
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.len() >= 2 * self.max {
            waiting.retain(|w| !w.served.load(Ordering::Relaxed));
        }
        waiting.push_back(place.clone());
        place
    }

    /// Closes the oldest connection still waiting for its first request; `false` if there is
    /// none.
    fn evict_oldest_waiting(&self) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(oldest) = waiting.pop_front() {
            if !oldest.served.swap(true, Ordering::Relaxed) {
                tracing::debug!("every connection is in use; closing the oldest idle one");
                oldest.evict.cancel();
                return true;
            }
        }
        false
    }
}

/// A socket that holds its place among the connections for as long as it is open, through a
/// WebSocket upgrade too (the upgraded connection owns it).
struct Counted {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
