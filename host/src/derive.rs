//! Derived shared keys on the host (PROTOCOL.md §9): the answer to a
//! `derive-request`, the table of keys derived in live sessions, and the
//! local socket through which authorised host processes fetch them.
//!
//! Intended use: an actor in the guest and a process on the host OS need a
//! shared secret for one VM session (e.g. to authenticate a side channel,
//! or to unlock something the host hands the VM) without any long-lived
//! key being provisioned. Both ends take it from the TLS exporter of the
//! attested session (`K = TLS-Exporter("EXPORTER-vkx-v1-derive", purpose,
//! L)`), confirm it to each other with tags, and the host keeps it only
//! while that session lives: a new session yields a new K.
//!
//! Local access: `serve` listens on a Unix socket (mode 0660) and checks
//! every client's `SO_PEERCRED` uid/gid against an allow-list from
//! host.toml before reading a byte. A client writes one request line
//! `derived <vm-id> <purpose>\n` and gets `OK <hex>\n` or `ERR <reason>\n`.
//! Keys are held per session (PROTOCOL.md §9.4): a VM with several live
//! sessions has one K per session and purpose; the request gets the one
//! of the session that confirmed it last, or, with a fourth word, the
//! session named by its hex session-id (`derived <vm-id> <purpose>
//! <session-id>`). A session that ends removes its own keys only.
//! `vkx-host derived get` is such a client. Requests and replies are
//! bounded; the socket serves at most [`MAX_LOCAL_CLIENTS`] clients at once
//! and each for at most [`LOCAL_CLIENT_TIMEOUT`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::VmPolicy;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use vkx_common::transcript::{ConfirmRole, confirm_tag, verify_confirm_tag};
use vkx_common::wire::{CONFIRM_TAG_LEN, Purpose, VmId};
use vkx_common::{rl_info, rl_warn};
use zeroize::Zeroizing;

/// Local clients served at once.
pub const MAX_LOCAL_CLIENTS: usize = 32;
/// Longest a local client may take for its request and our reply.
pub const LOCAL_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line (`derived ` + vm-id + ` ` + purpose, optionally
/// ` ` + 32 hex of a session-id, + LF).
pub const MAX_LOCAL_REQUEST: usize = 256;
/// Derived keys held at once: a few purposes for each VM of a node.
pub const MAX_DERIVED_KEYS: usize = 16 * 1024;

/// The host's answer to one derivation. `Debug` never shows the key.
pub enum Answer {
    Confirm {
        key: Zeroizing<Vec<u8>>,
        host_tag: [u8; CONFIRM_TAG_LEN],
    },
    NotPermitted,
    TagMismatch,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Confirm { key, .. } => write!(f, "Confirm({} bytes)", key.len()),
            Self::NotPermitted => f.write_str("NotPermitted"),
            Self::TagMismatch => f.write_str("TagMismatch"),
        }
    }
}

/// Checks the purpose against the VM's policy, derives K from this TLS
/// connection, checks the guest's tag (constant time) and makes the host's.
pub fn answer(
    tls: &rustls::ServerConnection,
    vm: Option<&VmPolicy>,
    purpose: &Purpose,
    length: u8,
    guest_tag: &[u8; CONFIRM_TAG_LEN],
) -> Answer {
    if !vm.is_some_and(|vm| vm.derive.contains(purpose)) {
        return Answer::NotPermitted;
    }
    let Ok(key) = vkx_common::tls::derive_exporter(tls, purpose.as_str(), usize::from(length))
    else {
        return Answer::NotPermitted;
    };
    if !verify_confirm_tag(&key, ConfirmRole::Guest, purpose.as_str(), guest_tag) {
        return Answer::TagMismatch;
    }
    let host_tag = confirm_tag(&key, ConfirmRole::Host, purpose.as_str());
    Answer::Confirm { key, host_tag }
}

/// A session's id (`attestation-result`'s session-id).
pub type SessionId = [u8; 16];

/// One session's K of one purpose, and when it was confirmed (a sequence
/// number: the newest answers a request that names no session).
struct Entry {
    session: SessionId,
    seq: u64,
    key: Zeroizing<Vec<u8>>,
}

#[derive(Default)]
struct Table {
    by: BTreeMap<(VmId, Purpose), Vec<Entry>>,
    len: usize,
    seq: u64,
}

/// Keys derived in live sessions, by VM, purpose and session. `Debug`
/// shows how many, never a key.
#[derive(Default)]
pub struct DerivedKeys {
    keys: Mutex<Table>,
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.keys.lock().map_or(0, |k| k.len);
        write!(f, "DerivedKeys({n} keys)")
    }
}

