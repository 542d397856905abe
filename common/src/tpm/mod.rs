//! TPM 2.0 structures and quote verification, in pure Rust.
//!
//! The host verifies guest evidence here without libtss2: the code that
//! faces guest bytes stays small, bounded and fuzzable. Parsers accept the
//! TPM 2.0 marshalling (Part 2 of the TPM 2.0 library specification) of
//! exactly the structures a quote needs and reject trailing bytes.
//!
//! Constants shared by provisioning (host), evidence (guest) and
//! verification live in this module so all three agree.

/// Persistent handle of the vkx attestation key (AK) in a provisioned vTPM.
/// In the owner-assigned persistent range (0x81000000-0x817FFFFF), away
/// from the TCG-reserved EK handles 0x81010001/0x81010002.
pub const AK_PERSISTENT_HANDLE: u32 = 0x8100_0A4B;

/// TPM_RH_ENDORSEMENT (Part 2 §7.4): the hierarchy the vkx AK is a
/// primary key of (PROTOCOL.md §7.6).
pub const TPM_RH_ENDORSEMENT: u32 = 0x4000_000B;

/// TPM_RH_OWNER: the storage hierarchy.
pub const TPM_RH_OWNER: u32 = 0x4000_0001;

/// The qualified name of a hierarchy: its handle, 4 bytes big-endian
/// (Part 1 §16.5: a hierarchy's name and qualified name are its handle).
pub fn hierarchy_qualified_name(handle: u32) -> [u8; 4] {
    handle.to_be_bytes()
}

/// Persistent handle of the ECC P-256 endorsement key (TCG EK Credential
/// Profile 2.3, "ECC NIST P256" EK handle).
pub const EK_ECC_PERSISTENT_HANDLE: u32 = 0x8101_0002;

/// Persistent handle of the RSA-2048 endorsement key (TCG EK Credential
/// Profile 2.3).
pub const EK_RSA_PERSISTENT_HANDLE: u32 = 0x8101_0001;

/// NV index holding the DER AK certificate issued at provisioning. In the
/// owner-defined NV range (0x01000000-0x013FFFFF).
pub const AK_CERT_NV_INDEX: u32 = 0x0100_0A4B;

/// Largest AK certificate stored in NV; equals the wire limit.
pub const MAX_AK_CERT_NV: usize = crate::wire::MAX_AK_CERT;

pub mod alg;
pub mod attest;
pub mod marshal;
pub mod public;
#[doc(hidden)]
pub mod selfcheck;
pub mod signature;
pub mod verify;

pub use attest::{Attest, ClockInfo, PcrSelection};
pub use marshal::TpmParseError;
pub use public::{KeyScheme, Public, PublicKey, SymmetricDef};
pub use signature::Signature;
pub use verify::{AkParent, QuoteExpectations, VerifiedQuote, VerifyError, verify_quote};
