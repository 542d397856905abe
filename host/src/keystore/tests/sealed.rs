//! Sealing: a round trip, another master key, edited metadata, damaged
//! ciphertext or files, a corrupt newest version.

use super::*;

#[test]
fn round_trip_through_add_current_version_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    assert!(s.list().unwrap().is_empty());
    assert!(s.current(&name("disk")).unwrap().is_none());
    let info = s
        .add(
            &name("disk"),
            &material(SECRET),
            &allow(&["vm-2", "vm-1", "vm-1"], &["debian-12"]),
        )
        .unwrap();
    assert_eq!(info.current_version, 1);
    assert_eq!(info.versions, vec![1]);
    assert_eq!(info.material_len, 32);
    let key = s.current(&name("disk")).unwrap().unwrap();
    assert_eq!(key.material.expose(), SECRET);
    assert_eq!(key.version, 1);
    assert_eq!(
        key.allowed_vms.iter().map(VmId::as_str).collect::<Vec<_>>(),
        ["vm-1", "vm-2"]
    );
    assert!(key.created_unix > 1_700_000_000);
    assert_eq!(s.version(&name("disk"), 1).unwrap(), Some(key.clone()));
    assert_eq!(s.version(&name("disk"), 2).unwrap(), None);
    assert_eq!(s.version(&name("disk"), 0).unwrap(), None);
    assert_eq!(s.version(&name("other"), 1).unwrap(), None);
    s.generate(&name("cfg"), 48, &AllowList::default()).unwrap();
    let list = s.list().unwrap();
    assert_eq!(
        list.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["cfg", "disk"]
    );
    assert_eq!(list[0].material_len, 48);
    assert_eq!(list[1], info);
    // Reopening (a restart) reads the same.
    let again = store(dir.path());
    assert_eq!(again.current(&name("disk")).unwrap(), Some(key));
    // Private files and directories, no temporary entries left.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(s.dir()), 0o700);
    assert_eq!(mode(&s.dir().join("disk")), 0o700);
    assert_eq!(mode(&key_path(&s, "disk", 1)), 0o600);
    assert_eq!(mode(&s.dir().join("disk").join(RECORD_FILE)), 0o600);
    assert_eq!(file_names(s.dir()), ["cfg", "disk"]);
    assert_eq!(
        file_names(&s.dir().join("disk")),
        ["00000001.key", RECORD_FILE]
    );
    // The file holds no plaintext.
    let raw = fs::read(key_path(&s, "disk", 1)).unwrap();
    let text = String::from_utf8(raw).unwrap();
    assert!(!text.contains("key-material") && !text.contains(&hex::encode(SECRET)));
}

