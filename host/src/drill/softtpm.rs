//! An insecure software "vTPM": the quotes of a thousand VMs without a
//! thousand swtpm processes, for the drills (`vkx-host drill`, the
//! synthetic guests of [`super::fleet`]) and the load generator and
//! fault-injection suite of `vkx-e2e` (feature `insecure-soft-tpm`).
//!
//! **Not a TPM, and never for production.** Its attestation key is an
//! ordinary ring ECDSA key in this process's memory, derived from a
//! [`Seed`] and the VM's index; it is a "restricted" key only in what its
//! public area claims. A host accepts its quotes only because whoever made
//! it recorded its AK in a registry ([`SoftTpm::ak_public`] with
//! [`crate::enroll`]).
//!
//! Confinement (what keeps it away from production nodes):
//! - the keys come from a per-sandbox [`Seed`] drawn from the OS
//!   ([`Seed::generate`]), never from the index alone, so no two sandboxes
//!   (and no outsider) share an AK, and a seed is never written anywhere;
//! - the drill enrols soft AKs only in the registry of its own sandbox, a
//!   directory it created under its temporary root, and refuses any other
//!   ([`super::sandbox::Sandbox::enroll`]); `vkx-host drill` takes no
//!   node directory or registry argument for its scenarios;
//! - the production guest agent (`vkx-guest`) never links this module: it
//!   lives in `vkx-host` (which the guest does not depend on), and only
//!   the drill's synthetic guests and `vkx-e2e` use it.
//!
//! What it produces is byte-compatible with what a vkx-provisioned vTPM
//! (swtpm) produces, so the host does exactly the work it does for a
//! real quote:
//! - the AK's TPM2B_PUBLIC as a TPM marshals the key made from vkx's AK
//!   template (`crate::vtpm::ak_template`, ECC): ECC P-256,
//!   nameAlg SHA-256, objectAttributes fixedTPM | fixedParent |
//!   sensitiveDataOrigin | userWithAuth | noDA | restricted | sign
//!   ([`AK_ATTRIBUTES`]), empty authPolicy, symmetric NULL, scheme
//!   ECDSA/SHA-256, kdf NULL, both coordinates 32 bytes;
//! - an EK public of the TCG default ECC P-256 template (L-2), as the
//!   registry's `ek_public` stand-in;
//! - the AK name (nameAlg || SHA-256(TPMT_PUBLIC)) and the AK's qualified
//!   name, which a quote carries as qualifiedSigner: the AK is a primary
//!   key of the endorsement hierarchy, so it is
//!   nameAlg || SHA-256(TPM_RH_ENDORSEMENT || AK name);
//! - TPMS_ATTEST of TPM2_Quote: TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE,
//!   qualifiedSigner, extraData = the qualifying data, clockInfo (a clock
//!   in milliseconds that only increases, resetCount 1, restartCount 0,
//!   safe), firmwareVersion (swtpm 0.7's), the TPML_PCR_SELECTION as
//!   asked (3-byte bitmaps) and pcrDigest = SHA-256 of the selected PCR
//!   values in selection order;
//! - TPMT_SIGNATURE: ECDSA, SHA-256, r and s as 32-byte TPM2Bs.
//!
//! The PCRs hold fixed values ([`SoftTpm::pcr_value`]), the same for every
//! soft VM: they all booted the same image.
//!
//! Keys are derived: scalar = SHA-256(label || seed || role || index ||
//! counter), the first value in [1, n); one seed gives the same AKs, so a
//! site can restart its host on the same registry. ring cannot compute a
//! public key from a private scalar, so the `p256` crate does that one
//! scalar multiplication, and ring's consistency check on the pair proves
//! it right for every key.

use std::sync::Mutex;
use std::time::Instant;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use vkx_common::tpm::alg::{
    TPM_ALG_AES, TPM_ALG_CFB, TPM_ALG_ECC, TPM_ALG_ECDSA, TPM_ALG_NULL, TPM_ECC_NIST_P256,
};
use vkx_common::tpm::attest::{TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE};
use vkx_common::tpm::marshal::Writer;
use vkx_common::tpm::{PcrSelection, Public};
use vkx_common::wire::{
    Evidence, HashAlg, MAX_PCR_BANKS, MAX_PCRS_PER_BANK, PcrBankSelection, PcrBankValues,
};

/// objectAttributes of vkx's AK: fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth, noDA, restricted, sign.
pub const AK_ATTRIBUTES: u32 = 0x0005_0472;

