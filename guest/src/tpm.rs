//! Evidence from the VM's vTPM: a TPM2_Quote over the requested PCRs with
//! the AK the host provisioned, plus the PCR values and the AK certificate.
//!
//! What it trusts: nothing it produces is trusted by itself; the host
//! verifies the quote against the AK it recorded at provisioning. This side
//! only makes sure the evidence is consistent before sending it: the PCR
//! values it reports are exactly the ones the quote covers (their digest is
//! compared with the quote's pcrDigest; if a PCR changed in between, the
//! round is repeated a bounded number of times).
//!
//! What it bounds: the selection (at most [`MAX_PCR_BANKS`] banks of PCRs
//! 0..=23), TPM2_PCR_Read calls (it returns at most 8 digests per call,
//! so at most [`MAX_PCR_READ_CALLS`] per bank), quote rounds
//! ([`MAX_QUOTE_ROUNDS`]), the AK certificate read from NV
//! ([`MAX_AK_CERT_NV`]), and retries of transient TPM refusals (RETRY,
//! YIELDED, TESTING: 5 attempts, 50 ms doubling; each attempt is an ESAPI
//! call that resubmits up to 5 times itself, so at most 25 submissions of
//! one command reach the TPM).
//!
//! The AK has an authValue (PROTOCOL.md §7.6): the host draws it at
//! provisioning and the operator installs it as the agent's
//! `ak_auth_file`, readable by the agent's user only, so other processes
//! that can open the TPM cannot quote with the AK. [`AkAuth`] reads that
//! file (bounded, refused if group or others may read it) and keeps the
//! value zeroizing; a vTPM provisioned before vkx set one takes
//! [`AkAuth::empty`]. A refused authorisation becomes
//! [`TpmError::AkAuthRefused`], naming the fix.
//!
//! The API is synchronous: TPM calls block, so async callers run it on a
//! blocking thread.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::constants::PropertyTag;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{
    KeyHandle, NvIndexHandle, NvIndexTpmHandle, PersistentTpmHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::NvAuth;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Attest, AttestInfo, Auth, Data, PcrSelectSize, PcrSelection, PcrSelectionList, PcrSlot, Public,
    PublicBuffer, SignatureScheme,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::tss2_esys::TPML_PCR_SELECTION;
use vkx_common::tpm::{AK_CERT_NV_INDEX, AK_PERSISTENT_HANDLE, MAX_AK_CERT_NV};
use vkx_common::wire::{
    Evidence, HashAlg, MAX_PCR_BANKS, MAX_PCRS_PER_BANK, MAX_TPM_ATTEST, MAX_TPM_SIGNATURE,
    PcrBankSelection, PcrBankValues,
};

use vkx_common::tss::{TssFault, classify, describe, handle_exists, retry_transient};
use zeroize::Zeroizing;

/// The TPM a guest uses unless told otherwise: the kernel's resource
/// manager, so other TPM users in the VM are not disturbed.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// Environment variable that overrides the TCTI (tests point it at swtpm).
pub const TCTI_ENV: &str = "VKX_TPM_TCTI";

/// TPM2_PCR_Read returns at most 8 digests per call; 24 PCRs need 3
/// calls. One more than that catches a TPM that returns fewer.
pub const MAX_PCR_READ_CALLS: usize = MAX_PCRS_PER_BANK.div_ceil(8) + 1;
/// Rounds of read-PCRs-then-quote before giving up on PCRs that keep
/// changing (a measured boot in progress settles within a round or two).
pub const MAX_QUOTE_ROUNDS: usize = 3;
/// NV reads go in chunks of at most this size (TPM2B_MAX_NV_BUFFER on
/// PC-client TPMs is at least 512).
const MAX_NV_CHUNK: usize = 512;
/// The AK authValue's size: 32 bytes, as `vkx-host vtpm provision` draws
/// it (the most a TPM takes for a SHA-256 object).
pub const AK_AUTH_LEN: usize = 32;
/// Largest `ak_auth_file` read: 64 hex digits and a newline, with room for
/// trailing whitespace; anything larger is not such a file.
pub const MAX_AK_AUTH_FILE: u64 = 1024;

