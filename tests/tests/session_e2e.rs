//! The agents end to end as processes: `vkx-host serve` and `vkx-guest
//! once` over a Unix socket, TLS with the pinned host key, swtpm as the
//! guest's vTPM, the host's registry and policy deciding.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vkx_e2e::node::Node;
use vkx_e2e::swtpm::Swtpm;
use vkx_e2e::{bin, run};

/// Longest wait for the host's socket to appear.
const STARTUP_LIMIT: Duration = Duration::from_secs(20);

struct HostProcess {
    child: Child,
    log: PathBuf,
}

impl HostProcess {
    fn start(config: &Path, socket: &Path, log: PathBuf) -> Self {
        let child = Command::new(bin("vkx-host"))
            .args(["serve", "--config", &config.display().to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < STARTUP_LIMIT,
                "host did not listen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "host did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let work = tempfile::tempdir().unwrap();
    let w = |n: &str| work.path().join(n);
    let tpm = Swtpm::start();

    let node = Node::new();
    let pin = node.pin().to_owned();
    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(o.status.success(), "{o:?}");

    // The operator's reference values: this VM's PCRs 0 and 7 as they are.
    let o = run(
        "vkx-guest",
        &[
            "evidence",
            "--tcti",
            &tpm.tcti(),
            "--nonce",
            &"00".repeat(32),
            "--pcrs",
            "sha256:0,7",
            "--out-dir",
            &w("ref").display().to_string(),
        ],
        b"",
    );
    assert!(o.status.success(), "{o:?}");
    let pcrs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w("ref/pcrs.json")).unwrap()).unwrap();
    let mut policy =
        "[[image]]\nname = \"img\"\nkeys = [\"disk\"]\n\n[[vm]]\nid = \"vm-1\"\nimage = \"img\"\n"
            .to_owned();
    for i in ["0", "7"] {
        policy += &format!(
            "\n[[vm.pcr]]\nbank = \"sha256\"\nindex = {i}\nallowed = [\"{}\"]\n",
            pcrs["sha256"][i].as_str().unwrap()
        );
    }
    std::fs::write(w("policy.toml"), policy).unwrap();
    let socket = w("vm-1.sock");
    std::fs::write(
        w("host.toml"),
        format!(
            "node_dir = \"{}\"\nregistry = \"{}\"\npolicy = \"{}\"\n\n[[unix_listener]]\npath = \"{}\"\nvm_id = \"vm-1\"\n\n[[hybrid_vsock]]\npath = \"{}\"\nvm_id = \"vm-1\"\n",
            node.node_dir(),
            node.registry(),
            w("policy.toml").display(),
            socket.display(),
            w("vm-1.vsock").display()
        ),
    )
    .unwrap();
    let guest_config = |pin: &str| {
        let path = w(&format!("guest-{}.toml", &pin[..8]));
        std::fs::write(
            &path,
            format!(
                "host_socket = \"{}\"\nhost_key_sha256 = \"{pin}\"\ntcti = \"{}\"\n",
                socket.display(),
                tpm.tcti()
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let host = HostProcess::start(&w("host.toml"), &socket, w("host.log"));

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
    let hybrid = w("guest-hybrid.toml");
    std::fs::write(
        &hybrid,
        format!(
            "host_socket = \"{}\"\nhost_key_sha256 = \"{pin}\"\ntcti = \"{}\"\n",
            w("vm-1.vsock_7861").display(),
            tpm.tcti()
        ),
    )
    .unwrap();
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
