//! `GET /ws` (DESIGN §7): live `job.updated` and `slide.updated` for the caller's tenant.
//!
//! One [`Hub`](super::hub::Hub) per gateway process listens on the projector's `NOTIFY` channel, so every
//! instance sees every change whichever instance's projector made it. `NOTIFY` payloads
//! bypass row-level security; each socket keeps only its own tenant's changes and reads the
//! row itself through the tenant-scoped query layer. Every message carries a resume `cursor`:
//! a client that reconnects with `?since=<cursor>` first gets the current state of everything
//! that changed after it, then the live stream. The cursor is the read model's position sealed
//! under a key from the keyring (ChaCha20-Poly1305, bound to the tenant): opaque, so a tenant
//! cannot read the volume of every other tenant's work from it, and any gateway opens it.
//! Buffers are bounded: a socket that falls more than `Realtime__ClientBuffer` changes behind,
//! or does not take a message within `Realtime__SendTimeoutSeconds`, is closed with code 4008
//! and reconnects with `since`.
//!
//! The session is written over `Sink`/`Stream`, so its rules are tested without a socket.

use std::collections::HashMap;
use std::time::Duration;
use tracing::Instrument;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast;

use super::auth::Identity;
use super::extract::ApiQuery;
use super::hub::{Change, Signal};
use super::problem::{ApiError, ApiResult, Reads};
use super::state::{AppState, READERS};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The subprotocol a client offers alongside its token.
pub const PROTOCOL: &str = "mira.v1";
/// Close code for a client that cannot keep up.
pub const CLOSE_SLOW: u16 = 4008;
/// Close code at the token's `exp`: the client reconnects with a fresh token and `since`.
pub const CLOSE_EXPIRED: u16 = 4001;
/// Rows of each kind read per catch-up query.
pub const CATCH_UP_PAGE: i64 = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// The ID token, for a browser, which cannot set a header on a WebSocket (or the
    /// `Sec-WebSocket-Protocol` offer).
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub access_token: Option<String>,
    /// Resume after this cursor (one a message of this API carried).
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub since: Option<String>,
}

/// The keyring subject whose data key seals resume cursors.
pub const CURSOR_KEY_SUBJECT: &str = "mira:ws-cursor";

/// Seals and opens resume cursors: a position sealed (`super::sealed`) with the tenant as
/// associated data.
#[derive(Debug)]
pub struct Cursors {
    sealing: super::sealed::Sealing,
}

impl Cursors {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            sealing: super::sealed::Sealing::new(key),
        }
    }

    /// A cursor for `position`; empty (a cursor that opens to nothing, so the client catches up
    /// from the start) in the never-seen case of no random nonce.
    pub fn seal(&self, tenant: &str, position: i64) -> String {
        self.sealing
            .seal(tenant.as_bytes(), &position.to_be_bytes())
            .unwrap_or_default()
    }

    /// The position a cursor of `tenant` holds; `None` for anything this API did not give
    /// that tenant.
    pub fn open(&self, tenant: &str, cursor: &str) -> Option<i64> {
        let plain = self.sealing.open(tenant.as_bytes(), cursor)?;
        Some(i64::from_be_bytes(plain.try_into().ok()?))
    }

    /// A message as the client gets it: its `position` replaced by a sealed `cursor`.
    fn outgoing(&self, tenant: &str, msg: Message) -> Message {
        let Message::Text(text) = &msg else {
            return msg;
        };
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
            return msg;
        };
        let Some(p) = v
            .as_object_mut()
            .and_then(|o| o.remove("position"))
            .and_then(|p| p.as_i64())
        else {
            return msg;
        };
        v["cursor"] = serde_json::Value::String(self.seal(tenant, p));
        Message::Text(v.to_string().into())
    }
}

/// The token from `Sec-WebSocket-Protocol` (`mira.v1, <token>`) or `?access_token=`.
fn token(headers: &HeaderMap, q: &WsQuery) -> Option<String> {
    let offered = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| *p != PROTOCOL && p.matches('.').count() == 2)
        .map(str::to_owned);
    offered.or_else(|| q.access_token.clone())
}

