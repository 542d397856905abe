//! TPMS_ATTEST of a quote (TPM 2.0 Library Part 2 §10.12.12), the
//! structure a TPM signs in TPM2_Quote.
//!
//! What it trusts: nothing. The bytes come from the guest; they mean
//! something only after the AK's signature over them has been verified
//! ([`super::verify`]). Parsing first is safe because it is bounded: fixed
//! fields, four sized buffers each checked against its limit before use,
//! and at most [`MAX_PCR_BANKS`] PCR selections of exactly
//! [`PCR_SELECT_SIZE`] bytes. The largest accepted TPMS_ATTEST is 259
//! bytes.
//!
//! Only what a quote can be is accepted: magic TPM_GENERATED_VALUE, type
//! TPM_ST_ATTEST_QUOTE, `safe` 0 or 1, known PCR bank hashes, no trailing
//! bytes. So a parsed [`Attest`] re-marshals to exactly its input.

use super::alg::{HashAlg, hash_from_id, hash_id};
use super::marshal::{Reader, TpmParseError, Writer};

/// TPM_GENERATED_VALUE: the first field of every structure a TPM signs
/// with a restricted key, which a restricted key refuses to sign when it
/// comes from outside the TPM.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;

/// TPM_ST_ATTEST_QUOTE: the TPMS_ATTEST type made by TPM2_Quote.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

/// TPM2B_NAME: a 2-byte nameAlg and a digest of at most 64 bytes (SHA-512);
/// a handle-form name (4 bytes) is shorter.
pub const MAX_NAME_SIZE: usize = 2 + 64;

/// TPM2B_DATA (extraData): sizeof(TPMT_HA) less the algorithm id, 64 bytes
/// for a TPM with SHA-512. vkx passes a 32-byte transcript hash.
pub const MAX_EXTRA_DATA: usize = 64;

/// TPM2B_DIGEST (pcrDigest): the largest digest, SHA-512.
pub const MAX_DIGEST_SIZE: usize = 64;

/// TPML_PCR_SELECTION count: one selection per bank, and a TPM has at most
/// the four banks vkx knows (SHA-1, SHA-256, SHA-384, SHA-512).
pub const MAX_PCR_BANKS: usize = crate::wire::MAX_PCR_BANKS;

/// TPMS_PCR_SELECTION.sizeofSelect: a PC-client TPM has 24 PCRs, so the
/// bitmap is 3 bytes (PCR_SELECT_MIN = PCR_SELECT_MAX = 3 there). The TPM
/// echoes the caller's size back, and the vkx guest always asks with 3;
/// other sizes (a 4-byte map with a zero last byte is legal TPM input) are
/// refused so that one selection has one encoding.
pub const PCR_SELECT_SIZE: usize = 3;

/// PCRs one selection bitmap covers.
pub const PCRS_PER_BANK: u8 = SIZEOF_SELECT * 8;

/// [`PCR_SELECT_SIZE`] as the u8 the TPM marshals.
const SIZEOF_SELECT: u8 = 3;
const _: () = assert!(SIZEOF_SELECT as usize == PCR_SELECT_SIZE);

/// The PCRs of one bank that a quote covers (TPMS_PCR_SELECTION).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcrSelection {
    hash: HashAlg,
    /// Bit `i % 8` of byte `i / 8` selects PCR `i`.
    select: [u8; PCR_SELECT_SIZE],
}

impl PcrSelection {
    /// A selection of `pcrs` (each below [`PCRS_PER_BANK`], any order,
    /// duplicates allowed) in bank `hash`. `None` if an index is out of
    /// range.
    pub fn new(hash: HashAlg, pcrs: &[u8]) -> Option<Self> {
        let mut select = [0u8; PCR_SELECT_SIZE];
        for &p in pcrs {
            let byte = select.get_mut(usize::from(p / 8))?;
            *byte |= 1 << (p % 8);
        }
        Some(Self { hash, select })
    }

    pub fn hash(&self) -> HashAlg {
        self.hash
    }

    /// The bitmap as the TPM marshals it.
    pub fn bitmap(&self) -> [u8; PCR_SELECT_SIZE] {
        self.select
    }

    /// The selected PCR indices, ascending: the order in which TPM2_Quote
    /// hashes them into pcrDigest.
    pub fn pcrs(&self) -> impl Iterator<Item = u8> + '_ {
        (0..PCRS_PER_BANK).filter(|i| self.select[usize::from(i / 8)] & (1 << (i % 8)) != 0)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, TpmParseError> {
        let hash = hash_from_id("pcrSelection.hash", r.u16("pcrSelection.hash")?)?;
        let size = r.u8("pcrSelection.sizeofSelect")?;
        if size != SIZEOF_SELECT {
            return Err(TpmParseError::Unsupported {
                field: "pcrSelection.sizeofSelect",
                value: size.into(),
            });
        }
        let mut select = [0u8; PCR_SELECT_SIZE];
        select.copy_from_slice(r.bytes(PCR_SELECT_SIZE, "pcrSelection.pcrSelect")?);
        Ok(Self { hash, select })
    }

