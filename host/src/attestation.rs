//! The host's decision on a guest's evidence (PROTOCOL.md §7.4): the AK
//! comes from the registry entry of the VM the transport identified (never
//! from the evidence), the quote is verified against the transcript hash
//! and the requested selection, and the PCR values against policy.
//!
//! Every refusal is a typed [`Rejection`] for the host's local,
//! rate-limited log; the guest only ever learns "attestation-failed"
//! (or "internal" for [`Rejection::is_local`] failures).

use crate::policy::{Policy, Refusal, VmPolicy};
use vkx_common::tpm::{
    AkParent, Public, QuoteExpectations, TpmParseError, VerifiedQuote, VerifyError,
};
use vkx_common::transcript::TRANSCRIPT_HASH_LEN;
use vkx_common::wire::{Evidence, HashAlg, PcrBankSelection, PcrBankValues, VmId};

use crate::registry::{QuoteObservation, Registry, RegistryError};

/// Evidence the host accepted, with what the VM may have.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub grants: VmPolicy,
    /// Clock, reset and restart counts and firmware version, to record
    /// per VM (a rewind means a snapshot restore or a clone, §15.8).
    pub quote: VerifiedQuote,
}

/// Why evidence was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    #[error("VM {0} has no registry entry: provision its vTPM with `vkx-host vtpm provision`")]
    NotProvisioned(VmId),
    #[error("evidence names AK {claimed}, the registry has {recorded} for this VM (another vTPM?)")]
    AkNameMismatch { claimed: String, recorded: String },
    #[error(
        "evidence carries an AK certificate (SHA-256 {claimed_prefix}…) that is not the one provisioning issued for this VM (another vTPM, or its NV rewritten?)"
    )]
    AkCertMismatch {
        /// First 8 bytes of the certificate's SHA-256, hex.
        claimed_prefix: String,
    },
    #[error("quote: {0}")]
    Quote(#[from] VerifyError),
    #[error("policy: {0}")]
    Policy(#[from] Refusal),
    // Local failures: the host, not the guest, is at fault.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("registry entry for {vm_id} is corrupt: {detail}")]
    CorruptEntry { vm_id: VmId, detail: String },
    /// The policy asks for a PCR the challenge did not select: it was
    /// reloaded between this handshake's challenge and its evidence. The
    /// guest is not at fault; it is told `internal` and tries again,
    /// challenged for the new selection.
    #[error(
        "the policy now asks for PCR {}:{index}, which this handshake's challenge did not \
         select (reloaded meanwhile)",
        .bank.name()
    )]
    SelectionStale { bank: HashAlg, index: u8 },
}

impl Rejection {
    /// True when the host failed locally (answer "internal", not
    /// "attestation-failed").
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Self::Registry(_) | Self::CorruptEntry { .. } | Self::SelectionStale { .. }
        )
    }
}

/// The AK public area recorded for `vm_id`.
pub fn registered_ak(registry: &Registry, vm_id: &VmId) -> Result<Public, Rejection> {
    registered(registry, vm_id).map(|(ak, _)| ak)
}

/// The AK public area recorded for `vm_id`, and the SHA-256 (hex) of the
/// AK certificate provisioning issued (of nothing, for an enrolled AK).
fn registered(registry: &Registry, vm_id: &VmId) -> Result<(Public, String), Rejection> {
    let entry = registry
        .by_vm_id(vm_id.as_str())?
        .ok_or_else(|| Rejection::NotProvisioned(vm_id.clone()))?;
    let corrupt = |detail: String| Rejection::CorruptEntry {
        vm_id: vm_id.clone(),
        detail,
    };
    let bytes = hex::decode(&entry.ak_public).map_err(|e| corrupt(format!("ak_public: {e}")))?;
    let ak =
        Public::parse(&bytes).map_err(|e: TpmParseError| corrupt(format!("ak_public: {e}")))?;
    if hex::encode(ak.name()) != entry.ak_name.to_ascii_lowercase() {
        return Err(corrupt("ak_name does not match ak_public".to_owned()));
    }
    Ok((ak, entry.ak_cert_sha256.to_ascii_lowercase()))
}

