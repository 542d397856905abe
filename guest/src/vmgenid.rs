//! VM generation changes (a snapshot restored, a clone started), as the
//! guest kernel announces them, for the daemon's re-attestation
//! (PROTOCOL.md §11.4, §15.8).
//!
//! What Linux offers: the `vmgenid` ACPI driver (`drivers/virt/vmgenid.c`,
//! `CONFIG_VMGENID`, since 5.18) reads the 128-bit generation ID the VMM
//! (QEMU's `-device vmgenid`, Hyper-V, ...) writes into guest memory; on
//! the VMM's ACPI notification it hands the new ID to the random generator,
//! which reseeds and logs, at `KERN_NOTICE` from the kernel itself,
//! `random: crng reseeded due to virtual machine fork`. That log record is
//! the one signal every such kernel gives user space. The ID is readable by
//! no kernel (no sysfs file), and the `change` uevent with `NEW_VMGENID=1`
//! existed only in Linux 6.8: added by commit ad6bcdad2b67, reverted by
//! 3aadf100f93d before 6.9. Found with Debian's kernels: bookworm's
//! 6.1 cloud flavour has no `vmgenid` driver (`CONFIG_VIRT_DRIVERS`
//! unset); bookworm-backports' 6.12 cloud flavour has it and logs the line.
//!
//! [`Watch`] reads the kernel's log device `/dev/kmsg` from its end (the
//! records already there are history: the daemon attests when it starts).
//! [`classify`] is the decision without I/O: a record counts only if its
//! facility is the kernel's (0) and its text is exactly that line. User
//! space cannot forge it: a write to `/dev/kmsg` that asks for facility 0
//! is logged with facility 1, `LOG_USER` (`devkmsg_write`), and the
//! daemon's tests write such a forgery to the real device and see it
//! ignored. Reading needs `CAP_SYSLOG` where `kernel.dmesg_restrict` is
//! set (Debian's default): `vkx-guest.service` grants it, lets the device
//! be read (`ProtectKernelLogs=no`, `DeviceAllow=/dev/kmsg r`) and denies
//! the `syslog(2)` call that the capability would also open (README "The
//! units' sandbox").
//!
//! Bounds: one record buffer of [`MAX_RECORD_LEN`] (the kernel's own limit
//! for one `/dev/kmsg` record); at most [`MAX_RECORDS_PER_RECEIVE`]
//! records per [`Watch::receive`], which waits at most
//! [`RECEIVE_TIMEOUT`] so that its thread notices when the daemon is gone.
//! Records overwritten before they were read (`EPIPE`: the log wrapped, a
//! burst of kernel messages) may have held the line, so that counts as a
//! change ([`Signal::Overflow`]): a needless re-attestation is cheap, a
//! missed one leaves a restored VM on its old session. Changes are
//! coalesced by the daemon (a `watch` channel: many changes before it
//! looks are one).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The kernel's log device.
pub const KMSG: &str = "/dev/kmsg";

/// Buffer for one `/dev/kmsg` record: the kernel formats each into a
/// buffer of this size (`CONSOLE_EXT_LOG_MAX`, 8 KiB) and refuses a read
/// into a smaller one, so no record is longer.
pub const MAX_RECORD_LEN: usize = 8192;

/// Longest a [`Watch::receive`] waits before it returns `None`.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Most records one [`Watch::receive`] reads before it returns, so a
/// chatty kernel cannot keep its caller from checking whether to stop.
pub const MAX_RECORDS_PER_RECEIVE: usize = 64;

/// The line the kernel's random generator logs when the VM generation
/// changes (`add_vmfork_randomness`, with its `random: ` prefix).
pub const VM_FORK_LINE: &[u8] = b"random: crng reseeded due to virtual machine fork";

/// The kernel's syslog facility (`LOG_KERN`); `/dev/kmsg` gives each
/// record's priority as `facility << 3 | level`.
const KERNEL_FACILITY: u32 = 0;

/// What one record (or a failed read) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The kernel announced a new VM generation.
    Changed,
    /// Log records were overwritten before they were read: a change may
    /// be among them.
    Overflow,
}

