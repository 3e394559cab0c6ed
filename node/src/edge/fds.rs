//! The file-descriptor reserve. A node out of descriptors cannot accept, so
//! new clients would wait in the kernel's backlog with no answer. Instead
//! the node keeps `fd_reserve` descriptors free: over the line, a new
//! connection is answered `503` with `Retry-After` and closed at once, so
//! clients back off and retry, and the reserve is left for health probes,
//! `/metrics` and Redis reconnects. If accept fails with EMFILE anyway, a
//! spare descriptor is given up for a moment to accept and shed one client.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use belfry_coordinator::metrics_server::Descriptors;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

use crate::telemetry;

pub struct FdBudget {
    /// Descriptors the node may use for client sockets; `usize::MAX` = no reserve.
    usable: usize,
    /// Client sockets open now, on every listener.
    open: AtomicUsize,
    /// Held open only to be closed when accept fails with EMFILE.
    spare: Mutex<Option<std::fs::File>>,
}

/// One accepted socket's share of the budget, returned on drop.
pub struct FdSlot {
    budget: Arc<FdBudget>,
}

impl Drop for FdSlot {
    fn drop(&mut self) {
        self.budget.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FdBudget {
    /// `reserve` descriptors below the soft `RLIMIT_NOFILE` stay free; the
    /// descriptors open now (listeners, Redis, logs) are counted as used.
    pub fn new(reserve: usize) -> Arc<Self> {
        let usable = match (reserve, soft_fd_limit()) {
            (0, _) | (_, None) => usize::MAX,
            (reserve, Some(limit)) => limit.saturating_sub(reserve + open_fds()),
        };
        Arc::new(Self {
            usable,
            open: AtomicUsize::new(0),
            spare: Mutex::new(std::fs::File::open("/dev/null").ok()),
        })
    }

    pub fn usable(&self) -> usize {
        self.usable
    }

    /// Counts an accepted socket; `shed` says whether it must be refused to
    /// keep the reserve. Sockets on the metrics port are never shed.
    pub fn take(self: &Arc<Self>) -> (FdSlot, bool) {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        (
            FdSlot {
                budget: self.clone(),
            },
            before >= self.usable,
        )
    }

    /// After accept failed with `e`: if it was for want of descriptors,
    /// frees the spare, accepts one waiting client and sheds it, and takes
    /// the spare back. Returns whether a client was shed.
    pub async fn shed_one(&self, listener: &TcpListener, e: &io::Error) -> bool {
        if !matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
            return false;
        }
        let spare = self.spare.lock().take();
        if spare.is_none() {
            return false;
        }
        drop(spare);
        let shed =
            match tokio::time::timeout(std::time::Duration::from_millis(10), listener.accept())
                .await
            {
                Ok(Ok((stream, _))) => {
                    shed_now(stream);
                    true
                }
                _ => false,
            };
        *self.spare.lock() = std::fs::File::open("/dev/null").ok();
        shed
    }
}

/// The metrics port's sockets count against the budget but are never shed
/// (the reserve is there for them); out of descriptors, it sheds a waiting
/// client as the main port does.
impl Descriptors for FdBudget {
    type Slot = FdSlot;

    fn open(self: &Arc<Self>) -> FdSlot {
        self.take().0
    }

    async fn accept_failed(&self, listener: &TcpListener, error: &io::Error) -> bool {
        let shed = self.shed_one(listener, error).await;
        if shed {
            telemetry::refused("fd_reserve");
        }
        shed
    }
}

const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\
content-type: application/json\r\ncontent-length: 36\r\nconnection: close\r\n\r\n\
{\"error\":\"Server is over capacity\"}\n";

/// Answers 503 without waiting and closes. What the client already sent is
/// read first, so closing does not reset the connection under the answer.
pub fn shed_now(stream: TcpStream) {
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
    let _ = stream.try_write(SHED_RESPONSE);
    if let Ok(std) = stream.into_std() {
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
}

fn soft_fd_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as usize)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_is_well_formed() {
        let text = std::str::from_utf8(SHED_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn over_the_line_is_shed() {
        let budget = Arc::new(FdBudget {
            usable: 2,
            open: AtomicUsize::new(0),
            spare: Mutex::new(None),
        });
        let (a, shed_a) = budget.take();
        let (_b, shed_b) = budget.take();
        let (c, shed_c) = budget.take();
        assert!(!shed_a && !shed_b && shed_c);
        drop(c);
        drop(a);
        assert!(!budget.take().1);
    }
}
