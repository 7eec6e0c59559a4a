//! The gateway's one listener on the projector's `NOTIFY` channel ([`Hub`]): every change of
//! every tenant, broadcast to the WebSocket sessions (`ws`), which keep their own tenant's.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// One read-model change, as the projector announces it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Change {
    pub tenant: String,
    pub entity: String,
    pub id: String,
    pub position: i64,
    /// The trace of the change (the projector's apply of its event), when it says.
    #[serde(default)]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Signal {
    Change(Arc<Change>),
    /// The listener lost its connection: changes may have been missed, so sessions read
    /// again from their last position.
    Resync,
}

/// The process's one listener on the projector's channel.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<Signal>,
}

impl Hub {
    /// Starts listening. `capacity` bounds how far a socket may fall behind.
    pub fn start(pool: sqlx::PgPool, capacity: usize, shutdown: CancellationToken) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let hub = Self { tx: tx.clone() };
        tokio::spawn(async move {
            loop {
                let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for read-model changes; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = shutdown.cancelled() => return,
                        }
                    }
                };
                if let Err(e) = listener.listen(mira_projections::projector::CHANNEL).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    continue;
                }
                // Anything committed while no listener ran is caught up by the sessions.
                let _ = tx.send(Signal::Resync);
                loop {
                    let next = tokio::select! {
                        n = listener.try_recv() => n,
                        _ = shutdown.cancelled() => return,
                    };
                    match next {
                        Ok(Some(n)) => match serde_json::from_str::<Change>(n.payload()) {
                            Ok(c) => {
                                let _ = tx.send(Signal::Change(Arc::new(c)));
                            }
                            Err(e) => tracing::warn!(error = %e, "unreadable read-model notification"),
                        },
                        // The connection dropped; the listener reconnects on the next call.
                        Ok(None) => {
                            let _ = tx.send(Signal::Resync);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "read-model listener failed; reconnecting");
                            break;
                        }
                    }
                }
            }
        });
        hub
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.tx.subscribe()
    }
}
