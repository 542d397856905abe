//! Which keys an attested VM gets (PROTOCOL.md §6.7, §6.8, §6.11).
//!
//! A key is released to a VM only when three independent things agree:
//! the VM attested (its PCRs met its policy: the session only asks after
//! that), the policy grants the key name to the VM or its image, and the
//! key's own allow-list in the store names the VM or its image. The two
//! operator actions are separate on purpose: neither a policy edit nor a
//! key import alone hands a key out.
//!
//! Every refusal is `not-permitted` on the wire, whatever its cause (no
//! grant, no such key, not on the allow-list), so a guest cannot probe
//! which keys exist; a store that cannot be read is `internal` (retry
//! later). The reason stays in the host's log. Released material travels
//! only in the `key-release` / `key-update` messages inside TLS, and is
//! never logged.

use std::collections::BTreeMap;

use crate::policy::VmPolicy;
use vkx_common::errors::ErrorCode;
use vkx_common::wire::{KeyName, KeyRefusal, KeyRelease, ReleasedKey};
use vkx_common::{rl_info, rl_warn};

use crate::keystore::{KeyStore, KeyStoreError, StoredKey};

/// Why one key was refused (host log only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Withheld {
    #[error("the policy does not grant this key to the VM")]
    NotGranted,
    #[error("no such key in the store")]
    NoSuchKey,
    #[error("the key's allow-list names neither the VM nor its image")]
    NotOnAllowList,
    #[error("the key store failed: {0}")]
    Store(String),
}

impl Withheld {
    /// The code the guest sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Store(_) => ErrorCode::Internal,
            _ => ErrorCode::NotPermitted,
        }
    }
}

/// The current version of `name` if `vm` may have it.
pub fn entitled(
    store: &dyn KeyStore,
    vm: &VmPolicy,
    name: &KeyName,
) -> Result<StoredKey, Withheld> {
    if !vm.keys.contains(name) {
        return Err(Withheld::NotGranted);
    }
    let key = match store.current(name) {
        Ok(Some(k)) => k,
        Ok(None) => return Err(Withheld::NoSuchKey),
        Err(KeyStoreError::NotFound { .. }) => return Err(Withheld::NoSuchKey),
        Err(e) => return Err(Withheld::Store(e.to_string())),
    };
    if !key.entitles(&vm.vm_id, Some(&vm.image)) {
        return Err(Withheld::NotOnAllowList);
    }
    Ok(key)
}

/// The answer to a `key-request`, and what was released (name → version)
/// for later rotation pushes. Names arrive sorted and unique (the decoder
/// enforces it), so both lists come out sorted too.
pub fn decide(
    store: &dyn KeyStore,
    vm: &VmPolicy,
    names: Vec<KeyName>,
) -> (KeyRelease, BTreeMap<KeyName, u32>) {
    let mut release = KeyRelease {
        released: Vec::new(),
        refused: Vec::new(),
    };
    let mut versions = BTreeMap::new();
    for name in names {
        match entitled(store, vm, &name) {
            Ok(key) => {
                rl_info!(peer: vm.vm_id, key = %name, version = key.version, "key released");
                versions.insert(name.clone(), key.version);
                release.released.push(ReleasedKey {
                    name,
                    version: key.version,
                    material: key.material,
                });
            }
            Err(why) => {
                rl_warn!(peer: vm.vm_id, key = %name, reason = %why, "key withheld");
                release.refused.push(KeyRefusal {
                    code: why.code(),
                    name,
                });
            }
        }
    }
    (release, versions)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keystore::{AllowList, DirKeyStore, MasterKey};
    use crate::policy::Policy;
    use vkx_common::wire::{KeyMaterial, VmId};

    const POLICY: &str = r#"
[[image]]
name = "img"
keys = ["disk", "unlisted", "missing"]

[[image.pcr]]
bank = "sha256"
index = 7
allowed = ["0000000000000000000000000000000000000000000000000000000000000000"]

[[vm]]
id = "vm-1"
image = "img"
keys = ["vm-1-config"]

[[vm]]
id = "vm-2"
image = "img"
"#;

    fn name(s: &str) -> KeyName {
        KeyName::new(s).unwrap()
    }

    fn store(dir: &std::path::Path) -> DirKeyStore {
        let s = DirKeyStore::open(&dir.join("keys"), MasterKey::generate().unwrap()).unwrap();
        let by_image = AllowList::new::<&str, &str>(&[], &["img"]).unwrap();
        let by_vm = AllowList::new::<&str, &str>(&["vm-1"], &[]).unwrap();
        let nobody = AllowList::new::<&str, &str>(&["vm-9"], &[]).unwrap();
        s.add(&name("disk"), &KeyMaterial::new(vec![1; 32]), &by_image)
            .unwrap();
        s.add(&name("vm-1-config"), &KeyMaterial::new(vec![2; 16]), &by_vm)
            .unwrap();
        s.add(&name("unlisted"), &KeyMaterial::new(vec![3; 8]), &nobody)
            .unwrap();
        s.add(&name("other"), &KeyMaterial::new(vec![4; 8]), &by_image)
            .unwrap();
        s
    }

    #[test]
    fn three_independent_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let policy = Policy::from_toml(POLICY).unwrap();
        let vm1 = policy.vm(&VmId::new("vm-1").unwrap()).unwrap();
        let names = ["disk", "missing", "other", "unlisted", "vm-1-config"]
            .map(name)
            .to_vec();
        let (r, versions) = decide(&s, vm1, names.clone());
        let released: Vec<&str> = r.released.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(released, ["disk", "vm-1-config"]);
        assert_eq!(r.released[0].material.expose(), &[1u8; 32][..]);
        let refused: Vec<(&str, ErrorCode)> = r
            .refused
            .iter()
            .map(|k| (k.name.as_str(), k.code))
            .collect();
        assert_eq!(
            refused,
            [
                ("missing", ErrorCode::NotPermitted),
                ("other", ErrorCode::NotPermitted),
                ("unlisted", ErrorCode::NotPermitted),
            ]
        );
        assert_eq!(versions.get(&name("disk")), Some(&1));
        assert_eq!(
            entitled(&s, vm1, &name("missing")),
            Err(Withheld::NoSuchKey)
        );
        assert_eq!(
            entitled(&s, vm1, &name("other")).err(),
            Some(Withheld::NotGranted)
        );
        assert_eq!(
            entitled(&s, vm1, &name("unlisted")).err(),
            Some(Withheld::NotOnAllowList)
        );
        // vm-2 shares the image but not vm-1's own key.
        let vm2 = policy.vm(&VmId::new("vm-2").unwrap()).unwrap();
        let (r, _) = decide(&s, vm2, names);
        let released: Vec<&str> = r.released.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(released, ["disk"]);
    }

    #[test]
    fn an_empty_store_releases_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let empty =
            DirKeyStore::open(&dir.path().join("keys"), MasterKey::generate().unwrap()).unwrap();
        let policy = Policy::from_toml(POLICY).unwrap();
        let vm1 = policy.vm(&VmId::new("vm-1").unwrap()).unwrap();
        let (r, v) = decide(&empty, vm1, vec![name("disk")]);
        assert!(r.released.is_empty() && v.is_empty());
        assert_eq!(r.refused[0].code, ErrorCode::NotPermitted);
    }
}