/// Whether one `/dev/kmsg` record announces a new VM generation. `record`
/// is `PRIORITY,SEQUENCE,MICROSECONDS,FLAGS[,...];TEXT\n` followed by
/// optional ` KEY=VALUE\n` lines, at most [`MAX_RECORD_LEN`] bytes
/// (Documentation/ABI/testing/dev-kmsg).
pub fn classify(record: &[u8]) -> Option<Signal> {
    let semicolon = record.iter().position(|b| *b == b';')?;
    let (header, rest) = (&record[..semicolon], &record[semicolon + 1..]);
    let priority = header.split(|b| *b == b',').next()?;
    // Decimal digits only, short enough for u32: "5", "13", "190".
    if priority.is_empty() || priority.len() > 9 || !priority.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let priority: u32 = std::str::from_utf8(priority).ok()?.parse().ok()?;
    if priority >> 3 != KERNEL_FACILITY {
        return None;
    }
    let text = rest.split(|b| *b == b'\n').next()?;
    (text == VM_FORK_LINE).then_some(Signal::Changed)
}

/// The kernel log device, read from where it ended when opened.
#[derive(Debug)]
pub struct Watch {
    kmsg: File,
    buf: Vec<u8>,
}

impl Watch {
    /// Opens [`KMSG`] (see [`Watch::open_at`]).
    pub fn open() -> io::Result<Self> {
        Self::open_at(Path::new(KMSG))
    }

