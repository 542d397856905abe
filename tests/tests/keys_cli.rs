#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

//! The key store as an operator drives it: `vkx-host init` makes the
//! master key, `vkx-host keys add|generate|rotate|list|verify|remove` run
//! as separate processes, and the library reads back what they wrote.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vkx_common::wire::KeyName;
use vkx_e2e::node::Node;
use vkx_e2e::run;
use vkx_host::keystore::{DirKeyStore, KeyStore, MAX_VERSIONS_KEPT};

/// Material fed in by the tests: recognisable as text, hex and base64.
const SECRET: &[u8] = b"Sup3r-S3cret-Key-Material-Do-N0t-Print-Me!";

/// Runs `vkx-host keys <args> --node-dir <node>`.
fn keys(node: &Node, args: &[&str], stdin: &[u8]) -> Output {
    let node_dir = node.node_dir();
    let mut full = vec!["keys"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--node-dir", &node_dir]);
    run("vkx-host", &full, stdin)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Fails with a non-zero status and a message on stderr that contains
/// `needle`.
#[track_caller]
fn fails(o: Output, needle: &str) -> String {
    assert!(!o.status.success(), "unexpected success: {}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(needle), "{needle:?} not in: {err}");
    err
}

fn master_key_path(node: &Node) -> PathBuf {
    Path::new(&node.node_dir()).join(vkx_host::node::MASTER_KEY_FILE)
}

/// The store as the host agent opens it.
fn library_store(node: &Node) -> DirKeyStore {
    let node_dir = PathBuf::from(node.node_dir());
    let master = vkx_host::node::load_master_key(&node_dir).unwrap();
    DirKeyStore::open(&node_dir.join("keys"), master).unwrap()
}

fn key_name(s: &str) -> KeyName {
    KeyName::new(s).unwrap()
}

fn list_json(node: &Node) -> Vec<serde_json::Value> {
    let out = ok(keys(node, &["list", "--json"], b""));
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[(n >> (18 - 6 * i)) as usize & 63]));
        }
        if pad {
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
    }
    out
}

/// Every way the material could show up in text, also cut at any offset
/// (base64 of a sub-slice starting mid-group would differ, so several
/// starts are tried).
fn material_renderings(material: &[u8]) -> Vec<String> {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    for start in 0..3 {
        let m = &material[start..];
        out.push(base64(m, STD, true)[..16].to_owned());
        out.push(base64(m, URL, false)[..16].to_owned());
    }
    let hex = hex::encode(material);
    out.push(hex[..16].to_owned());
    out.push(hex[..16].to_uppercase());
    out.push(hex[1..17].to_owned());
    out.push(String::from_utf8_lossy(&material[..12]).into_owned());
    // Debug of a byte slice: "[83, 117, 112, ..."
    out.push(
        format!("{:?}", &material[..4])
            .trim_end_matches(']')
            .to_owned(),
    );
    out
}

#[track_caller]
fn assert_no_material(text: &str, material: &[u8]) {
    for needle in material_renderings(material) {
        assert!(
            !text.contains(&needle),
            "material ({needle}) printed: {text}"
        );
    }
}

