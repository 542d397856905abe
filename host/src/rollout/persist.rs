//! The host's own copy of the last accepted envelope (spec/ROLLOUT.md
//! §9): `<dir>/accepted.json`, written crash-safely (temporary file,
//! fsync, rename, fsync of the directory), so after a restart the host
//! keeps what it had even when every source is down (fail-static), and
//! admission keeps refusing replays of older revisions.
//!
//! What it trusts: the file is the host's own (root-owned state
//! directory); it is re-parsed and re-validated on load but not
//! re-admitted. What it bounds: the file's size. A missing file is "no
//! document yet"; an unreadable or corrupt one is an error the caller
//! reports, never a silent reset to no document (which would drop kills).

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use super::admit::Accepted;
use super::document::{DocumentError, MAX_DOCUMENT_BYTES};
use super::envelope::TrustedKeys;

/// The persisted envelope's file name.
pub const ACCEPTED_FILE: &str = "accepted.json";
/// The temporary file a new envelope is written to before the rename.
const TEMP_FILE: &str = ".accepted.json.tmp";

/// Why the persisted envelope could not be stored or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    #[error("rollout state {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "rollout state {} is corrupt ({source}); the host will not guess: restore it, or \
         remove it to start from host.toml's generally-available features",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        source: DocumentError,
    },
}

/// Stores `accepted`'s envelope bytes as `<dir>/accepted.json`,
/// atomically and durably. `dir` must exist.
pub fn store(dir: &Path, accepted: &Accepted) -> Result<(), PersistError> {
    let temp = dir.join(TEMP_FILE);
    let target = dir.join(ACCEPTED_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PersistError::Io { path, source }
    };
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .and_then(|mut f| f.write_all(accepted.envelope()).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io(&temp)(e));
    }
    fs::rename(&temp, &target).map_err(io(&target))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Loads `<dir>/accepted.json`: `None` if there is none.
pub fn load(dir: &Path, trusted: &TrustedKeys) -> Result<Option<Accepted>, PersistError> {
    let path = dir.join(ACCEPTED_FILE);
    let io = |source| PersistError::Io {
        path: path.clone(),
        source,
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    // One byte over the limit lets the parser report the size.
    let limit = u64::try_from(MAX_DOCUMENT_BYTES + 1).unwrap_or(u64::MAX);
    file.take(limit).read_to_end(&mut bytes).map_err(io)?;
    Accepted::restore(bytes, trusted)
        .map(Some)
        .map_err(|source| PersistError::Corrupt {
            path: path.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::admit::{Admitted, admit};
    use crate::rollout::document::{Document, EXAMPLE, Feature};
    use crate::rollout::envelope::{TrustedKey, public_key_hex, sign, unsigned};
    use ring::signature::Ed25519KeyPair;
    use std::collections::BTreeSet;

    fn accepted(bytes: &[u8], trusted: &TrustedKeys) -> Accepted {
        match admit(bytes, None, &BTreeSet::new(), trusted).unwrap() {
            Admitted::New(a) => a,
            Admitted::Unchanged => unreachable!(),
        }
    }

    #[test]
    fn store_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let key = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
        let trusted = TrustedKeys::new([TrustedKey {
            id: "k".into(),
            public_key: public_key_hex(&key),
        }])
        .unwrap();
        assert_eq!(load(dir.path(), &trusted).unwrap(), None);
        let doc = Document::parse(EXAMPLE.as_bytes()).unwrap();
        let a = accepted(&sign(&doc, &key, "k").unwrap(), &trusted);
        store(dir.path(), &a).unwrap();
        assert_eq!(load(dir.path(), &trusted).unwrap(), Some(a.clone()));
        assert!(!dir.path().join(TEMP_FILE).exists());
        // A key since removed from host.toml: the document stays, unsigned.
        let restored = load(dir.path(), &TrustedKeys::default()).unwrap().unwrap();
        assert_eq!(restored.document(), a.document());
        assert_eq!(restored.signed_by(), None);
        // Overwrite with a newer one.
        let killed = crate::rollout::edit::kill(Some(&doc), Feature::KeyRelease, 1).unwrap();
        let b = match admit(&unsigned(&killed), Some(&a), &BTreeSet::new(), &trusted).unwrap() {
            Admitted::New(b) => b,
            Admitted::Unchanged => unreachable!(),
        };
        store(dir.path(), &b).unwrap();
        assert_eq!(load(dir.path(), &trusted).unwrap(), Some(b));
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(ACCEPTED_FILE),
            b"{\"document\": {\"format\": 1",
        )
        .unwrap();
        let e = load(dir.path(), &TrustedKeys::default()).unwrap_err();
        assert!(matches!(e, PersistError::Corrupt { .. }), "{e}");
        fs::write(
            dir.path().join(ACCEPTED_FILE),
            vec![b' '; MAX_DOCUMENT_BYTES + 10],
        )
        .unwrap();
        let e = load(dir.path(), &TrustedKeys::default()).unwrap_err();
        assert!(
            matches!(
                &e,
                PersistError::Corrupt {
                    source: DocumentError::TooLarge { .. },
                    ..
                }
            ),
            "{e}"
        );
    }
}
