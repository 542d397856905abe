//! vsock on the host: the AF_VSOCK listener's configuration and admission
//! (PROTOCOL.md §2.2, §2.6), and the host-to-guest CONNECT preamble of
//! hybrid vsock (§2.3.2).
//!
//! AF_VSOCK. The host listens on `VMADDR_CID_ANY:port` ([`bind`]); the
//! hypervisor sets the peer address of each accepted socket, so the peer's
//! CID is the VM's identity. [`VsockListenerConfig`] maps CIDs to vm-ids
//! (`[vsock]` in `host.toml`), [`CidMap`] is that mapping once
//! validated, and [`admit`] is the pure decision on one accepted peer: a
//! mapped VM, or a peer to serve as unmapped (§2.6: TLS, `hello`, then an
//! opaque `attestation-failed`). With `require_privileged_port`, a peer
//! whose source port is not reserved (< 1024) is unmapped too: inside the
//! guest only a process with `CAP_NET_BIND_SERVICE` can bind such a port
//! (§15.7).
//!
//! Hybrid vsock, host to guest. [`hybrid_connect`] connects to the VMM's
//! socket PATH (no `_<port>` suffix), writes `CONNECT <P>\n` and reads the
//! `OK <n>\n` reply one byte at a time with
//! [`vkx_common::hybrid::ConnectReply`], so the stream it returns starts
//! at the first byte of guest port P. The connect is bounded by
//! [`CONNECT_TIMEOUT`], the request and reply together by
//! [`HYBRID_CONNECT_TIMEOUT`]; on any failure the socket is dropped, which
//! closes it, and nothing else is attempted on it. Version 1 agents do
//! not use this direction; it serves tooling ([`connect_check`], behind
//! `vkx-host vsock connect-check`) and tests.
//!
//! Nothing here opens an AF_VSOCK socket except [`bind`].

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};
use vkx_common::hybrid::{ConnectReply, HYBRID_CONNECT_TIMEOUT, HybridError, connect_request};
use vkx_common::session::transport::{CONNECT_TIMEOUT, VKX_PORT};
use vkx_common::wire::{DecodeError, MAX_GUEST_CID, MIN_GUEST_CID, VmId};

/// Lowest port the host agent may listen on (§2.2).
pub const MIN_LISTEN_PORT: u32 = 1024;
/// Source ports below this are reserved: binding one needs
/// `CAP_NET_BIND_SERVICE` in the guest (§2.2).
pub const RESERVED_PORT_END: u32 = 1024;
/// `VMADDR_PORT_ANY`: "any port" to `bind`, never a port to listen on.
pub const VMADDR_PORT_ANY: u32 = u32::MAX;
/// Most VMs one AF_VSOCK listener maps.
pub const MAX_VSOCK_VMS: usize = 4096;

// ------------------------------------------------------------ hybrid vsock

