//! Registry entries for simulated VMs, written without a TPM: for load
//! generation and tests only.
//!
//! Production provisioning goes through `vkx-host vtpm provision`
//! ([`crate::vtpm::provision`]): it creates the vTPM's EK and AK itself,
//! over a channel the host controls, before any guest code runs, issues
//! the AK certificate into the vTPM's NV, and only then records what it
//! saw. That is what makes an entry trustworthy.
//!
//! A connect storm of a thousand VMs (`make bench`, `tests/examples/storm.rs`)
//! cannot run a thousand swtpm processes, so its software quote signers'
//! AKs are recorded here, straight from their TPM2B_PUBLIC. The host then
//! treats them exactly like a provisioned vTPM's: the same registry
//! lookup, the same quote verification. Whoever calls
//! [`enroll_simulated_vm`] vouches for the key: nothing here proves that
//! it lives in a TPM.
//!
//! What it checks: the vm-id (the protocol's rule); that the AK parses
//! and is a key the verifier would accept (restricted, sign-only, bound to
//! its TPM: [`vkx_common::tpm::verify::AK_REQUIRED_ATTRIBUTES`]); that
//! the EK stand-in parses and has the AK's key type (the registry's
//! `ek_alg` fixes the AK's algorithm); that the VM has no entry yet.
//!
//! What it does not do, on purpose:
//! - no AK certificate: the entry's `ak_cert_sha256` is the SHA-256 of
//!   empty input ([`NO_CERTIFICATE_SHA256`]), which no DER certificate
//!   has, so the entry says plainly that no certificate was issued;
//! - no check that the AK is not another VM's: that is a scan of the
//!   whole registry per entry, which would make enrolling N VMs O(N²).
//!
//! The write is the registry's atomic replace (temporary file, fsync,
//! rename, directory fsync), after the check that no entry exists; the
//! registry's create-if-absent insert would scan every entry to count
//! them. Between the check and the rename a concurrent `vtpm provision`
//! of the same vm-id could be overwritten: never enrol a vm-id that a
//! real VM may use.

use std::time::{SystemTime, UNIX_EPOCH};

use vkx_common::tpm::verify::{AK_FORBIDDEN_ATTRIBUTES, AK_REQUIRED_ATTRIBUTES};
use vkx_common::tpm::{Public, PublicKey};

use crate::registry::{EkAlg, Registry, RegistryEntry, RegistryError, validate_vm_id};

/// SHA-256 of empty input, hex: the `ak_cert_sha256` of an entry for
/// which no AK certificate was issued.
pub const NO_CERTIFICATE_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a simulated VM was not enrolled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{which} public area: {reason}")]
    InvalidKey { which: &'static str, reason: String },
    #[error("vm {vm_id} already has a registry entry; simulated VMs are enrolled once")]
    Exists { vm_id: String },
}

