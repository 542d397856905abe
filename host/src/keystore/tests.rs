use super::*;

const SECRET: &[u8; 32] = b"0123456789abcdef-key-material-!!";

fn master(byte: u8) -> MasterKey {
    MasterKey::new(Zeroizing::new([byte; MASTER_KEY_LEN]))
}

fn store(dir: &Path) -> DirKeyStore {
    DirKeyStore::open(&dir.join("keys"), master(1)).unwrap()
}

fn name(s: &str) -> KeyName {
    validate_key_name(s).unwrap()
}

fn material(bytes: &[u8]) -> KeyMaterial {
    KeyMaterial::new(bytes.to_vec())
}

fn allow(vms: &[&str], images: &[&str]) -> AllowList {
    AllowList::new(vms, images).unwrap()
}

#[test]
fn the_cache_decrypts_each_current_version_once_and_follows_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(store(dir.path()));
    let disk = name("disk");
    inner
        .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let keys = CachedKeys::new(inner.clone());
    let versions = |s: &DirKeyStore| -> BTreeMap<KeyName, u32> {
        s.list()
            .unwrap()
            .into_iter()
            .map(|k| (k.name, k.current_version))
            .collect()
    };
    keys.refresh(&versions(&inner));
    assert_eq!(keys.decrypts(), 1);
    // A thousand sessions asking: no more reads or decrypts.
    for _ in 0..1000 {
        assert_eq!(keys.current(&disk).unwrap().unwrap().version, 1);
    }
    assert_eq!(keys.decrypts(), 1);
    // A rotation: seen once the watcher refreshes, decrypted once.
    inner.rotate(&disk, None).unwrap();
    assert_eq!(
        keys.current(&disk).unwrap().unwrap().version,
        2,
        "served at once"
    );
    keys.refresh(&versions(&inner));
    for _ in 0..1000 {
        assert_eq!(keys.current(&disk).unwrap().unwrap().version, 2);
    }
    assert_eq!(keys.decrypts(), 2);
    // A removed key leaves the cache with the refresh.
    inner.remove(&disk).unwrap();
    keys.refresh(&versions(&inner));
    assert!(keys.current(&disk).is_err() || keys.current(&disk).unwrap().is_none());
    assert!(format!("{keys:?}").contains("0 current versions"));
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn key_path(s: &DirKeyStore, key: &str, version: u32) -> PathBuf {
    s.dir().join(key).join(version_file_name(version))
}