#[test]
fn init_creates_a_private_master_key_once() {
    let node = Node::new();
    let path = master_key_path(&node);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let before = std::fs::read(&path).unwrap();
    assert_ne!(before, [0u8; 32]);
    // A second init refuses, and the master key stays as it was.
    fails(
        run("vkx-host", &["init", "--dir", &node.node_dir()], b""),
        "refusing to replace",
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Two nodes get different master keys.
    assert_ne!(
        std::fs::read(master_key_path(&Node::new())).unwrap(),
        before
    );
}

#[test]
fn a_master_key_readable_by_others_is_refused() {
    let node = Node::new();
    let path = master_key_path(&node);
    ok(keys(
        &node,
        &["generate", "disk", "--allow-vm", "vm-1"],
        b"",
    ));
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        for args in [
            &["list"][..],
            &["rotate", "disk"],
            &["generate", "cfg"],
            &["verify"],
        ] {
            let err = fails(keys(&node, args, b""), &format!("mode {mode:04o}"));
            assert!(err.contains("chmod 600"), "{err}");
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let keys_now = list_json(&node);
    assert_eq!(keys_now.len(), 1);
    assert_eq!(keys_now[0]["current_version"], 1);
    // A master key of the wrong size is refused, too.
    std::fs::write(&path, [1u8; 16]).unwrap();
    fails(keys(&node, &["list"], b""), "16 bytes");
}

#[test]
fn keys_lifecycle_through_the_binary() {
    let node = Node::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("material.bin");
    std::fs::write(&file, SECRET).unwrap();
    let file = file.display().to_string();

    let out = ok(keys(
        &node,
        &[
            "add",
            "disk",
            "--from-file",
            &file,
            "--allow-vm",
            "vm-2",
            "--allow-vm",
            "vm-1",
            "--allow-image",
            "debian-12",
        ],
        b"",
    ));
    assert!(out.contains("added key disk version 1 (42 bytes)"), "{out}");
    let out = ok(keys(
        &node,
        &["add", "from-stdin", "--from-stdin", "--allow-vm", "vm-3"],
        b"\x00\x01binary\xff",
    ));
    assert!(out.contains("version 1 (9 bytes)"), "{out}");
    let out = ok(keys(
        &node,
        &["generate", "cfg", "--bytes", "64", "--allow-image", "img"],
        b"",
    ));
    assert!(
        out.contains("generated key cfg version 1 (64 random bytes)"),
        "{out}"
    );
    // A key nobody may receive is stored, with a warning.
    let o = keys(&node, &["generate", "orphan"], b"");
    assert!(stderr(&o).contains("will not release this key"), "{o:?}");
    ok(o);

    // Existing names are refused, whatever the source.
    fails(
        keys(&node, &["add", "disk", "--from-stdin"], b"other"),
        "already exists",
    );
    fails(keys(&node, &["generate", "cfg"], b""), "already exists");

    // Rotation: random material of the same length, or given material;
    // the allow-lists stay.
    let out = ok(keys(&node, &["rotate", "disk"], b""));
    assert!(out.contains("rotated key disk to version 2"), "{out}");
    let out = ok(keys(
        &node,
        &["rotate", "disk", "--from-stdin"],
        b"v3-material",
    ));
    assert!(out.contains("to version 3 (3 versions kept)"), "{out}");

    let store = library_store(&node);
    let v1 = store.version(&key_name("disk"), 1).unwrap().unwrap();
    assert_eq!(v1.material.expose(), SECRET);
    let v2 = store.version(&key_name("disk"), 2).unwrap().unwrap();
    assert_eq!(v2.material.expose().len(), SECRET.len());
    assert_ne!(v2.material.expose(), SECRET);
    let v3 = store.current(&key_name("disk")).unwrap().unwrap();
    assert_eq!((v3.version, v3.material.expose()), (3, &b"v3-material"[..]));
    assert_eq!(v3.allowed_vms, v1.allowed_vms);
    assert_eq!(v3.allowed_images, v1.allowed_images);
    let vm = |s: &str| vkx_common::wire::VmId::new(s).unwrap();
    assert!(v3.entitles(&vm("vm-1"), None));
    assert!(v3.entitles(&vm("vm-9"), Some("debian-12")));
    assert!(!v3.entitles(&vm("vm-9"), Some("debian-11")));
    assert_eq!(
        store
            .current(&key_name("from-stdin"))
            .unwrap()
            .unwrap()
            .material
            .expose(),
        b"\x00\x01binary\xff"
    );

    // The table and the JSON list.
    let table = ok(keys(&node, &["list"], b""));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert_eq!(lines.len(), 5, "{table}");
    let disk = lines.iter().find(|l| l.starts_with("disk ")).unwrap();
    for field in ["3", "11", "vm-1,vm-2", "debian-12", "Z"] {
        assert!(disk.contains(field), "{field} not in {disk}");
    }
    let listed = list_json(&node);
    let names: Vec<&str> = listed.iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cfg", "disk", "from-stdin", "orphan"]);
    let disk = &listed[1];
    assert_eq!(disk["current_version"], 3);
    assert_eq!(disk["versions"], serde_json::json!([1, 2, 3]));
    assert_eq!(disk["material_len"], 11);
    assert_eq!(disk["allowed_vms"], serde_json::json!(["vm-1", "vm-2"]));
    assert_eq!(disk["allowed_images"], serde_json::json!(["debian-12"]));
    assert!(listed[0]["created_unix"].as_u64().unwrap() > 1_700_000_000);

    let out = ok(keys(&node, &["verify"], b""));
    assert!(out.contains("6 key versions verified"), "{out}");

    // Removal.
    let out = ok(keys(&node, &["remove", "disk"], b""));
    assert!(out.contains("removed key disk (3 versions)"), "{out}");
    assert!(store.current(&key_name("disk")).unwrap().is_none());
    assert_eq!(list_json(&node).len(), 3);
    fails(keys(&node, &["remove", "disk"], b""), "does not exist");
    fails(keys(&node, &["rotate", "disk"], b""), "does not exist");
    let leftovers: Vec<_> = std::fs::read_dir(Path::new(&node.node_dir()).join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        leftovers.iter().all(|n| !n.starts_with('.')),
        "{leftovers:?}"
    );
}

#[test]
fn a_store_outside_the_node_directory() {
    let node = Node::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("elsewhere").display().to_string();
    ok(keys(&node, &["generate", "disk", "--store", &store], b""));
    let listed = ok(keys(&node, &["list", "--store", &store], b""));
    assert!(listed.contains("disk"), "{listed}");
    let default = ok(keys(&node, &["list"], b""));
    assert!(default.starts_with("no keys in"), "{default}");
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let node = Node::new();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![7u8; 1025]).unwrap();
    let big = big.display().to_string();
    let missing = dir.path().join("missing").display().to_string();
    for (args, stdin, needle) in [
        (
            &["add", "k", "--from-stdin"][..],
            &b""[..],
            "standard input is empty",
        ),
        (
            &["add", "k", "--from-file", &big],
            b"",
            "more than 1024 bytes",
        ),
        (
            &["add", "k", "--from-stdin"],
            &[7u8; 5000][..],
            "more than 1024 bytes",
        ),
        (
            &["add", "k", "--from-file", &missing],
            b"",
            "open key material file",
        ),
        (&["add", "k"], b"", "--from-file"),
        (
            &["add", "k", "--from-file", &big, "--from-stdin"],
            b"",
            "cannot be used with",
        ),
        (&["add", "..", "--from-stdin"], b"x", "invalid key name"),
        (&["add", ".tmp-x", "--from-stdin"], b"x", "invalid key name"),
        (&["add", "a/b", "--from-stdin"], b"x", "invalid key name"),
        (&["generate", &"k".repeat(65)], b"", "invalid key name"),
        (
            &["generate", "k", "--bytes", "0"],
            b"",
            "a key has 1..=1024 bytes",
        ),
        (
            &["generate", "k", "--bytes", "1025"],
            b"",
            "a key has 1..=1024 bytes",
        ),
        (
            &["generate", "k", "--allow-vm", "a b"],
            b"",
            "invalid allow-list",
        ),
        (
            &["generate", "k", "--allow-image", "x/y"],
            b"",
            "invalid allow-list",
        ),
        (&["rotate", "nope"], b"", "does not exist"),
        (&["remove", "nope"], b"", "does not exist"),
    ] {
        let o = keys(&node, args, stdin);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: {needle:?} not in {}",
            stderr(&o)
        );
    }
    // Nothing was stored by any of them.
    assert!(list_json(&node).is_empty());
    // No --node-dir: refused by the argument parser.
    let o = run("vkx-host", &["keys", "list"], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--node-dir"), "{}", stderr(&o));
}

#[test]
fn no_command_ever_prints_material() {
    let node = Node::new();
    let mut transcript = String::new();
    let mut record = |o: Output| {
        transcript.push_str(&stdout(&o));
        transcript.push_str(&stderr(&o));
    };
    record(keys(
        &node,
        &["add", "disk", "--from-stdin", "--allow-vm", "vm-1"],
        SECRET,
    ));
    // Refusals see the material too.
    record(keys(&node, &["add", "disk", "--from-stdin"], SECRET));
    record(keys(&node, &["add", "bad name", "--from-stdin"], SECRET));
    record(keys(
        &node,
        &["add", "x", "--from-stdin", "--allow-vm", "a b"],
        SECRET,
    ));
    let mut long = SECRET.repeat(30);
    long.truncate(1100);
    record(keys(&node, &["add", "long", "--from-stdin"], &long));
    record(keys(&node, &["rotate", "disk", "--from-stdin"], SECRET));
    record(keys(&node, &["list"], b""));
    record(keys(&node, &["list", "--json"], b""));
    record(keys(&node, &["verify"], b""));
    // A damaged file: the errors name it but quote nothing of it.
    let file = Path::new(&node.node_dir()).join("keys/disk/00000002.key");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["created_unix"] = (doc["created_unix"].as_u64().unwrap() + 1).into();
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    record(keys(&node, &["list"], b""));
    record(keys(&node, &["verify"], b""));
    record(keys(&node, &["remove", "disk"], b""));
    assert!(transcript.contains("added key disk"), "{transcript}");
    assert_no_material(&transcript, SECRET);
    // The key files hold no plaintext either.
    assert!(!text.contains("Sup3r") && !text.contains(&hex::encode(&SECRET[..8])));
}

#[test]
fn verify_and_list_report_a_tampered_key() {
    let node = Node::new();
    ok(keys(
        &node,
        &["generate", "disk", "--allow-vm", "vm-1"],
        b"",
    ));
    ok(keys(&node, &["rotate", "disk"], b""));
    let file = Path::new(&node.node_dir()).join("keys/disk/00000002.key");
    // Grant the key to another VM by editing the file: authentication
    // fails, so the edit hands out nothing.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("\"vm-1\"", "\"vm-666\"")).unwrap();
    let o = keys(&node, &["verify"], b"");
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(out.contains("ok    disk v1"), "{out}");
    assert!(out.contains("FAIL  disk v2"), "{out}");
    assert!(out.contains("00000002.key"), "{out}");
    assert!(
        stderr(&o).contains("1 of 2 key versions failed"),
        "{}",
        stderr(&o)
    );
    let err = fails(keys(&node, &["list"], b""), "is corrupt");
    assert!(err.contains("authentication failed"), "{err}");
    // No silent fall-back to version 1 for the agent either.
    assert!(library_store(&node).current(&key_name("disk")).is_err());
}

/// SIGKILL `keys rotate` at varying points: the store stays readable,
/// every version left decrypts, and rotation goes on.
#[test]
fn sigkill_during_rotate_leaves_a_readable_store() {
    let node = Node::new();
    ok(keys(
        &node,
        &["generate", "disk", "--allow-vm", "vm-1"],
        b"",
    ));
    let bin = vkx_e2e::bin("vkx-host");
    let node_dir = node.node_dir();
    let mut completed = 0u32;
    for delay_ms in 0..=30u64 {
        let mut child = Command::new(&bin)
            .args(["keys", "rotate", "disk", "--node-dir", &node_dir])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL; fails only if it already exited.
        let status = child.wait().unwrap();
        if status.success() {
            completed += 1;
        }
    }
    let store = library_store(&node);
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    let info = &listed[0];
    eprintln!(
        "{completed} of 31 rotations ran to the end; current version {}",
        info.current_version
    );
    // Every rotation that ran to the end made a version; killed ones may
    // have, too.
    assert!(info.current_version > completed, "{info:?}");
    // Rotations killed between their link and their pruning leave extra
    // versions (the next complete rotation prunes them); none is missing
    // between the oldest kept and the current one.
    let oldest = info.versions[0];
    assert_eq!(
        info.versions,
        (oldest..=info.current_version).collect::<Vec<_>>(),
        "{info:?}"
    );
    for &v in &info.versions {
        let key = store.version(&key_name("disk"), v).unwrap().unwrap();
        assert_eq!(key.material.expose().len(), 32);
        assert_eq!(key.allowed_vms.len(), 1);
    }
    ok(keys(&node, &["list"], b""));
    ok(keys(&node, &["verify"], b""));
    // A complete rotation afterwards works and prunes.
    let out = ok(keys(&node, &["rotate", "disk"], b""));
    assert!(
        out.contains(&format!("to version {}", info.current_version + 1)),
        "{out}"
    );
    let after = &store.list().unwrap()[0];
    assert!(after.versions.len() <= MAX_VERSIONS_KEPT, "{after:?}");
}

/// Deleting the newest version file does not roll the key back: the host
/// refuses it, `list` and `verify` say why, and only an explicit
/// `seal --danger-accept-rollback` serves the older version.
#[test]
fn deleting_the_newest_version_refuses_the_key_until_the_operator_decides() {
    let node = Node::new();
    ok(keys(
        &node,
        &["generate", "disk", "--allow-vm", "vm-1"],
        b"",
    ));
    ok(keys(&node, &["generate", "cfg", "--allow-vm", "vm-1"], b""));
    ok(keys(&node, &["rotate", "disk"], b""));
    ok(keys(&node, &["rotate", "disk"], b""));
    let key_dir = Path::new(&node.node_dir()).join("keys/disk");
    std::fs::remove_file(key_dir.join("00000003.key")).unwrap();
    let err = fails(keys(&node, &["list"], b""), "00000003.key");
    assert!(err.contains("is missing"), "{err}");
    let o = keys(&node, &["verify"], b"");
    assert!(!o.status.success());
    assert!(stdout(&o).contains("FAIL  disk v3"), "{}", stdout(&o));
    assert!(stdout(&o).contains("ok    cfg v1"), "{}", stdout(&o));
    let store = library_store(&node);
    assert!(store.current(&key_name("disk")).is_err());
    assert!(store.current(&key_name("cfg")).unwrap().is_some());
    fails(keys(&node, &["rotate", "disk"], b""), "is missing");
    fails(
        keys(&node, &["seal", "disk"], b""),
        "danger-accept-rollback",
    );
    let out = ok(keys(
        &node,
        &["seal", "disk", "--danger-accept-rollback"],
        b"",
    ));
    assert!(
        out.contains("sealed key disk at version 2") && out.contains("ROLLED BACK"),
        "{out}"
    );
    assert_eq!(
        store.current(&key_name("disk")).unwrap().unwrap().version,
        2
    );
    ok(keys(&node, &["verify"], b""));
}

/// A store as the previous vkx wrote it (no records) is refused key by
/// key until `keys seal --all`.
#[test]
fn a_store_without_records_is_sealed_explicitly() {
    let node = Node::new();
    ok(keys(
        &node,
        &["generate", "disk", "--allow-vm", "vm-1"],
        b"",
    ));
    ok(keys(&node, &["rotate", "disk"], b""));
    ok(keys(&node, &["generate", "cfg", "--allow-vm", "vm-1"], b""));
    let store_dir = Path::new(&node.node_dir()).join("keys");
    for key in ["disk", "cfg"] {
        std::fs::remove_file(store_dir.join(key).join("current.json")).unwrap();
    }
    let err = fails(
        keys(&node, &["list"], b""),
        "no sealed current-version record",
    );
    assert!(err.contains("keys seal"), "{err}");
    fails(keys(&node, &["verify"], b""), "2 of 3 key versions failed");
    fails(keys(&node, &["seal"], b""), "<NAME>");
    let out = ok(keys(&node, &["seal", "--all"], b""));
    assert!(out.contains("sealed key disk at version 2"), "{out}");
    assert!(out.contains("sealed key cfg at version 1"), "{out}");
    assert!(out.contains("it had no record"), "{out}");
    assert_eq!(list_json(&node).len(), 2);
    let again = ok(keys(&node, &["seal", "disk"], b""));
    assert!(again.contains("already sealed at version 2"), "{again}");
}

/// The store refuses a directory group or others may list.
#[test]
fn a_store_directory_others_may_list_is_refused() {
    let node = Node::new();
    ok(keys(
        &node,
        &["generate", "disk", "--allow-vm", "vm-1"],
        b"",
    ));
    let store_dir = Path::new(&node.node_dir()).join("keys");
    std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = fails(keys(&node, &["list"], b""), "chmod 700");
    assert!(err.contains(&store_dir.display().to_string()), "{err}");
    std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    ok(keys(&node, &["list"], b""));
}