impl DerivedKeys {
    /// Session `session` of `vm` confirmed K for `purpose` (again: it
    /// replaces that session's own). Past [`MAX_DERIVED_KEYS`] a new one
    /// is not kept (the local process gets "no such derived key").
    pub fn insert(
        &self,
        vm: &VmId,
        purpose: &Purpose,
        session: SessionId,
        key: Zeroizing<Vec<u8>>,
    ) {
        if let Ok(mut t) = self.keys.lock() {
            t.seq += 1;
            let seq = t.seq;
            let full = t.len >= MAX_DERIVED_KEYS;
            let list = t.by.entry((vm.clone(), purpose.clone())).or_default();
            if let Some(e) = list.iter_mut().find(|e| e.session == session) {
                e.key = key;
                e.seq = seq;
            } else if !full {
                list.push(Entry { session, seq, key });
                t.len += 1;
            } else if list.is_empty() {
                t.by.remove(&(vm.clone(), purpose.clone()));
            }
        }
    }

    /// Session `session` ended: its K for `purpose` goes; other sessions'
    /// stay.
    pub fn remove(&self, vm: &VmId, purpose: &Purpose, session: SessionId) {
        if let Ok(mut t) = self.keys.lock() {
            let k = (vm.clone(), purpose.clone());
            let Some(list) = t.by.get_mut(&k) else { return };
            let before = list.len();
            list.retain(|e| e.session != session);
            let removed = before - list.len();
            if list.is_empty() {
                t.by.remove(&k);
            }
            t.len -= removed;
        }
    }

    /// K of `vm` for `purpose`: of `session` if named, else of the live
    /// session that confirmed it last.
    pub fn get(
        &self,
        vm: &VmId,
        purpose: &Purpose,
        session: Option<SessionId>,
    ) -> Option<Zeroizing<Vec<u8>>> {
        let t = self.keys.lock().ok()?;
        let list = t.by.get(&(vm.clone(), purpose.clone()))?;
        match session {
            Some(s) => list.iter().find(|e| e.session == s),
            None => list.iter().max_by_key(|e| e.seq),
        }
        .map(|e| e.key.clone())
    }
}

/// `[local]` in host.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub socket: PathBuf,
    /// Users whose processes may fetch derived keys.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Groups whose processes may fetch derived keys (primary gid).
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// The socket's file mode (default 0o660), owner and group (default:
    /// the host's): an allowed uid must be able to open it, and to
    /// traverse its directory (the unit's `RuntimeDirectoryMode`).
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    #[serde(default)]
    pub socket_uid: Option<u32>,
    #[serde(default)]
    pub socket_gid: Option<u32>,
}

fn default_socket_mode() -> u32 {
    0o660
}

/// A `[local] socket_mode` with bits other than read/write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[local] socket_mode {0:#o}: read/write bits only (e.g. 0o660)")]
pub struct SocketModeError(pub u32);

/// Why `vkx-host derived get` ([`fetch`]) got no key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error("connect {}: {source}", .path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("local socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad reply")]
    BadReply,
    #[error("the host refused: {0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl LocalConfig {
    /// The socket's access settings, checked: no execute bits, nothing
    /// for others beyond read/write.
    pub fn access(&self) -> Result<crate::listen::SocketAccess, SocketModeError> {
        if self.socket_mode & !0o666 != 0 {
            return Err(SocketModeError(self.socket_mode));
        }
        Ok(crate::listen::SocketAccess {
            mode: self.socket_mode,
            uid: self.socket_uid,
            gid: self.socket_gid,
        })
    }

    fn allows(&self, uid: u32, gid: u32) -> bool {
        self.allow_uids.contains(&uid) || self.allow_gids.contains(&gid)
    }
}

/// Serves the local socket until `stop`; at most [`MAX_LOCAL_CLIENTS`]
/// at once, each for at most [`LOCAL_CLIENT_TIMEOUT`].
pub async fn serve_local(
    listener: UnixListener,
    config: LocalConfig,
    keys: Arc<DerivedKeys>,
    stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_LOCAL_CLIENTS));
    let config = Arc::new(config);
    let serve = move |stream: UnixStream| {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            rl_warn!("local socket: too many clients; closing one");
            return None;
        };
        let (config, keys) = (config.clone(), keys.clone());
        Some(async move {
            let _ =
                tokio::time::timeout(LOCAL_CLIENT_TIMEOUT, client(stream, &config, &keys)).await;
            drop(permit);
        })
    };
    crate::listen::accept_loop(listener, "local", serve, stop).await;
}

async fn client(mut stream: UnixStream, config: &LocalConfig, keys: &DerivedKeys) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    // One request line, at most MAX_LOCAL_REQUEST bytes.
    while line.len() < MAX_LOCAL_REQUEST {
        match stream.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return,
        }
    }
    // Checked after the (bounded) request is read, so that the refusal
    // reaches the client instead of a reset.
    if !config.allows(uid, gid) {
        rl_warn!(uid, gid, "local socket: client not allowed");
        let _ = stream.write_all(b"ERR not allowed\n").await;
        return;
    }
    let reply = match parse_request(&line) {
        Some((vm, purpose, session)) => match keys.get(&vm, &purpose, session) {
            Some(k) => {
                rl_info!(uid, vm = %vm, purpose = %purpose, "derived key handed to a local process");
                let mut r = Zeroizing::new(String::from("OK "));
                r.push_str(&Zeroizing::new(hex::encode(k.as_slice())));
                r.push('\n');
                r
            }
            None => Zeroizing::new("ERR no such derived key\n".to_owned()),
        },
        None => Zeroizing::new("ERR bad request\n".to_owned()),
    };
    let _ = stream.write_all(reply.as_bytes()).await;
}