/// Edits one field of a key file's JSON in place.
fn edit(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn assert_corrupt<T: fmt::Debug>(r: Result<T, KeyStoreError>, what: &str) {
    assert!(
        matches!(r, Err(KeyStoreError::Corrupt { .. })),
        "{what}: {r:?}"
    );
}

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

#[test]
fn limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let none = AllowList::default();
    // Names.
    for bad in [
        "",
        ".",
        "..",
        ".tmp-x",
        ".removed-x",
        ".hidden",
        "a/b",
        "a b",
        "é",
    ] {
        assert!(
            matches!(
                validate_key_name(bad),
                Err(KeyStoreError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(validate_key_name(&"k".repeat(64)).is_ok());
    assert!(validate_key_name(&"k".repeat(65)).is_err());
    // A KeyName that passes the protocol's rule but not the store's.
    let dots = KeyName::new("..").unwrap();
    assert!(matches!(
        s.current(&dots),
        Err(KeyStoreError::InvalidName { .. })
    ));
    assert!(s.add(&dots, &material(SECRET), &none).is_err());
    // Material length.
    for bad in [0, MAX_KEY_MATERIAL + 1] {
        assert!(matches!(
            s.add(&name("m"), &material(&vec![1; bad]), &none),
            Err(KeyStoreError::InvalidMaterial { .. })
        ));
        assert!(matches!(
            s.generate(&name("m"), bad, &none),
            Err(KeyStoreError::InvalidMaterial { .. })
        ));
    }
    // Allow-lists: count and syntax.
    let many: Vec<String> = (0..=MAX_ALLOWED_ENTRIES)
        .map(|i| format!("vm-{i}"))
        .collect();
    let empty: [&str; 0] = [];
    assert!(AllowList::new(&many, &empty).is_err());
    assert!(AllowList::new(&empty, &many).is_err());
    assert!(AllowList::new(&many[..MAX_ALLOWED_ENTRIES], &many[..MAX_ALLOWED_ENTRIES]).is_ok());
    for bad in ["", "a b", "a/b", &"i".repeat(MAX_IMAGE_NAME + 1)] {
        assert!(AllowList::new(&empty, &[bad]).is_err(), "{bad:?}");
        assert!(AllowList::new(&[bad], &empty).is_err(), "{bad:?}");
    }
    // The largest key fits in a file of at most MAX_KEY_FILE bytes.
    let vms: Vec<String> = (0..MAX_ALLOWED_ENTRIES)
        .map(|i| format!("{i:0>64}"))
        .collect();
    let big = AllowList::new(&vms, &vms).unwrap();
    let m = material(&[0xee; MAX_KEY_MATERIAL]);
    s.add(&name(&"k".repeat(64)), &m, &big).unwrap();
    let key = s.current(&name(&"k".repeat(64))).unwrap().unwrap();
    assert_eq!(key.material, m);
    assert_eq!(key.allowed_images.len(), MAX_ALLOWED_ENTRIES);
    let len = fs::metadata(key_path(&s, &"k".repeat(64), 1))
        .unwrap()
        .len();
    assert!(len <= MAX_KEY_FILE, "{len}");
}

#[test]
fn the_store_holds_at_most_max_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    // Key directories as `add` counts them (a version file each); their
    // contents are not read.
    for i in 0..MAX_KEYS {
        let d = s.dir().join(format!("k{i}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join(version_file_name(1)), b"").unwrap();
    }
    assert!(matches!(
        s.generate(&name("one-more"), 32, &AllowList::default()),
        Err(KeyStoreError::Full { .. })
    ));
    assert!(!s.dir().join("one-more").exists());
}

#[test]
fn add_refuses_an_existing_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    assert!(matches!(
        s.add(&name("disk"), &material(b"other"), &AllowList::default()),
        Err(KeyStoreError::Exists { .. })
    ));
    assert_eq!(
        s.current(&name("disk")).unwrap().unwrap().material.expose(),
        SECRET
    );
    // An empty directory is not a key: add takes its place.
    fs::create_dir(s.dir().join("empty")).unwrap();
    assert!(s.list().unwrap().iter().all(|k| k.name.as_str() != "empty"));
    s.add(&name("empty"), &material(b"x"), &AllowList::default())
        .unwrap();
    assert_eq!(s.list().unwrap().len(), 2);
    assert!(file_names(s.dir()).iter().all(|n| !n.starts_with('.')));
}

#[test]
fn rotate_keeps_allow_lists_and_prunes_to_the_newest_eight() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let allowed = allow(&["vm-1"], &["img"]);
    s.add(&name("disk"), &material(SECRET), &allowed).unwrap();
    let mut seen = vec![SECRET.to_vec()];
    for v in 2..=11u32 {
        let info = if v == 5 {
            s.rotate(&name("disk"), Some(&material(b"given")))
        } else {
            s.rotate(&name("disk"), None)
        }
        .unwrap();
        assert_eq!(info.current_version, v);
        let key = s.current(&name("disk")).unwrap().unwrap();
        assert_eq!(key.version, v);
        assert_eq!(key.allowed_vms, *allowed.vms());
        assert_eq!(key.allowed_images, *allowed.images());
        let expected_len = if v == 5 {
            5
        } else if v < 5 {
            32
        } else {
            5
        };
        assert_eq!(key.material.expose().len(), expected_len, "v{v}");
        assert!(
            !seen.contains(&key.material.expose().to_vec()),
            "v{v} repeats"
        );
        seen.push(key.material.expose().to_vec());
    }
    let info = &s.list().unwrap()[0];
    assert_eq!(info.versions, (4..=11).collect::<Vec<_>>());
    assert_eq!(info.versions.len(), MAX_VERSIONS_KEPT);
    assert!(s.version(&name("disk"), 3).unwrap().is_none());
    assert!(s.version(&name("disk"), 1).unwrap().is_none());
    assert_eq!(
        s.version(&name("disk"), 5)
            .unwrap()
            .unwrap()
            .material
            .expose(),
        b"given"
    );
    assert!(matches!(
        s.rotate(&name("nope"), None),
        Err(KeyStoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.rotate(&name("disk"), Some(&material(&[]))),
        Err(KeyStoreError::InvalidMaterial { .. })
    ));
}

#[test]
fn rotate_stops_at_the_last_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let key = StoredKey {
        name: name("disk"),
        version: u32::MAX,
        created_unix: 1,
        allowed_vms: BTreeSet::new(),
        allowed_images: BTreeSet::new(),
        material: material(SECRET),
    };
    create_private_dir(&s.dir().join("disk")).unwrap();
    fs::write(key_path(&s, "disk", u32::MAX), s.seal(&key).unwrap()).unwrap();
    s.write_record(
        &s.dir().join("disk"),
        &name("disk"),
        Record {
            current: u32::MAX,
            pending: None,
        },
    )
    .unwrap();
    assert_eq!(s.current(&name("disk")).unwrap().unwrap(), key);
    assert!(matches!(
        s.rotate(&name("disk"), None),
        Err(KeyStoreError::VersionsExhausted { .. })
    ));
}

#[test]
fn version_files_must_be_spelt_canonically() {
    assert_eq!(version_file_name(1), "00000001.key");
    assert_eq!(version_file_name(u32::MAX), "4294967295.key");
    assert_eq!(parse_version_file_name("00000001.key"), Some(1));
    assert_eq!(parse_version_file_name("123456789.key"), Some(123_456_789));
    for bad in [
        "1.key",
        "000000001.key",
        "00000000.key",
        "0000000a.key",
        "+0000001.key",
        "00000001.key.bak",
        "4294967296.key",
        ".tmp-00000001.key",
    ] {
        assert_eq!(parse_version_file_name(bad), None, "{bad}");
    }
}

#[test]
fn temp_and_removed_leftovers_are_ignored_then_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let key_dir = s.dir().join("disk");
    let old = SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60);
    let make_file = |path: &Path, stale: bool| {
        fs::write(path, b"{\"half\":").unwrap();
        if stale {
            File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
    };
    make_file(&key_dir.join(".tmp-stale"), true);
    make_file(&key_dir.join(".tmp-fresh"), false);
    // A stale half-built key directory and an interrupted removal.
    fs::create_dir(s.dir().join(".tmp-stale-dir")).unwrap();
    make_file(&s.dir().join(".tmp-stale-dir").join("00000001.key"), false);
    File::open(s.dir().join(".tmp-stale-dir"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    fs::create_dir(s.dir().join(".tmp-fresh-dir")).unwrap();
    fs::create_dir(s.dir().join(".removed-x")).unwrap();
    make_file(&s.dir().join(".removed-x").join("00000001.key"), false);
    // Reads ignore them.
    assert_eq!(s.list().unwrap().len(), 1);
    assert_eq!(s.verify().unwrap().len(), 1);
    assert!(s.current(&name("disk")).unwrap().is_some());
    // Writes delete the stale ones, and only those.
    s.rotate(&name("disk"), None).unwrap();
    assert_eq!(
        file_names(&key_dir),
        [".tmp-fresh", "00000001.key", "00000002.key", RECORD_FILE]
    );
    s.generate(&name("cfg"), 32, &AllowList::default()).unwrap();
    assert_eq!(file_names(s.dir()), [".tmp-fresh-dir", "cfg", "disk"]);
}

#[test]
fn remove_deletes_the_key_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    s.rotate(&name("disk"), None).unwrap();
    s.generate(&name("cfg"), 32, &AllowList::default()).unwrap();
    assert_eq!(s.remove(&name("disk")).unwrap(), 2);
    assert!(s.current(&name("disk")).unwrap().is_none());
    assert_eq!(file_names(s.dir()), ["cfg"]);
    assert!(matches!(
        s.remove(&name("disk")),
        Err(KeyStoreError::NotFound { .. })
    ));
    // The name can be used again, from version 1.
    s.add(&name("disk"), &material(b"new"), &AllowList::default())
        .unwrap();
    assert_eq!(s.current(&name("disk")).unwrap().unwrap().version, 1);
}

#[test]
fn entitlement_needs_the_vm_or_its_image_on_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(
        &name("disk"),
        &material(SECRET),
        &allow(&["vm-1"], &["debian-12"]),
    )
    .unwrap();
    let key = s.current(&name("disk")).unwrap().unwrap();
    let vm = |v: &str| VmId::new(v).unwrap();
    assert!(key.entitles(&vm("vm-1"), None));
    assert!(key.entitles(&vm("vm-1"), Some("other")));
    assert!(key.entitles(&vm("vm-2"), Some("debian-12")));
    assert!(!key.entitles(&vm("vm-2"), None));
    assert!(!key.entitles(&vm("vm-2"), Some("debian-11")));
    assert!(!key.entitles(&vm("vm-2"), Some("")));
}

#[test]
fn debug_output_shows_no_material() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let key = s.current(&name("disk")).unwrap().unwrap();
    let master_bytes = [0xa5u8; MASTER_KEY_LEN];
    let m = MasterKey::new(Zeroizing::new(master_bytes));
    let store_dbg = format!("{:?}", DirKeyStore::open(s.dir(), m).unwrap());
    let m = MasterKey::new(Zeroizing::new(master_bytes));
    assert_eq!(format!("{m:?}"), "MasterKey(..)");
    for text in [
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{:?}", s.list().unwrap()),
        store_dbg,
    ] {
        for needle in [
            hex::encode(SECRET),
            hex::encode(master_bytes),
            "key-material".to_owned(),
            "165, 165".to_owned(),   // a5 as a decimal byte list
            "48, 49, 50".to_owned(), // SECRET as a decimal byte list
        ] {
            assert!(!text.contains(&needle), "{needle} in {text}");
        }
    }
    assert!(format!("{key:?}").contains("REDACTED"));
}

#[test]
fn concurrent_writers_never_replace_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let key_dir = s.dir().join("disk");
    let before = fs::read(key_path(&s, "disk", 1)).unwrap();
    assert!(matches!(
        s.write_new_file(&key_dir, &version_file_name(1), b"other", &name("disk")),
        Err(KeyStoreError::ConcurrentWrite { .. })
    ));
    assert_eq!(fs::read(key_path(&s, "disk", 1)).unwrap(), before);
    assert_eq!(file_names(&key_dir), ["00000001.key", RECORD_FILE]);
    // Two threads rotating at once: each rotation either succeeds with
    // its own version or reports the race; the store stays readable.
    let s = std::sync::Arc::new(s);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || {
                (0..10)
                    .filter(|_| match s.rotate(&name("disk"), None) {
                        Ok(_) => true,
                        Err(KeyStoreError::ConcurrentWrite { .. }) => false,
                        Err(e) => panic!("{e}"),
                    })
                    .count()
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let current = s.current(&name("disk")).unwrap().unwrap();
    assert_eq!(current.version as usize, 1 + ok);
    assert!(s.verify().unwrap().iter().all(|c| c.result.is_ok()));
}

/// Every point where a write can stop: afterwards the store reads the
/// old state or the new one, and the next write succeeds.
#[test]
fn a_crash_during_rotate_leaves_the_old_or_the_new_version() {
    for step in [
        Step::RecordSynced,
        Step::PendingRecorded,
        Step::TempPartlyWritten,
        Step::TempWritten,
        Step::TempSynced,
        Step::Linked,
        Step::Committed,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
            .unwrap();
        s.crash_at = Some(step);
        let new = material(b"the new version");
        assert!(
            matches!(
                s.rotate(&name("disk"), Some(&new)),
                Err(KeyStoreError::InjectedCrash)
            ),
            "{step:?}"
        );
        // "Restart": a fresh store on the same directory.
        let s = store(dir.path());
        let current = s.current(&name("disk")).unwrap().unwrap();
        match step {
            // Only the final record commits the new version.
            Step::Committed => {
                assert_eq!((current.version, &current.material), (2, &new), "{step:?}");
            }
            _ => assert_eq!(
                (current.version, current.material.expose()),
                (1, &SECRET[..]),
                "{step:?}"
            ),
        }
        assert_eq!(current.allowed_vms.len(), 1);
        assert!(
            s.verify().unwrap().iter().all(|c| c.result.is_ok()),
            "{step:?}"
        );
        assert_eq!(s.list().unwrap().len(), 1);
        // The uncommitted version is never served, not even by number.
        if step == Step::Linked {
            assert!(key_path(&s, "disk", 2).exists());
            assert_eq!(s.version(&name("disk"), 2).unwrap(), None);
            assert_eq!(s.list().unwrap()[0].versions, [1]);
        }
        // A temporary file may stay behind, and does not get in the way.
        let temp_left = file_names(&s.dir().join("disk"))
            .iter()
            .any(|n| n.starts_with(TEMP_PREFIX));
        assert_eq!(
            temp_left,
            !matches!(step, Step::PendingRecorded | Step::Committed),
            "{step:?}"
        );
        let info = s.rotate(&name("disk"), None).unwrap();
        assert_eq!(info.current_version, current.version + 1, "{step:?}");
        let key = s.current(&name("disk")).unwrap().unwrap();
        assert_eq!(key.version, current.version + 1, "{step:?}");
        assert_ne!(key.material, new, "{step:?}");
        assert!(s.verify().unwrap().iter().all(|c| c.result.is_ok()));
    }
}

#[test]
fn a_crash_during_add_leaves_no_key_or_the_whole_key() {
    for step in [
        Step::TempPartlyWritten,
        Step::TempWritten,
        Step::TempSynced,
        Step::Linked,
        Step::RecordSynced,
        Step::StagingReady,
        Step::Published,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        s.crash_at = Some(step);
        assert!(
            matches!(
                s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[])),
                Err(KeyStoreError::InjectedCrash)
            ),
            "{step:?}"
        );
        let s = store(dir.path());
        let current = s.current(&name("disk")).unwrap();
        if step == Step::Published {
            let key = current.unwrap();
            assert_eq!((key.version, key.material.expose()), (1, &SECRET[..]));
            assert_eq!(s.list().unwrap().len(), 1);
        } else {
            assert!(current.is_none(), "{step:?}");
            assert!(s.list().unwrap().is_empty(), "{step:?}");
            assert!(!s.dir().join("disk").exists(), "{step:?}");
            // The name is free: the key can be added now.
            s.add(&name("disk"), &material(SECRET), &AllowList::default())
                .unwrap();
        }
        assert!(s.verify().unwrap().iter().all(|c| c.result.is_ok()));
    }
}

