//! The agents end to end as processes: `vkx-host serve` and `vkx-guest
//! once` over a Unix socket, TLS with the pinned host key, swtpm as the
//! guest's vTPM, the host's registry and policy deciding.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use vkx_e2e::agents::Deployment;
use vkx_e2e::run;

/// A raw client: TLS with the pinned key, then the given frames; returns
/// the messages the host sends back until it closes.
fn raw_exchange(socket: &Path, pin: &str, frames: &[Vec<u8>]) -> Vec<vkx_common::wire::Message> {
    use std::io::{Read, Write};
    let pin: [u8; 32] = hex::decode(pin).unwrap().try_into().unwrap();
    let config = vkx_common::tls::client_config(pin).unwrap();
    let conn = rustls::ClientConnection::new(config, vkx_common::tls::host_server_name()).unwrap();
    let sock = std::os::unix::net::UnixStream::connect(socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    for payload in frames {
        let mut frame = Vec::new();
        vkx_common::wire::encode_frame(payload, &mut frame).unwrap();
        tls.write_all(&frame).unwrap();
    }
    tls.flush().unwrap();
    let mut bytes = Vec::new();
    // Ends at the host's close (EOF or reset); bounded by the read timeout.
    let _ = tls.read_to_end(&mut bytes);
    let mut d = vkx_common::wire::FrameDecoder::new();
    let mut input = &bytes[..];
    let mut out = Vec::new();
    while let Ok(Some(p)) = d.decode(&mut input) {
        out.push(vkx_common::wire::Message::decode(p).unwrap());
    }
    out
}

fn only_error(msgs: &[vkx_common::wire::Message]) -> vkx_common::errors::ErrorCode {
    match msgs {
        [vkx_common::wire::Message::Error(e)] => e.code,
        other => panic!("expected one error, got {other:?}"),
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_provisioned_guest_attests_and_a_tampered_one_is_refused() {
    let d = Deployment::new("vm-1", "");
    let tpm = &d.tpm;
    let pin = d.node.pin().to_owned();
    let socket = d.socket();
    let guest_config = |pin: &str| {
        d.guest_config(&format!("guest-{}.toml", &pin[..8]), &socket, pin, "")
            .display()
            .to_string()
    };
    let host = d.start_host("host.log");

    // 1. Attested.
    let o = run("vkx-guest", &["once", "--config", &guest_config(&pin)], b"");
    assert_eq!(
        o.status.code(),
        Some(0),
        "guest: {}\nhost: {}",
        stderr(&o),
        host.log()
    );
    assert!(stdout(&o).contains("attested: session"), "{}", stdout(&o));
    assert!(host.log().contains("attested"), "{}", host.log());

    // 1b. The same over hybrid vsock: the VMM delivers the guest's
    //     connection to host port 7861 on `<path>_7861` (§2.3.1).
    let hybrid = d.guest_config("guest-hybrid.toml", &d.path("vm.vsock_7861"), &pin, "");
    let o = run(
        "vkx-guest",
        &["once", "--config", &hybrid.display().to_string()],
        b"",
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "guest: {}\nhost: {}",
        stderr(&o),
        host.log()
    );

    // 1c. A raw client with an unknown message type, then one offering only
    //     a version the host does not speak: each gets its typed permanent
    //     error and a closed connection; the host keeps serving.
    use vkx_common::errors::ErrorCode;
    let got = raw_exchange(&socket, &pin, &[hex::decode("821863a0").unwrap()]);
    assert_eq!(only_error(&got), ErrorCode::UnknownMessage);
    let future_hello = vkx_common::wire::Message::Hello(vkx_common::wire::Hello {
        min_version: 2,
        max_version: 3,
        agent_name: vkx_common::wire::AgentName::new("future").unwrap(),
        agent_version: vkx_common::wire::AgentVersion::new("9").unwrap(),
        guest_nonce: [0; 32],
    })
    .encode()
    .unwrap()
    .to_vec();
    let got = raw_exchange(&socket, &pin, &[future_hello]);
    match &got[..] {
        [vkx_common::wire::Message::Error(e)] => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert_eq!(
                e.supported,
                Some(vkx_common::wire::VersionRange { min: 1, max: 1 })
            );
        }
        other => panic!("{other:?}"),
    }
    let o = run("vkx-guest", &["once", "--config", &guest_config(&pin)], b"");
    assert_eq!(
        o.status.code(),
        Some(0),
        "the host stopped serving: {}",
        host.log()
    );

    // 2. The wrong host key: permanent, no retry.
    let o = run(
        "vkx-guest",
        &["once", "--config", &guest_config(&"ab".repeat(32))],
        b"",
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("TLS handshake"), "{}", stderr(&o));

    // 3. A changed boot: the guest learns only attestation-failed; the
    //    reason is in the host's log.
    let o = Command::new("tpm2_pcrextend")
        .args(["-T", &tpm.tcti(), &format!("7:sha256={}", "ee".repeat(32))])
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = run("vkx-guest", &["once", "--config", &guest_config(&pin)], b"");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("attestation-failed (6)"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("PCR"),
        "the reason leaked to the guest: {}",
        stderr(&o)
    );
    let log = host.log();
    assert!(
        log.contains("attestation refused") && log.contains("sha256:7"),
        "{log}"
    );

    // 4. SIGTERM: the host stops cleanly and removes its socket.
    let status = host.stop();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());

    // 5. No host: retryable.
    let o = run("vkx-guest", &["once", "--config", &guest_config(&pin)], b"");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}