/// Records `ak_public` (TPM2B_PUBLIC) as the AK of the simulated VM
/// `vm_id`, with `ek_public` (TPM2B_PUBLIC) as its EK stand-in. Load
/// generation and tests only: see the module documentation.
pub fn enroll_simulated_vm(
    registry: &Registry,
    vm_id: &str,
    ek_public: &[u8],
    ak_public: &[u8],
) -> Result<RegistryEntry, EnrollError> {
    let vm = validate_vm_id(vm_id)?;
    let invalid = |which, reason: String| EnrollError::InvalidKey { which, reason };
    let ak = Public::parse(ak_public).map_err(|e| invalid("AK", e.to_string()))?;
    let attrs = ak.attributes();
    if attrs & AK_REQUIRED_ATTRIBUTES != AK_REQUIRED_ATTRIBUTES
        || attrs & AK_FORBIDDEN_ATTRIBUTES != 0
    {
        return Err(invalid(
            "AK",
            format!(
                "not a restricted signing key bound to its TPM (objectAttributes {attrs:#010x})"
            ),
        ));
    }
    let ek = Public::parse(ek_public).map_err(|e| invalid("EK", e.to_string()))?;
    let ek_alg = match (ek.key(), ak.key()) {
        (PublicKey::EccP256 { .. }, PublicKey::EccP256 { .. }) => EkAlg::Ecc,
        (PublicKey::Rsa { .. }, PublicKey::Rsa { .. }) => EkAlg::Rsa,
        _ => {
            return Err(invalid(
                "EK",
                "key type differs from the AK's (an ECC EK goes with an ECC AK, RSA with RSA)"
                    .into(),
            ));
        }
    };
    if registry.by_vm_id(vm.as_str())?.is_some() {
        return Err(EnrollError::Exists {
            vm_id: vm.as_str().to_owned(),
        });
    }
    let entry = RegistryEntry {
        vm_id: vm.as_str().to_owned(),
        ek_alg,
        ek_public: hex::encode(ek_public),
        ak_public: hex::encode(ak_public),
        ak_name: hex::encode(ak.name()),
        ak_cert_sha256: NO_CERTIFICATE_SHA256.to_owned(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        last_quote: None,
    };
    // A new VM: no clock baseline (a record left by an entry removed by
    // hand is not its own), and its clock file, so that its attestations
    // only overwrite a slot. Reset before the entry is written, so a crash
    // between the two cannot leave an old record under the new AK.
    registry.reset_clock(&vm, None)?;
    registry.replace(&entry)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An ECC AK of vkx's template, as swtpm marshals it
    /// (common/tests/fixtures/tpm/ecc-p256-ecdsa/ak.pub).
    const AK: &str = "00580023000b00050072000000100018000b00030010002055\
        9e4818039f6690046e137a67ff4f8f338ec052431f22d3f5b2eaafb4c0d4db0020\
        00215c6a87e99d0fff52a50fa44c4daa8fe9efe3438b5dcfe932d65b5eedaf71";

    /// An EK of the TCG default ECC template (unique left zero).
    fn ek() -> Vec<u8> {
        let mut t = hex::decode("0023000b000300b20020").unwrap();
        t.extend(
            hex::decode("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
                .unwrap(),
        );
        t.extend(hex::decode("000600800043001000030010").unwrap());
        for _ in 0..2 {
            t.extend([0x00, 0x20]);
            t.extend([0u8; 32]);
        }
        let mut out = u16::try_from(t.len()).unwrap().to_be_bytes().to_vec();
        out.extend(t);
        out
    }

    #[test]
    fn enrols_once_and_the_host_reads_the_ak_back() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let ak = hex::decode(AK).unwrap();
        let e = enroll_simulated_vm(&reg, "sim-1", &ek(), &ak).unwrap();
        assert_eq!(e.ek_alg, EkAlg::Ecc);
        assert_eq!(e.ak_cert_sha256, NO_CERTIFICATE_SHA256);
        assert_eq!(
            NO_CERTIFICATE_SHA256,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, b""))
        );
        assert_eq!(reg.by_vm_id("sim-1").unwrap(), Some(e));
        let vm = validate_vm_id("sim-1").unwrap();
        let read = crate::attestation::registered_ak(&reg, &vm).unwrap();
        assert_eq!(read.to_bytes(), ak);
        assert!(matches!(
            enroll_simulated_vm(&reg, "sim-1", &ek(), &ak),
            Err(EnrollError::Exists { .. })
        ));
    }

    #[test]
    fn refuses_keys_the_verifier_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let ak = hex::decode(AK).unwrap();
        // Not restricted (bit 16 cleared in objectAttributes).
        let mut unrestricted = ak.clone();
        unrestricted[7] &= !0x01;
        assert!(matches!(
            enroll_simulated_vm(&reg, "sim-1", &ek(), &unrestricted),
            Err(EnrollError::InvalidKey { which: "AK", .. })
        ));
        assert!(matches!(
            enroll_simulated_vm(&reg, "sim-1", &ek(), &ak[..10]),
            Err(EnrollError::InvalidKey { which: "AK", .. })
        ));
        assert!(matches!(
            enroll_simulated_vm(&reg, "sim-1", &[0, 0], &ak),
            Err(EnrollError::InvalidKey { which: "EK", .. })
        ));
        assert!(matches!(
            enroll_simulated_vm(&reg, "a/b", &ek(), &ak),
            Err(EnrollError::Registry(RegistryError::InvalidVmId { .. }))
        ));
        assert_eq!(reg.entries().unwrap().len(), 0);
    }
}
