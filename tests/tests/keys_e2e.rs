//! Keys end to end, as processes: `vkx-host keys` fills the store,
//! `vkx-host serve` releases by policy and allow-list, `vkx-guest once`
//! and `vkx-guest run` deliver to the key directory, a rotation reaches a
//! live guest (pushed, installed, acknowledged) and an offline one (at its
//! next attestation). Everything runs with the most verbose logging, and
//! no key's bytes (raw, hex or base64) may appear in any log or output.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use vkx_e2e::agents::{Agent, Deployment};
use vkx_e2e::run;

const LIMIT: Duration = Duration::from_secs(30);

/// Key materials with no byte pattern a log could contain by chance.
const DISK_V1: &[u8; 32] = b"\x8e\x11\xa4\x03\x9f\x5b\xc2\x77\x10\xee\x42\x6d\x93\x0a\x5c\xb1\x2f\xd8\x64\x39\x71\xc5\x0b\xe6\x88\x14\xaf\x5e\x23\x97\xd0\x4c";
const DISK_V2: &[u8; 32] = b"\x17\xf2\x6a\xc9\x30\x8d\x4e\xb5\x02\x99\x7c\xe1\x5f\x36\xa8\x0d\xc4\x61\xbb\x28\x93\x4f\xde\x07\x75\x1a\xe9\x52\x3c\x86\xf0\x2b";
const DISK_V3: &[u8; 32] = b"\x6b\x0c\xd1\x84\x27\xfa\x53\x9e\x40\xb7\x1d\x68\xc3\x05\x9a\xe4\x32\x7f\x16\xab\x58\xe0\x0f\xcd\x91\x24\x7b\xd6\x3a\x85\x4e\xb9";

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Fails if any form of any material appears in `text`.
fn assert_no_secret(what: &str, text: &[u8]) {
    for m in [DISK_V1, DISK_V2, DISK_V3] {
        let forms: [Vec<u8>; 4] = [
            m.to_vec(),
            hex::encode(m).into_bytes(),
            hex::encode_upper(m).into_bytes(),
            base64(m).into_bytes(),
        ];
        for f in forms {
            // Any 12-byte window of a form is already a leak.
            for w in f.windows(12) {
                assert!(
                    !text.windows(w.len()).any(|t| t == w),
                    "{what} contains key material"
                );
            }
        }
    }
}

fn keys_cmd(d: &Deployment, args: &[&str], stdin: &[u8]) -> Output {
    let node = d.node.node_dir();
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--node-dir", &node]);
    let o = run("vkx-host", &all, stdin);
    assert!(o.status.success(), "keys {args:?}: {o:?}");
    o
}

fn key_file(dir: &Path, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400, "{}", path.display());
    std::fs::read(path).unwrap()
}