/// Why a hybrid-vsock CONNECT exchange failed. The socket is closed in
/// every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HybridConnectError {
    /// The VMM's socket could not be reached (missing, refused, no
    /// permission).
    #[error("connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("connect to {} timed out after {timeout:?}", path.display())]
    ConnectTimeout { path: PathBuf, timeout: Duration },
    #[error("write the CONNECT request: {0}")]
    Write(#[source] io::Error),
    #[error("read the CONNECT reply: {0}")]
    Read(#[source] io::Error),
    /// No complete reply in time (`received` bytes of it had arrived).
    #[error("no complete CONNECT reply within {timeout:?} ({received} bytes received)")]
    ReplyTimeout { timeout: Duration, received: usize },
    /// The VMM answered something other than `OK <n>\n`, or closed the
    /// connection before its LF (typically: nothing listens on the guest
    /// port).
    #[error("CONNECT reply refused: {0}")]
    Reply(#[from] HybridError),
}

/// A completed CONNECT exchange.
#[derive(Debug)]
pub struct HybridConnection {
    /// Positioned at the first byte of guest port P.
    pub stream: UnixStream,
    /// The host-side port the VMM assigned to this connection.
    pub assigned_port: u32,
}

/// Connects to guest port `port` through the VMM's hybrid-vsock socket
/// `path` (PROTOCOL.md §2.3.2). The returned stream is positioned at the
/// first byte of guest port `port`.
pub async fn hybrid_connect(path: &Path, port: u32) -> Result<UnixStream, HybridConnectError> {
    hybrid_connect_with(path, port, HYBRID_CONNECT_TIMEOUT)
        .await
        .map(|c| c.stream)
}

/// [`hybrid_connect`] with the bound on request and reply as a parameter
/// (tests use a short one), returning the assigned port too. The connect
/// itself is bounded by [`CONNECT_TIMEOUT`].
pub async fn hybrid_connect_with(
    path: &Path,
    port: u32,
    reply_timeout: Duration,
) -> Result<HybridConnection, HybridConnectError> {
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(HybridConnectError::Connect {
                path: path.to_path_buf(),
                source,
            });
        }
        Err(_) => {
            return Err(HybridConnectError::ConnectTimeout {
                path: path.to_path_buf(),
                timeout: CONNECT_TIMEOUT,
            });
        }
    };
    let mut reply = ConnectReply::new();
    let exchange = exchange(&mut stream, port, &mut reply);
    // On every error path `stream` is dropped here, which closes it.
    match tokio::time::timeout(reply_timeout, exchange).await {
        Ok(Ok(assigned_port)) => Ok(HybridConnection {
            stream,
            assigned_port,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HybridConnectError::ReplyTimeout {
            timeout: reply_timeout,
            received: reply.len(),
        }),
    }
}

/// Writes the request and reads the reply, one byte per read so that no
/// byte after the LF is consumed. Bounded: the parser fails by
/// `HYBRID_CONNECT_REPLY_MAX` bytes at the latest.
async fn exchange(
    stream: &mut UnixStream,
    port: u32,
    reply: &mut ConnectReply,
) -> Result<u32, HybridConnectError> {
    stream
        .write_all(&connect_request(port))
        .await
        .map_err(HybridConnectError::Write)?;
    let mut byte = [0u8; 1];
    loop {
        let n = stream
            .read(&mut byte)
            .await
            .map_err(HybridConnectError::Read)?;
        if n == 0 {
            return Ok(reply.finish()?);
        }
        if let Some(assigned) = reply.push(byte[0])? {
            return Ok(assigned);
        }
    }
}

/// The operator diagnostic behind `vkx-host vsock connect-check`: does the
/// VMM socket `path` reach a listener on guest port `port`? Returns the
/// host-side port the VMM assigned. The connection is closed at once
/// without sending anything on it: the guest's listener sees a connection
/// open and end.
pub async fn connect_check(path: &Path, port: u32) -> Result<u32, HybridConnectError> {
    let HybridConnection {
        mut stream,
        assigned_port,
    } = hybrid_connect_with(path, port, HYBRID_CONNECT_TIMEOUT).await?;
    // Best effort: the answer is already known, and dropping closes.
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, stream.shutdown()).await;
    Ok(assigned_port)
}

// ---------------------------------------------------------------- AF_VSOCK

/// `[vsock]` in `host.toml`: the AF_VSOCK listener and the VMs it knows
/// by CID.
///
/// ```toml
/// [vsock]
/// port = 7861                    # default; >= 1024, same as the guests'
/// require_privileged_port = true # default; false admits any source port
/// vm = [ { cid = 17, vm_id = "vm-17" } ]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockListenerConfig {
    #[serde(default = "default_port")]
    pub port: u32,
    /// Serve peers whose source port is >= 1024 as unmapped (§2.2).
    /// Default on: inside the guest only a process with
    /// `CAP_NET_BIND_SERVICE` (the agent) binds such a port (§15.7).
    #[serde(default = "default_require_privileged_port")]
    pub require_privileged_port: bool,
    /// The CID → vm-id mapping. The mapping must describe the VM that
    /// currently owns each CID (§2.1).
    #[serde(default)]
    pub vm: Vec<VsockVm>,
}

/// One VM of the AF_VSOCK listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockVm {
    pub cid: u32,
    pub vm_id: String,
}

fn default_port() -> u32 {
    VKX_PORT
}

fn default_require_privileged_port() -> bool {
    true
}

impl Default for VsockListenerConfig {
    fn default() -> Self {
        Self {
            port: VKX_PORT,
            require_privileged_port: default_require_privileged_port(),
            vm: Vec::new(),
        }
    }
}