/// Decides on `evidence` from the VM the transport identified as `vm_id`,
/// for a handshake whose transcript hash is `transcript_hash` and whose
/// challenge asked for `selection`.
pub fn verify_evidence(
    registry: &Registry,
    policy: &Policy,
    vm_id: &VmId,
    transcript_hash: &[u8; TRANSCRIPT_HASH_LEN],
    selection: &[PcrBankSelection],
    evidence: &Evidence,
) -> Result<Accepted, Rejection> {
    let (ak, cert_sha256) = registered(registry, vm_id)?;
    let recorded = ak.name();
    if evidence.ak_name != recorded {
        return Err(Rejection::AkNameMismatch {
            claimed: hex::encode(&evidence.ak_name),
            recorded: hex::encode(&recorded),
        });
    }
    // The registry, not the certificate, is what this host trusts the AK
    // by (§7.4 step 4); a certificate, when sent, must still be the one
    // provisioning issued and recorded, or this vTPM is not the one the
    // registry describes. Its content is not parsed here.
    if let Some(cert) = &evidence.ak_cert {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert);
        if hex::encode(digest.as_ref()) != cert_sha256 {
            return Err(Rejection::AkCertMismatch {
                claimed_prefix: hex::encode(&digest.as_ref()[..8]),
            });
        }
    }
    let quote = vkx_common::tpm::verify_quote(
        &evidence.tpm_attest,
        &evidence.tpm_signature,
        &ak,
        &QuoteExpectations {
            // The registry's AKs are vkx-provisioned: primaries of the
            // endorsement hierarchy (PROTOCOL.md §7.6).
            ak_parent: AkParent::VKX,
            qualifying_data: transcript_hash,
            pcr_selection: selection,
            pcr_values: &evidence.pcr_values,
        },
    )?;
    let grants = judge(policy, vm_id, selection, &evidence.pcr_values)?;
    Ok(Accepted { grants, quote })
}

/// The policy's verdict on verified PCR `values`, quoted for `selection`.
fn judge(
    policy: &Policy,
    vm_id: &VmId,
    selection: &[PcrBankSelection],
    values: &[PcrBankValues],
) -> Result<VmPolicy, Rejection> {
    match policy.evaluate(vm_id, values) {
        Ok(grants) => Ok(grants.clone()),
        Err(Refusal::PcrMissing { bank, index })
            if !selection
                .iter()
                .any(|s| s.hash_alg == bank && s.pcrs.contains(&index)) =>
        {
            Err(Rejection::SelectionStale { bank, index })
        }
        Err(e) => Err(e.into()),
    }
}

/// A quote whose TPM clock state is older than the last accepted one for
/// the same VM: the VM was restored from a snapshot, or cloned (§15.8).
/// The host re-attests such a VM and flags it for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rewind {
    #[error("TPM reset count went back from {was} to {now}")]
    ResetCount { was: u32, now: u32 },
    #[error("TPM restart count went back from {was} to {now} without a reset")]
    RestartCount { was: u32, now: u32 },
    #[error("TPM clock went back from {was} ms to {now} ms without a reset")]
    Clock { was: u64, now: u64 },
}

/// Compares a new quote's clock state with the last accepted one.
pub fn detect_rewind(last: &QuoteObservation, quote: &VerifiedQuote) -> Option<Rewind> {
    let c = quote.clock_info;
    if c.reset_count < last.reset_count {
        return Some(Rewind::ResetCount {
            was: last.reset_count,
            now: c.reset_count,
        });
    }
    if c.reset_count > last.reset_count {
        return None;
    }
    if c.restart_count < last.restart_count {
        return Some(Rewind::RestartCount {
            was: last.restart_count,
            now: c.restart_count,
        });
    }
    // The clock may legitimately lag after an unorderly shutdown; the TPM
    // says so by clearing `safe`.
    if c.safe && c.restart_count == last.restart_count && c.clock < last.clock {
        return Some(Rewind::Clock {
            was: last.clock,
            now: c.clock,
        });
    }
    None
}