#[test]
fn keys_are_released_by_policy_delivered_and_rotated_without_leaking() {
    let d = Deployment::new("vm-1", "log_level = \"trace\"");
    let pin = d.node.pin().to_owned();
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    // The policy grants "disk" to the image; "secret" exists but is on
    // neither the policy nor its own allow-list for vm-1.
    let o = keys_cmd(
        &d,
        &["add", "disk", "--from-stdin", "--allow-image", "img"],
        DISK_V1,
    );
    outputs.push(("keys add".into(), [o.stdout, o.stderr].concat()));
    keys_cmd(&d, &["generate", "secret", "--allow-vm", "vm-9"], b"");
    let key_dir = d.path("keys");
    let cfg = |name: &str, keys: &str| {
        d.guest_config(
            name,
            &d.socket(),
            &pin,
            &format!(
                "log_level = \"trace\"\nkeys = [{keys}]\nkey_dir = \"{}\"\n[retry]\nbase_ms = 100\ncap_ms = 1000\nfloor_ms = 50\n",
                key_dir.display()
            ),
        )
        .display()
        .to_string()
    };
    let disk_only = cfg("disk.toml", "\"disk\"");
    let both = cfg("both.toml", "\"disk\", \"secret\"");
    let host = d.start_host("host.log");

    // 1. Released by policy, delivered at mode 0400.
    let o = run("vkx-guest", &["once", "--config", &disk_only], b"");
    assert_eq!(o.status.code(), Some(0), "{o:?}\n{}", host.log());
    assert!(String::from_utf8_lossy(&o.stdout).contains("key delivered: disk version 1"));
    assert_eq!(key_file(&key_dir, "disk"), DISK_V1);
    outputs.push(("once".into(), [o.stdout, o.stderr].concat()));

    // 2. A key the policy does not grant: refused, typed, exit 4; the other
    //    key still arrives; the reason is only in the host's log.
    let o = run("vkx-guest", &["once", "--config", &both], b"");
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("secret: refused: not-permitted"), "{err}");
    assert!(!key_dir.join("secret").exists());
    assert!(host.log().contains("the policy does not grant this key"));
    outputs.push(("once refused".into(), [o.stdout, o.stderr].concat()));

    // 3. Rotation to a live guest: pushed, installed atomically, acked.
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &disk_only],
        d.path("guest.log"),
    );
    guest.wait_log(LIMIT, "the first delivery", |l| l.contains("key delivered"));
    keys_cmd(&d, &["rotate", "disk", "--from-stdin"], DISK_V2);
    guest.wait_log(LIMIT, "the pushed rotation", |l| {
        l.contains("key delivered") && l.contains("version=2")
    });
    host.wait_log(LIMIT, "the acknowledgement", |l| {
        l.contains("key update installed")
    });
    assert_eq!(key_file(&key_dir, "disk"), DISK_V2);
    assert!(guest.stop().success());

    // 4. Rotation while the guest is offline: it gets the new version at
    //    its next attestation.
    keys_cmd(&d, &["rotate", "disk", "--from-stdin"], DISK_V3);
    let o = run("vkx-guest", &["once", "--config", &disk_only], b"");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("key delivered: disk version 3"));
    assert_eq!(key_file(&key_dir, "disk"), DISK_V3);
    outputs.push(("once after rotation".into(), [o.stdout, o.stderr].concat()));

    // `vkx-guest get` prints exactly the key, for a pipe.
    let o = run("vkx-guest", &["get", "disk", "--config", &disk_only], b"");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(o.stdout, DISK_V3);
    outputs.push(("get stderr".into(), o.stderr));
    let o = run("vkx-guest", &["get", "secret", "--config", &disk_only], b"");
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    outputs.push(("get refused".into(), [o.stdout, o.stderr].concat()));

    let o = keys_cmd(&d, &["list"], b"");
    outputs.push(("keys list".into(), [o.stdout, o.stderr].concat()));
    assert!(host.stop().success());

    // 5. No key's bytes anywhere: outputs, and both agents' logs at the
    //    most verbose level.
    outputs.push((
        "host log".into(),
        std::fs::read(d.path("host.log")).unwrap(),
    ));
    outputs.push((
        "guest log".into(),
        std::fs::read(d.path("guest.log")).unwrap(),
    ));
    for (what, text) in &outputs {
        assert_no_secret(what, text);
    }
    let host_log = String::from_utf8_lossy(&outputs[outputs.len() - 2].1).into_owned();
    assert!(
        host_log.contains("TRACE") || host_log.contains("DEBUG"),
        "not verbose: {host_log}"
    );
}

/// A key the store refuses is withheld, and never served at an older
/// version: here one key lost its sealed record (as in a store from
/// before records) and another its newest version file. The host still
/// starts and serves what it can.
#[test]
fn a_refused_key_is_withheld_and_the_host_serves_the_rest() {
    let d = Deployment::new("vm-1", "log_level = \"debug\"");
    let pin = d.node.pin().to_owned();
    keys_cmd(
        &d,
        &["add", "disk", "--from-stdin", "--allow-image", "img"],
        DISK_V1,
    );
    keys_cmd(&d, &["rotate", "disk", "--from-stdin"], DISK_V2);
    keys_cmd(&d, &["generate", "secret", "--allow-vm", "vm-9"], b"");
    let store = Path::new(&d.node.node_dir()).join("keys");
    std::fs::remove_file(store.join("secret/current.json")).unwrap();
    let key_dir = d.path("keys");
    let cfg = d
        .guest_config(
            "disk.toml",
            &d.socket(),
            &pin,
            &format!(
                "keys = [\"disk\"]\nkey_dir = \"{}\"\n[retry]\nbase_ms = 100\ncap_ms = 1000\nfloor_ms = 50\n",
                key_dir.display()
            ),
        )
        .display()
        .to_string();
    let host = d.start_host("host.log");
    host.wait_log(LIMIT, "the refusal of the unsealed key", |l| {
        l.contains("key refused, not served") && l.contains("secret")
    });
    let o = run("vkx-guest", &["once", "--config", &cfg], b"");
    assert_eq!(o.status.code(), Some(0), "{o:?}\n{}", host.log());
    assert!(String::from_utf8_lossy(&o.stdout).contains("key delivered: disk version 2"));
    assert_eq!(key_file(&key_dir, "disk"), DISK_V2);

    // The newest version deleted: withheld, not version 1 instead.
    std::fs::remove_file(store.join("disk/00000002.key")).unwrap();
    let o = run("vkx-guest", &["once", "--config", &cfg], b"");
    assert_ne!(o.status.code(), Some(0), "{o:?}");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("key delivered"),
        "{o:?}"
    );
    assert_eq!(key_file(&key_dir, "disk"), DISK_V2);
    host.wait_log(LIMIT, "the withheld key", |l| {
        l.contains("key withheld") && l.contains("00000002.key")
    });
    assert!(host.stop().success());
}

