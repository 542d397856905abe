//! One accept loop for every listening socket of `serve`: the guests'
//! listeners, the metrics endpoint and the derived-key socket.
//!
//! The loop accepts one connection at a time and hands it to the caller,
//! which decides (admission, a slot count) whether to serve it and returns
//! the task that does. Tasks are owned by the loop: when `stop` turns true
//! the loop stops accepting and awaits every task it spawned, so no
//! connection outlives the shutdown unseen. Each task must bound itself
//! (TLS and session deadlines, an exchange timeout); the owner of the loop
//! bounds the wait for the loop itself (`serve`'s shutdown grace).
//!
//! An accept error (out of file descriptors, say) pauses the loop for
//! [`ACCEPT_ERROR_PAUSE`] instead of spinning, and is logged through the
//! rate limiter under the listener's name.

use std::future::Future;
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use vkx_common::rl_warn;

/// After an accept error (e.g. out of file descriptors), the listener
/// pauses this long instead of spinning.
pub const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A listening socket: each call accepts one connection.
pub trait Accept {
    /// One accepted connection and whatever the listener knows of its peer.
    type Conn: Send + 'static;

    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for UnixListener {
    type Conn = UnixStream;

    async fn accept(&self) -> std::io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Accepts until `stop` turns true; `serve` decides for each connection
/// and returns the task that serves it (or `None` when it was turned away
/// at once). Then awaits the tasks still running.
pub async fn accept_loop<L, H, F>(
    listener: L,
    name: &str,
    mut serve: H,
    mut stop: watch::Receiver<bool>,
) where
    L: Accept,
    H: FnMut(L::Conn) -> Option<F>,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    // Runs until shutdown. Each iteration accepts one connection, reaps
    // one finished task, or pauses after an accept error.
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        match accepted {
            Ok(conn) => {
                if let Some(task) = serve(conn) {
                    tasks.spawn(task);
                }
            }
            Err(e) => {
                rl_warn!(peer: name, error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Binds a Unix socket for local clients (metrics, derived keys),
/// replacing a stale one, with mode 0660.
pub fn bind_local(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn awaits_its_tasks_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = bind_local(&path).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let finished = Arc::new(AtomicUsize::new(0));
        let f = finished.clone();
        let lp = tokio::spawn(async move {
            accept_loop(
                listener,
                "test",
                move |mut s: UnixStream| {
                    let f = f.clone();
                    Some(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        let _ = s.write_all(b"x").await;
                        f.fetch_add(1, Ordering::SeqCst);
                    })
                },
                stop_rx,
            )
            .await;
        });
        let _a = UnixStream::connect(&path).await.unwrap();
        let _b = UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stop_tx.send(true).unwrap();
        lp.await.unwrap();
        assert_eq!(
            finished.load(Ordering::SeqCst),
            2,
            "both tasks ran to the end"
        );
    }
}
