//! What one client can hold of the gateway (ADR 0020): the listener's connection limits
//! (a header read timeout, an idle timeout, a cap on connections served at once, a bounded
//! drain on shutdown) and the request rate per client.
//!
//! The listener is hyper's HTTP/1.1 connection with a timer (axum's own `serve` sets none, so
//! a client sending a header byte every few seconds was held for ever), wrapped in a reader
//! that notes when bytes last moved, so a connection that carries nothing is closed once no
//! request is in flight.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::problem::ApiError;

/// The listener's limits (`Api__HeaderReadTimeoutSeconds`, `Api__IdleTimeoutSeconds`,
/// `Api__MaxConnections`, `Api__ShutdownGraceSeconds`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl ConnLimits {
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(s.api.header_read_timeout_seconds),
            idle_timeout: Duration::from_secs(s.api.idle_timeout_seconds),
            max_connections: s.api.max_connections as usize,
            shutdown_grace: Duration::from_secs(s.api.shutdown_grace_seconds),
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self::from_settings(&crate::config::Settings::default())
    }
}

/// The address a request came in on (the listener's own), beside axum's `ConnectInfo` (the
/// peer's): `/dev/*` routes check that `Host` names it.
#[derive(Debug, Clone, Copy)]
pub struct ServedOn(pub SocketAddr);

/// A stream that notes, in milliseconds since `born`, when bytes last moved either way.
struct Watched<T> {
    inner: T,
    born: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn touch(&self) {
        self.last
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
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

/// Serves `router` on `listener` within `limits` until `shutdown`; then stops accepting, asks
/// every connection to close after its request in flight, and waits at most the shutdown
/// grace for them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        // At the cap, wait for a connection to end before accepting: new clients wait in the
        // kernel's backlog, and the timeouts below make room.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut close = close_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let born = Instant::now();
            let last = Arc::new(AtomicU64::new(0));
            let io = TokioIo::new(Watched {
                inner: stream,
                born,
                last: last.clone(),
            });
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(ServedOn(local));
                let mut router = router.clone();
                async move { tower::Service::call(&mut router, req).await }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            let mut ticks = tokio::time::interval(tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                        break;
                    }
                    _ = close.changed(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = ticks.tick(), if !closing => {
                        let quiet = born.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                        if quiet >= limits.idle_timeout {
                            tracing::debug!(%peer, "closing an idle connection");
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            grace_s = limits.shutdown_grace.as_secs(),
            "connections still open after the shutdown grace (Api__ShutdownGraceSeconds): closing them"
        );
        conns.shutdown().await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Requests per client

/// A token bucket per client address: `rate` a second, bursts of twice that.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    hops: usize,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Buckets kept before full ones are forgotten.
const MAX_TRACKED: usize = 65_536;

impl RateLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, forwarded_for_hops: u32) -> Option<Arc<Self>> {
        (per_second > 0).then(|| {
            Arc::new(Self {
                rate: per_second as f64,
                burst: 2.0 * per_second as f64,
                hops: forwarded_for_hops as usize,
                buckets: Mutex::new(HashMap::new()),
            })
        })
    }

    /// The client a request counts against: the peer, or with `hops` proxies in front, the
    /// address that many entries from the right of `X-Forwarded-For` (what the nearest proxy
    /// saw; entries further left are the client's to write).
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        if self.hops == 0 {
            return peer.map(|p| p.ip());
        }
        let all: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        all.len()
            .checked_sub(self.hops)
            .and_then(|i| all.get(i))
            .and_then(|s| s.parse().ok())
            .or_else(|| peer.map(|p| p.ip()))
    }

    /// Takes one request from `client`'s bucket: `Err(wait)` when it is empty.
    pub fn take(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&client) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + rate * now.duration_since(*at).as_secs_f64() < burst);
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(client).or_insert((self.burst, now));
        *tokens = (*tokens + self.rate * now.duration_since(*at).as_secs_f64()).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

/// Operations' probes are never limited: a load balancer's health checks come from a few
/// addresses, many times a second across targets.
const UNLIMITED: &[&str] = &["/healthz", "/readyz"];

/// The middleware: 429 with `Retry-After` past the client's rate.
pub async fn rate_limit(State(limiter): State<Option<Arc<RateLimiter>>>, req: Request, next: Next) -> Response {
    let Some(limiter) = limiter else {
        return next.run(req).await;
    };
    if UNLIMITED.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if let Some(client) = limiter.client(peer, req.headers()) {
        if let Err(wait) = limiter.take(client, Instant::now()) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut res = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                format!(
                    "more than {} requests a second from this client (Api__RequestsPerSecond); retry after {secs} s",
                    limiter.rate
                ),
            )
            .into_response();
            res.headers_mut().insert("retry-after", HeaderValue::from(secs));
            return res;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_its_rate() {
        let l = RateLimiter::new(10, 0).unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(l.take(a, t0).is_ok());
        }
        let wait = l.take(a, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.take(b, t0).is_ok(), "another client has its own bucket");
        assert!(
            l.take(a, t0 + Duration::from_millis(100)).is_ok(),
            "one more after 1/rate"
        );
        assert!(l.take(a, t0 + Duration::from_millis(100)).is_err());
        assert!(RateLimiter::new(0, 0).is_none(), "0 turns it off");
    }

    #[test]
    fn behind_proxies_the_client_is_what_the_nearest_proxy_saw() {
        let peer = Some("10.1.2.3:4000".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        let behind_one = RateLimiter::new(5, 1).unwrap();
        assert_eq!(behind_one.client(peer, &h), Some("203.0.113.9".parse().unwrap()));
        let direct = RateLimiter::new(5, 0).unwrap();
        assert_eq!(
            direct.client(peer, &h),
            Some("10.1.2.3".parse().unwrap()),
            "a direct client cannot name itself"
        );
        let behind_three = RateLimiter::new(5, 3).unwrap();
        assert_eq!(behind_three.client(peer, &h), Some("10.1.2.3".parse().unwrap()));
    }
}
