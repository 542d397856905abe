//! VM generation changes (a snapshot restored, a clone started), as the
//! guest kernel announces them, for the daemon's re-attestation
//! (PROTOCOL.md §11.4, §15.8).
//!
//! What Linux offers: the `vmgenid` ACPI driver (`drivers/virt/vmgenid.c`,
//! `CONFIG_VMGENID`) reads the 128-bit generation ID the VMM (QEMU's
//! `-device vmgenid`, Hyper-V, ...) writes into guest memory; on the VMM's
//! ACPI notification it reseeds the kernel's random generator and, in
//! kernels that carry the change uevent (later than 6.1: Debian bookworm's
//! 6.1 has none, and its cloud flavour has no `vmgenid` driver at all,
//! `CONFIG_VIRT_DRIVERS` unset), it emits a `KOBJ_CHANGE` uevent with
//! `NEW_VMGENID=1` on the ACPI device.
//! The ID itself is not readable from user space (no sysfs file): the
//! uevent is the only signal, and it says "changed", not "to what".
//!
//! [`Watch`] listens on the kernel's uevent netlink multicast group
//! (`NETLINK_KOBJECT_UEVENT`, group 1; no privilege needed, only
//! `AF_NETLINK` in the unit's `RestrictAddressFamilies=`). [`classify`] is
//! the decision without I/O: a datagram counts only if it comes from the
//! kernel (netlink port 0), is a `change@` uevent and holds the exact field
//! `NEW_VMGENID=1`. What it trusts: the kernel. A root process in the guest
//! can forge a uevent, but root is the guest agent for vkx's purposes
//! (README "Residual risk"), and the most a forgery buys is a
//! re-attestation, which the retry budget bounds.
//!
//! Bounds: one datagram buffer of [`MAX_UEVENT_LEN`] (the kernel's own
//! uevent buffer is 2 KiB); a longer datagram is truncated by the socket
//! and ignored. A full socket buffer (`ENOBUFS`: uevents were dropped, a
//! burst of device events) may have swallowed a change, so it counts as
//! one ([`Signal::Overflow`]): a needless re-attestation is cheap, a missed
//! one leaves a restored VM on its old session. Changes are coalesced by
//! the daemon (a `watch` channel: many changes before it looks are one).
//! The socket is blocking (tokio's `AsyncFd` would need `unsafe` here) and
//! read on a thread of its own, with a receive timeout of
//! [`RECEIVE_TIMEOUT`] so that the thread notices when the daemon is gone.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recvfrom, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;

/// Receive buffer for one uevent datagram. The kernel builds uevents in a
/// 2 KiB buffer (`UEVENT_BUFFER_SIZE`); twice that leaves room and still
/// flags anything longer as not ours.
pub const MAX_UEVENT_LEN: usize = 4096;

/// Longest a [`Watch::receive`] blocks before it returns `None`.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Most datagrams one [`Watch::receive`] reads before it returns, so a
/// steady stream of other uevents (a busy udev) cannot keep its caller
/// from checking whether to stop.
pub const MAX_UEVENTS_PER_RECEIVE: usize = 64;

/// The multicast group of uevents sent by the kernel itself (udevd
/// re-broadcasts on group 2, which is not listened to).
const KERNEL_UEVENT_GROUP: u32 = 1;

/// The field the kernel's `vmgenid` driver adds to its change uevent.
const NEW_VMGENID: &[u8] = b"NEW_VMGENID=1";

/// What one datagram (or a failed receive) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The kernel announced a new VM generation.
    Changed,
    /// Uevents were dropped (socket buffer full): a change may be among
    /// them.
    Overflow,
}

/// Whether a uevent datagram from netlink port `sender` announces a new
/// VM generation. `datagram` is `ACTION@DEVPATH\0KEY=VALUE\0...`, at most
/// [`MAX_UEVENT_LEN`] bytes; `truncated` if the socket cut it.
pub fn classify(datagram: &[u8], sender: u32, truncated: bool) -> Option<Signal> {
    // Only the kernel (port 0) sends on group 1 with authority.
    if sender != 0 || truncated {
        return None;
    }
    let mut fields = datagram.split(|b| *b == 0);
    let header = fields.next()?;
    if !header.starts_with(b"change@") {
        return None;
    }
    fields.any(|f| f == NEW_VMGENID).then_some(Signal::Changed)
}

