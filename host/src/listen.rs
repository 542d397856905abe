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
    bind_local_with(path, &SocketAccess::default())
}

/// Who may open a local socket: its file mode, and optionally its owner
/// and group (`[local] socket_mode`, `socket_uid`, `socket_gid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        Self {
            mode: 0o660,
            uid: None,
            gid: None,
        }
    }
}

/// Binds a Unix socket at `path` with `access`. A stale socket there (a
/// previous run's) is replaced; anything else at the path (a file, a
/// directory, a symlink) is refused, never unlinked.
pub fn bind_local_with(path: &Path, access: &SocketAccess) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: refusing to replace it",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode & 0o777))?;
    if access.uid.is_some() || access.gid.is_some() {
        std::os::unix::fs::chown(path, access.uid, access.gid)?;
    }
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
    async fn a_stale_socket_is_replaced_anything_else_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        drop(bind_local(&path).unwrap());
        // A previous run's socket: replaced.
        let access = SocketAccess {
            mode: 0o600,
            uid: None,
            gid: Some(nix_gid()),
        };
        drop(bind_local_with(&path, &access).unwrap());
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // A file (or a symlink to one): never unlinked.
        let file = dir.path().join("f");
        std::fs::write(&file, "keep").unwrap();
        assert!(bind_local(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(bind_local(&link).is_err());
        assert!(link.exists());
    }

    /// This process's own group (chown to it needs no privilege).
    fn nix_gid() -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").unwrap().gid()
    }

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
