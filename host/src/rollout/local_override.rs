//! The node's local override file (spec/ROLLOUT.md §6): a small TOML file
//! that can only kill features, and always wins, so a kill works on a
//! node whose fleet store is broken or unreachable.
//!
//! What it trusts: the file is local and root-owned, written by an
//! operator on the node. What it bounds: the file's size
//! ([`MAX_OVERRIDE_BYTES`]) before parsing. Strict: unknown keys and
//! unknown feature names are refused (a misspelt kill must fail loudly;
//! the caller then treats every feature as killed, see
//! [`Override::kill_all`]). Repeating a name is harmless and allowed.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::document::Feature;
use super::shown;

/// Largest override file read: it lists at most a few feature names.
pub const MAX_OVERRIDE_BYTES: usize = 4096;

/// Why an override file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverrideError {
    #[error("rollout override {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rollout override is larger than {MAX_OVERRIDE_BYTES} bytes")]
    TooLarge,
    #[error("rollout override is not valid TOML for vkx: {0}")]
    Syntax(String),
    #[error(
        "rollout override: killed[{index}] \"{name}\" is not a feature \
         (v1 has key-release, key-derivation, key-rotation)"
    )]
    UnknownFeature { index: usize, name: String },
}

/// The features the local override kills.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Override {
    killed: BTreeSet<Feature>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideFile {
    #[serde(default)]
    killed: Vec<String>,
}

impl Override {
    /// Parses the file's text: `killed = ["key-release", ...]`; an empty
    /// file kills nothing.
    pub fn parse(text: &str) -> Result<Self, OverrideError> {
        if text.len() > MAX_OVERRIDE_BYTES {
            return Err(OverrideError::TooLarge);
        }
        let file: OverrideFile =
            toml::from_str(text).map_err(|e| OverrideError::Syntax(e.to_string()))?;
        let mut killed = BTreeSet::new();
        for (index, name) in file.killed.iter().enumerate() {
            let f = Feature::from_name(name).ok_or_else(|| OverrideError::UnknownFeature {
                index,
                name: shown(name),
            })?;
            killed.insert(f);
        }
        Ok(Self { killed })
    }

    /// Reads and parses the file at `path`; a file that does not exist
    /// kills nothing.
    pub fn read(path: &Path) -> Result<Self, OverrideError> {
        let io = |source| OverrideError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io(e)),
        };
        let mut text = String::new();
        // One byte more than the limit tells "too large" from "at the limit".
        let limit = u64::try_from(MAX_OVERRIDE_BYTES + 1).unwrap_or(u64::MAX);
        file.take(limit).read_to_string(&mut text).map_err(io)?;
        Self::parse(&text)
    }

    /// An override that kills every feature: what the caller applies when
    /// the override file exists but cannot be read or parsed, since the
    /// operator who wrote it meant to switch something off.
    pub fn kill_all() -> Self {
        Self {
            killed: Feature::ALL.into_iter().collect(),
        }
    }

    /// An override killing exactly `features`.
    pub fn killing(features: impl IntoIterator<Item = Feature>) -> Self {
        Self {
            killed: features.into_iter().collect(),
        }
    }

    pub fn kills(&self, f: Feature) -> bool {
        self.killed.contains(&f)
    }

    pub fn killed(&self) -> impl Iterator<Item = Feature> + '_ {
        self.killed.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kills_strictly() {
        let o = Override::parse("killed = [\"key-release\", \"key-rotation\", \"key-release\"]\n")
            .unwrap();
        assert!(o.kills(Feature::KeyRelease));
        assert!(o.kills(Feature::KeyRotation));
        assert!(!o.kills(Feature::KeyDerivation));
        assert_eq!(Override::parse("").unwrap(), Override::default());
        let e = Override::parse("killed = [\"key-relase\"]").unwrap_err();
        assert!(e.to_string().contains("killed[0] \"key-relase\""), "{e}");
        let e = Override::parse("kiled = [\"key-release\"]").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Override::parse("killed = []\nkilled = []").unwrap_err();
        assert!(matches!(e, OverrideError::Syntax(_)), "{e}");
        let e = Override::parse(&"#".repeat(MAX_OVERRIDE_BYTES + 1)).unwrap_err();
        assert!(matches!(e, OverrideError::TooLarge));
    }

    #[test]
    fn a_missing_file_kills_nothing_and_an_oversize_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollout-override.toml");
        assert_eq!(Override::read(&path).unwrap(), Override::default());
        std::fs::write(&path, "killed = [\"key-derivation\"]\n").unwrap();
        assert!(Override::read(&path).unwrap().kills(Feature::KeyDerivation));
        std::fs::write(&path, "#".repeat(MAX_OVERRIDE_BYTES + 1)).unwrap();
        assert!(matches!(
            Override::read(&path),
            Err(OverrideError::TooLarge)
        ));
        assert_eq!(Override::kill_all().killed().count(), 3);
    }
}