/// Errors of evidence collection, each naming the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    #[error(
        "invalid TCTI {tcti:?}: {detail} (examples: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`)"
    )]
    InvalidTcti { tcti: String, detail: String },
    #[error(
        "no TPM at {tcti:?}: {detail}; give the VM a vTPM (it appears as /dev/tpmrm0), or set {TCTI_ENV}"
    )]
    NoTpm { tcti: String, detail: String },
    #[error(
        "no AK at persistent handle {AK_PERSISTENT_HANDLE:#010x}: provision the vTPM with `vkx-host vtpm provision` (on the host, before the VM boots)"
    )]
    NoAk,
    #[error(
        "the key at persistent handle {AK_PERSISTENT_HANDLE:#010x} is not a vkx AK ({reason}): re-provision the vTPM with `vkx-host vtpm provision`"
    )]
    AkUnsuitable { reason: &'static str },
    #[error("invalid PCR selection: {reason}")]
    InvalidSelection { reason: String },
    #[error(
        "PCR bank {bank:?} is not allocated in this TPM: request an allocated bank (see `tpm2_getcap pcrs`), or allocate it with `tpm2_pcrallocate` and reboot"
    )]
    PcrBankNotAllocated { bank: HashAlg },
    #[error(
        "PCRs kept changing while quoting ({MAX_QUOTE_ROUNDS} rounds): try again when the boot measurements have settled"
    )]
    PcrsChanging,
    #[error(
        "the AK certificate in NV index {AK_CERT_NV_INDEX:#010x} is {len} bytes, over the limit of {MAX_AK_CERT_NV}: re-provision the vTPM"
    )]
    AkCertTooLarge { len: usize },
    #[error("the TPM's {what} is {len} bytes, over the protocol limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("TPM command {op} failed: {detail}")]
    Tpm { op: &'static str, detail: String },
    #[error("ak_auth_file {}: {reason}", path.display())]
    AkAuthFile { path: PathBuf, reason: String },
    #[error(
        "the AK at {AK_PERSISTENT_HANDLE:#010x} refused {}: install the file `vkx-host vtpm provision` wrote for this VM (<registry>/vtpm-auth/<vm-id>.ak-auth) and name it in guest.toml's ak_auth_file (vkx-guest evidence: --ak-auth-file)",
        if *configured { "the authorisation in ak_auth_file (it belongs to another vTPM, or the vTPM was provisioned again)" } else { "an empty authorisation (no ak_auth_file is configured)" }
    )]
    AkAuthRefused { configured: bool },
    #[error(
        "the TPM is in dictionary-attack lockout (too many wrong authorisations): it recovers by itself over time; the host's lockout auth resets it at once"
    )]
    TpmLockout,
}

/// The AK's authValue. `Debug` is redacted.
#[derive(Clone, Default)]
pub struct AkAuth(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for AkAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "AkAuth(empty)"
        } else {
            "AkAuth(<redacted>)"
        })
    }
}

impl AkAuth {
    /// No authValue: a vTPM provisioned before vkx set one.
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads `path`: [`AK_AUTH_LEN`] bytes as hex, surrounding whitespace
    /// ignored. Refused if group or others may access the file, if it is
    /// not a regular file, or if it is larger than [`MAX_AK_AUTH_FILE`].
    pub fn load(path: &Path) -> Result<Self, TpmError> {
        use std::os::unix::fs::MetadataExt;
        let bad = |reason: String| TpmError::AkAuthFile {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:04o}: group or others may read it; make it 0400 (or 0600), owned by the agent's user",
                meta.mode() & 0o7777
            )));
        }
        let mut text = Zeroizing::new(String::new());
        file.take(MAX_AK_AUTH_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_AK_AUTH_FILE {
            return Err(bad(format!("larger than {MAX_AK_AUTH_FILE} bytes")));
        }
        let hex_text = text.trim();
        let mut value = Zeroizing::new(vec![0u8; AK_AUTH_LEN]);
        if hex_text.len() != 2 * AK_AUTH_LEN
            || hex::decode_to_slice(hex_text, value.as_mut_slice()).is_err()
        {
            return Err(bad(format!(
                "not {AK_AUTH_LEN} bytes as {} hex digits",
                2 * AK_AUTH_LEN
            )));
        }
        Ok(Self(value))
    }
}

fn tpm_err(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |e| TpmError::Tpm {
        op,
        detail: describe(&e),
    }
}

/// The TCTI to use: `VKX_TPM_TCTI` if set, else [`DEFAULT_TCTI`].
pub fn tcti_from_env() -> String {
    std::env::var(TCTI_ENV).unwrap_or_else(|_| DEFAULT_TCTI.to_string())
}

