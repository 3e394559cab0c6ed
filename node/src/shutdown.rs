//! Shutdown and drain state. On SIGTERM readiness fails first, so load
//! balancers stop sending new clients; after `drain_delay_secs` every client
//! is closed with 4200 (pusher-js reconnects at once, to another node); the
//! process exits when connections are gone or the grace period ends.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Shutdown {
    draining: AtomicBool,
    /// Cancelled when listeners must stop accepting.
    stop: CancellationToken,
}

impl Shutdown {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn stop_accepting(&self) {
        self.stop.cancel();
    }

    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Cancelled with `stop_accepting`, for servers that take a token (the
    /// metrics port, `belfry_coordinator::metrics_server`).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