/// Records an accepted quote's clock state for `vm_id` (its clock record,
/// one in-place write and `fdatasync`) and reports a rewind against the
/// previous one, if any. With `keep_on_rewind`, a rewound quote is not
/// recorded: the last good state stays the baseline, so the VM stays
/// refused until an operator accepts the new state ([`accept_rewind`]).
/// The caller serialises calls per VM within the process; the clock
/// record's lock serialises them with other processes.
pub fn record_quote(
    registry: &Registry,
    vm_id: &VmId,
    quote: &VerifiedQuote,
    now_unix: u64,
    keep_on_rewind: bool,
) -> Result<Option<Rewind>, Rejection> {
    let entry = registry
        .by_vm_id(vm_id.as_str())?
        .ok_or_else(|| Rejection::NotProvisioned(vm_id.clone()))?;
    let mut clock = registry.clock(vm_id)?;
    // No clock record yet: the baseline an older version kept in the entry.
    let last = clock.recorded().unwrap_or(entry.last_quote);
    let rewind = last.as_ref().and_then(|last| detect_rewind(last, quote));
    if rewind.is_some() && keep_on_rewind {
        return Ok(rewind);
    }
    let c = quote.clock_info;
    clock.record(Some(QuoteObservation {
        clock: c.clock,
        reset_count: c.reset_count,
        restart_count: c.restart_count,
        firmware_version: quote.firmware_version,
        at_unix: now_unix,
    }))?;
    Ok(rewind)
}