// ------------------------------------------- records and permissions

/// The record on disk, as JSON.
fn record_json(s: &DirKeyStore, key: &str) -> serde_json::Value {
    serde_json::from_slice(&fs::read(s.dir().join(key).join(RECORD_FILE)).unwrap()).unwrap()
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn rotate_moves_the_sealed_record_with_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let r = record_json(&s, "disk");
    assert_eq!(
        (r["name"].as_str(), r["current"].as_u64()),
        (Some("disk"), Some(1))
    );
    assert!(r["pending"].is_null(), "{r}");
    for v in 2..=12u32 {
        s.rotate(&name("disk"), None).unwrap();
        let r = record_json(&s, "disk");
        assert_eq!(r["current"].as_u64(), Some(u64::from(v)), "{r}");
        assert!(r["pending"].is_null(), "{r}");
        assert_eq!(s.current_version(&name("disk")).unwrap(), Some(v));
    }
    // The MAC is bound to the master key: the same record does not
    // verify under another.
    let other = DirKeyStore::open(s.dir(), master(2)).unwrap();
    assert!(matches!(
        other.current_version(&name("disk")),
        Err(KeyStoreError::RecordInvalid { .. })
    ));
    // The record key is not the AES key, and depends on the master key.
    let msg = record_message(
        &name("disk"),
        Record {
            current: 1,
            pending: None,
        },
    );
    let tag = |k: &MasterKey| hmac::sign(&k.record_key().unwrap(), &msg).as_ref().to_vec();
    let plain = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]), &msg);
    assert_ne!(tag(&master(1)), plain.as_ref());
    assert_ne!(tag(&master(1)), tag(&master(2)));
    assert_eq!(tag(&master(1)), tag(&master(1)));
}