/// The largest message a client may send.
pub const MAX_CLIENT_MESSAGE: usize = 4096;
/// The live feed.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(handler))
}

#[utoipa::path(get, operation_id = "live_updates", path = "/ws",
    summary = "Live updates: a WebSocket that pushes the tenant's job and slide changes (DESIGN §7)",
    params(WsQuery),
    responses((status = 101, description = "switching to the WebSocket protocol"), Reads))]
pub async fn handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<WsQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let token = token(&headers, &q).ok_or(ApiError::unauthenticated())?;
    let who = state.auth.verify(&token).await.map_err(|e| {
        tracing::debug!(reason = %e, "WebSocket token refused");
        ApiError::invalid_token(e.reason())
    })?;
    who.require(READERS)?;
    let upgrade = upgrade.map_err(|r| ApiError::bad_request(format!("not a WebSocket upgrade: {}", r.body_text())))?;
    let hub = state
        .hub
        .clone()
        .ok_or_else(|| ApiError::unavailable("live updates are not running"))?;
    let key = state
        .cursor_key
        .get_or_try_init(|| async { state.keyring.key_for(CURSOR_KEY_SUBJECT).await })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the cursor key is unavailable");
            ApiError::unavailable("the keyring")
        })?;
    let cursors = std::sync::Arc::new(Cursors::new(key));
    let since = match q.since.as_deref() {
        None => None,
        Some(c) => Some(
            cursors
                .open(who.tenant.as_str(), c)
                .ok_or_else(|| ApiError::bad_request("since: not a cursor this API gave you"))?,
        ),
    };
    let rx = hub.subscribe();
    let cfg = state.limits;
    Ok(upgrade
        .protocols([PROTOCOL])
        // Clients have nothing to say on this socket (it only pushes); a message beyond a few
        // kilobytes closes it instead of being buffered and ignored.
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket: WebSocket| async move {
            let (sink, stream) = socket.split();
            let tenant = who.tenant.as_str().to_owned();
            let sink = sink.with(move |m: Message| {
                futures_util::future::ready(Ok::<_, axum::Error>(cursors.outgoing(&tenant, m)))
            });
            let open = metrics::gauge!("mira_ws_connections");
            open.increment(1.0);
            let end = session(sink, stream, Source(state), who, since, rx, cfg.ws_send_timeout).await;
            open.decrement(1.0);
            tracing::debug!(?end, "WebSocket closed");
        })
        .into_response())
}

/// Where a session reads rows: the tenant-scoped query layer (a trait so the session's rules
/// can be tested without a database).
#[async_trait::async_trait]
pub trait Rows: Send + Sync {
    /// The message for `change`, or `None` if the row is not visible to `who`.
    async fn message(&self, who: &Identity, change: &Change) -> Result<Option<(i64, serde_json::Value)>, String>;
    /// Messages for up to `limit` jobs changed after `position`, oldest change first.
    async fn jobs_since(&self, who: &Identity, position: i64, limit: i64) -> Result<Vec<Keyed>, String>;
    /// Messages for up to `limit` slides changed after `position`, oldest change first.
    async fn slides_since(&self, who: &Identity, position: i64, limit: i64) -> Result<Vec<Keyed>, String>;
    /// The current read-model position.
    async fn position(&self) -> Result<i64, String>;
    /// Rows of each kind per catch-up query.
    fn page(&self) -> i64 {
        CATCH_UP_PAGE
    }
}

/// A message with the key of the row it is about (`job:<id>`, `slide:<id>`) and its position.
pub type Keyed = (String, i64, serde_json::Value);