/// objectAttributes of the TCG default EK template: fixedTPM, fixedParent,
/// sensitiveDataOrigin, adminWithPolicy, restricted, decrypt.
pub const EK_ATTRIBUTES: u32 = 0x0003_00b2;

/// The TCG default EK template's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT)
/// (EK Credential Profile 2.0, B.3.2).
pub const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// TPM_RH_ENDORSEMENT: the hierarchy the vkx AK is a primary of; its
/// handle is the hierarchy's qualified name.
pub const TPM_RH_ENDORSEMENT: u32 = 0x4000_000b;

/// firmwareVersion swtpm 0.7 reports (TPM_PT_FIRMWARE_VERSION_1 || _2).
pub const FIRMWARE_VERSION: u64 = 0x2019_1023_0016_3636;

/// clockInfo.resetCount: one TPM2_Startup(CLEAR) since manufacture, as a
/// fresh swtpm after the VM's first boot.
pub const RESET_COUNT: u32 = 1;

/// The TPM clock at the soft TPM's creation, in milliseconds: a vTPM that
/// has been up for a minute.
pub const CLOCK_START_MS: u64 = 60_000;

/// Bytes of a P-256 coordinate, scalar, and of ECDSA r and s.
pub const P256_LEN: usize = 32;

/// Label of the key derivation (domain separation; the secret is the
/// [`Seed`]).
const SEED_LABEL: &[u8] = b"vkx insecure soft TPM v2";

/// Bytes of a [`Seed`].
pub const SEED_LEN: usize = 32;

/// The secret every soft TPM of one sandbox derives its keys from. Drawn
/// from the OS per sandbox ([`Seed::generate`]); never logged (redacted
/// `Debug`), never written, zeroized on drop.
#[derive(Clone)]
pub struct Seed(zeroize::Zeroizing<[u8; SEED_LEN]>);

impl Seed {
    /// A fresh random seed.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        let mut bytes = zeroize::Zeroizing::new([0u8; SEED_LEN]);
        ring::rand::SecureRandom::fill(&SystemRandom::new(), bytes.as_mut())?;
        Ok(Self(bytes))
    }

    /// A given seed: for tests that need the same keys twice.
    pub fn from_bytes(bytes: [u8; SEED_LEN]) -> Self {
        Self(zeroize::Zeroizing::new(bytes))
    }
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(<redacted>)")
    }
}

/// Label of the fixed PCR values.
const PCR_LABEL: &[u8] = b"vkx insecure soft TPM PCR v1";

/// Counters tried per key before giving up on finding a scalar in
/// [1, n); a SHA-256 output is outside it with probability < 2^-32.
const MAX_DERIVE_TRIES: u32 = 16;

/// One simulated VM's vTPM. `Sync`: one instance may quote for several
/// sessions at once, as a TPM behind a resource manager.
#[derive(Debug)]
pub struct SoftTpm {
    index: u32,
    ak: EcdsaKeyPair,
    ak_public: Vec<u8>,
    ak_name: Vec<u8>,
    qualified_signer: Vec<u8>,
    ek_public: Vec<u8>,
    started: Instant,
    last_clock: Mutex<u64>,
    rng: SystemRandom,
}

/// A quote as the TPM returns it, with the PCR values it covers.
#[derive(Debug, Clone)]
pub struct SoftQuote {
    /// TPMS_ATTEST.
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE.
    pub signature: Vec<u8>,
    pub pcr_values: Vec<PcrBankValues>,
}

impl SoftTpm {
    /// The soft vTPM of VM number `index` of the sandbox of `seed`: the
    /// same keys for the same seed and index.
    // Both expects hold by construction: the public point is computed from
    // the scalar by the `p256` crate (ring checks the pair), and the
    // public area is marshalled here from a fixed template that `Public::parse` accepts (the unit test below).
    #[allow(clippy::expect_used)]
    pub fn new(seed: &Seed, index: u32) -> Self {
        let rng = SystemRandom::new();
        let (ak_scalar, ak_point) = derive_key(seed, b"ak", index);
        let ak = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            ak_scalar.as_ref(),
            &ak_point,
            &rng,
        )
        .expect("ring accepts the derived P-256 key pair (public key computed right)");
        let ak_public = ak_public_area(&ak_point);
        let ak_name = Public::parse(&ak_public)
            .expect("the soft AK public area parses")
            .name();
        // Computed here, not with the verifier's `Public::qualified_name`:
        // the soft TPM is one of the verifier's judges.
        let mut qn = ring::digest::Context::new(&ring::digest::SHA256);
        qn.update(&TPM_RH_ENDORSEMENT.to_be_bytes());
        qn.update(&ak_name);
        let mut qualified_signer = HashAlg::Sha256.tpm_alg_id().to_be_bytes().to_vec();
        qualified_signer.extend_from_slice(qn.finish().as_ref());
        let (_, ek_point) = derive_key(seed, b"ek", index);
        Self {
            index,
            ak,
            ak_public,
            ak_name,
            qualified_signer,
            ek_public: ek_public_area(&ek_point),
            started: Instant::now(),
            last_clock: Mutex::new(0),
            rng,
        }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The AK's TPM2B_PUBLIC (what `tpm2_createak -u` writes and the
    /// registry records).
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// The AK's TPM name: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC).
    pub fn ak_name(&self) -> &[u8] {
        &self.ak_name
    }