/// A quote and everything needed to check it.
#[derive(Debug, Clone)]
pub struct QuoteBundle {
    pub evidence: Evidence,
    /// The AK's TPM2B_PUBLIC as TPM2_ReadPublic returned it.
    pub ak_public: Vec<u8>,
}

/// Collects evidence: quotes `selection` with the provisioned AK over
/// `qualifying_data` and reports the quoted PCR values and the AK
/// certificate (if the vTPM has one).
pub fn collect_evidence(
    tcti: &str,
    ak_auth: &AkAuth,
    selection: &[PcrBankSelection],
    qualifying_data: &[u8; 32],
) -> Result<Evidence, TpmError> {
    collect_quote(tcti, ak_auth, selection, qualifying_data).map(|b| b.evidence)
}

/// Like [`collect_evidence`], and also returns the AK's public area.
pub fn collect_quote(
    tcti: &str,
    ak_auth: &AkAuth,
    selection: &[PcrBankSelection],
    qualifying_data: &[u8; 32],
) -> Result<QuoteBundle, TpmError> {
    check_selection(selection)?;
    let mut ctx = open_context(tcti)?;
    let ak = open_ak(&mut ctx)?;
    let result = Auth::try_from(ak_auth.0.to_vec())
        .and_then(|auth| ctx.tr_set_auth(ak.handle.into(), auth))
        .map_err(tpm_err("Esys_TR_SetAuth (AK)"))
        .and_then(|()| {
            quote_with(
                &mut ctx,
                &ak,
                !ak_auth.is_empty(),
                selection,
                qualifying_data,
            )
        });
    let mut object = ak.handle.into();
    let _ = ctx.tr_close(&mut object);
    result
}

fn open_context(tcti: &str) -> Result<Context, TpmError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| TpmError::InvalidTcti {
        tcti: tcti.into(),
        detail: e.to_string(),
    })?;
    Context::new(conf).map_err(|e| TpmError::NoTpm {
        tcti: tcti.into(),
        detail: describe(&e),
    })
}

fn check_selection(selection: &[PcrBankSelection]) -> Result<(), TpmError> {
    let invalid = |reason: String| TpmError::InvalidSelection { reason };
    if selection.is_empty() || selection.len() > MAX_PCR_BANKS {
        return Err(invalid(format!("1..={MAX_PCR_BANKS} banks are needed")));
    }
    for (i, bank) in selection.iter().enumerate() {
        if selection[..i].iter().any(|b| b.hash_alg == bank.hash_alg) {
            return Err(invalid(format!("bank {:?} appears twice", bank.hash_alg)));
        }
        if bank.pcrs.is_empty() || !bank.pcrs.windows(2).all(|w| w[0] < w[1]) {
            return Err(invalid(format!(
                "bank {:?}: PCR indices must be non-empty and strictly ascending",
                bank.hash_alg
            )));
        }
        if bank
            .pcrs
            .iter()
            .any(|&p| usize::from(p) >= MAX_PCRS_PER_BANK)
        {
            return Err(invalid(format!(
                "bank {:?}: PCR indices are 0..={}",
                bank.hash_alg,
                MAX_PCRS_PER_BANK - 1
            )));
        }
    }
    Ok(())
}

struct Ak {
    handle: KeyHandle,
    public: Public,
    name: Vec<u8>,
}

fn open_ak(ctx: &mut Context) -> Result<Ak, TpmError> {
    if !handle_exists(ctx, AK_PERSISTENT_HANDLE).map_err(tpm_err("GetCapability (handles)"))? {
        return Err(TpmError::NoAk);
    }
    let persistent =
        PersistentTpmHandle::new(AK_PERSISTENT_HANDLE).map_err(tpm_err("persistent handle"))?;
    let object = retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
        .map_err(tpm_err("ReadPublic (AK)"))?;
    let handle = KeyHandle::from(object);
    let (public, name, _) =
        retry_transient(|| ctx.read_public(handle)).map_err(tpm_err("ReadPublic (AK)"))?;
    let attributes = public.object_attributes();
    if !(attributes.restricted() && attributes.sign_encrypt() && attributes.fixed_tpm()) {
        return Err(TpmError::AkUnsuitable {
            reason: "not a restricted, TPM-bound signing key",
        });
    }
    if !matches!(public, Public::Ecc { .. } | Public::Rsa { .. }) {
        return Err(TpmError::AkUnsuitable {
            reason: "neither ECC nor RSA",
        });
    }
    Ok(Ak {
        handle,
        public,
        name: name.value().to_vec(),
    })
}

