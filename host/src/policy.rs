//! The host's attestation and key policy: which measured boot states are
//! acceptable for which VM, and which keys and derivation purposes a VM
//! may have once attested.
//!
//! The policy is a TOML file written by node operators. It is validated
//! completely at load (unknown fields, malformed digests, dangling image
//! references, duplicates and limits are refused with an error that names
//! the place), so a running host only ever holds a policy that makes
//! sense. Evaluation is a pure function of (policy, VM identity, verified
//! PCR values): the host logs the [`Refusal`] reasons locally; the guest
//! only ever learns "attestation-failed" or "not-permitted".
//!
//! ```toml
//! [[image]]
//! name = "debian-12-2026.11"
//! keys = ["disk"]
//! derive = ["disk-unlock:v1"]
//!
//! [[image.pcr]]
//! bank = "sha256"
//! index = 7
//! # several values: the fleet is half-way through an OS update
//! allowed = ["<64 hex>", "<64 hex>"]
//!
//! [[vm]]
//! id = "vm-17"
//! image = "debian-12-2026.11"
//! keys = ["vm-17-config"]      # in addition to the image's keys
//! ```
//!
//! SHA-1 PCR banks are refused unless an image opts in with
//! `danger_allow_sha1_pcrs = true`: SHA-1 has practical chosen-prefix
//! collisions, so a sha1 PCR value says less about what was measured than
//! a SHA-2 one. The opt-in is per image, not node-wide, because the bank a
//! VM can be measured in is a property of its firmware, that is of its
//! image: one legacy image must not open SHA-1 for every VM on the node.
//! A VM's own `[[vm.pcr]]` rules use its image's setting. Without the
//! opt-in the host never selects a sha1 bank, and evaluation refuses
//! reported sha1 values ([`Refusal::Sha1Bank`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use vkx_common::wire::{HashAlg, KeyName, PcrBankSelection, PcrBankValues, Purpose, VmId};

/// Largest policy file read: far above any real policy, small enough that
/// a wrong path cannot exhaust memory.
pub const MAX_POLICY_FILE: u64 = 4 * 1024 * 1024;
/// Images in one policy.
pub const MAX_IMAGES: usize = 1024;
/// VMs in one policy: a node serves ~1,000; leave room for re-placement.
pub const MAX_VMS: usize = 16 * 1024;
/// Allowed values per PCR: enough for several staged updates at once.
pub const MAX_ALLOWED_VALUES: usize = 16;
/// Keys or purposes granted by one image or VM entry.
pub const MAX_GRANTS: usize = 64;
/// Longest image name.
pub const MAX_IMAGE_NAME: usize = 64;

/// Checks an image name: 1 to [`MAX_IMAGE_NAME`] characters of
/// `[A-Za-z0-9._:+-]`, the wire's name alphabet. The policy and the key
/// store's allow-lists (`vkx-host keys --allow-image`) both use it, so a
/// name one accepts the other does too, and a name is always safe to log.
pub fn check_image_name(image: &str) -> Result<(), String> {
    if image.is_empty() || image.len() > MAX_IMAGE_NAME {
        return Err(format!(
            "image name must have 1..={MAX_IMAGE_NAME} characters"
        ));
    }
    if !image
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'+' | b'-'))
    {
        return Err("image name has a character outside [A-Za-z0-9._:+-]".into());
    }
    Ok(())
}

/// Why a policy file was refused. The message names the place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("read policy {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy {path} is larger than {MAX_POLICY_FILE} bytes")]
    TooLarge { path: String },
    #[error("policy is not valid TOML for vkx: {0}")]
    Syntax(String),
    #[error("policy: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> PolicyError {
    PolicyError::Invalid(msg.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    image: Vec<ImageFile>,
    #[serde(default)]
    vm: Vec<VmFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    name: String,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    derive: Vec<String>,
    #[serde(default)]
    pcr: Vec<PcrFile>,
    /// Accept sha1 PCR rules for this image's VMs (see the primer).
    #[serde(default)]
    danger_allow_sha1_pcrs: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    id: String,
    image: String,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    derive: Vec<String>,
    /// Per-VM reference values; they replace the image's for the same PCR.
    #[serde(default)]
    pcr: Vec<PcrFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PcrFile {
    bank: String,
    index: u8,
    allowed: Vec<String>,
}

/// A PCR: (bank, index).
pub type PcrId = (HashAlg, u8);

/// The effective policy of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPolicy {
    pub vm_id: VmId,
    pub image: String,
    /// Allowed digests per PCR; every listed PCR must match one of them.
    pub pcrs: BTreeMap<PcrId, BTreeSet<Vec<u8>>>,
    pub keys: BTreeSet<KeyName>,
    pub derive: BTreeSet<Purpose>,
    /// The image opted in to sha1 PCR banks (`danger_allow_sha1_pcrs`).
    pub allow_sha1_pcrs: bool,
}