    /// The AK's qualified name, the quotes' qualifiedSigner.
    pub fn qualified_signer(&self) -> &[u8] {
        &self.qualified_signer
    }

    /// The EK's TPM2B_PUBLIC (TCG default ECC P-256 template).
    pub fn ek_public(&self) -> &[u8] {
        &self.ek_public
    }

    /// The fixed value of PCR `index` in `bank`, for every soft TPM: the
    /// bank's hash of a label and the index.
    pub fn pcr_value(bank: HashAlg, index: u8) -> Vec<u8> {
        let alg = match bank {
            HashAlg::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            HashAlg::Sha256 => &ring::digest::SHA256,
            HashAlg::Sha384 => &ring::digest::SHA384,
            HashAlg::Sha512 => &ring::digest::SHA512,
        };
        let mut ctx = ring::digest::Context::new(alg);
        ctx.update(PCR_LABEL);
        ctx.update(&bank.tpm_alg_id().to_be_bytes());
        ctx.update(&[index]);
        ctx.finish().as_ref().to_vec()
    }

    /// The PCR values of `selection`, as the guest reports them.
    pub fn pcr_values(selection: &[PcrBankSelection]) -> Vec<PcrBankValues> {
        selection
            .iter()
            .map(|bank| PcrBankValues {
                hash_alg: bank.hash_alg,
                values: bank
                    .pcrs
                    .iter()
                    .map(|&i| (i, Self::pcr_value(bank.hash_alg, i)))
                    .collect(),
            })
            .collect()
    }

    /// TPM2_Quote with the AK over `selection`, qualifyingData
    /// `qualifying_data`, scheme ECDSA/SHA-256. Refuses what a TPM
    /// refuses: no bank, a bank twice, PCRs not ascending or beyond 23,
    /// more than 64 bytes of qualifying data.
    pub fn quote_raw(
        &self,
        selection: &[PcrBankSelection],
        qualifying_data: &[u8],
    ) -> Result<SoftQuote, String> {
        if selection.is_empty() || selection.len() > MAX_PCR_BANKS {
            return Err(format!(
                "1 to {MAX_PCR_BANKS} PCR banks, not {}",
                selection.len()
            ));
        }
        if qualifying_data.len() > 64 {
            return Err("qualifying data longer than 64 bytes".into());
        }
        let mut selects = Vec::with_capacity(selection.len());
        for (i, bank) in selection.iter().enumerate() {
            if selection[..i].iter().any(|b| b.hash_alg == bank.hash_alg) {
                return Err(format!("bank {:?} selected twice", bank.hash_alg));
            }
            let ascending = bank.pcrs.windows(2).all(|w| w[0] < w[1]);
            let in_range = bank
                .pcrs
                .iter()
                .all(|&p| usize::from(p) < MAX_PCRS_PER_BANK);
            if bank.pcrs.is_empty() || !ascending || !in_range {
                return Err(format!("bad PCR list {:?}", bank.pcrs));
            }
            selects.push(
                PcrSelection::new(bank.hash_alg, &bank.pcrs)
                    .ok_or_else(|| format!("bad PCR list {:?}", bank.pcrs))?,
            );
        }
        let pcr_values = Self::pcr_values(selection);
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for bank in &pcr_values {
            for value in bank.values.values() {
                digest.update(value);
            }
        }
        let mut w = Writer::new();
        w.u32(TPM_GENERATED_VALUE);
        w.u16(TPM_ST_ATTEST_QUOTE);
        w.tpm2b(&self.qualified_signer);
        w.tpm2b(qualifying_data);
        w.u64(self.tick());
        w.u32(RESET_COUNT);
        w.u32(0); // restartCount
        w.u8(1); // safe
        w.u64(FIRMWARE_VERSION);
        w.u32(u32::try_from(selects.len()).map_err(|e| e.to_string())?);
        for s in &selects {
            w.u16(s.hash().tpm_alg_id());
            w.u8(u8::try_from(s.bitmap().len()).map_err(|e| e.to_string())?);
            w.raw(&s.bitmap());
        }
        w.tpm2b(digest.finish().as_ref());
        let attest = w.into_bytes();
        let sig = self
            .ak
            .sign(&self.rng, &attest)
            .map_err(|_| "ECDSA signing failed".to_owned())?;
        let (r, s) = sig.as_ref().split_at(P256_LEN);
        let mut w = Writer::new();
        w.u16(TPM_ALG_ECDSA);
        w.u16(HashAlg::Sha256.tpm_alg_id());
        w.tpm2b(r);
        w.tpm2b(s);
        Ok(SoftQuote {
            attest,
            signature: w.into_bytes(),
            pcr_values,
        })
    }