fn quote_with(
    ctx: &mut Context,
    ak: &Ak,
    ak_auth_configured: bool,
    selection: &[PcrBankSelection],
    qualifying_data: &[u8; 32],
) -> Result<QuoteBundle, TpmError> {
    let ak_cert = read_ak_cert(ctx)?;
    let quote_selection = selection_list(selection)?;
    let nonce = Data::try_from(qualifying_data.to_vec()).map_err(tpm_err("qualifying data"))?;
    for _ in 0..MAX_QUOTE_ROUNDS {
        let pcr_values = read_pcrs(ctx, selection)?;
        let (attest, signature) = retry_transient(|| {
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.quote(
                    ak.handle,
                    nonce.clone(),
                    // Null: the AK's own scheme (ECDSA or RSASSA, SHA-256).
                    SignatureScheme::Null,
                    quote_selection.clone(),
                )
            })
        })
        .map_err(|e| match classify(&e) {
            TssFault::Tpm(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => {
                TpmError::AkAuthRefused {
                    configured: ak_auth_configured,
                }
            }
            TssFault::Tpm(Tss2ResponseCodeKind::Lockout) => TpmError::TpmLockout,
            _ => tpm_err("Quote")(e),
        })?;
        if !quoted_values_match(&attest, &pcr_values) {
            continue;
        }
        let tpm_attest = attest.marshall().map_err(tpm_err("marshal TPMS_ATTEST"))?;
        let tpm_signature = signature
            .marshall()
            .map_err(tpm_err("marshal TPMT_SIGNATURE"))?;
        check_size("TPMS_ATTEST", tpm_attest.len(), MAX_TPM_ATTEST)?;
        check_size("TPMT_SIGNATURE", tpm_signature.len(), MAX_TPM_SIGNATURE)?;
        let ak_public = PublicBuffer::try_from(ak.public.clone())
            .and_then(|b| b.marshall())
            .map_err(tpm_err("marshal TPM2B_PUBLIC"))?;
        return Ok(QuoteBundle {
            evidence: Evidence {
                tpm_attest,
                tpm_signature,
                ak_name: ak.name.clone(),
                ak_cert,
                pcr_values,
            },
            ak_public,
        });
    }
    Err(TpmError::PcrsChanging)
}

fn check_size(what: &'static str, len: usize, max: usize) -> Result<(), TpmError> {
    if len > max {
        return Err(TpmError::TooLarge { what, len, max });
    }
    Ok(())
}

fn hashing_algorithm(alg: HashAlg) -> HashingAlgorithm {
    match alg {
        HashAlg::Sha1 => HashingAlgorithm::Sha1,
        HashAlg::Sha256 => HashingAlgorithm::Sha256,
        HashAlg::Sha384 => HashingAlgorithm::Sha384,
        HashAlg::Sha512 => HashingAlgorithm::Sha512,
    }
}

fn hash_alg(alg: HashingAlgorithm) -> Option<HashAlg> {
    match alg {
        HashingAlgorithm::Sha1 => Some(HashAlg::Sha1),
        HashingAlgorithm::Sha256 => Some(HashAlg::Sha256),
        HashingAlgorithm::Sha384 => Some(HashAlg::Sha384),
        HashingAlgorithm::Sha512 => Some(HashAlg::Sha512),
        _ => None,
    }
}

fn slot(index: u8) -> Result<PcrSlot, TpmError> {
    PcrSlot::try_from(1u32 << index).map_err(tpm_err("PCR slot"))
}

fn slot_index(slot: PcrSlot) -> u8 {
    // A PcrSlot is one bit of a 24-bit mask: trailing_zeros is 0..=23.
    u8::try_from(u32::from(slot).trailing_zeros()).unwrap_or(u8::MAX)
}