/// A validated policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    vms: BTreeMap<VmId, VmPolicy>,
}

/// Why evidence did not satisfy the policy. Logged on the host only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("VM {0} is not in the policy")]
    UnknownVm(VmId),
    #[error("PCR {}:{index} was not reported", .bank.name())]
    PcrMissing { bank: HashAlg, index: u8 },
    #[error("PCR {}:{index} has digest {digest_prefix}… which no rule allows", .bank.name())]
    PcrMismatch {
        bank: HashAlg,
        index: u8,
        /// First 8 bytes in hex: enough to find it in an event log.
        digest_prefix: String,
    },
    #[error("the evidence reports a sha1 PCR bank, which this VM's image does not allow")]
    Sha1Bank,
}

fn parse_bank(s: &str, at: &str) -> Result<HashAlg, PolicyError> {
    HashAlg::from_name(s).ok_or_else(|| {
        invalid(format!(
            "{at}: bank {s:?} is not sha1, sha256, sha384 or sha512"
        ))
    })
}

/// Parses PCR rules; a sha1 rule only when `allow_sha1` (the setting of
/// `image`, named in the refusal).
fn parse_pcrs(
    rules: &[PcrFile],
    at: &str,
    image: &str,
    allow_sha1: bool,
) -> Result<BTreeMap<PcrId, BTreeSet<Vec<u8>>>, PolicyError> {
    let mut out = BTreeMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let here = format!("{at} pcr #{}", i + 1);
        let bank = parse_bank(&rule.bank, &here)?;
        if bank == HashAlg::Sha1 && !allow_sha1 {
            return Err(invalid(format!(
                "{here}: bank sha1 is refused (SHA-1 has practical collisions); prefer a sha256 \
                 rule, or set `danger_allow_sha1_pcrs = true` in image {image:?} if its \
                 firmware measures into sha1 only"
            )));
        }
        if rule.index > 23 {
            return Err(invalid(format!(
                "{here}: index {} is not 0..23",
                rule.index
            )));
        }
        if rule.allowed.is_empty() || rule.allowed.len() > MAX_ALLOWED_VALUES {
            return Err(invalid(format!(
                "{here}: needs 1..={MAX_ALLOWED_VALUES} allowed values, has {}",
                rule.allowed.len()
            )));
        }
        let mut allowed = BTreeSet::new();
        for v in &rule.allowed {
            let digest =
                decode_hex(v).ok_or_else(|| invalid(format!("{here}: {v:?} is not hex")))?;
            if digest.len() != bank.digest_len() {
                return Err(invalid(format!(
                    "{here}: a {:?} digest has {} bytes, {v:?} has {}",
                    bank,
                    bank.digest_len(),
                    digest.len()
                )));
            }
            allowed.insert(digest);
        }
        if out.insert((bank, rule.index), allowed).is_some() {
            return Err(invalid(format!(
                "{here}: {}:{} is listed twice",
                rule.bank, rule.index
            )));
        }
    }
    Ok(out)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn parse_grants<T: Ord>(
    items: &[String],
    at: &str,
    what: &str,
    make: impl Fn(String) -> Result<T, vkx_common::wire::DecodeError>,
) -> Result<BTreeSet<T>, PolicyError> {
    if items.len() > MAX_GRANTS {
        return Err(invalid(format!("{at}: more than {MAX_GRANTS} {what}")));
    }
    let mut out = BTreeSet::new();
    for item in items {
        let v = make(item.clone()).map_err(|e| invalid(format!("{at}: {what} {item:?}: {e}")))?;
        if !out.insert(v) {
            return Err(invalid(format!("{at}: {what} {item:?} listed twice")));
        }
    }
    Ok(out)
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        use crate::fsutil::FsError;
        let shown = path.display().to_string();
        let read = |source| PolicyError::Read {
            path: shown.clone(),
            source,
        };
        let raw = crate::fsutil::read_capped(path, MAX_POLICY_FILE).map_err(|e| match e {
            FsError::TooLarge { .. } => PolicyError::TooLarge {
                path: shown.clone(),
            },
            FsError::Io { source, .. } | FsError::Directory { source, .. } => read(source),
            other => read(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                other.to_string(),
            )),
        })?;
        let text = String::from_utf8(raw)
            .map_err(|e| read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::from_toml(&text)
    }

    /// Validates a policy given as TOML text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        if file.image.len() > MAX_IMAGES {
            return Err(invalid(format!("more than {MAX_IMAGES} images")));
        }
        if file.vm.len() > MAX_VMS {
            return Err(invalid(format!("more than {MAX_VMS} VMs")));
        }
        let mut images = BTreeMap::new();
        for img in &file.image {
            let at = format!(
                "image {:?}",
                img.name
                    .chars()
                    .take(MAX_IMAGE_NAME + 8)
                    .collect::<String>()
            );
            check_image_name(&img.name).map_err(|e| invalid(format!("{at}: {e}")))?;
            let allow_sha1 = img.danger_allow_sha1_pcrs;
            let pcrs = parse_pcrs(&img.pcr, &at, &img.name, allow_sha1)?;
            let keys = parse_grants(&img.keys, &at, "key", KeyName::new)?;
            let derive = parse_grants(&img.derive, &at, "purpose", Purpose::new)?;
            if images
                .insert(img.name.clone(), (pcrs, keys, derive, allow_sha1))
                .is_some()
            {
                return Err(invalid(format!("{at} is defined twice")));
            }
        }
        let mut vms = BTreeMap::new();
        for vm in &file.vm {
            let at = format!("vm {:?}", vm.id);
            let vm_id = VmId::new(vm.id.clone()).map_err(|e| invalid(format!("{at}: {e}")))?;
            let (image_pcrs, image_keys, image_derive, allow_sha1) = images
                .get(&vm.image)
                .ok_or_else(|| invalid(format!("{at}: image {:?} is not defined", vm.image)))?;
            let mut pcrs = image_pcrs.clone();
            pcrs.extend(parse_pcrs(&vm.pcr, &at, &vm.image, *allow_sha1)?);
            if pcrs.is_empty() {
                return Err(invalid(format!(
                    "{at}: no PCR rules (from image or VM): such a VM would be trusted \
                     whatever it booted"
                )));
            }
            if pcrs
                .keys()
                .map(|(bank, _)| bank)
                .collect::<BTreeSet<_>>()
                .len()
                > vkx_common::wire::MAX_PCR_BANKS
            {
                return Err(invalid(format!(
                    "{at}: more PCR banks than a quote can hold"
                )));
            }
            let mut keys = image_keys.clone();
            keys.extend(parse_grants(&vm.keys, &at, "key", KeyName::new)?);
            let mut derive = image_derive.clone();
            derive.extend(parse_grants(&vm.derive, &at, "purpose", Purpose::new)?);
            let entry = VmPolicy {
                vm_id: vm_id.clone(),
                image: vm.image.clone(),
                pcrs,
                keys,
                derive,
                allow_sha1_pcrs: *allow_sha1,
            };
            if vms.insert(vm_id, entry).is_some() {
                return Err(invalid(format!("{at} is listed twice")));
            }
        }
        Ok(Self { vms })
    }

    pub fn vm(&self, vm_id: &VmId) -> Option<&VmPolicy> {
        self.vms.get(vm_id)
    }

    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// The PCRs to ask a VM to quote: every PCR its policy constrains.
    pub fn selection(&self, vm_id: &VmId) -> Option<Vec<PcrBankSelection>> {
        let vm = self.vms.get(vm_id)?;
        let mut banks: BTreeMap<HashAlg, Vec<u8>> = BTreeMap::new();
        for (bank, index) in vm.pcrs.keys() {
            banks.entry(*bank).or_default().push(*index);
        }
        Some(
            banks
                .into_iter()
                .map(|(hash_alg, pcrs)| PcrBankSelection { hash_alg, pcrs })
                .collect(),
        )
    }

    /// Checks verified PCR values against the VM's policy. Returns the
    /// VM's grants when every constrained PCR holds an allowed value.
    pub fn evaluate(&self, vm_id: &VmId, values: &[PcrBankValues]) -> Result<&VmPolicy, Refusal> {
        let vm = self
            .vms
            .get(vm_id)
            .ok_or_else(|| Refusal::UnknownVm(vm_id.clone()))?;
        // The host selects no sha1 bank for such a VM (`selection`), so
        // reported sha1 values mean a selection this policy did not make.
        if !vm.allow_sha1_pcrs && values.iter().any(|b| b.hash_alg == HashAlg::Sha1) {
            return Err(Refusal::Sha1Bank);
        }
        for ((bank, index), allowed) in &vm.pcrs {
            let digest = values
                .iter()
                .find(|b| b.hash_alg == *bank)
                .and_then(|b| b.values.get(index))
                .ok_or(Refusal::PcrMissing {
                    bank: *bank,
                    index: *index,
                })?;
            if !allowed.contains(digest) {
                return Err(Refusal::PcrMismatch {
                    bank: *bank,
                    index: *index,
                    digest_prefix: digest.iter().take(8).map(|b| format!("{b:02x}")).collect(),
                });
            }
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reads_up_to_the_cap_and_names_a_larger_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let cap = usize::try_from(MAX_POLICY_FILE).unwrap();
        std::fs::write(&path, "#".repeat(cap)).unwrap();
        assert!(Policy::load(&path).is_ok(), "at the cap");
        std::fs::write(&path, "#".repeat(cap + 1)).unwrap();
        assert!(matches!(
            Policy::load(&path),
            Err(PolicyError::TooLarge { .. })
        ));
        assert!(matches!(
            Policy::load(&dir.path().join("absent")),
            Err(PolicyError::Read { .. })
        ));
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn policy() -> String {
        format!(
            r#"
[[image]]
name = "deb12"
keys = ["disk"]
derive = ["disk-unlock:v1"]
[[image.pcr]]
bank = "sha256"
index = 0
allowed = ["{A}"]
[[image.pcr]]
bank = "sha256"
index = 7
allowed = ["{A}", "{B}"]

[[vm]]
id = "vm-1"
image = "deb12"
keys = ["vm-1-config"]

[[vm]]
id = "vm-2"
image = "deb12"
[[vm.pcr]]
bank = "sha256"
index = 7
allowed = ["{C}"]
"#
        )
    }

    fn values(p0: &str, p7: &str) -> Vec<PcrBankValues> {
        vec![PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values: [(0u8, hex_bytes(p0)), (7u8, hex_bytes(p7))].into(),
        }]
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        decode_hex(s).unwrap()
    }

    fn vm(id: &str) -> VmId {
        VmId::new(id).unwrap()
    }

    #[test]
    fn staged_update_values_and_per_vm_override() {
        let p = Policy::from_toml(&policy()).unwrap();
        assert_eq!(p.vm_count(), 2);
        let g = p.evaluate(&vm("vm-1"), &values(A, A)).unwrap();
        assert!(g.keys.contains(&KeyName::new("disk").unwrap()));
        assert!(g.keys.contains(&KeyName::new("vm-1-config").unwrap()));
        assert!(p.evaluate(&vm("vm-1"), &values(A, B)).is_ok());
        assert!(matches!(
            p.evaluate(&vm("vm-1"), &values(A, C)),
            Err(Refusal::PcrMismatch { index: 7, .. })
        ));
        // vm-2 replaces the image's PCR 7 rule.
        assert!(p.evaluate(&vm("vm-2"), &values(A, C)).is_ok());
        assert!(p.evaluate(&vm("vm-2"), &values(A, A)).is_err());
        assert_eq!(
            p.evaluate(&vm("vm-3"), &values(A, A)),
            Err(Refusal::UnknownVm(vm("vm-3")))
        );
        let missing = vec![PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values: [(0u8, hex_bytes(A))].into(),
        }];
        assert_eq!(
            p.evaluate(&vm("vm-1"), &missing),
            Err(Refusal::PcrMissing {
                bank: HashAlg::Sha256,
                index: 7
            })
        );
        assert_eq!(
            p.selection(&vm("vm-1")).unwrap(),
            vec![PcrBankSelection {
                hash_alg: HashAlg::Sha256,
                pcrs: vec![0, 7]
            }]
        );
    }

    #[test]
    fn invalid_policies_are_refused_with_the_place_named() {
        let cases = [
            (
                policy().replace("keys = [\"disk\"]", "keyz = [\"disk\"]"),
                "unknown field",
            ),
            (policy().replace("index = 7", "index = 24"), "index 24"),
            (
                policy().replace(&format!("[\"{A}\", \"{B}\"]"), "[\"abcd\"]"),
                "has 2",
            ),
            (
                policy().replace(&format!("[\"{A}\", \"{B}\"]"), "[\"xyz\"]"),
                "not hex",
            ),
            (
                policy().replace("image = \"deb12\"\nkeys", "image = \"deb13\"\nkeys"),
                "not defined",
            ),
            (
                policy().replace("id = \"vm-2\"", "id = \"vm-1\""),
                "listed twice",
            ),
            (
                policy().replace("bank = \"sha256\"\nindex = 0", "bank = \"md5\"\nindex = 0"),
                "md5",
            ),
            (
                policy().replace("keys = [\"vm-1-config\"]", "keys = [\"bad name\"]"),
                "bad name",
            ),
            (policy().replace("index = 0", "index = 7"), "listed twice"),
            // The key store's alphabet: an image a key could never name.
            (
                policy().replace("name = \"deb12\"", "name = \"deb 12\""),
                "outside [A-Za-z0-9._:+-]",
            ),
            (
                policy().replace(
                    "name = \"deb12\"",
                    &format!("name = \"{}\"", "d".repeat(65)),
                ),
                "1..=64 characters",
            ),
            (
                "[[image]]\nname = \"x\"\n[[vm]]\nid = \"v\"\nimage = \"x\"\n".to_owned(),
                "no PCR rules",
            ),
        ];
        for (text, want) in cases {
            let err = Policy::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    const SHA1: &str = "1111111111111111111111111111111111111111";

    fn sha1_rule(table: &str) -> String {
        format!("[[{table}.pcr]]\nbank = \"sha1\"\nindex = 0\nallowed = [\"{SHA1}\"]\n")
    }

    #[test]
    fn sha1_banks_need_the_images_explicit_opt_in() {
        // In an image's rules, and in a VM's (which uses its image's
        // setting): a configuration error that names the fix.
        let in_image = policy().replacen(
            "[[image.pcr]]",
            &format!("{}[[image.pcr]]", sha1_rule("image")),
            1,
        );
        let in_vm = format!("{}{}", policy(), sha1_rule("vm"));
        for text in [&in_image, &in_vm] {
            let err = Policy::from_toml(text).unwrap_err();
            assert!(matches!(err, PolicyError::Invalid(_)), "{err}");
            let err = err.to_string();
            assert!(err.contains("bank sha1 is refused"), "{err}");
            assert!(err.contains("danger_allow_sha1_pcrs = true"), "{err}");
            assert!(err.contains("\"deb12\""), "{err}");
        }
        // Opted in: accepted, selected, and evaluated.
        let opt_in = |t: &str| {
            t.replacen(
                "derive = [\"disk-unlock:v1\"]",
                "derive = [\"disk-unlock:v1\"]\ndanger_allow_sha1_pcrs = true",
                1,
            )
        };
        let p = Policy::from_toml(&opt_in(&in_vm)).unwrap();
        assert!(Policy::from_toml(&opt_in(&in_image)).is_ok());
        let sel = p.selection(&vm("vm-2")).unwrap();
        assert_eq!(sel[0].hash_alg, HashAlg::Sha1);
        let mut v = values(A, C);
        v.insert(
            0,
            PcrBankValues {
                hash_alg: HashAlg::Sha1,
                values: [(0u8, hex_bytes(SHA1))].into(),
            },
        );
        assert!(p.evaluate(&vm("vm-2"), &v).is_ok());
        // A bad opt-in value is a syntax error, not "false".
        let bad = policy().replacen(
            "derive = [\"disk-unlock:v1\"]",
            "derive = [\"disk-unlock:v1\"]\ndanger_allow_sha1_pcrs = \"yes\"",
            1,
        );
        assert!(matches!(
            Policy::from_toml(&bad),
            Err(PolicyError::Syntax(_))
        ));
    }

    #[test]
    fn reported_sha1_values_are_refused_without_the_opt_in() {
        // Evidence for a selection the host would not make: a sha1 bank
        // beside the sha256 one the policy asks for.
        let p = Policy::from_toml(&policy()).unwrap();
        assert!(
            p.selection(&vm("vm-1"))
                .unwrap()
                .iter()
                .all(|b| b.hash_alg != HashAlg::Sha1)
        );
        let mut v = values(A, A);
        v.push(PcrBankValues {
            hash_alg: HashAlg::Sha1,
            values: [(0u8, hex_bytes(SHA1))].into(),
        });
        assert_eq!(p.evaluate(&vm("vm-1"), &v), Err(Refusal::Sha1Bank));
        assert!(p.evaluate(&vm("vm-1"), &values(A, A)).is_ok());
    }
}