    /// The TPM clock for the next quote: milliseconds since creation on
    /// top of [`CLOCK_START_MS`], strictly increasing from quote to quote.
    fn tick(&self) -> u64 {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut last = self
            .last_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = (CLOCK_START_MS.saturating_add(elapsed)).max(last.saturating_add(1));
        *last
    }
}

impl vkx_guest::agent::Quote for SoftTpm {
    fn quote(
        &self,
        selection: &[PcrBankSelection],
        qualifying_data: &[u8; 32],
    ) -> Result<Evidence, String> {
        let q = self.quote_raw(selection, qualifying_data)?;
        Ok(Evidence {
            tpm_attest: q.attest,
            tpm_signature: q.signature,
            ak_name: self.ak_name.clone(),
            // A soft VM has no AK certificate: the host trusts the AK
            // through its registry entry.
            ak_cert: None,
            pcr_values: q.pcr_values,
        })
    }
}

/// The AK's TPM2B_PUBLIC for the uncompressed point `point` (0x04 || x || y).
fn ak_public_area(point: &[u8]) -> Vec<u8> {
    let (x, y) = coordinates(point);
    let mut t = Writer::new();
    t.u16(TPM_ALG_ECC);
    t.u16(HashAlg::Sha256.tpm_alg_id());
    t.u32(AK_ATTRIBUTES);
    t.tpm2b(&[]); // authPolicy
    t.u16(TPM_ALG_NULL); // symmetric
    t.u16(TPM_ALG_ECDSA);
    t.u16(HashAlg::Sha256.tpm_alg_id());
    t.u16(TPM_ECC_NIST_P256);
    t.u16(TPM_ALG_NULL); // kdf
    t.tpm2b(x);
    t.tpm2b(y);
    let mut w = Writer::new();
    w.tpm2b(&t.into_bytes());
    w.into_bytes()
}

/// The EK's TPM2B_PUBLIC (TCG EK Credential Profile template L-2).
fn ek_public_area(point: &[u8]) -> Vec<u8> {
    let (x, y) = coordinates(point);
    let mut t = Writer::new();
    t.u16(TPM_ALG_ECC);
    t.u16(HashAlg::Sha256.tpm_alg_id());
    t.u32(EK_ATTRIBUTES);
    t.tpm2b(&EK_AUTH_POLICY);
    t.u16(TPM_ALG_AES);
    t.u16(128);
    t.u16(TPM_ALG_CFB);
    t.u16(TPM_ALG_NULL); // scheme
    t.u16(TPM_ECC_NIST_P256);
    t.u16(TPM_ALG_NULL); // kdf
    t.tpm2b(x);
    t.tpm2b(y);
    let mut w = Writer::new();
    w.tpm2b(&t.into_bytes());
    w.into_bytes()
}

fn coordinates(point: &[u8]) -> (&[u8], &[u8]) {
    point[1..].split_at(P256_LEN)
}

/// The key of `role` for VM `index`: (scalar, uncompressed public point).
fn derive_key(
    seed: &Seed,
    role: &[u8],
    index: u32,
) -> (zeroize::Zeroizing<[u8; P256_LEN]>, Vec<u8>) {
    for counter in 0..MAX_DERIVE_TRIES {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(SEED_LABEL);
        ctx.update(seed.0.as_ref());
        ctx.update(role);
        ctx.update(&index.to_be_bytes());
        ctx.update(&counter.to_be_bytes());
        let mut scalar = zeroize::Zeroizing::new([0u8; P256_LEN]);
        scalar.copy_from_slice(ctx.finish().as_ref());
        if let Some(point) = public_point(&scalar) {
            return (scalar, point);
        }
    }
    unreachable!("{MAX_DERIVE_TRIES} SHA-256 outputs all outside [1, n)")
}