/// Derived shared keys (PROTOCOL.md §9): the guest's K (delivered to its
/// derived directory) equals the host's, which an allowed local process
/// fetches through the host's local socket; a process the allow-list does
/// not name is refused by its credentials; the key goes with its session;
/// a purpose the policy does not grant is refused.
#[test]
fn derived_keys_agree_and_local_access_is_by_credentials() {
    use std::os::unix::fs::MetadataExt as _;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let d = Deployment::new("vm-1", "");
    let local = d.path("local.sock");
    let with_local = |allow: u32| {
        format!(
            "log_level = \"trace\"\n[local]\nsocket = \"{}\"\nallow_uids = [{allow}]\n",
            local.display()
        )
    };
    d.write_host_config(&with_local(uid));
    let pin = d.node.pin().to_owned();
    let derived_dir = d.path("derived");
    let cfg = |name: &str, purpose: &str| {
        d.guest_config(
            name,
            &d.socket(),
            &pin,
            &format!(
                "derived_dir = \"{}\"\nlog_level = \"trace\"\n[[derive]]\npurpose = \"{purpose}\"\nlength = 48\n",
                derived_dir.display()
            ),
        )
        .display()
        .to_string()
    };
    let granted = cfg("derive.toml", "disk-unlock:v1");
    let fetch = || {
        run(
            "vkx-host",
            &[
                "derived",
                "get",
                "--socket",
                &local.display().to_string(),
                "--vm-id",
                "vm-1",
                "--purpose",
                "disk-unlock:v1",
            ],
            b"",
        )
    };
    let host = d.start_host("host.log");

    // 1. A guest holding its session derived K; the host's copy is the
    //    same bytes, for an allowed local process.
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &granted],
        d.path("guest.log"),
    );
    guest.wait_log(LIMIT, "the derived key", |l| {
        l.contains("derived key delivered")
    });
    let k_guest = key_file(&derived_dir, "disk-unlock:v1");
    assert_eq!(k_guest.len(), 48);
    let o = fetch();
    assert!(o.status.success(), "{o:?}\n{}", host.log());
    assert_eq!(o.stdout, k_guest);

    // 1b. A second session of the same VM derives its own K and ends: the
    //     first session's K is neither overwritten nor removed (§9.4).
    let other_dir = d.path("derived-once");
    let once = d
        .guest_config(
            "derive-once.toml",
            &d.socket(),
            &pin,
            &format!(
                "derived_dir = \"{}\"\n[[derive]]\npurpose = \"disk-unlock:v1\"\nlength = 48\n",
                other_dir.display()
            ),
        )
        .display()
        .to_string();
    let o = run("vkx-guest", &["once", "--config", &once], b"");
    assert!(o.status.success(), "{o:?}");
    let k_once = key_file(&other_dir, "disk-unlock:v1");
    assert_ne!(k_once, k_guest, "each session has its own K");
    let o = fetch();
    assert!(o.status.success(), "{o:?}\n{}", host.log());
    assert_eq!(o.stdout, k_guest, "the live session's K, untouched");

    // 2. The session ends: so does the host's K.
    assert!(guest.stop().success());
    let start = std::time::Instant::now();
    loop {
        let o = fetch();
        if !o.status.success() {
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("no such derived key"),
                "{o:?}"
            );
            break;
        }
        assert!(start.elapsed() < LIMIT, "K outlived its session");
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3. A purpose the policy does not grant: refused, exit 4.
    let o = run(
        "vkx-guest",
        &["once", "--config", &cfg("other.toml", "other:v1")],
        b"",
    );
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the host refused the purpose"),
        "{o:?}"
    );
    assert!(host.stop().success());

    // 4. A local process whose uid the allow-list does not name is refused
    //    by its credentials, whatever the socket's file mode.
    d.write_host_config(&with_local(uid.wrapping_add(4242)));
    let host = d.start_host("host-2.log");
    let guest = Agent::spawn(
        "vkx-guest",
        &["run", "--config", &granted],
        d.path("guest-2.log"),
    );
    guest.wait_log(LIMIT, "the derived key", |l| {
        l.contains("derived key delivered")
    });
    let o = fetch();
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not allowed"),
        "{o:?}"
    );
    assert!(host.log().contains("client not allowed"), "{}", host.log());
    let k = key_file(&derived_dir, "disk-unlock:v1");
    assert!(guest.stop().success());
    assert!(host.stop().success());
    for log in ["host.log", "host-2.log", "guest.log", "guest-2.log"] {
        let text = std::fs::read(d.path(log)).unwrap();
        for key in [&k_guest, &k] {
            for w in hex::encode(key).as_bytes().windows(16) {
                assert!(
                    !text.windows(16).any(|t| t == w),
                    "{log} holds a derived key"
                );
            }
        }
    }
}
