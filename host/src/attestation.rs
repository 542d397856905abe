//! The host's decision on a guest's evidence (PROTOCOL.md §7.4): the AK
//! comes from the registry entry of the VM the transport identified (never
//! from the evidence), the quote is verified against the transcript hash
//! and the requested selection, and the PCR values against policy.
//!
//! Every refusal is a typed [`Rejection`] for the host's local,
//! rate-limited log; the guest only ever learns "attestation-failed"
//! (or "internal" for [`Rejection::is_local`] failures).

use vkx_common::policy::{Policy, Refusal, VmPolicy};
use vkx_common::tpm::{Public, QuoteExpectations, TpmParseError, VerifiedQuote, VerifyError};
use vkx_common::transcript::TRANSCRIPT_HASH_LEN;
use vkx_common::wire::{Evidence, PcrBankSelection, VmId};

use crate::registry::{Registry, RegistryError};

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
    #[error("quote: {0}")]
    Quote(#[from] VerifyError),
    #[error("policy: {0}")]
    Policy(#[from] Refusal),
    // Local failures: the host, not the guest, is at fault.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("registry entry for {vm_id} is corrupt: {detail}")]
    CorruptEntry { vm_id: VmId, detail: String },
}

impl Rejection {
    /// True when the host failed locally (answer "internal", not
    /// "attestation-failed").
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Registry(_) | Self::CorruptEntry { .. })
    }
}

/// The AK public area recorded for `vm_id`.
pub fn registered_ak(registry: &Registry, vm_id: &VmId) -> Result<Public, Rejection> {
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
    Ok(ak)
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
    let ak = registered_ak(registry, vm_id)?;
    let recorded = ak.name();
    if evidence.ak_name != recorded {
        return Err(Rejection::AkNameMismatch {
            claimed: hex::encode(&evidence.ak_name),
            recorded: hex::encode(&recorded),
        });
    }
    let quote = vkx_common::tpm::verify_quote(
        &evidence.tpm_attest,
        &evidence.tpm_signature,
        &ak,
        &QuoteExpectations {
            qualifying_data: transcript_hash,
            pcr_selection: selection,
            pcr_values: &evidence.pcr_values,
        },
    )?;
    let grants = policy.evaluate(vm_id, &evidence.pcr_values)?.clone();
    Ok(Accepted { grants, quote })
}