/// The selection as the TPM gets it, banks in the caller's order (so the
/// quote's pcrDigest follows it, as `tpm2_checkquote -l` expects;
/// tss-esapi's builder would reorder banks through a hash map).
fn selection_list(selection: &[PcrBankSelection]) -> Result<PcrSelectionList, TpmError> {
    let mut raw = TPML_PCR_SELECTION::default();
    if selection.len() > raw.pcrSelections.len() {
        return Err(TpmError::InvalidSelection {
            reason: format!("more than {} banks", raw.pcrSelections.len()),
        });
    }
    for (dst, bank) in raw.pcrSelections.iter_mut().zip(selection) {
        let slots = bank
            .pcrs
            .iter()
            .map(|&p| slot(p))
            .collect::<Result<Vec<_>, _>>()?;
        let one = PcrSelection::create(
            hashing_algorithm(bank.hash_alg),
            PcrSelectSize::default(),
            &slots,
        )
        .map_err(tpm_err("PCR selection"))?;
        *dst = one.into();
    }
    // At most MAX_PCR_BANKS (4) banks, checked above: fits in u32.
    raw.count = u32::try_from(selection.len()).unwrap_or(u32::MAX);
    PcrSelectionList::try_from(raw).map_err(tpm_err("PCR selection"))
}

/// Reads every selected PCR, bank by bank; TPM2_PCR_Read returns at most
/// 8 digests per call, so each bank is read until all its PCRs are in.
fn read_pcrs(
    ctx: &mut Context,
    selection: &[PcrBankSelection],
) -> Result<Vec<PcrBankValues>, TpmError> {
    let mut out = Vec::with_capacity(selection.len());
    for bank in selection {
        let alg = hashing_algorithm(bank.hash_alg);
        let mut values = BTreeMap::new();
        for _ in 0..MAX_PCR_READ_CALLS {
            let missing: Vec<u8> = bank
                .pcrs
                .iter()
                .copied()
                .filter(|p| !values.contains_key(p))
                .collect();
            if missing.is_empty() {
                break;
            }
            let request = selection_list(&[PcrBankSelection {
                hash_alg: bank.hash_alg,
                pcrs: missing,
            }])?;
            let (_, read, digests) =
                retry_transient(|| ctx.pcr_read(request.clone())).map_err(tpm_err("PCR_Read"))?;
            let slots: Vec<PcrSlot> = read
                .get_selections()
                .iter()
                .filter(|s| s.hashing_algorithm() == alg)
                .flat_map(|s| s.selected())
                .collect();
            if slots.is_empty() || slots.len() != digests.len() {
                return Err(TpmError::PcrBankNotAllocated {
                    bank: bank.hash_alg,
                });
            }
            for (slot, digest) in slots.into_iter().zip(digests.value()) {
                if digest.len() != bank.hash_alg.digest_len() {
                    return Err(TpmError::PcrBankNotAllocated {
                        bank: bank.hash_alg,
                    });
                }
                values.insert(slot_index(slot), digest.value().to_vec());
            }
        }
        if values.len() != bank.pcrs.len() {
            return Err(TpmError::PcrBankNotAllocated {
                bank: bank.hash_alg,
            });
        }
        out.push(PcrBankValues {
            hash_alg: bank.hash_alg,
            values,
        });
    }
    Ok(out)
}

/// Whether `values` are the PCRs the quote covers: the quote's pcrDigest
/// is the hash (SHA-256, the AK's scheme hash) of the selected PCR values
/// concatenated in the order of its own selection list.
fn quoted_values_match(attest: &Attest, values: &[PcrBankValues]) -> bool {
    let AttestInfo::Quote { info } = attest.attested() else {
        return false;
    };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for selection in info.pcr_selection().get_selections() {
        let Some(alg) = hash_alg(selection.hashing_algorithm()) else {
            return false;
        };
        let Some(bank) = values.iter().find(|b| b.hash_alg == alg) else {
            return false;
        };
        for slot in selection.selected() {
            let Some(digest) = bank.values.get(&slot_index(slot)) else {
                return false;
            };
            ctx.update(digest);
        }
    }
    ctx.finish().as_ref() == info.pcr_digest().value()
}