#[test]
fn deleting_the_newest_version_refuses_the_key_instead_of_rolling_back() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(store(dir.path()));
    let disk = name("disk");
    inner
        .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    inner.rotate(&disk, None).unwrap();
    inner.rotate(&disk, None).unwrap();
    inner
        .add(&name("cfg"), &material(b"cfg"), &allow(&["vm-1"], &[]))
        .unwrap();
    let keys = CachedKeys::new(inner.clone());
    // Served and cached at version 3.
    assert_eq!(keys.current(&disk).unwrap().unwrap().version, 3);
    fs::remove_file(key_path(&inner, "disk", 3)).unwrap();
    for (what, r) in [
        ("store", inner.current(&disk).map(|_| ())),
        ("cache", keys.current(&disk).map(|_| ())),
        ("version 2", inner.version(&disk, 2).map(|_| ())),
        ("current version", inner.current_version(&disk).map(|_| ())),
    ] {
        let err = r.unwrap_err();
        assert!(
            matches!(
                err,
                KeyStoreError::RecordedVersionMissing { version: 3, .. }
            ),
            "{what}: {err:?}"
        );
    }
    let err = inner.current(&disk).unwrap_err().to_string();
    assert!(
        err.contains("00000003.key") && err.contains("refused"),
        "{err}"
    );
    // The operator's listing fails; the agent's leaves the key out and
    // serves the other one.
    assert!(inner.list().is_err());
    let served: Vec<_> = keys.list().unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(served, [name("cfg")]);
    assert!(keys.current(&name("cfg")).unwrap().is_some());
    keys.refresh(&BTreeMap::from([(name("cfg"), 1)]));
    assert!(keys.current(&disk).is_err());
    // `verify` names the missing version; rotating is refused.
    let checks = inner.verify().unwrap();
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| c.result.is_err())
        .map(|c| (c.name.as_str(), c.version))
        .collect();
    assert_eq!(failed, [("disk", 3)]);
    assert!(matches!(
        inner.rotate(&disk, None),
        Err(KeyStoreError::RecordedVersionMissing { .. })
    ));
    // `seal` does not roll back unless told to.
    assert!(matches!(
        inner.seal_current(&disk, false),
        Err(KeyStoreError::RecordedVersionMissing { .. })
    ));
    assert!(inner.current(&disk).is_err());
    let sealed = inner.seal_current(&disk, true).unwrap();
    assert_eq!(
        (sealed.version, sealed.change),
        (2, SealChange::Back { from: 3 })
    );
    assert_eq!(keys.current(&disk).unwrap().unwrap().version, 2);
    // Deleting every version leaves the record: still refused.
    inner.rotate(&disk, None).unwrap();
    for v in 1..=3 {
        let _ = fs::remove_file(key_path(&inner, "disk", v));
    }
    assert!(matches!(
        inner.current(&disk),
        Err(KeyStoreError::RecordedVersionMissing { version: 3, .. })
    ));
    assert!(inner.names().unwrap().contains(&disk));
}

