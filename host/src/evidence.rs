//! `vkx-host evidence inspect|verify`: the host's verifier on evidence
//! given as files, for debugging real quotes in the field.
//!
//! Inputs are tpm2-tools' formats: the TPMS_ATTEST message (`tpm2_quote
//! -m`), the TPMT_SIGNATURE (`-s`, "tss" format), the AK public as
//! TPM2B_PUBLIC (`tpm2_createak -u`, TPM2_ReadPublic), the PCR values as
//! the "values" file (`tpm2_quote -o`, `tpm2_pcrread -o`) with the
//! selection in tpm2-tools syntax, and the qualifying data in hex. The
//! files are operator-supplied but may come from a guest: every parser is
//! the bounded one the agent uses, and nothing is printed raw except
//! digests and names in hex.

use std::fmt::Write as _;

use crate::policy::Policy;
use vkx_common::pcrs::{parse_pcr_list, split_pcr_values};
use vkx_common::tpm::{
    AkParent, Attest, Public, PublicKey, QuoteExpectations, Signature, VerifiedQuote,
};
use vkx_common::wire::{PcrBankValues, VmId};

/// Largest evidence file read: well above any TPM structure.
pub const MAX_EVIDENCE_FILE: u64 = 64 * 1024;

/// Reads one input file, of at most [`MAX_EVIDENCE_FILE`] bytes.
pub fn read_bounded(path: &std::path::Path) -> Result<Vec<u8>, crate::fsutil::FsError> {
    crate::fsutil::read_capped(path, MAX_EVIDENCE_FILE)
}

/// Reads an AK public file: TPM2B_PUBLIC (or a bare TPMT_PUBLIC).
pub fn parse_ak(bytes: &[u8]) -> Result<Public, String> {
    if bytes.starts_with(b"-----BEGIN") {
        return Err(
            "PEM AK keys carry no TPM attributes, so the restricted-key check cannot run: \
             give the TPM2B_PUBLIC (`tpm2_createak -u ak.pub`, `tpm2_readpublic -o`)"
                .to_owned(),
        );
    }
    Public::parse(bytes)
        .or_else(|_| Public::parse_tpmt(bytes))
        .map_err(|e| format!("AK public: {e}"))
}

/// Human-readable fields of the evidence files.
pub fn describe(attest: &[u8], signature: Option<&[u8]>, ak: Option<&Public>) -> String {
    let mut s = String::new();
    match Attest::parse(attest) {
        Ok(a) => {
            let c = a.clock_info();
            let _ = writeln!(s, "TPMS_ATTEST ({} bytes): quote", attest.len());
            let _ = writeln!(
                s,
                "  qualified signer  {}",
                hex::encode(a.qualified_signer())
            );
            let _ = writeln!(s, "  extra data        {}", hex::encode(a.extra_data()));
            let _ = writeln!(
                s,
                "  clock             {} ms, reset count {}, restart count {}, safe {}",
                c.clock, c.reset_count, c.restart_count, c.safe
            );
            let _ = writeln!(s, "  firmware version  {:#018x}", a.firmware_version());
            for sel in a.pcr_select() {
                let pcrs: Vec<String> = sel.pcrs().map(|p| p.to_string()).collect();
                let _ = writeln!(
                    s,
                    "  pcr selection     {}:{}",
                    sel.hash().name(),
                    pcrs.join(",")
                );
            }
            let _ = writeln!(s, "  pcr digest        {}", hex::encode(a.pcr_digest()));
        }
        Err(e) => {
            let _ = writeln!(s, "TPMS_ATTEST ({} bytes): refused: {e}", attest.len());
        }
    }
    if let Some(sig) = signature {
        match Signature::parse(sig) {
            Ok(Signature::Ecdsa(e)) => {
                let _ = writeln!(
                    s,
                    "TPMT_SIGNATURE: ECDSA-{} (r {} bytes, s {} bytes)",
                    e.hash().name(),
                    e.r().len(),
                    e.s().len()
                );
            }
            Ok(Signature::RsaSsa(r)) => {
                let _ = writeln!(
                    s,
                    "TPMT_SIGNATURE: RSASSA-{} ({} bytes)",
                    r.hash().name(),
                    r.sig().len()
                );
            }
            Ok(Signature::RsaPss(r)) => {
                let _ = writeln!(
                    s,
                    "TPMT_SIGNATURE: RSAPSS-{} ({} bytes)",
                    r.hash().name(),
                    r.sig().len()
                );
            }
            Ok(_) => {
                let _ = writeln!(s, "TPMT_SIGNATURE: a scheme this tool does not print");
            }
            Err(e) => {
                let _ = writeln!(s, "TPMT_SIGNATURE ({} bytes): refused: {e}", sig.len());
            }
        }
    }
    if let Some(ak) = ak {
        let kind = match ak.key() {
            PublicKey::Rsa { .. } => "RSA-2048",
            PublicKey::EccP256 { .. } => "ECC NIST P-256",
            _ => "other",
        };
        let _ = writeln!(
            s,
            "AK: {kind}, name {}, attributes {:#010x}",
            hex::encode(ak.name()),
            ak.attributes()
        );
    }
    s
}

/// What `evidence verify` checks against.
#[derive(Debug)]
pub struct VerifyInputs<'a> {
    pub attest: &'a [u8],
    pub signature: &'a [u8],
    pub ak: &'a Public,
    /// Where the AK sits: its qualified name is the quote's signer.
    pub ak_parent: AkParent<'a>,
    /// tpm2-tools syntax, e.g. `sha256:0,1,7+sha1:0`.
    pub pcr_list: &'a str,
    /// The "values" file.
    pub pcr_values: &'a [u8],
    pub nonce: &'a [u8],
    /// Also evaluate this VM's policy.
    pub policy: Option<(&'a Policy, &'a VmId)>,
}

/// The verifier's verdict: Ok with the quote's facts, or the reason.
pub fn verify(inputs: &VerifyInputs<'_>) -> Result<(VerifiedQuote, Vec<PcrBankValues>), String> {
    let selection = parse_pcr_list(inputs.pcr_list)?;
    let values = split_pcr_values(&selection, inputs.pcr_values)?;
    let quote = vkx_common::tpm::verify_quote(
        inputs.attest,
        inputs.signature,
        inputs.ak,
        &QuoteExpectations {
            ak_parent: inputs.ak_parent,
            qualifying_data: inputs.nonce,
            pcr_selection: &selection,
            pcr_values: &values,
        },
    )
    .map_err(|e| e.to_string())?;
    if let Some((policy, vm_id)) = inputs.policy {
        policy
            .evaluate(vm_id, &values)
            .map_err(|e| format!("policy: {e}"))?;
    }
    Ok((quote, values))
}