fn parse_request(line: &[u8]) -> Option<(VmId, Purpose, Option<SessionId>)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    let (Some("derived"), Some(vm), Some(purpose), session, None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let session = match session {
        None => None,
        Some(hex) if hex.len() == 32 => {
            let mut id = [0u8; 16];
            hex::decode_to_slice(hex, &mut id).ok()?;
            Some(id)
        }
        Some(_) => return None,
    };
    Some((VmId::new(vm).ok()?, Purpose::new(purpose).ok()?, session))
}

/// The client side (`vkx-host derived get`): the derived key, raw.
pub async fn fetch(
    socket: &Path,
    vm: &VmId,
    purpose: &Purpose,
) -> Result<Zeroizing<Vec<u8>>, FetchError> {
    let work = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|source| FetchError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        s.write_all(format!("derived {vm} {purpose}\n").as_bytes())
            .await?;
        let mut reply = Zeroizing::new(Vec::new());
        (&mut s)
            .take(4 + 2 * 256 + 2)
            .read_to_end(&mut reply)
            .await?;
        let text = std::str::from_utf8(&reply).map_err(|_| FetchError::BadReply)?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        if let Some(hex) = text.strip_prefix("OK ") {
            return hex::decode(hex)
                .map(Zeroizing::new)
                .map_err(|_| FetchError::BadReply);
        }
        Err(FetchError::Refused(
            text.strip_prefix("ERR ").unwrap_or("bad reply").to_owned(),
        ))
    };
    tokio::time::timeout(LOCAL_CLIENT_TIMEOUT, work)
        .await
        .map_err(|_| FetchError::Timeout(LOCAL_CLIENT_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_are_strict() {
        assert!(parse_request(b"derived vm-1 disk-unlock:v1").is_some());
        assert_eq!(
            parse_request(b"derived vm-1 p 000102030405060708090a0b0c0d0e0f")
                .unwrap()
                .2,
            Some(std::array::from_fn(|i| u8::try_from(i).unwrap()))
        );
        for bad in [
            &b"derived vm-1 p 0001"[..],
            b"derived vm-1 p 000102030405060708090a0b0c0d0e0g",
            b"derived vm-1 p 000102030405060708090a0b0c0d0e0f x",
            &b"derived vm-1"[..],
            b"derived vm-1 p extra",
            b"derive vm-1 p",
            b"derived vm 1 p",
            b"derived  vm-1 p",
            b"derived vm-1 \xff",
        ] {
            assert!(parse_request(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn each_session_keeps_its_own_key_and_removes_only_its_own() {
        let t = DerivedKeys::default();
        let vm = VmId::new("vm-1").unwrap();
        let p = Purpose::new("p").unwrap();
        let (s1, s2) = ([1u8; 16], [2u8; 16]);
        t.insert(&vm, &p, s1, Zeroizing::new(vec![1; 32]));
        t.insert(&vm, &p, s2, Zeroizing::new(vec![2; 32]));
        // The second session did not overwrite the first's K.
        assert_eq!(t.get(&vm, &p, Some(s1)).unwrap().as_slice(), &[1u8; 32][..]);
        assert_eq!(t.get(&vm, &p, Some(s2)).unwrap().as_slice(), &[2u8; 32][..]);
        // Unnamed: the session that confirmed last.
        assert_eq!(t.get(&vm, &p, None).unwrap().as_slice(), &[2u8; 32][..]);
        t.insert(&vm, &p, s1, Zeroizing::new(vec![3; 32]));
        assert_eq!(t.get(&vm, &p, None).unwrap().as_slice(), &[3u8; 32][..]);
        // The first session ending does not take the second's.
        t.remove(&vm, &p, s1);
        assert!(t.get(&vm, &p, Some(s1)).is_none());
        assert_eq!(t.get(&vm, &p, None).unwrap().as_slice(), &[2u8; 32][..]);
        t.remove(&vm, &p, s2);
        assert!(t.get(&vm, &p, None).is_none());
        assert_eq!(t.keys.lock().unwrap().len, 0);
        assert!(t.keys.lock().unwrap().by.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let t = DerivedKeys::default();
        let p = Purpose::new("p").unwrap();
        let vm = VmId::new("vm-1").unwrap();
        for i in 0..=MAX_DERIVED_KEYS {
            let mut s = [0u8; 16];
            s[..8].copy_from_slice(&(i as u64).to_be_bytes());
            t.insert(&vm, &p, s, Zeroizing::new(vec![0; 1]));
        }
        assert_eq!(t.keys.lock().unwrap().len, MAX_DERIVED_KEYS);
    }
}