#[test]
fn a_tampered_missing_or_replayed_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let disk = name("disk");
    s.add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    s.add(&name("cfg"), &material(b"cfg"), &AllowList::default())
        .unwrap();
    let record_path = s.dir().join("disk").join(RECORD_FILE);
    let at_v1 = fs::read(&record_path).unwrap();
    s.rotate(&disk, None).unwrap();
    let pristine = fs::read(&record_path).unwrap();
    let invalid = |what: &str| {
        let err = s.current(&disk).unwrap_err();
        assert!(
            matches!(err, KeyStoreError::RecordInvalid { .. }),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains("current.json"), "{what}: {err}");
    };
    type Edit = (&'static str, fn(&mut serde_json::Value));
    let edits: [Edit; 7] = [
        ("current lowered", |v| v["current"] = 1.into()),
        ("current raised", |v| v["current"] = 3.into()),
        ("pending added", |v| v["pending"] = 3.into()),
        ("mac bit", |v| {
            let mut m = hex::decode(v["mac"].as_str().unwrap()).unwrap();
            m[0] ^= 1;
            v["mac"] = hex::encode(m).into();
        }),
        ("mac not hex", |v| v["mac"] = "zz".into()),
        ("unknown field", |v| v["extra"] = 1.into()),
        ("format", |v| v["format"] = 2.into()),
    ];
    for (what, f) in edits {
        fs::write(&record_path, &pristine).unwrap();
        edit(&record_path, f);
        invalid(what);
    }
    for junk in [&b""[..], b"{", b"\x00\xff", &[b' '; 2048]] {
        fs::write(&record_path, junk).unwrap();
        invalid("junk");
    }
    // Another key's genuine record.
    fs::copy(s.dir().join("cfg").join(RECORD_FILE), &record_path).unwrap();
    invalid("copied from another key");
    // A genuine earlier record put back while the newer version is
    // there: the newer version is unrecorded.
    fs::write(&record_path, &at_v1).unwrap();
    let err = s.current(&disk).unwrap_err();
    assert!(
        matches!(
            err,
            KeyStoreError::Unrecorded {
                version: 2,
                current: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(s.version(&disk, 1).is_err());
    // Deleted: refused (never re-created on the fly, never the highest
    // file taken on trust).
    fs::remove_file(&record_path).unwrap();
    let err = s.current(&disk).unwrap_err();
    assert!(matches!(err, KeyStoreError::Unsealed { .. }), "{err:?}");
    assert!(err.to_string().contains("keys seal disk"), "{err}");
    assert!(!record_path.exists());
    // The other key is untouched throughout.
    assert!(s.current(&name("cfg")).unwrap().is_some());
    // Restored, it reads again.
    fs::write(&record_path, &pristine).unwrap();
    assert_eq!(s.current(&disk).unwrap().unwrap().version, 2);
    // An invalid record is replaced by `seal` only when told to.
    fs::write(&record_path, b"{}").unwrap();
    assert!(matches!(
        s.seal_current(&disk, false),
        Err(KeyStoreError::RecordInvalid { .. })
    ));
    assert_eq!(
        s.seal_current(&disk, true).unwrap().change,
        SealChange::ReplacedInvalid
    );
    assert_eq!(s.current(&disk).unwrap().unwrap().version, 2);
}

#[test]
fn an_old_file_of_a_removed_key_put_back_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let disk = name("disk");
    s.add(&disk, &material(b"old"), &allow(&["vm-1"], &[]))
        .unwrap();
    s.rotate(&disk, None).unwrap();
    let old_v2 = fs::read(key_path(&s, "disk", 2)).unwrap();
    s.remove(&disk).unwrap();
    s.add(&disk, &material(b"new"), &allow(&["vm-1"], &[]))
        .unwrap();
    // Authentic (same name, version and master key), but not this key's.
    fs::write(key_path(&s, "disk", 2), &old_v2).unwrap();
    assert!(matches!(
        s.current(&disk),
        Err(KeyStoreError::Unrecorded { version: 2, .. })
    ));
    fs::remove_file(key_path(&s, "disk", 2)).unwrap();
    assert_eq!(s.current(&disk).unwrap().unwrap().material.expose(), b"new");
}

#[test]
fn a_store_without_records_is_refused_until_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(store(dir.path()));
    let disk = name("disk");
    inner
        .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    inner.rotate(&disk, None).unwrap();
    inner
        .generate(&name("cfg"), 16, &AllowList::default())
        .unwrap();
    // As the previous vkx left it: no records.
    for key in ["disk", "cfg"] {
        fs::remove_file(inner.dir().join(key).join(RECORD_FILE)).unwrap();
    }
    for key in [&disk, &name("cfg")] {
        assert!(matches!(
            inner.current(key),
            Err(KeyStoreError::Unsealed { .. })
        ));
    }
    // A single version is no exception: it may be what is left after
    // deleting the newer ones.
    assert!(matches!(
        inner.rotate(&name("cfg"), None),
        Err(KeyStoreError::Unsealed { .. })
    ));
    assert!(matches!(inner.list(), Err(KeyStoreError::Unsealed { .. })));
    let keys = CachedKeys::new(inner.clone());
    assert!(keys.list().unwrap().is_empty());
    let checks = inner.verify().unwrap();
    assert_eq!(checks.iter().filter(|c| c.result.is_err()).count(), 2);
    assert_eq!(inner.names().unwrap(), [name("cfg"), disk.clone()]);
    // The explicit migration.
    let sealed = inner.seal_current(&disk, false).unwrap();
    assert_eq!((sealed.version, sealed.change), (2, SealChange::First));
    assert!(sealed.created_unix > 1_700_000_000);
    assert_eq!(inner.seal_current(&name("cfg"), false).unwrap().version, 1);
    assert_eq!(keys.list().unwrap().len(), 2);
    assert_eq!(keys.current(&disk).unwrap().unwrap().version, 2);
    assert_eq!(
        inner.seal_current(&disk, false).unwrap().change,
        SealChange::Unchanged
    );
    assert!(matches!(
        inner.seal_current(&name("nope"), false),
        Err(KeyStoreError::NotFound { .. })
    ));
    // `seal` adopts a newer authentic version (a record older than its
    // files, e.g. restored from a backup taken mid-rotation).
    let at_v2 = fs::read(inner.dir().join("disk").join(RECORD_FILE)).unwrap();
    inner.rotate(&disk, None).unwrap();
    fs::write(inner.dir().join("disk").join(RECORD_FILE), at_v2).unwrap();
    assert!(inner.current(&disk).is_err());
    assert_eq!(
        inner.seal_current(&disk, false).unwrap().change,
        SealChange::Forward { from: 2 }
    );
    assert_eq!(inner.current(&disk).unwrap().unwrap().version, 3);
}

#[test]
fn store_and_key_directories_open_to_group_or_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    s.add(&name("cfg"), &material(b"cfg"), &allow(&["vm-1"], &[]))
        .unwrap();
    let top = s.dir().to_path_buf();
    for mode in [
        0o750, 0o705, 0o710, 0o701, 0o740, 0o704, 0o720, 0o702, 0o777,
    ] {
        set_mode(&top, mode);
        let err = DirKeyStore::open(&top, master(1)).unwrap_err();
        assert!(
            matches!(err, KeyStoreError::DirectoryExposed { mode: m, ref path } if m == mode && *path == top),
            "{mode:o}: {err:?}"
        );
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
    set_mode(&top, 0o700);
    let s = DirKeyStore::open(&top, master(1)).unwrap();
    // A key's directory: that key is refused, the other still served.
    let key_dir = top.join("disk");
    for mode in [0o750, 0o705, 0o711, 0o770] {
        set_mode(&key_dir, mode);
        let err = s.current(&name("disk")).unwrap_err();
        assert!(
            matches!(err, KeyStoreError::DirectoryExposed { mode: m, .. } if m == mode),
            "{mode:o}: {err:?}"
        );
        assert!(s.current(&name("cfg")).unwrap().is_some());
        assert!(s.rotate(&name("disk"), None).is_err());
    }
    set_mode(&key_dir, 0o700);
    assert!(s.current(&name("disk")).unwrap().is_some());
    // A store created by the store itself passes, whatever the umask
    // let through (DirBuilder's 0700 only loses bits to it).
    let fresh = DirKeyStore::open(&dir.path().join("a/b/keys"), master(1)).unwrap();
    fresh
        .generate(&name("k"), 32, &AllowList::default())
        .unwrap();
    for p in [
        dir.path().join("a"),
        dir.path().join("a/b"),
        fresh.dir().to_path_buf(),
        fresh.dir().join("k"),
    ] {
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            p.display()
        );
    }
}