/// One page of catch-up after `position`: the messages of both lists, oldest first, and, when
/// a list filled its page, the position up to which the page is complete. A list that filled
/// its page may have more rows after its last one, so messages of the other list beyond that
/// point wait for the next page (sending them now would move the resume point past rows never
/// sent).
async fn catch_up_page<D: Rows>(rows: &D, who: &Identity, position: i64) -> Result<(Vec<Keyed>, Option<i64>), String> {
    let limit = rows.page();
    let jobs = rows.jobs_since(who, position, limit).await?;
    let slides = rows.slides_since(who, position, limit).await?;
    let end = |l: &[Keyed]| (l.len() as i64 >= limit).then(|| l.last().map(|m| m.1)).flatten();
    let complete_to = match (end(&jobs), end(&slides)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut out: Vec<Keyed> = jobs.into_iter().chain(slides).collect();
    if let Some(upto) = complete_to {
        out.retain(|m| m.1 <= upto);
    }
    out.sort_by_key(|m| m.1);
    Ok((out, complete_to))
}

pub struct Source(pub AppState);

#[async_trait::async_trait]
impl Rows for Source {
    async fn message(&self, who: &Identity, c: &Change) -> Result<Option<(i64, serde_json::Value)>, String> {
        let Ok(id) = uuid::Uuid::parse_str(&c.id) else {
            return Ok(None);
        };
        let s = &self.0;
        match c.entity.as_str() {
            "job" => match s.read.job(&who.tenant, id).await.map_err(|e| e.to_string())? {
                Some(j) => {
                    let shown = super::jobs::shown_jobs(s, who, std::slice::from_ref(&j))
                        .await
                        .map_err(|e| format!("{e:?}"))?;
                    Ok(shown.into_iter().next().map(|v| {
                        (
                            j.position,
                            json!({"type": "job.updated", "position": j.position, "job": v}),
                        )
                    }))
                }
                None => Ok(None),
            },
            "slide" => match s.read.slide(&who.tenant, id).await.map_err(|e| e.to_string())? {
                Some(r) => {
                    let p = r.position;
                    let v = super::slides::view(s, r).await;
                    Ok(Some((
                        p,
                        json!({"type": "slide.updated", "position": p, "slide": super::public::public_view(&v)}),
                    )))
                }
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }

    async fn jobs_since(&self, who: &Identity, position: i64, limit: i64) -> Result<Vec<Keyed>, String> {
        let rows = self
            .0
            .read
            .jobs_since(&who.tenant, position, limit)
            .await
            .map_err(|e| e.to_string())?;
        let shown = super::jobs::shown_jobs(&self.0, who, &rows)
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(rows
            .iter()
            .zip(shown)
            .map(|(j, v)| {
                (
                    format!("job:{}", j.job_id),
                    j.position,
                    json!({"type": "job.updated", "position": j.position, "job": v}),
                )
            })
            .collect())
    }

    async fn slides_since(&self, who: &Identity, position: i64, limit: i64) -> Result<Vec<Keyed>, String> {
        let s = &self.0;
        let mut out = Vec::new();
        for r in s
            .read
            .slides_since(&who.tenant, position, limit)
            .await
            .map_err(|e| e.to_string())?
        {
            let key = format!("slide:{}", r.slide_id);
            let p = r.position;
            let v = super::slides::view(s, r).await;
            out.push((
                key,
                p,
                json!({"type": "slide.updated", "position": p, "slide": super::public::public_view(&v)}),
            ));
        }
        Ok(out)
    }

    async fn position(&self) -> Result<i64, String> {
        self.0.read.position().await.map_err(|e| e.to_string())
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    /// Closed with [`CLOSE_SLOW`].
    Slow,
    /// Closed with [`CLOSE_EXPIRED`] at the token's `exp`.
    Expired,
    ServerStopping,
    Failed(String),
}

async fn send<S>(sink: &mut S, msg: Message, timeout: Duration) -> Result<(), End>
where
    S: Sink<Message> + Unpin,
{
    match tokio::time::timeout(timeout, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::ClientClosed),
        Err(_) => Err(End::Slow),
    }
}

async fn close_with<S: Sink<Message> + Unpin>(sink: &mut S, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), sink.send(Message::Close(Some(frame)))).await;
}

/// Sends every message after `from` that is newer than what this session already sent.
async fn catch_up<S, D>(
    sink: &mut S,
    rows: &D,
    who: &Identity,
    from: i64,
    sent: &mut HashMap<String, i64>,
    timeout: Duration,
) -> Result<i64, End>
where
    S: Sink<Message> + Unpin,
    D: Rows,
{
    let (mut high, mut after) = (from, from);
    loop {
        let (page, complete_to) = catch_up_page(rows, who, after).await.map_err(End::Failed)?;
        for (key, position, msg) in page {
            high = high.max(position);
            if sent.get(&key).is_some_and(|p| *p >= position) {
                continue;
            }
            sent.insert(key, position);
            send(sink, Message::Text(msg.to_string().into()), timeout).await?;
        }
        match complete_to {
            Some(p) if p > after => {
                after = p;
                high = high.max(p);
            }
            _ => return Ok(high),
        }
    }
}

/// One client's session: hello, catch-up from `since`, then live changes of its tenant.
pub async fn session<S, R, E, D>(
    mut sink: S,
    mut incoming: R,
    rows: D,
    who: Identity,
    since: Option<i64>,
    mut rx: broadcast::Receiver<Signal>,
    send_timeout: Duration,
) -> End
where
    S: Sink<Message> + Unpin,
    R: Stream<Item = Result<Message, E>> + Unpin,
    D: Rows,
{
    let mut sent: HashMap<String, i64> = HashMap::new();
    // The socket lives no longer than its token.
    let left = (who.expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
    let expiry = tokio::time::sleep(left);
    tokio::pin!(expiry);
    let result: Result<End, End> = async {
        let now = rows.position().await.map_err(End::Failed)?;
        let hello = json!({"type": "hello", "tenant": who.tenant.as_str(), "position": now});
        send(&mut sink, Message::Text(hello.to_string().into()), send_timeout).await?;
        let mut high = match since {
            Some(p) => catch_up(&mut sink, &rows, &who, p, &mut sent, send_timeout).await?,
            None => now,
        };
        loop {
            tokio::select! {
                signal = rx.recv() => match signal {
                    Ok(Signal::Change(c)) => {
                        if c.tenant != who.tenant.as_str() {
                            continue;
                        }
                        let key = format!("{}:{}", c.entity, c.id);
                        if sent.get(&key).is_some_and(|p| *p >= c.position) {
                            continue;
                        }
                        if let Some((position, msg)) = rows.message(&who, &c).await.map_err(End::Failed)? {
                            if sent.get(&key).is_some_and(|p| *p >= position) {
                                continue;
                            }
                            sent.insert(key, position);
                            high = high.max(position);
                            let span = tracing::info_span!("ws.push", entity = %c.entity);
                            if let Some(tp) = &c.traceparent {
                                mira_telemetry::follow(&span, tp);
                            }
                            send(&mut sink, Message::Text(msg.to_string().into()), send_timeout)
                                .instrument(span)
                                .await?;
                        }
                    }
                    Ok(Signal::Resync) => {
                        high = catch_up(&mut sink, &rows, &who, high, &mut sent, send_timeout).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(End::Slow),
                    Err(broadcast::error::RecvError::Closed) => return Ok(End::ServerStopping),
                },
                m = incoming.next() => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(End::ClientClosed),
                    Some(Ok(_)) => {}
                },
                _ = &mut expiry => return Ok(End::Expired),
            }
        }
    }
    .await;
    let end = match result {
        Ok(e) | Err(e) => e,
    };
    match end {
        End::Slow => {
            metrics::counter!("mira_ws_dropped_slow_clients_total").increment(1);
            close_with(&mut sink, CLOSE_SLOW, "too slow: reconnect with ?since=<last cursor>").await
        }
        End::Expired => {
            close_with(
                &mut sink,
                CLOSE_EXPIRED,
                "token expired: reconnect with a fresh token and ?since=<last cursor>",
            )
            .await
        }
        _ => {}
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cursors_are_opaque_and_open_only_for_their_tenant() {
        let c = Cursors::new(&[7u8; 32]);
        let a = c.seal("lab-a", 41);
        let b = c.seal("lab-a", 41);
        assert_ne!(a, b, "two cursors of one position differ");
        assert!(!a.contains("41"), "{a}");
        assert_eq!(c.open("lab-a", &a), Some(41));
        assert_eq!(c.open("lab-b", &a), None, "another tenant's cursor");
        assert_eq!(c.open("lab-a", "41"), None, "a bare position");
        let mut forged = a.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            c.open("lab-a", std::str::from_utf8(&forged).unwrap()),
            None,
            "a changed cursor"
        );
        assert_eq!(Cursors::new(&[8u8; 32]).open("lab-a", &a), None, "another key");
        let out = c.outgoing(
            "lab-a",
            Message::Text(r#"{"type":"job.updated","position":41,"job":{}}"#.into()),
        );
        let Message::Text(t) = out else {
            panic!("text stays text")
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        assert!(v.get("position").is_none(), "{v}");
        assert_eq!(c.open("lab-a", v["cursor"].as_str().unwrap()), Some(41));
    }
    use std::sync::Mutex;

    /// Jobs at positions 1..=position (the last ones), and slides at `slides` positions.
    struct Fake {
        position: i64,
        slides: Vec<i64>,
        page: i64,
    }

    impl Fake {
        fn jobs(position: i64) -> Self {
            Self {
                position,
                slides: Vec::new(),
                page: CATCH_UP_PAGE,
            }
        }
    }

    fn keyed(kind: &str, p: i64) -> Keyed {
        (
            format!("{kind}:{p}"),
            p,
            json!({"type": format!("{kind}.updated"), "position": p}),
        )
    }

    #[async_trait::async_trait]
    impl Rows for Fake {
        async fn message(&self, _: &Identity, c: &Change) -> Result<Option<(i64, serde_json::Value)>, String> {
            Ok(Some((
                c.position,
                json!({"type": format!("{}.updated", c.entity), "position": c.position}),
            )))
        }
        async fn jobs_since(&self, _: &Identity, p: i64, limit: i64) -> Result<Vec<Keyed>, String> {
            Ok((p + 1..=self.position)
                .filter(|i| !self.slides.contains(i))
                .take(limit as usize)
                .map(|i| keyed("job", i))
                .collect())
        }
        async fn slides_since(&self, _: &Identity, p: i64, limit: i64) -> Result<Vec<Keyed>, String> {
            Ok(self
                .slides
                .iter()
                .filter(|i| **i > p)
                .take(limit as usize)
                .map(|i| keyed("slide", *i))
                .collect())
        }
        async fn position(&self) -> Result<i64, String> {
            Ok(self.position)
        }
        fn page(&self) -> i64 {
            self.page
        }
    }

    fn who(t: &str) -> Identity {
        Identity {
            subject: "u".into(),
            tenant: mira_events::TenantId::parse(t).unwrap(),
            roles: vec![super::super::auth::Role::Pathologist],
            expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
        }
    }

    fn change(t: &str, p: i64) -> Signal {
        Signal::Change(Arc::new(Change {
            tenant: t.into(),
            entity: "job".into(),
            id: format!("{p}"),
            position: p,
            traceparent: None,
        }))
    }

    /// A sink that records what it is sent.
    fn recorder() -> (impl Sink<Message, Error = ()> + Unpin, Arc<Mutex<Vec<Message>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let sink = futures_util::sink::unfold((), move |_, m: Message| {
            let l = l.clone();
            async move {
                l.lock().unwrap().push(m);
                Ok::<_, ()>(())
            }
        });
        (Box::pin(sink), log)
    }

    fn texts(log: &Arc<Mutex<Vec<Message>>>) -> Vec<serde_json::Value> {
        log.lock()
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn only_the_tenants_changes_reach_it_after_a_catch_up() {
        let (tx, _) = broadcast::channel(16);
        let rx = tx.subscribe();
        let (sink, log) = recorder();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = Box::pin(futures_util::stream::once(async move {
            let _ = close_rx.await;
            Ok::<_, ()>(Message::Close(None))
        }));
        let task = tokio::spawn(session(
            sink,
            incoming,
            Fake::jobs(3),
            who("lab-a"),
            Some(1),
            rx,
            Duration::from_secs(1),
        ));
        tx.send(change("lab-b", 4)).unwrap();
        tx.send(change("lab-a", 5)).unwrap();
        tx.send(change("lab-a", 3)).unwrap(); // already sent by the catch-up
        tokio::time::sleep(Duration::from_millis(50)).await;
        close_tx.send(()).unwrap();
        assert_eq!(task.await.unwrap(), End::ClientClosed);
        let got: Vec<_> = texts(&log)
            .iter()
            .map(|m| (m["type"].as_str().unwrap().to_owned(), m["position"].as_i64().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("hello".into(), 3),
                ("job.updated".into(), 2),
                ("job.updated".into(), 3),
                ("job.updated".into(), 5)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_closed() {
        let (tx, rx) = broadcast::channel(16);
        // Takes the hello, then never completes another send.
        let taken = Arc::new(Mutex::new(0));
        let t = taken.clone();
        let sink = Box::pin(futures_util::sink::unfold((), move |_, _m: Message| {
            let t = t.clone();
            async move {
                let n = {
                    let mut n = t.lock().unwrap();
                    *n += 1;
                    *n
                };
                if n > 1 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ()>(())
            }
        }));
        let incoming = Box::pin(futures_util::stream::pending::<Result<Message, ()>>());
        let task = tokio::spawn(session(
            sink,
            incoming,
            Fake::jobs(0),
            who("lab-a"),
            None,
            rx,
            Duration::from_secs(10),
        ));
        tx.send(change("lab-a", 1)).unwrap();
        assert_eq!(task.await.unwrap(), End::Slow);
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_the_buffer_is_closed() {
        let (tx, rx) = broadcast::channel(4);
        for p in 1..=10 {
            tx.send(change("lab-a", p)).unwrap();
        }
        let (sink, log) = recorder();
        let incoming = Box::pin(futures_util::stream::pending::<Result<Message, ()>>());
        let end = session(
            sink,
            incoming,
            Fake::jobs(0),
            who("lab-a"),
            None,
            rx,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(end, End::Slow);
        let last = log.lock().unwrap().last().cloned();
        assert!(matches!(last, Some(Message::Close(Some(f))) if f.code == CLOSE_SLOW));
    }

    #[tokio::test]
    async fn catch_up_pages_through_both_lists_until_exhausted() {
        // 40 changes: slides at every third position, jobs at the rest; pages of 4 rows each.
        let slides: Vec<i64> = (1..=40).filter(|p| p % 3 == 0).collect();
        let fake = Fake {
            position: 40,
            slides: slides.clone(),
            page: 4,
        };
        let (_tx, rx) = broadcast::channel(16);
        let (sink, log) = recorder();
        let incoming = Box::pin(futures_util::stream::iter([Ok::<_, ()>(Message::Close(None))]));
        // The close is only read after the catch-up: every message before it is the catch-up.
        let end = session(sink, incoming, fake, who("lab-a"), Some(0), rx, Duration::from_secs(1)).await;
        assert_eq!(end, End::ClientClosed);
        let got: Vec<(String, i64)> = texts(&log)
            .iter()
            .skip(1)
            .map(|m| (m["type"].as_str().unwrap().to_owned(), m["position"].as_i64().unwrap()))
            .collect();
        let expected: Vec<(String, i64)> = (1..=40)
            .map(|p| {
                let kind = if slides.contains(&p) { "slide" } else { "job" };
                (format!("{kind}.updated"), p)
            })
            .collect();
        assert_eq!(got, expected, "every change once, in order, across pages");
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_is_closed_when_its_token_expires() {
        let (_tx, rx) = broadcast::channel(16);
        let (sink, log) = recorder();
        let incoming = Box::pin(futures_util::stream::pending::<Result<Message, ()>>());
        let mut w = who("lab-a");
        w.expires_at = chrono::Utc::now() + chrono::Duration::seconds(90);
        let started = tokio::time::Instant::now();
        let end = tokio::time::timeout(
            Duration::from_secs(600),
            session(sink, incoming, Fake::jobs(0), w, None, rx, Duration::from_secs(1)),
        )
        .await
        .expect("the session ends at the token's exp");
        assert_eq!(end, End::Expired);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(89) && waited <= Duration::from_secs(91),
            "{waited:?}"
        );
        let last = log.lock().unwrap().last().cloned();
        assert!(matches!(last, Some(Message::Close(Some(f))) if f.code == CLOSE_EXPIRED));
    }
}