/// Why a `[vsock]` table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VsockConfigError {
    #[error("port {port} is below {MIN_LISTEN_PORT} (PROTOCOL.md §2.2)")]
    PortReserved { port: u32 },
    #[error("port {VMADDR_PORT_ANY} is VMADDR_PORT_ANY, not a port to listen on")]
    PortAny,
    #[error(
        "[vsock] maps no VM (vm = [{{ cid = N, vm_id = \"...\" }}]): every guest would be refused"
    )]
    NoVms,
    #[error("{count} VMs; at most {MAX_VSOCK_VMS}")]
    TooManyVms { count: usize },
    #[error("vm {vm_id}: cid {cid} is not a guest CID ({MIN_GUEST_CID}..={MAX_GUEST_CID})")]
    CidOutOfRange { cid: u32, vm_id: String },
    #[error("cid {cid} is mapped twice")]
    DuplicateCid { cid: u32 },
    #[error("vm_id {vm_id} is mapped twice")]
    DuplicateVmId { vm_id: String },
    #[error("vm_id {vm_id:?}: {source}")]
    InvalidVmId { vm_id: String, source: DecodeError },
}

impl VsockListenerConfig {
    /// Checks everything [`cid_map`](Self::cid_map) checks.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        self.cid_map().map(drop)
    }

    /// Validates the configuration and builds its CID map.
    pub fn cid_map(&self) -> Result<CidMap, VsockConfigError> {
        if self.port < MIN_LISTEN_PORT {
            return Err(VsockConfigError::PortReserved { port: self.port });
        }
        if self.port == VMADDR_PORT_ANY {
            return Err(VsockConfigError::PortAny);
        }
        if self.vm.is_empty() {
            return Err(VsockConfigError::NoVms);
        }
        if self.vm.len() > MAX_VSOCK_VMS {
            return Err(VsockConfigError::TooManyVms {
                count: self.vm.len(),
            });
        }
        let mut by_cid = HashMap::with_capacity(self.vm.len());
        let mut names = BTreeSet::new();
        for v in &self.vm {
            if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&v.cid) {
                return Err(VsockConfigError::CidOutOfRange {
                    cid: v.cid,
                    vm_id: v.vm_id.clone(),
                });
            }
            let vm_id =
                VmId::new(v.vm_id.as_str()).map_err(|source| VsockConfigError::InvalidVmId {
                    vm_id: v.vm_id.clone(),
                    source,
                })?;
            if !names.insert(v.vm_id.as_str()) {
                return Err(VsockConfigError::DuplicateVmId {
                    vm_id: v.vm_id.clone(),
                });
            }
            if by_cid.insert(v.cid, vm_id).is_some() {
                return Err(VsockConfigError::DuplicateCid { cid: v.cid });
            }
        }
        Ok(CidMap { by_cid })
    }

    /// The address [`bind`] listens on: `VMADDR_CID_ANY:port`.
    pub fn listen_addr(&self) -> VsockAddr {
        VsockAddr::new(VMADDR_CID_ANY, self.port)
    }
}

/// A validated CID → vm-id mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidMap {
    by_cid: HashMap<u32, VmId>,
}

impl CidMap {
    /// The VM that owns `cid`, if configured.
    pub fn get(&self, cid: u32) -> Option<&VmId> {
        self.by_cid.get(&cid)
    }

    pub fn len(&self) -> usize {
        self.by_cid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cid.is_empty()
    }
}

/// The decision on one accepted AF_VSOCK peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A configured VM: serve it with `PeerContext { vm_id: Some(vm_id),
    /// cid: Some(cid), .. }`.
    Vm { vm_id: VmId, cid: u32 },
    /// Serve up to `hello`, then refuse opaquely (§2.6):
    /// `PeerContext { vm_id: None, .. }`. `reason` is for the host's log
    /// only; the guest must not learn it.
    Unmapped { reason: Unmapped },
}