#[test]
fn store_and_key_directories_of_another_uid_are_refused() {
    if !crate::fsutil::running_as_root("store_and_key_directories_of_another_uid_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let top = s.dir().to_path_buf();
    std::os::unix::fs::chown(&top, Some(65534), None).unwrap();
    let err = DirKeyStore::open(&top, master(1)).unwrap_err();
    assert!(
        matches!(
            err,
            KeyStoreError::NotOwned { owner: 65534, expected: 0, ref path } if *path == top
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("chown -R 0 ") && text.contains("uid 65534"),
        "{text}"
    );
    std::os::unix::fs::chown(&top, Some(0), None).unwrap();
    let s = DirKeyStore::open(&top, master(1)).unwrap();
    std::os::unix::fs::chown(top.join("disk"), Some(65534), None).unwrap();
    assert!(matches!(
        s.current(&name("disk")),
        Err(KeyStoreError::NotOwned { owner: 65534, .. })
    ));
    std::os::unix::fs::chown(top.join("disk"), Some(0), None).unwrap();
    assert!(s.current(&name("disk")).unwrap().is_some());
}

#[test]
fn a_symlinked_key_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.add(&name("disk"), &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    let elsewhere = dir.path().join("elsewhere");
    fs::rename(s.dir().join("disk"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, s.dir().join("disk")).unwrap();
    let err = s.current(&name("disk")).unwrap_err();
    assert!(matches!(err, KeyStoreError::Symlink { .. }), "{err:?}");
    assert!(matches!(
        s.rotate(&name("disk"), None),
        Err(KeyStoreError::Symlink { .. })
    ));
}
