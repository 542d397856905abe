//! The directory store: limits, existing keys, file names, leftovers,
//! removal, concurrent writers, a crash during `add`, and the store's and
//! keys' directory permissions and owners.

use super::*;

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

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
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