/// Why a peer is served as unmapped. For the host's log only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmapped {
    /// CIDs 0-2 and `VMADDR_CID_ANY` are not guests (e.g. a process on the
    /// host itself, over the loopback transport).
    #[error("peer CID {cid} is not a guest CID")]
    NotAGuest { cid: u32 },
    #[error("peer CID {cid} is not configured")]
    UnknownCid { cid: u32 },
    /// A configured VM, but the connection comes from a port any process
    /// in the guest could bind.
    #[error("peer CID {cid} ({vm_id}) connected from unreserved port {port}")]
    UnprivilegedPort { cid: u32, vm_id: VmId, port: u32 },
}

impl Admission {
    /// The vm-id for `PeerContext::vm_id`.
    pub fn vm_id(&self) -> Option<&VmId> {
        match self {
            Self::Vm { vm_id, .. } => Some(vm_id),
            Self::Unmapped { .. } => None,
        }
    }

    /// The CID for `PeerContext::cid` (sent in `challenge`).
    pub fn cid(&self) -> Option<u32> {
        match self {
            Self::Vm { cid, .. } => Some(*cid),
            Self::Unmapped { .. } => None,
        }
    }

    /// A name for rate-limited logs (`rl_warn!(peer: ..)`): the vm-id when
    /// known, else `cid:<n>`. The CID comes from the hypervisor, so the
    /// set of names a guest can cause is bounded.
    pub fn log_peer(&self) -> String {
        match self {
            Self::Vm { vm_id, .. }
            | Self::Unmapped {
                reason: Unmapped::UnprivilegedPort { vm_id, .. },
            } => vm_id.to_string(),
            Self::Unmapped {
                reason: Unmapped::NotAGuest { cid } | Unmapped::UnknownCid { cid },
            } => format!("cid:{cid}"),
        }
    }
}

/// Decides how to serve a peer from the address the hypervisor reported
/// for it (`VsockListener::accept`'s `VsockAddr`: `cid()`, `port()`).
/// Pure: no I/O, no clock.
pub fn admit(
    map: &CidMap,
    peer_cid: u32,
    peer_port: u32,
    require_privileged_port: bool,
) -> Admission {
    if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&peer_cid) {
        return Admission::Unmapped {
            reason: Unmapped::NotAGuest { cid: peer_cid },
        };
    }
    let Some(vm_id) = map.get(peer_cid) else {
        return Admission::Unmapped {
            reason: Unmapped::UnknownCid { cid: peer_cid },
        };
    };
    if require_privileged_port && peer_port >= RESERVED_PORT_END {
        return Admission::Unmapped {
            reason: Unmapped::UnprivilegedPort {
                cid: peer_cid,
                vm_id: vm_id.clone(),
                port: peer_port,
            },
        };
    }
    Admission::Vm {
        vm_id: vm_id.clone(),
        cid: peer_cid,
    }
}