/// The DER AK certificate from NV, or `None` if the vTPM has none.
fn read_ak_cert(ctx: &mut Context) -> Result<Option<Vec<u8>>, TpmError> {
    if !handle_exists(ctx, AK_CERT_NV_INDEX).map_err(tpm_err("GetCapability (handles)"))? {
        return Ok(None);
    }
    let index = NvIndexTpmHandle::new(AK_CERT_NV_INDEX).map_err(tpm_err("NV index"))?;
    let object = retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::NvIndex(index)))
        .map_err(tpm_err("NV_ReadPublic"))?;
    let handle = NvIndexHandle::from(object);
    let (public, _) =
        retry_transient(|| ctx.nv_read_public(handle)).map_err(tpm_err("NV_ReadPublic"))?;
    let size = public.data_size();
    if size > MAX_AK_CERT_NV {
        return Err(TpmError::AkCertTooLarge { len: size });
    }
    let chunk = ctx
        .get_tpm_property(PropertyTag::NvBufferMax)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
        .map_or(MAX_NV_CHUNK, |v| v.min(MAX_NV_CHUNK));
    let mut cert = Vec::with_capacity(size);
    // Each round reads a chunk > 0 bytes, so size / chunk + 1 rounds do.
    for _ in 0..=size / chunk {
        if cert.len() >= size {
            break;
        }
        let len = u16::try_from(chunk.min(size - cert.len()))
            .map_err(|_| TpmError::AkCertTooLarge { len: size })?;
        let offset =
            u16::try_from(cert.len()).map_err(|_| TpmError::AkCertTooLarge { len: size })?;
        let data = retry_transient(|| {
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_read(NvAuth::Owner, handle, len, offset)
            })
        })
        .map_err(tpm_err("NV_Read"))?;
        if data.is_empty() {
            break;
        }
        cert.extend_from_slice(data.value());
    }
    if cert.len() != size {
        return Err(TpmError::Tpm {
            op: "NV_Read",
            detail: format!("read {} of {size} bytes of the AK certificate", cert.len()),
        });
    }
    Ok(Some(cert))
}

/// Parses `sha256:0,1,7` into a bank selection (indices sorted, duplicates
/// dropped).
pub fn parse_pcr_selection(text: &str) -> Result<PcrBankSelection, TpmError> {
    let invalid = |reason: String| TpmError::InvalidSelection { reason };
    let mut banks = vkx_common::pcrs::parse_pcr_list(text).map_err(invalid)?;
    match banks.len() {
        1 => Ok(banks.remove(0)),
        _ => Err(invalid(format!("{text:?}: one bank per --pcrs"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selections() {
        let s = parse_pcr_selection("sha256:7,0,1,1").unwrap();
        assert_eq!(s.hash_alg, HashAlg::Sha256);
        assert_eq!(s.pcrs, [0, 1, 7]);
        for bad in ["sha256", "md5:0", "sha1:24", "sha1:x", "sha1:"] {
            assert!(parse_pcr_selection(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_selections() {
        let bank = |hash_alg, pcrs: &[u8]| PcrBankSelection {
            hash_alg,
            pcrs: pcrs.to_vec(),
        };
        assert!(check_selection(&[bank(HashAlg::Sha256, &[0, 7])]).is_ok());
        assert!(check_selection(&[]).is_err());
        assert!(check_selection(&[bank(HashAlg::Sha256, &[7, 0])]).is_err());
        assert!(check_selection(&[bank(HashAlg::Sha256, &[])]).is_err());
        assert!(check_selection(&[bank(HashAlg::Sha256, &[24])]).is_err());
        assert!(check_selection(&[bank(HashAlg::Sha1, &[0]), bank(HashAlg::Sha1, &[1])]).is_err());
    }

    #[test]
    fn slots_round_trip() {
        for i in 0..24u8 {
            assert_eq!(slot_index(slot(i).unwrap()), i);
        }
    }

    #[test]
    fn ak_auth_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ak-auth");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&format!("{}\n", "ab".repeat(32)), 0o400);
        let auth = AkAuth::load(&path).unwrap();
        assert_eq!(auth.0.as_slice(), [0xab; 32]);
        assert_eq!(format!("{auth:?}"), "AkAuth(<redacted>)");
        assert!(AkAuth::empty().is_empty());
        write(&"ab".repeat(32), 0o640);
        assert!(matches!(
            AkAuth::load(&path),
            Err(TpmError::AkAuthFile { .. })
        ));
        for bad in ["ab".repeat(31), "xy".repeat(32), "ab".repeat(600)] {
            write(&bad, 0o600);
            assert!(AkAuth::load(&path).is_err(), "{}", bad.len());
        }
        assert!(AkAuth::load(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn missing_tpm_names_the_fix() {
        let e = collect_evidence(
            "device:/nonexistent/tpmrm0",
            &AkAuth::empty(),
            &[parse_pcr_selection("sha256:0").unwrap()],
            &[0; 32],
        )
        .unwrap_err();
        assert!(matches!(e, TpmError::NoTpm { .. }), "{e}");
        assert!(e.to_string().contains(TCTI_ENV), "{e}");
    }
}