    /// Opens the kernel log device at `path`, non-blocking, and skips the
    /// records already in it. Fails without `CAP_SYSLOG` (where
    /// `dmesg_restrict` is set) or in a unit that hides the device: the
    /// daemon then runs without the watch and says so once.
    pub fn open_at(path: &Path) -> io::Result<Self> {
        let mut kmsg = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)?;
        // On /dev/kmsg, SEEK_END moves past the last record.
        kmsg.seek(SeekFrom::End(0))?;
        Ok(Self {
            kmsg,
            buf: vec![0; MAX_RECORD_LEN],
        })
    }

    /// Waits for the next generation change (or a possible one), at most
    /// about [`RECEIVE_TIMEOUT`] and at most [`MAX_RECORDS_PER_RECEIVE`]
    /// records: `None` if none came. Other records are read and dropped.
    /// An error other than overwritten records ends the watch.
    pub fn receive(&mut self) -> io::Result<Option<Signal>> {
        let timeout = PollTimeout::try_from(RECEIVE_TIMEOUT).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.kmsg.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        for _ in 0..MAX_RECORDS_PER_RECEIVE {
            // Each read returns exactly one record.
            match self.kmsg.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    if let Some(s) = classify(&self.buf[..n]) {
                        return Ok(Some(s));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The reader fell behind and records were overwritten; the
                // next read goes on from the oldest one left.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {
                    return Ok(Some(Signal::Overflow));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The record Linux 6.12 logs on a VM fork, as `/dev/kmsg` gives it
    /// (priority 5: facility kernel, level notice).
    const RECORD: &[u8] = b"5,1093,48214332,-;random: crng reseeded due to virtual machine fork\n";

    #[test]
    fn the_kernels_vm_fork_record_is_a_new_generation() {
        assert_eq!(classify(RECORD), Some(Signal::Changed));
        // Any level, extra header fields, continuation lines.
        assert_eq!(
            classify(b"6,7,8,c,caller=T1;random: crng reseeded due to virtual machine fork\n"),
            Some(Signal::Changed)
        );
        assert_eq!(
            classify(b"5,1,2,-;random: crng reseeded due to virtual machine fork\n SUBSYSTEM=x\n"),
            Some(Signal::Changed)
        );
        // Without the final newline.
        assert_eq!(
            classify(b"5,1,2,-;random: crng reseeded due to virtual machine fork"),
            Some(Signal::Changed)
        );
    }

    #[test]
    fn only_the_kernels_facility_and_only_that_line_count() {
        for other in [
            // What a write of "<5>random: ..." by root becomes: LOG_USER.
            &b"13,1094,48214999,-;random: crng reseeded due to virtual machine fork\n"[..],
            b"190,1,2,-;random: crng reseeded due to virtual machine fork\n",
            // Near misses of the text.
            b"5,1,2,-;random: crng reseeded due to virtual machine fork!\n",
            b"5,1,2,-;random: crng reseeded on system resumption\n",
            b"5,1,2,-; random: crng reseeded due to virtual machine fork\n",
            b"5,1,2,-;x\n random: crng reseeded due to virtual machine fork\n",
            // Malformed headers.
            b"random: crng reseeded due to virtual machine fork\n",
            b",1,2,-;random: crng reseeded due to virtual machine fork\n",
            b"-5,1,2,-;random: crng reseeded due to virtual machine fork\n",
            b"99999999999,1,2,-;random: crng reseeded due to virtual machine fork\n",
            b"",
            b";",
        ] {
            assert_eq!(classify(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn a_record_of_any_bytes_is_classified_without_panicking() {
        let junk: Vec<u8> = (0..=255u8).cycle().take(MAX_RECORD_LEN).collect();
        for data in [RECORD, &junk[..]] {
            for n in 0..data.len() {
                let _ = classify(&data[..n]);
            }
        }
    }

    /// The real device, on the build machine (root there): opened at its
    /// end, waits at most its timeout, and a forgery written to it by root
    /// (asking for the kernel's facility and level notice) is logged as a
    /// `LOG_USER` record and ignored. The build machines are themselves VMs
    /// restored from snapshots, so their logs may also hold the kernel's
    /// genuine record (`5,...;random: crng reseeded due to virtual machine
    /// fork`, seen on Linux 6.18 under Firecracker): every such record in
    /// the log is judged by its facility alone.
    #[test]
    fn the_real_kmsg_ignores_a_forged_line_and_waits_at_most_its_timeout() {
        // Root (or CAP_SYSLOG) is needed to read the log where
        // dmesg_restrict is set: the test fails rather than passes silently.
        let mut w = Watch::open().unwrap_or_else(|e| panic!("{KMSG}: {e}"));
        let mut tail = Watch::open().unwrap();
        let forgery = [b"<5>".as_slice(), VM_FORK_LINE, b"\n"].concat();
        let mut out = std::fs::OpenOptions::new().write(true).open(KMSG).unwrap();
        // One write is one record.
        assert_eq!(
            std::io::Write::write(&mut out, &forgery).unwrap(),
            forgery.len()
        );
        // The forgery (and whatever else the machine logs) is read and
        // dropped; with nothing after it, a receive returns None within
        // its timeout.
        let t = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(w.receive().unwrap(), None);
        }
        assert!(t.elapsed() < RECEIVE_TIMEOUT * 10, "{:?}", t.elapsed());
        // The forgery as the kernel logged it: facility user (13 = 1 << 3 | 5).
        let forged = records(&mut tail.kmsg)
            .into_iter()
            .find(|r| r.ends_with(&forgery[3..]))
            .expect("the forgery was logged");
        assert!(
            forged.starts_with(b"13,"),
            "{}",
            String::from_utf8_lossy(&forged)
        );
        assert_eq!(classify(&forged), None);
        // Every record of the line in the whole log: the kernel's count,
        // anyone else's do not.
        let mut all = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(KMSG)
            .unwrap();
        for r in records(&mut all) {
            if r.ends_with(&forgery[3..]) {
                let expected = r.starts_with(b"5,").then_some(Signal::Changed);
                assert_eq!(classify(&r), expected, "{}", String::from_utf8_lossy(&r));
            }
        }
    }

    /// The records readable from `kmsg` now (bounded).
    fn records(kmsg: &mut File) -> Vec<Vec<u8>> {
        let mut buf = vec![0; MAX_RECORD_LEN];
        let mut out = Vec::new();
        for _ in 0..100_000 {
            match kmsg.read(&mut buf) {
                Ok(n) if n > 0 => out.push(buf[..n].to_vec()),
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
                _ => break,
            }
        }
        out
    }
}
