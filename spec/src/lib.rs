//! The protocol specification's machine-readable parts, for tests.
//!
//! `spec/` holds PROTOCOL.md (the prose), vkx.cddl (the schema) and
//! `vectors/` (test vectors as JSON files). This crate gives tests the
//! schema text and the vectors, and enforces that tests use all of them:
//! a [`Vector`] panics when it is dropped with a field nobody read, and
//! [`VectorFiles`] panics when dropped with a file nobody opened (after the
//! ring `testutil` idea: a vector that is not checked is a lie).

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The CDDL schema of every v1 message.
pub const CDDL: &str = include_str!("../vkx.cddl");

/// The directory holding the vectors.
pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// Every vector file (`*.json` below `vectors/`), sorted, with paths
/// relative to the vectors directory.
#[derive(Debug)]
pub struct VectorFiles {
    files: BTreeSet<String>,
    opened: RefCell<BTreeSet<String>>,
}

impl VectorFiles {
    pub fn load() -> Self {
        let mut files = BTreeSet::new();
        walk(&vectors_dir(), &mut files);
        assert!(
            !files.is_empty(),
            "no vectors found in {}",
            vectors_dir().display()
        );
        Self {
            files,
            opened: RefCell::new(BTreeSet::new()),
        }
    }

    /// The files below `subdir` (e.g. "messages"), not yet opened.
    pub fn under(&self, subdir: &str) -> Vec<String> {
        let prefix = format!("{subdir}/");
        self.files
            .iter()
            .filter(|f| f.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Opens one file (a path relative to the vectors directory).
    pub fn open(&self, rel: &str) -> Vector {
        assert!(self.files.contains(rel), "no vector file {rel}");
        self.opened.borrow_mut().insert(rel.to_owned());
        Vector::from_file(rel)
    }
}

impl Drop for VectorFiles {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let opened = self.opened.borrow();
        let unused: Vec<&String> = self.files.iter().filter(|f| !opened.contains(*f)).collect();
        assert!(
            unused.is_empty(),
            "vector files never used by a test: {unused:?}"
        );
    }
}

fn walk(dir: &Path, out: &mut BTreeSet<String>) {
    let root = vectors_dir();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
                .path()
        })
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out);
        } else {
            let rel = path
                .strip_prefix(&root)
                .unwrap_or_else(|_| panic!("{} outside vectors", path.display()))
                .to_string_lossy()
                .into_owned();
            assert!(
                rel.ends_with(".json"),
                "unexpected file in vectors/: {rel} (vectors are .json)"
            );
            out.insert(rel);
        }
    }
}

/// One vector: a JSON object whose fields must all be read.
#[derive(Debug)]
pub struct Vector {
    name: String,
    fields: Map<String, Value>,
    used: RefCell<BTreeSet<String>>,
}

impl Vector {
    fn from_file(rel: &str) -> Self {
        let path = vectors_dir().join(rel);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: not JSON: {e}"));
        let Value::Object(fields) = value else {
            panic!("{rel}: a vector is a JSON object");
        };
        Self {
            name: rel.to_owned(),
            fields,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// The file the vector came from, for assertion messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn has(&self, key: &str) -> bool {
        self.fields.contains_key(key)
    }

    /// A field, marked as used. Panics if absent.
    pub fn value(&self, key: &str) -> &Value {
        self.used.borrow_mut().insert(key.to_owned());
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("{}: missing field {key}", self.name))
    }

    pub fn str(&self, key: &str) -> &str {
        self.value(key)
            .as_str()
            .unwrap_or_else(|| panic!("{}: field {key} is not a string", self.name))
    }

    /// A hex string field (spaces allowed for readability).
    pub fn hex(&self, key: &str) -> Vec<u8> {
        let s: String = self.str(key).split_whitespace().collect();
        hex::decode(&s).unwrap_or_else(|e| panic!("{}: field {key} is not hex: {e}", self.name))
    }

    pub fn u64(&self, key: &str) -> u64 {
        self.value(key)
            .as_u64()
            .unwrap_or_else(|| panic!("{}: field {key} is not an unsigned integer", self.name))
    }
}

impl Drop for Vector {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let used = self.used.borrow();
        let unused: Vec<&String> = self.fields.keys().filter(|k| !used.contains(*k)).collect();
        assert!(
            unused.is_empty(),
            "{}: fields never used by the test: {unused:?}",
            self.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "fields never used")]
    fn an_unread_field_fails() {
        let files = VectorFiles::load();
        let first = files.under("messages").remove(0);
        let v = files.open(&first);
        let _ = v.str("message");
        std::mem::forget(files);
        drop(v);
    }

    #[test]
    #[should_panic(expected = "vector files never used")]
    fn an_unopened_file_fails() {
        let _files = VectorFiles::load();
    }
}