    fn write(&self, w: &mut Writer) {
        w.u16(hash_id(self.hash));
        w.u8(SIZEOF_SELECT);
        w.raw(&self.select);
    }
}

/// TPMS_CLOCK_INFO: the TPM's clock at the time of the quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered since it was last cleared
    /// (advances only while powered; a vTPM's runs with its VM's host).
    pub clock: u64,
    /// TPM resets (power cycles / VM reboots) since the last clear.
    pub reset_count: u32,
    /// TPM restarts (resume from hibernation) since the last reset.
    pub restart_count: u32,
    /// Whether `clock` is known not to have gone backwards.
    pub safe: bool,
}

/// A parsed quote TPMS_ATTEST. Fields are only readable: every value was
/// checked when parsed, and [`Attest::to_bytes`] reproduces the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    qualified_signer: Vec<u8>,
    extra_data: Vec<u8>,
    clock_info: ClockInfo,
    firmware_version: u64,
    pcr_select: Vec<PcrSelection>,
    pcr_digest: Vec<u8>,
}

impl Attest {
    /// Parses one TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, nothing after it.
    pub fn parse(input: &[u8]) -> Result<Self, TpmParseError> {
        let mut r = Reader::new(input);
        let magic = r.u32("magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(TpmParseError::BadMagic { found: magic });
        }
        let ty = r.u16("type")?;
        if ty != TPM_ST_ATTEST_QUOTE {
            return Err(TpmParseError::NotAQuote { found: ty });
        }
        let qualified_signer = r.tpm2b("qualifiedSigner", MAX_NAME_SIZE)?.to_vec();
        let extra_data = r.tpm2b("extraData", MAX_EXTRA_DATA)?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe = match r.u8("clockInfo.safe")? {
            0 => false,
            1 => true,
            _ => {
                return Err(TpmParseError::InvalidValue {
                    field: "clockInfo.safe",
                    rule: "TPMI_YES_NO is 0 or 1",
                });
            }
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let count = r.u32("pcrSelect.count")?;
        let banks = usize::try_from(count)
            .ok()
            .filter(|n| *n <= MAX_PCR_BANKS)
            .ok_or(TpmParseError::TooLarge {
                field: "pcrSelect.count",
                len: usize::try_from(count).unwrap_or(usize::MAX),
                max: MAX_PCR_BANKS,
            })?;
        let mut pcr_select = Vec::with_capacity(banks);
        for _ in 0..banks {
            pcr_select.push(PcrSelection::read(&mut r)?);
        }
        let pcr_digest = r.tpm2b("pcrDigest", MAX_DIGEST_SIZE)?.to_vec();
        r.finish("TPMS_ATTEST")?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock_info: ClockInfo {
                clock,
                reset_count,
                restart_count,
                safe,
            },
            firmware_version,
            pcr_select,
            pcr_digest,
        })
    }

    /// The marshalled TPMS_ATTEST; equal to the bytes it was parsed from.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(TPM_GENERATED_VALUE);
        w.u16(TPM_ST_ATTEST_QUOTE);
        w.tpm2b(&self.qualified_signer);
        w.tpm2b(&self.extra_data);
        w.u64(self.clock_info.clock);
        w.u32(self.clock_info.reset_count);
        w.u32(self.clock_info.restart_count);
        w.u8(u8::from(self.clock_info.safe));
        w.u64(self.firmware_version);
        // At most MAX_PCR_BANKS entries, so the count always fits.
        w.u32(u32::try_from(self.pcr_select.len()).unwrap_or(u32::MAX));
        for s in &self.pcr_select {
            s.write(&mut w);
        }
        w.tpm2b(&self.pcr_digest);
        w.into_bytes()
    }

    /// The qualified name of the signing key (TPM2B_NAME): nameAlg ||
    /// H(parent's qualified name || key's name). It places the key in its
    /// TPM's hierarchy; it is not a key identity a verifier can check
    /// without the parent chain, and it proves nothing about which TPM
    /// signed (see [`super::verify`]).
    pub fn qualified_signer(&self) -> &[u8] {
        &self.qualified_signer
    }

    /// The caller's qualifying data (TPM2_Quote `qualifyingData`): for
    /// vkx, the transcript hash that binds the quote to one session.
    pub fn extra_data(&self) -> &[u8] {
        &self.extra_data
    }

    pub fn clock_info(&self) -> ClockInfo {
        self.clock_info
    }

    /// Vendor-defined firmware version of the TPM.
    pub fn firmware_version(&self) -> u64 {
        self.firmware_version
    }

    /// The quoted PCRs, bank by bank, in the order the TPM hashed them.
    pub fn pcr_select(&self) -> &[PcrSelection] {
        &self.pcr_select
    }

    /// H(selected PCR values, concatenated), H being the signing scheme's
    /// hash.
    pub fn pcr_digest(&self) -> &[u8] {
        &self.pcr_digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quote from swtpm (common/tests/fixtures/tpm/ecc-p256-ecdsa).
    const QUOTE: &str = "ff5443478018\
        0022000baa6886a4adff713f433f68e75b79d393a2efc0830c48fb2bc522881ae1ec85ad\
        00200880 66d33cbee53f9e71cf21fa79729b14ebdfac5a5293ca0dc688917cf5a152\
        000000000000024d 00000001 00000000 01\
        2019102300163636\
        00000001 000b 03 870000\
        00208c9aecacd891283391e51ae123b3b04b2c9dc81449caf720563cec5fbc000a2c";

    fn quote() -> Vec<u8> {
        let hex: String = QUOTE.chars().filter(|c| !c.is_whitespace()).collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn parses_swtpm_quote_and_round_trips() {
        let b = quote();
        let a = Attest::parse(&b).unwrap();
        assert_eq!(a.qualified_signer().len(), 34);
        assert_eq!(a.extra_data().len(), 32);
        assert_eq!(
            a.clock_info(),
            ClockInfo {
                clock: 0x24d,
                reset_count: 1,
                restart_count: 0,
                safe: true
            }
        );
        assert_eq!(a.firmware_version(), 0x2019_1023_0016_3636);
        assert_eq!(a.pcr_select().len(), 1);
        assert_eq!(a.pcr_select()[0].hash(), HashAlg::Sha256);
        assert_eq!(a.pcr_select()[0].pcrs().collect::<Vec<_>>(), [0, 1, 2, 7]);
        assert_eq!(a.pcr_digest().len(), 32);
        assert_eq!(a.to_bytes(), b);
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = quote();
        for n in 0..b.len() {
            assert!(
                matches!(Attest::parse(&b[..n]), Err(TpmParseError::Truncated { .. })),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn refuses_what_a_quote_cannot_be() {
        let b = quote();
        let with = |at: usize, v: &[u8]| {
            let mut m = b.clone();
            m[at..at + v.len()].copy_from_slice(v);
            Attest::parse(&m)
        };
        assert_eq!(
            with(0, &[0xff, 0x54, 0x43, 0x48]),
            Err(TpmParseError::BadMagic { found: 0xff54_4348 })
        );
        // TPM_ST_ATTEST_CERTIFY
        assert_eq!(
            with(4, &[0x80, 0x17]),
            Err(TpmParseError::NotAQuote { found: 0x8017 })
        );
        // qualifiedSigner larger than a name
        assert!(matches!(
            with(6, &[0x00, 0x43]),
            Err(TpmParseError::TooLarge {
                field: "qualifiedSigner",
                ..
            })
        ));
        // extraData larger than 64
        assert!(matches!(
            with(42, &[0x00, 0x41]),
            Err(TpmParseError::TooLarge {
                field: "extraData",
                ..
            })
        ));
        let safe = 42 + 2 + 32 + 16;
        assert_eq!(
            with(safe, &[2]),
            Err(TpmParseError::InvalidValue {
                field: "clockInfo.safe",
                rule: "TPMI_YES_NO is 0 or 1"
            })
        );
        let count = safe + 1 + 8;
        assert!(matches!(
            with(count, &[0, 0, 0, 5]),
            Err(TpmParseError::TooLarge {
                field: "pcrSelect.count",
                len: 5,
                max: 4
            })
        ));
        assert!(matches!(
            with(count, &[0xff, 0xff, 0xff, 0xff]),
            Err(TpmParseError::TooLarge {
                field: "pcrSelect.count",
                ..
            })
        ));
        // SM3_256 bank
        assert_eq!(
            with(count + 4, &[0x00, 0x12]),
            Err(TpmParseError::UnsupportedAlgorithm {
                field: "pcrSelection.hash",
                alg: 0x12
            })
        );
        assert_eq!(
            with(count + 6, &[4]),
            Err(TpmParseError::Unsupported {
                field: "pcrSelection.sizeofSelect",
                value: 4
            })
        );
        assert!(matches!(
            with(count + 10, &[0x00, 0x41]),
            Err(TpmParseError::TooLarge {
                field: "pcrDigest",
                ..
            })
        ));
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            Attest::parse(&long),
            Err(TpmParseError::TrailingBytes {
                structure: "TPMS_ATTEST",
                extra: 1
            })
        );
    }

    #[test]
    fn selection_bitmap() {
        let s = PcrSelection::new(HashAlg::Sha1, &[23, 0, 9, 9]).unwrap();
        assert_eq!(s.bitmap(), [0x01, 0x02, 0x80]);
        assert_eq!(s.pcrs().collect::<Vec<_>>(), [0, 9, 23]);
        assert_eq!(PcrSelection::new(HashAlg::Sha1, &[24]), None);
    }
}