/// Validates `config` and listens on `VMADDR_CID_ANY:port`. Call inside a
/// Tokio runtime (the listener registers with its reactor). An invalid
/// configuration is an `InvalidInput` error.
pub fn bind(config: &VsockListenerConfig) -> io::Result<VsockListener> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    VsockListener::bind(config.listen_addr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    fn vm(cid: u32, vm_id: &str) -> VsockVm {
        VsockVm {
            cid,
            vm_id: vm_id.into(),
        }
    }

    fn config(vms: Vec<VsockVm>) -> VsockListenerConfig {
        VsockListenerConfig {
            vm: vms,
            ..VsockListenerConfig::default()
        }
    }

    fn map() -> CidMap {
        config(vec![
            vm(3, "vm-3"),
            vm(17, "vm-17"),
            vm(MAX_GUEST_CID, "vm-max"),
        ])
        .cid_map()
        .unwrap()
    }

    fn id(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    #[test]
    fn vsock_config_from_toml_with_defaults() {
        let c: VsockListenerConfig =
            toml::from_str("[[vm]]\ncid = 17\nvm_id = \"vm-17\"\n").unwrap();
        assert_eq!(c.port, VKX_PORT);
        assert!(
            c.require_privileged_port,
            "AF_VSOCK requires a reserved source port unless told otherwise"
        );
        assert!(VsockListenerConfig::default().require_privileged_port);
        assert_eq!(c.vm, vec![vm(17, "vm-17")]);
        let m = c.cid_map().unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(17), Some(&id("vm-17")));
        assert_eq!(m.get(18), None);

        let c: VsockListenerConfig = toml::from_str(
            "port = 9000\nrequire_privileged_port = false\n\
             [[vm]]\ncid = 3\nvm_id = \"a\"\n[[vm]]\ncid = 4\nvm_id = \"b\"\n",
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert!(!c.require_privileged_port, "the operator may turn it off");
        assert_eq!(c.cid_map().unwrap().len(), 2);
        assert_eq!(
            c.listen_addr(),
            VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, 9000)
        );
        assert_eq!(c.listen_addr().cid(), u32::MAX);
        assert_eq!(c.listen_addr().port(), 9000);
    }

    #[test]
    fn vsock_config_refuses_unknown_fields() {
        for text in [
            "prot = 7861\n[[vm]]\ncid = 3\nvm_id = \"a\"\n",
            "[[vm]]\ncid = 3\nvm_id = \"a\"\nname = \"x\"\n",
            "[[vm]]\ncid = 3\n",
            "[[vm]]\ncid = -3\nvm_id = \"a\"\n",
            "[[vm]]\ncid = 4294967296\nvm_id = \"a\"\n",
        ] {
            assert!(
                toml::from_str::<VsockListenerConfig>(text).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn vsock_config_validation() {
        let ok = config(vec![vm(3, "a")]);
        assert_eq!(ok.validate(), Ok(()));
        let cases: Vec<(VsockListenerConfig, VsockConfigError)> = vec![
            (
                VsockListenerConfig {
                    port: 1023,
                    ..ok.clone()
                },
                VsockConfigError::PortReserved { port: 1023 },
            ),
            (
                VsockListenerConfig {
                    port: 0,
                    ..ok.clone()
                },
                VsockConfigError::PortReserved { port: 0 },
            ),
            (
                VsockListenerConfig {
                    port: u32::MAX,
                    ..ok.clone()
                },
                VsockConfigError::PortAny,
            ),
            (config(vec![]), VsockConfigError::NoVms),
            (
                config(vec![vm(2, "host")]),
                VsockConfigError::CidOutOfRange {
                    cid: 2,
                    vm_id: "host".into(),
                },
            ),
            (
                config(vec![vm(u32::MAX, "any")]),
                VsockConfigError::CidOutOfRange {
                    cid: u32::MAX,
                    vm_id: "any".into(),
                },
            ),
            (
                config(vec![vm(3, "a"), vm(3, "b")]),
                VsockConfigError::DuplicateCid { cid: 3 },
            ),
            (
                config(vec![vm(3, "a"), vm(4, "a")]),
                VsockConfigError::DuplicateVmId { vm_id: "a".into() },
            ),
        ];
        for (c, want) in cases {
            assert_eq!(c.validate(), Err(want.clone()), "{want}");
        }
        for bad in ["", "has space", "x/y", &"a".repeat(65)] {
            assert!(
                matches!(
                    config(vec![vm(3, bad)]).validate(),
                    Err(VsockConfigError::InvalidVmId { .. })
                ),
                "{bad:?}"
            );
        }
        // Ports at the bounds.
        for port in [1024, u32::MAX - 1] {
            assert_eq!(
                VsockListenerConfig { port, ..ok.clone() }.validate(),
                Ok(())
            );
        }
    }

    #[test]
    fn vsock_config_count_is_bounded() {
        let at_limit: Vec<_> = (0..MAX_VSOCK_VMS)
            .map(|i| {
                let i = u32::try_from(i).unwrap();
                vm(MIN_GUEST_CID + i, &format!("vm-{i}"))
            })
            .collect();
        assert_eq!(
            config(at_limit.clone()).cid_map().unwrap().len(),
            MAX_VSOCK_VMS
        );
        let mut over = at_limit;
        over.push(vm(1_000_000, "one-more"));
        assert_eq!(
            config(over).validate(),
            Err(VsockConfigError::TooManyVms {
                count: MAX_VSOCK_VMS + 1
            })
        );
    }

    #[test]
    fn vsock_admit_mapped_vms() {
        let m = map();
        for (cid, name) in [(3, "vm-3"), (17, "vm-17"), (MAX_GUEST_CID, "vm-max")] {
            let a = admit(&m, cid, 50_000, false);
            assert_eq!(
                a,
                Admission::Vm {
                    vm_id: id(name),
                    cid
                }
            );
            assert_eq!(a.vm_id(), Some(&id(name)));
            assert_eq!(a.cid(), Some(cid));
            assert_eq!(a.log_peer(), name);
        }
    }

    #[test]
    fn vsock_admit_unmapped_and_non_guest_cids() {
        let m = map();
        for cid in [0, 1, 2, u32::MAX] {
            let a = admit(&m, cid, 1023, false);
            assert_eq!(
                a,
                Admission::Unmapped {
                    reason: Unmapped::NotAGuest { cid }
                }
            );
            assert_eq!(a.vm_id(), None);
            assert_eq!(a.cid(), None);
        }
        for require in [false, true] {
            let a = admit(&m, 18, 1023, require);
            assert_eq!(
                a,
                Admission::Unmapped {
                    reason: Unmapped::UnknownCid { cid: 18 }
                }
            );
            assert_eq!(a.log_peer(), "cid:18");
        }
        // Unknown CID and unreserved port: the identity is reported.
        assert_eq!(
            admit(&m, 18, 40_000, true),
            Admission::Unmapped {
                reason: Unmapped::UnknownCid { cid: 18 }
            }
        );
        assert_eq!(
            admit(&CidMap::default(), 17, 0, false),
            Admission::Unmapped {
                reason: Unmapped::UnknownCid { cid: 17 }
            }
        );
    }

    #[test]
    fn vsock_admit_privileged_port_requirement() {
        let m = map();
        for port in [0, 1, 1023] {
            assert_eq!(admit(&m, 17, port, true).vm_id(), Some(&id("vm-17")));
        }
        for port in [1024, 49_152, u32::MAX] {
            let a = admit(&m, 17, port, true);
            assert_eq!(
                a,
                Admission::Unmapped {
                    reason: Unmapped::UnprivilegedPort {
                        cid: 17,
                        vm_id: id("vm-17"),
                        port
                    }
                }
            );
            assert_eq!(a.vm_id(), None);
            assert_eq!(a.log_peer(), "vm-17");
            // Without the requirement the source port does not matter.
            assert_eq!(admit(&m, 17, port, false).vm_id(), Some(&id("vm-17")));
        }
    }

    /// A fake VMM: accepts one connection, reads the request line byte by
    /// byte, answers `reply` in one write and returns the request.
    async fn fake_vmm(listener: UnixListener, reply: &'static [u8]) -> Vec<u8> {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while req.last() != Some(&b'\n') {
            assert_eq!(s.read(&mut b).await.unwrap(), 1);
            req.push(b[0]);
        }
        s.write_all(reply).await.unwrap();
        // Hold the connection until the client has read what it wants.
        let _ = s.read(&mut b).await;
        req
    }

    #[tokio::test]
    async fn vsock_hybrid_connect_stops_at_the_lf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(fake_vmm(listener, b"OK 1073741824\n\x16\x03\x01"));
        let mut c = hybrid_connect_with(&path, 7861, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(c.assigned_port, 1_073_741_824);
        let mut first = [0u8; 3];
        c.stream.read_exact(&mut first).await.unwrap();
        assert_eq!(first, [0x16, 0x03, 0x01]);
        drop(c);
        assert_eq!(vmm.await.unwrap(), b"CONNECT 7861\n");
    }

    #[tokio::test]
    async fn vsock_hybrid_connect_refuses_a_bad_reply_and_a_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(fake_vmm(listener, b"OK 12\r\n"));
        let e = hybrid_connect_with(&path, 1, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                HybridConnectError::Reply(HybridError::CarriageReturn { offset: 5 })
            ),
            "{e}"
        );
        assert_eq!(vmm.await.unwrap(), b"CONNECT 1\n");

        let e = connect_check(&dir.path().join("absent"), 7861)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HybridConnectError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
    }

    #[tokio::test]
    async fn vsock_connect_check_returns_the_assigned_port() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(fake_vmm(listener, b"OK 0000001025\n"));
        assert_eq!(connect_check(&path, 22).await.unwrap(), 1025);
        assert_eq!(vmm.await.unwrap(), b"CONNECT 22\n");
    }
}
