//! The guest's session ends when the kernel resets its connection without
//! making it readable (`vkx_guest::transport::FaultWatch`): what a vsock
//! device unplug or transport reset does to a guest's socket, and what
//! `make vm-test`'s live snapshot case found the daemon deaf to.
//!
//! No test may open AF_VSOCK here, so the reset comes from a socket that
//! polls the same way: a connected UDP socket whose datagram is refused
//! on loopback gets `sk_err` and polls `EPOLLERR` without `EPOLLIN`. Its
//! watch is handed to a real session (the guest agent with a soft vTPM,
//! `vkx-host serve` as its own process over a Unix socket), the datagram
//! is sent once the session is Established, and the session must end at
//! once as a transport failure. Without the watch in the session loop it
//! would hold until its re-attestation time (about an hour) and the bound
//! below would fail the test.

#![cfg(feature = "insecure-soft-tpm")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vkx_common::retry::Failure;
use vkx_common::session::CloseReason;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_e2e::herd::SoftSite;
use vkx_guest::agent::{Handler, Reaction};
use vkx_guest::transport::FaultWatch;

/// From the reset to the session's end: generous for a loaded machine,
/// far below the session's own timers.
const END_BOUND: Duration = Duration::from_secs(30);
/// Connect, attest and the reset together.
const ATTEMPT_BOUND: Duration = Duration::from_secs(120);

/// Sends the refused datagram (the reset) once the session is Established.
struct ResetWhenAttested<'a> {
    udp: &'a UdpSocket,
    reset_at: Option<Instant>,
}

impl Handler for ResetWhenAttested<'_> {
    fn on_event(&mut self, ev: GuestEvent, _guest: &mut Guest, _now: Instant) -> Reaction {
        if let GuestEvent::Attested { .. } = ev {
            self.udp.send(b"reset").unwrap();
            self.reset_at = Some(Instant::now());
        }
        Reaction::default()
    }
}

#[test]
fn a_reset_the_reader_cannot_see_ends_an_established_session() {
    let soft = SoftSite::new(1, "reset");
    let host = soft.site.start_host("reset", "");
    let agent = soft.agents().remove(0);
    let socket = soft.site.sockets[0].clone();

    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(closed_addr).unwrap();
    udp.set_nonblocking(true).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (attempt, reset_at, ended_at) = rt.block_on(async {
        let fault = FaultWatch::of(&udp).unwrap();
        let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let (_stop_tx, mut stop) = watch::channel(false);
        let mut handler = ResetWhenAttested {
            udp: &udp,
            reset_at: None,
        };
        let attempt = tokio::time::timeout(
            ATTEMPT_BOUND,
            agent.over_with_fault(stream, &fault, &mut handler, &mut stop, None),
        )
        .await
        .expect("the session did not end after the reset");
        (attempt, handler.reset_at, Instant::now())
    });
    host.stop(false);

    let reset_at = reset_at.expect("the session never reached Established");
    assert!(attempt.established, "{}", attempt.detail);
    assert!(
        matches!(attempt.close, CloseReason::Failed(Failure::Transport)),
        "{:?}: {}",
        attempt.close,
        attempt.detail
    );
    assert!(
        attempt.detail.contains("reset under the session"),
        "{}",
        attempt.detail
    );
    let took = ended_at.duration_since(reset_at);
    assert!(
        took < END_BOUND,
        "the session ended {took:?} after the reset"
    );
}
