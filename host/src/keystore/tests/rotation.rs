//! Rotation: allow lists kept, pruning to the newest versions, the last
//! version, a crash during `rotate`, the sealed record moving along.

use super::*;

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