/// The uncompressed public point (0x04 || x || y) of `scalar`
/// (big-endian), or `None` if the scalar is not in [1, n). ring cannot
/// compute a public key from a private scalar; the `p256` crate can.
fn public_point(scalar: &[u8; P256_LEN]) -> Option<Vec<u8>> {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let secret = p256::SecretKey::from_bytes(&(*scalar).into()).ok()?;
    Some(
        secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair as _;

    #[test]
    fn keys_are_reproducible_and_distinct_per_vm_and_seed() {
        let seed = Seed::from_bytes([7; SEED_LEN]);
        let a = SoftTpm::new(&seed, 7);
        let b = SoftTpm::new(&seed, 7);
        let c = SoftTpm::new(&seed, 8);
        let other = SoftTpm::new(&Seed::generate().unwrap(), 7);
        assert_ne!(a.ak_public(), other.ak_public());
        assert_ne!(a.ek_public(), other.ek_public());
        assert_eq!(a.ak_public(), b.ak_public());
        assert_eq!(a.ek_public(), b.ek_public());
        assert_ne!(a.ak_public(), c.ak_public());
        assert_ne!(a.ak_public()[2..], a.ek_public()[2..]);
        assert_eq!(a.ak.public_key().as_ref()[1..33], a.ak_public()[24..56]);
    }

    /// A signature by the right AK over a quote that names another signer
    /// (a qualifiedSigner of the right form but not the AK's qualified
    /// name): what only a forged TPM, or an AK moved under another parent,
    /// would produce. The host refuses it.
    #[test]
    fn a_quote_naming_another_signer_is_refused() {
        use vkx_common::tpm::{AkParent, QuoteExpectations, VerifyError, verify_quote};
        let mut t = SoftTpm::new(&Seed::generate().unwrap(), 2);
        let ak = Public::parse(t.ak_public()).unwrap();
        let sel = vec![PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: vec![0, 7],
        }];
        let nonce = [9u8; 32];
        let verify = |q: &SoftQuote| {
            verify_quote(
                &q.attest,
                &q.signature,
                &ak,
                &QuoteExpectations {
                    ak_parent: AkParent::VKX,
                    qualifying_data: &nonce,
                    pcr_selection: &sel,
                    pcr_values: &q.pcr_values,
                },
            )
        };
        assert!(verify(&t.quote_raw(&sel, &nonce).unwrap()).is_ok());
        let right = t.qualified_signer.clone();
        let mut flipped = right.clone();
        flipped[33] ^= 1;
        let under_owner = ak.qualified_name(&0x4000_0001u32.to_be_bytes());
        for tampered in [flipped, under_owner, ak.name()] {
            t.qualified_signer = tampered;
            let q = t.quote_raw(&sel, &nonce).unwrap();
            assert_eq!(verify(&q), Err(VerifyError::QualifiedSignerMismatch));
        }
    }

    #[test]
    fn public_points_of_small_and_out_of_group_scalars() {
        let scalar = |v: u8| {
            let mut s = [0u8; P256_LEN];
            s[P256_LEN - 1] = v;
            s
        };
        // G and 2G (SEC 2 / well-known test values).
        let g = public_point(&scalar(1)).unwrap();
        assert_eq!(
            hex::encode(&g),
            "04\
             6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
             4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
        );
        let two = public_point(&scalar(2)).unwrap();
        assert_eq!(
            hex::encode(&two),
            "04\
             7cf27b188d034f7e8a52380304b51ac3c08969e277f21b35a60b48fc47669978\
             07775510db8ed040293d9ac69f7430dbba7dade63ce982299e04b79d227873d1"
        );
        // 0, n and above are not private keys.
        let n: [u8; P256_LEN] =
            hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")
                .unwrap()
                .try_into()
                .unwrap();
        assert!(public_point(&[0; P256_LEN]).is_none());
        assert!(public_point(&n).is_none());
        assert!(public_point(&[0xff; P256_LEN]).is_none());
        let mut n_minus_1 = n;
        n_minus_1[P256_LEN - 1] -= 1;
        // (n-1)G = -G: same x.
        assert_eq!(public_point(&n_minus_1).unwrap()[..33], g[..33]);
    }

    #[test]
    fn clock_only_increases() {
        let t = SoftTpm::new(&Seed::generate().unwrap(), 1);
        let a = t.tick();
        let b = t.tick();
        assert!(a >= CLOCK_START_MS && b > a);
    }
}