/// `vkx-host vtpm accept-rewind`: forgets `vm_id`'s last accepted clock
/// state, so its next quote is the new baseline (after an intended
/// snapshot restore). `false` if there was none.
pub fn accept_rewind(registry: &Registry, vm_id: &VmId) -> Result<bool, Rejection> {
    let entry = registry
        .by_vm_id(vm_id.as_str())?
        .ok_or_else(|| Rejection::NotProvisioned(vm_id.clone()))?;
    let mut clock = registry.clock(vm_id)?;
    if clock.recorded().unwrap_or(entry.last_quote).is_none() {
        return Ok(false);
    }
    clock.record(None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vkx_common::tpm::ClockInfo;

    /// A registry entry for vm-1 (the fields rewind tracking does not read
    /// are placeholders).
    fn enroll_vm1(reg: &Registry) {
        use crate::registry::{EkAlg, RegistryEntry};
        reg.insert(&RegistryEntry {
            vm_id: "vm-1".into(),
            ek_alg: EkAlg::Ecc,
            ek_public: "00aa".into(),
            ak_public: "00bb".into(),
            ak_name: "000b".into(),
            ak_cert_sha256: "cc".repeat(32),
            created_unix: 1,
            last_quote: None,
        })
        .unwrap();
    }

    fn quote(reset_count: u32, restart_count: u32, clock: u64, safe: bool) -> VerifiedQuote {
        VerifiedQuote {
            clock_info: ClockInfo {
                clock,
                reset_count,
                restart_count,
                safe,
            },
            firmware_version: 7,
            ak_name: vec![0, 11],
        }
    }

    #[test]
    fn a_refused_rewind_keeps_the_good_baseline_until_an_operator_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("reg")).unwrap();
        enroll_vm1(&reg);
        let vm = VmId::new("vm-1").unwrap();
        assert_eq!(
            record_quote(&reg, &vm, &quote(5, 2, 10_000, true), 1, true).unwrap(),
            None
        );
        // The snapshot's quote, twice: refused both times (not recorded).
        for _ in 0..2 {
            assert!(
                record_quote(&reg, &vm, &quote(5, 2, 9_000, true), 2, true)
                    .unwrap()
                    .is_some()
            );
        }
        // The operator accepts the restored state: the next quote is the
        // new baseline.
        assert!(accept_rewind(&reg, &vm).unwrap());
        assert!(!accept_rewind(&reg, &vm).unwrap());
        assert_eq!(
            record_quote(&reg, &vm, &quote(5, 2, 9_000, true), 3, true).unwrap(),
            None
        );
        assert_eq!(
            record_quote(&reg, &vm, &quote(5, 2, 9_500, true), 4, true).unwrap(),
            None
        );
        // Flagging: recorded, so the same state again is no rewind.
        assert!(
            record_quote(&reg, &vm, &quote(5, 2, 9_100, true), 5, false)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            record_quote(&reg, &vm, &quote(5, 2, 9_100, true), 6, false).unwrap(),
            None
        );
    }

    #[test]
    fn a_pcr_the_challenge_did_not_select_is_the_hosts_fault() {
        let policy = Policy::from_toml(&format!(
            "[[image]]\nname = \"img\"\n\
             [[image.pcr]]\nbank = \"sha256\"\nindex = 0\nallowed = [\"{z}\"]\n\
             [[image.pcr]]\nbank = \"sha256\"\nindex = 7\nallowed = [\"{z}\"]\n\
             [[vm]]\nid = \"vm-1\"\nimage = \"img\"\n",
            z = "00".repeat(32)
        ))
        .unwrap();
        let vm = VmId::new("vm-1").unwrap();
        let only7 = [PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values: std::collections::BTreeMap::from([(7, vec![0; 32])]),
        }];
        let select = |pcrs: Vec<u8>| {
            [PcrBankSelection {
                hash_alg: HashAlg::Sha256,
                pcrs,
            }]
        };
        // Challenged for PCR 7 under a policy since reloaded to ask for
        // PCR 0 too: local, the guest tries again.
        let e = judge(&policy, &vm, &select(vec![7]), &only7).unwrap_err();
        assert!(
            matches!(e, Rejection::SelectionStale { index: 0, .. }) && e.is_local(),
            "{e}"
        );
        // Challenged for PCR 0 and not reporting it: the guest's fault.
        let e = judge(&policy, &vm, &select(vec![0, 7]), &only7).unwrap_err();
        assert!(
            matches!(e, Rejection::Policy(Refusal::PcrMissing { index: 0, .. })) && !e.is_local(),
            "{e}"
        );
        let both = [PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values: std::collections::BTreeMap::from([(0, vec![0; 32]), (7, vec![0; 32])]),
        }];
        assert!(judge(&policy, &vm, &select(vec![0, 7]), &both).is_ok());
    }

    #[test]
    fn rewinds_reveal_restores_and_clones() {
        let last = QuoteObservation {
            clock: 10_000,
            reset_count: 5,
            restart_count: 2,
            firmware_version: 7,
            at_unix: 0,
        };
        // Time moves on, the VM reboots or resumes: fine.
        assert_eq!(detect_rewind(&last, &quote(5, 2, 10_500, true)), None);
        assert_eq!(detect_rewind(&last, &quote(6, 0, 1_000, true)), None);
        assert_eq!(detect_rewind(&last, &quote(5, 3, 9_000, true)), None);
        // An unorderly shutdown may lose clock updates; the TPM says so.
        assert_eq!(detect_rewind(&last, &quote(5, 2, 9_000, false)), None);
        // A snapshot restore: same counts, older clock. A clone of an older
        // snapshot: fewer resets or restarts.
        assert_eq!(
            detect_rewind(&last, &quote(5, 2, 9_000, true)),
            Some(Rewind::Clock {
                was: 10_000,
                now: 9_000
            })
        );
        assert_eq!(
            detect_rewind(&last, &quote(4, 9, 99_000, true)),
            Some(Rewind::ResetCount { was: 5, now: 4 })
        );
        assert_eq!(
            detect_rewind(&last, &quote(5, 1, 99_000, true)),
            Some(Rewind::RestartCount { was: 2, now: 1 })
        );
    }

    /// Recording a quote leaves the VM's entry alone (same inode: no
    /// rewrite and rename per attestation) and keeps the baseline.
    #[cfg(unix)]
    #[test]
    fn recording_a_quote_does_not_rewrite_the_entry() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        enroll_vm1(&reg);
        let vm = VmId::new("vm-1").unwrap();
        let path = dir.path().join("vm-1.json");
        let before = std::fs::metadata(&path).unwrap().ino();
        for (at, clock) in [(1, 10_000), (2, 10_500), (3, 11_000)] {
            assert_eq!(
                record_quote(&reg, &vm, &quote(5, 2, clock, true), at, true).unwrap(),
                None
            );
        }
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), before);
        assert!(
            record_quote(&reg, &vm, &quote(5, 2, 10_900, true), 4, true)
                .unwrap()
                .is_some()
        );
    }
}
