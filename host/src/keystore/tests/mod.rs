//! The key store's tests, by topic: [`sealed`] (sealing, authentication,
//! corruption), [`directory`] (the directory store's limits, leftovers,
//! concurrency, crashes of `add`, permissions), [`rotation`] (rotate,
//! pruning, crashes of `rotate`), [`records`] (the sealed record against
//! rollback, replay and removal). Here: the helpers they share, the cache,
//! entitlement and `Debug`.

use super::*;

mod directory;
mod records;
mod rotation;
mod sealed;

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

/// A store in `dir` holding the key "disk" (version 1, [`SECRET`], for
/// vm-1), shared as the cache and record tests share it.
fn store_with_disk(dir: &Path) -> (Arc<DirKeyStore>, KeyName) {
    let inner = Arc::new(store(dir));
    let disk = name("disk");
    inner
        .add(&disk, &material(SECRET), &allow(&["vm-1"], &[]))
        .unwrap();
    (inner, disk)
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

/// The record on disk, as JSON.
fn record_json(s: &DirKeyStore, key: &str) -> serde_json::Value {
    serde_json::from_slice(&fs::read(s.dir().join(key).join(RECORD_FILE)).unwrap()).unwrap()
}

#[test]
fn the_cache_decrypts_each_current_version_once_and_follows_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let (inner, disk) = store_with_disk(dir.path());
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
