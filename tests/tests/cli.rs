//! The binaries as an operator runs them: `vkx-host wire decode` on the
//! spec's vectors, as separate processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use vkx_e2e::run;

fn vector(rel: &str) -> serde_json::Value {
    let path = vkx_spec::vectors_dir().join(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn versions_are_reported() {
    for bin in ["vkx-host", "vkx-guest"] {
        let o = run(bin, &["version"], b"");
        assert!(o.status.success(), "{bin}: {o:?}");
        assert!(
            stdout(&o).contains("protocol versions 1..=1"),
            "{bin}: {}",
            stdout(&o)
        );
    }
}

#[test]
fn decode_prints_a_safe_summary_of_binary_frames() {
    // A framed stream of two vectors, as binary on stdin.
    let mut stream = Vec::new();
    for rel in ["messages/hello.json", "messages/key-update.json"] {
        let cbor = hex::decode(vector(rel)["cbor"].as_str().unwrap()).unwrap();
        vkx_common::wire::encode_frame(&cbor, &mut stream).unwrap();
    }
    let o = run("vkx-host", &["wire", "decode", "--frames", "-"], &stream);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(
        out.contains("frame 0: hello versions=1..=1 agent=vkx-guest/0.1.0"),
        "{out}"
    );
    assert!(
        out.contains("frame 1: key-update update-id=7 key=disk@v4(32B)"),
        "{out}"
    );
    // The key material of the key-update vector is 0x7c repeated.
    assert!(
        !out.contains("7c7c") && !out.contains("|||"),
        "key material printed: {out}"
    );
}

#[test]
fn decode_refuses_every_negative_message_vector_with_its_kind() {
    let dir = vkx_spec::vectors_dir().join("negative");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let frames = v["layer"] == "frame";
        let mut args = vec!["wire", "decode", "--hex"];
        if frames {
            args.push("--frames");
        }
        args.push("-");
        let o = run("vkx-host", &args, v["input"].as_str().unwrap().as_bytes());
        assert_eq!(o.status.code(), Some(1), "{}: {o:?}", path.display());
        let kind = v["error"].as_str().unwrap();
        assert!(
            stdout(&o).contains(&format!("[{kind}]")),
            "{}: {}",
            path.display(),
            stdout(&o)
        );
        checked += 1;
    }
    assert!(checked >= 11);
}

#[test]
fn unknown_message_is_reported_as_permanent_wire_error() {
    let o = run("vkx-host", &["wire", "decode", "--hex", "-"], b"821863a0");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("error unknown-message (2)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn oversized_input_and_bad_hex_are_usage_errors() {
    let o = run("vkx-host", &["wire", "decode", "--hex", "-"], b"zz");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let big = vec![b'0'; 16 * 1024 * 1024 + 2];
    let o = run("vkx-host", &["wire", "decode", "--hex", "-"], &big);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("input larger than"));
}

#[test]
fn init_prints_the_host_key_pin_and_never_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node").display().to_string();
    let o = run("vkx-host", &["init", "--dir", &node], b"");
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let pin = out
        .lines()
        .find_map(|l| l.strip_prefix(vkx_e2e::node::PIN_LINE))
        .expect("pin line");
    assert_eq!(hex::decode(pin).unwrap().len(), 32);
    let again = run("vkx-host", &["init", "--dir", &node], b"");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));
}
