//! The sealed record: a deleted newest version, a tampered, missing or
//! replayed record, an old file of a removed key, a store without records.

use super::*;

#[test]
fn deleting_the_newest_version_refuses_the_key_instead_of_rolling_back() {
    let dir = tempfile::tempdir().unwrap();
    let (inner, disk) = store_with_disk(dir.path());
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
    let (inner, disk) = store_with_disk(dir.path());
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