/// The kernel's uevent socket, bound to the kernel's group.
#[derive(Debug)]
pub struct Watch {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Watch {
    /// Opens and binds the socket. Fails where netlink is unavailable (a
    /// unit without `AF_NETLINK`, a sandbox): the daemon then runs without
    /// it and says so once.
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        let timeout = i64::try_from(RECEIVE_TIMEOUT.as_secs()).unwrap_or(1);
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(timeout, 0))?;
        // Port 0: the kernel assigns a unique one.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_UEVENT_GROUP))?;
        Ok(Self {
            fd,
            buf: vec![0; MAX_UEVENT_LEN + 1],
        })
    }

    /// Blocks for the next generation change (or a possible one), at most
    /// about [`RECEIVE_TIMEOUT`] after the last datagram and at most
    /// [`MAX_UEVENTS_PER_RECEIVE`] datagrams: `None` if none came. Other
    /// uevents are read and dropped. An error other than a dropped-uevent
    /// overflow ends the watch.
    pub fn receive(&mut self) -> io::Result<Option<Signal>> {
        for _ in 0..MAX_UEVENTS_PER_RECEIVE {
            match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut self.buf) {
                Ok((n, from)) => {
                    let sender = from.map_or(u32::MAX, |a| a.pid());
                    // A datagram that fills the buffer plus one byte was
                    // longer than any uevent: truncated.
                    let truncated = n > MAX_UEVENT_LEN;
                    let n = n.min(MAX_UEVENT_LEN);
                    if let Some(s) = classify(&self.buf[..n], sender, truncated) {
                        return Ok(Some(s));
                    }
                }
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::ENOBUFS) => return Ok(Some(Signal::Overflow)),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The uevent Linux's vmgenid driver sends, as the kernel formats it.
    const UEVENT: &[u8] = b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0\
        ACTION=change\0DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0\
        SUBSYSTEM=acpi\0NEW_VMGENID=1\0MODALIAS=acpi:QEMUVGID:VM_GEN_COUNTER:\0SEQNUM=2310\0";

    #[test]
    fn the_kernels_change_uevent_is_a_new_generation() {
        assert_eq!(classify(UEVENT, 0, false), Some(Signal::Changed));
    }

    #[test]
    fn only_the_kernel_and_only_that_field_count() {
        // From a user-space sender (udevd's re-broadcast, a forger).
        assert_eq!(classify(UEVENT, 812, false), None);
        // Cut by the socket.
        assert_eq!(classify(UEVENT, 0, true), None);
        // Other uevents, near misses of the field.
        for other in [
            &b"add@/devices/virtual/net/lo\0ACTION=add\0SEQNUM=1\0"[..],
            b"change@/devices/x\0ACTION=change\0NEW_VMGENID=0\0",
            b"change@/devices/x\0ACTION=change\0NEW_VMGENID=11\0",
            b"change@/devices/x\0ACTION=change\0X_NEW_VMGENID=1\0",
            b"remove@/devices/x\0NEW_VMGENID=1\0",
            b"change@/devices/NEW_VMGENID=1",
            b"",
            b"\0\0\0",
        ] {
            assert_eq!(classify(other, 0, false), None, "{other:?}");
        }
    }

    #[test]
    fn a_uevent_of_any_bytes_is_classified_without_panicking() {
        // Bounded input, no allocation: every prefix of a real uevent and
        // of junk is judged.
        let junk: Vec<u8> = (0..=255u8).cycle().take(MAX_UEVENT_LEN).collect();
        for data in [UEVENT, &junk[..]] {
            for n in 0..data.len() {
                let _ = classify(&data[..n], 0, false);
            }
        }
        // The field may end the datagram without its NUL.
        let cut = b"change@/devices/x\0NEW_VMGENID=1";
        assert_eq!(classify(cut, 0, false), Some(Signal::Changed));
    }

    #[test]
    fn the_socket_opens_and_waits_at_most_its_timeout() {
        // The real socket: binds to the kernel's group and, with no
        // generation change (a build machine), returns None after its
        // receive timeout, however many other uevents arrive.
        let mut w = Watch::open().unwrap();
        let t = std::time::Instant::now();
        assert_eq!(w.receive().unwrap(), None);
        let waited = t.elapsed();
        assert!(
            waited >= RECEIVE_TIMEOUT - Duration::from_millis(50) && waited < RECEIVE_TIMEOUT * 10,
            "{waited:?}"
        );
    }
}