#[test]
fn another_master_key_cannot_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path())
        .add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let other = DirKeyStore::open(&dir.path().join("keys"), master(2)).unwrap();
    // The record is checked first, and fails first.
    let err = other.current(&name("disk")).unwrap_err();
    assert!(
        matches!(err, KeyStoreError::RecordInvalid { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("another master key"), "{err}");
    assert!(matches!(
        other.list(),
        Err(KeyStoreError::RecordInvalid { .. })
    ));
    // The version file itself fails too.
    let key_dir = other.dir().join("disk");
    assert_corrupt(other.read_version(&name("disk"), &key_dir, 1), "file");
    // And `seal` cannot paper over it: the version does not authenticate.
    assert_corrupt(other.seal_current(&name("disk"), true), "seal");
}

#[test]
fn edited_metadata_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(
        &name("disk"),
        &material(SECRET),
        &allow(&["vm-1"], &["img"]),
    )
    .unwrap();
    let path = key_path(&s, "disk", 1);
    let pristine = fs::read(&path).unwrap();
    type Edit = (&'static str, fn(&mut serde_json::Value));
    let edits: [Edit; 7] = [
        ("created", |v| v["created_unix"] = 1.into()),
        ("vm added", |v| {
            v["allowed_vms"] = serde_json::json!(["vm-1", "vm-666"]);
        }),
        ("vm replaced", |v| {
            v["allowed_vms"] = serde_json::json!(["vm-666"])
        }),
        ("vms emptied", |v| v["allowed_vms"] = serde_json::json!([])),
        ("image added", |v| {
            v["allowed_images"] = serde_json::json!(["evil", "img"]);
        }),
        // A VM moved to the image list: same strings, other fields.
        ("list swap", |v| {
            v["allowed_vms"] = serde_json::json!([]);
            v["allowed_images"] = serde_json::json!(["img", "vm-1"]);
        }),
        ("format", |v| v["format"] = 2.into()),
    ];
    for (what, f) in edits {
        fs::write(&path, &pristine).unwrap();
        edit(&path, f);
        assert_corrupt(s.current(&name("disk")), what);
    }
    // The version, consistently with the file name and a record naming
    // it: authentication still fails.
    let record = |key: &str, current: u32| {
        s.write_record(
            &s.dir().join(key),
            &name(key),
            Record {
                current,
                pending: None,
            },
        )
        .unwrap();
    };
    fs::write(&path, &pristine).unwrap();
    edit(&path, |v| v["version"] = 5.into());
    fs::rename(&path, key_path(&s, "disk", 5)).unwrap();
    record("disk", 5);
    assert_corrupt(s.current(&name("disk")), "version");
    fs::remove_file(key_path(&s, "disk", 5)).unwrap();
    // The name, consistently with the directory.
    create_private_dir(&s.dir().join("other")).unwrap();
    fs::write(key_path(&s, "other", 1), &pristine).unwrap();
    edit(&key_path(&s, "other", 1), |v| v["name"] = "other".into());
    record("other", 1);
    assert_corrupt(s.current(&name("other")), "name");
    // A file copied unchanged to another key's or version's place.
    fs::write(key_path(&s, "other", 1), &pristine).unwrap();
    assert_corrupt(s.current(&name("other")), "copied to another key");
    fs::write(key_path(&s, "disk", 2), &pristine).unwrap();
    record("disk", 2);
    assert_corrupt(s.current(&name("disk")), "copied to another version");
    fs::remove_file(key_path(&s, "disk", 2)).unwrap();
    record("disk", 1);
    // Untouched, it still reads.
    fs::write(&path, &pristine).unwrap();
    assert_eq!(
        s.current(&name("disk")).unwrap().unwrap().material.expose(),
        SECRET
    );
}

#[test]
fn damaged_ciphertext_nonce_or_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let path = key_path(&s, "disk", 1);
    let pristine = fs::read(&path).unwrap();
    let field = |k: &str| {
        let v: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
        v[k].as_str().unwrap().to_owned()
    };
    let flip_first = |h: String| {
        let mut b = hex::decode(h).unwrap();
        b[0] ^= 1;
        hex::encode(b)
    };
    let flip_last = |h: String| {
        let mut b = hex::decode(h).unwrap();
        let n = b.len() - 1;
        b[n] ^= 0x80;
        hex::encode(b)
    };
    let ct = field("ciphertext");
    let nonce = field("nonce");
    let cases: Vec<(&str, &str, serde_json::Value)> = vec![
        (
            "ciphertext bit",
            "ciphertext",
            flip_first(ct.clone()).into(),
        ),
        ("tag bit", "ciphertext", flip_last(ct.clone()).into()),
        ("ciphertext cut", "ciphertext", ct[..ct.len() - 2].into()),
        ("tag only", "ciphertext", ct[ct.len() - 32..].into()),
        ("ciphertext not hex", "ciphertext", "zz".into()),
        ("nonce bit", "nonce", flip_first(nonce.clone()).into()),
        ("nonce short", "nonce", nonce[2..].into()),
        ("nonce type", "nonce", 7.into()),
    ];
    for (what, key, value) in cases {
        fs::write(&path, &pristine).unwrap();
        edit(&path, |v| v[key] = value);
        assert_corrupt(s.current(&name("disk")), what);
    }
    // Truncated at every length (the final newline aside), unknown
    // fields, junk, oversized.
    for len in 0..pristine.trim_ascii_end().len() {
        fs::write(&path, &pristine[..len]).unwrap();
        assert_corrupt(s.current(&name("disk")), &format!("truncated to {len}"));
    }
    fs::write(&path, &pristine).unwrap();
    edit(&path, |v| v["extra"] = 1.into());
    assert_corrupt(s.current(&name("disk")), "unknown field");
    fs::write(&path, b"\x00\xff not json").unwrap();
    assert_corrupt(s.current(&name("disk")), "junk");
    let mut big = pristine.clone();
    big.resize(usize::try_from(MAX_KEY_FILE).unwrap() + 1, b' ');
    fs::write(&path, &big).unwrap();
    let err = s.current(&name("disk")).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    // A corrupt file's error names the file but quotes none of it.
    fs::write(&path, &pristine).unwrap();
    edit(&path, |v| v["ciphertext"] = flip_first(ct.clone()).into());
    let err = s.current(&name("disk")).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(!err.contains(&ct[..16]), "{err}");
}

#[test]
fn newest_version_corrupt_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    s.rotate(&name("disk"), None).unwrap();
    fs::write(key_path(&s, "disk", 2), b"{}").unwrap();
    // No silent fall-back to version 1.
    assert_corrupt(s.current(&name("disk")), "current");
    assert_corrupt(s.rotate(&name("disk"), None), "rotate");
    assert!(s.version(&name("disk"), 1).unwrap().is_some());
    let checks = s.verify().unwrap();
    assert_eq!(checks.len(), 2);
    assert!(checks[0].result.is_ok());
    assert!(matches!(
        checks[1].result,
        Err(KeyStoreError::Corrupt { .. })
    ));
}
