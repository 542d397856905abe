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
//! public key from a private scalar, so this module does that one P-256
//! scalar multiplication itself (small, not constant-time: the scalars
//! live only in this process, which holds the seed anyway), and ring's
//! consistency check on the pair proves it right for every key.

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
    // the scalar (ring checks the pair, and the p256 unit tests prove the
    // arithmetic), and the public area is marshalled here from a fixed
    // template that `Public::parse` accepts (the unit test below).
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
        if let Some(point) = p256::public_point(&scalar) {
            return (scalar, point.to_vec());
        }
    }
    unreachable!("{MAX_DERIVE_TRIES} SHA-256 outputs all outside [1, n)")
}

/// Just enough NIST P-256 to compute a public key from a private scalar:
/// field arithmetic in Montgomery form on four 64-bit limbs
/// (little-endian), Jacobian points, double-and-add. Not constant-time;
/// the scalars it sees are public (see the module primer).
#[allow(clippy::cast_possible_truncation)] // Limb arithmetic: keeping the low 64 bits is the point.
mod p256 {
    type Fe = [u64; 4];

    /// The field prime p = 2^256 - 2^224 + 2^192 + 2^96 - 1.
    const P: Fe = [
        0xffff_ffff_ffff_ffff,
        0x0000_0000_ffff_ffff,
        0x0000_0000_0000_0000,
        0xffff_ffff_0000_0001,
    ];
    /// The group order n, big-endian.
    const N_BE: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    /// The base point G, big-endian coordinates.
    const GX_BE: [u8; 32] = [
        0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
        0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98,
        0xc2, 0x96,
    ];
    const GY_BE: [u8; 32] = [
        0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e,
        0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf,
        0x51, 0xf5,
    ];

    fn from_be(b: &[u8; 32]) -> Fe {
        let mut out = [0u64; 4];
        for (i, limb) in out.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[32 - 8 * (i + 1)..32 - 8 * i]);
            *limb = u64::from_be_bytes(w);
        }
        out
    }

    fn to_be(a: &Fe) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, limb) in a.iter().enumerate() {
            out[32 - 8 * (i + 1)..32 - 8 * i].copy_from_slice(&limb.to_be_bytes());
        }
        out
    }

    /// a + b over 256 bits, and the carry out.
    fn add_raw(a: &Fe, b: &Fe) -> (Fe, bool) {
        let mut out = [0u64; 4];
        let mut carry = false;
        for i in 0..4 {
            let (s1, c1) = a[i].overflowing_add(b[i]);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            out[i] = s2;
            carry = c1 || c2;
        }
        (out, carry)
    }

    /// a - b over 256 bits, and the borrow out.
    fn sub_raw(a: &Fe, b: &Fe) -> (Fe, bool) {
        let mut out = [0u64; 4];
        let mut borrow = false;
        for i in 0..4 {
            let (d1, b1) = a[i].overflowing_sub(b[i]);
            let (d2, b2) = d1.overflowing_sub(u64::from(borrow));
            out[i] = d2;
            borrow = b1 || b2;
        }
        (out, borrow)
    }

    fn geq(a: &Fe, b: &Fe) -> bool {
        !sub_raw(a, b).1
    }

    fn add(a: &Fe, b: &Fe) -> Fe {
        let (s, carry) = add_raw(a, b);
        if carry || geq(&s, &P) {
            sub_raw(&s, &P).0
        } else {
            s
        }
    }

    fn sub(a: &Fe, b: &Fe) -> Fe {
        let (d, borrow) = sub_raw(a, b);
        if borrow { add_raw(&d, &P).0 } else { d }
    }

    /// Montgomery product a·b·2^-256 mod p (CIOS). -p^-1 mod 2^64 is 1
    /// for this p, so the reduction factor is the low limb itself.
    fn mul(a: &Fe, b: &Fe) -> Fe {
        let mut t = [0u64; 6];
        for bi in b {
            let mut carry = 0u64;
            for j in 0..4 {
                let x = u128::from(t[j]) + u128::from(a[j]) * u128::from(*bi) + u128::from(carry);
                t[j] = x as u64;
                carry = (x >> 64) as u64;
            }
            let x = u128::from(t[4]) + u128::from(carry);
            t[4] = x as u64;
            t[5] = (x >> 64) as u64;
            let m = t[0];
            let x = u128::from(t[0]) + u128::from(m) * u128::from(P[0]);
            let mut carry = (x >> 64) as u64;
            for j in 1..4 {
                let x = u128::from(t[j]) + u128::from(m) * u128::from(P[j]) + u128::from(carry);
                t[j - 1] = x as u64;
                carry = (x >> 64) as u64;
            }
            let x = u128::from(t[4]) + u128::from(carry);
            t[3] = x as u64;
            t[4] = t[5] + (x >> 64) as u64;
        }
        let r = [t[0], t[1], t[2], t[3]];
        if t[4] != 0 || geq(&r, &P) {
            sub_raw(&r, &P).0
        } else {
            r
        }
    }

    /// 2^256 mod p: one in Montgomery form.
    fn one() -> Fe {
        sub_raw(&[0; 4], &P).0
    }

    fn to_mont(a: &Fe) -> Fe {
        // R^2 mod p: R mod p doubled 256 times.
        let mut r2 = one();
        for _ in 0..256 {
            r2 = add(&r2, &r2);
        }
        mul(a, &r2)
    }

    fn from_mont(a: &Fe) -> Fe {
        mul(a, &[1, 0, 0, 0])
    }

    /// a^(p-2) = a^-1 (Montgomery form in and out).
    fn invert(a: &Fe) -> Fe {
        let e = sub_raw(&P, &[2, 0, 0, 0]).0;
        let mut r = one();
        for bit in (0..256).rev() {
            r = mul(&r, &r);
            if (e[bit / 64] >> (bit % 64)) & 1 == 1 {
                r = mul(&r, a);
            }
        }
        r
    }

    /// A Jacobian point (X/Z^2, Y/Z^3), Montgomery form; Z = 0 is the
    /// point at infinity.
    #[derive(Clone, Copy)]
    struct Jac {
        x: Fe,
        y: Fe,
        z: Fe,
    }

    fn is_zero(a: &Fe) -> bool {
        a.iter().all(|l| *l == 0)
    }

    /// dbl-2001-b (a = -3).
    fn double(p: &Jac) -> Jac {
        if is_zero(&p.z) || is_zero(&p.y) {
            return Jac {
                x: [0; 4],
                y: [0; 4],
                z: [0; 4],
            };
        }
        let delta = mul(&p.z, &p.z);
        let gamma = mul(&p.y, &p.y);
        let beta = mul(&p.x, &gamma);
        let t = mul(&sub(&p.x, &delta), &add(&p.x, &delta));
        let alpha = add(&add(&t, &t), &t);
        let beta2 = add(&beta, &beta);
        let beta4 = add(&beta2, &beta2);
        let beta8 = add(&beta4, &beta4);
        let x = sub(&mul(&alpha, &alpha), &beta8);
        let yz = add(&p.y, &p.z);
        let z = sub(&sub(&mul(&yz, &yz), &gamma), &delta);
        let gamma_sq = mul(&gamma, &gamma);
        let gamma_sq2 = add(&gamma_sq, &gamma_sq);
        let gamma_sq4 = add(&gamma_sq2, &gamma_sq2);
        let gamma_sq8 = add(&gamma_sq4, &gamma_sq4);
        let y = sub(&mul(&alpha, &sub(&beta4, &x)), &gamma_sq8);
        Jac { x, y, z }
    }

    /// add-2007-bl.
    fn plus(p: &Jac, q: &Jac) -> Jac {
        if is_zero(&p.z) {
            return *q;
        }
        if is_zero(&q.z) {
            return *p;
        }
        let z1z1 = mul(&p.z, &p.z);
        let z2z2 = mul(&q.z, &q.z);
        let u1 = mul(&p.x, &z2z2);
        let u2 = mul(&q.x, &z1z1);
        let s1 = mul(&mul(&p.y, &q.z), &z2z2);
        let s2 = mul(&mul(&q.y, &p.z), &z1z1);
        let h = sub(&u2, &u1);
        let s = sub(&s2, &s1);
        let r = add(&s, &s);
        if is_zero(&h) {
            return if is_zero(&r) {
                double(p)
            } else {
                Jac {
                    x: [0; 4],
                    y: [0; 4],
                    z: [0; 4],
                }
            };
        }
        let h2 = add(&h, &h);
        let i = mul(&h2, &h2);
        let j = mul(&h, &i);
        let v = mul(&u1, &i);
        let x = sub(&sub(&mul(&r, &r), &j), &add(&v, &v));
        let s1j = mul(&s1, &j);
        let y = sub(&mul(&r, &sub(&v, &x)), &add(&s1j, &s1j));
        let zz = add(&p.z, &q.z);
        let z = mul(&sub(&sub(&mul(&zz, &zz), &z1z1), &z2z2), &h);
        Jac { x, y, z }
    }

    /// The uncompressed public point (0x04 || x || y) of `scalar`
    /// (big-endian), or `None` if the scalar is not in [1, n).
    pub(super) fn public_point(scalar: &[u8; 32]) -> Option<[u8; 65]> {
        if scalar.iter().all(|b| *b == 0) || scalar.as_slice() >= N_BE.as_slice() {
            return None;
        }
        let g = Jac {
            x: to_mont(&from_be(&GX_BE)),
            y: to_mont(&from_be(&GY_BE)),
            z: one(),
        };
        let mut acc = Jac {
            x: [0; 4],
            y: [0; 4],
            z: [0; 4],
        };
        for byte in scalar {
            for bit in (0..8).rev() {
                acc = double(&acc);
                if (byte >> bit) & 1 == 1 {
                    acc = plus(&acc, &g);
                }
            }
        }
        if is_zero(&acc.z) {
            return None;
        }
        let zinv = invert(&acc.z);
        let zinv2 = mul(&zinv, &zinv);
        let x = from_mont(&mul(&acc.x, &zinv2));
        let y = from_mont(&mul(&mul(&acc.y, &zinv2), &zinv));
        let mut out = [0u8; 65];
        out[0] = 0x04;
        out[1..33].copy_from_slice(&to_be(&x));
        out[33..].copy_from_slice(&to_be(&y));
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn scalar(v: u8) -> [u8; 32] {
            let mut s = [0u8; 32];
            s[31] = v;
            s
        }

        #[test]
        fn small_multiples_of_the_base_point() {
            let g = public_point(&scalar(1)).unwrap();
            assert_eq!(g[1..33], GX_BE);
            assert_eq!(g[33..], GY_BE);
            // 2G (SEC 2 / well-known test value).
            let two = public_point(&scalar(2)).unwrap();
            assert_eq!(
                hex::encode(&two[1..33]),
                "7cf27b188d034f7e8a52380304b51ac3c08969e277f21b35a60b48fc47669978"
            );
            assert_eq!(
                hex::encode(&two[33..]),
                "07775510db8ed040293d9ac69f7430dbba7dade63ce982299e04b79d227873d1"
            );
        }

        #[test]
        fn refuses_scalars_outside_the_group() {
            assert!(public_point(&[0; 32]).is_none());
            assert!(public_point(&N_BE).is_none());
            assert!(public_point(&[0xff; 32]).is_none());
            let mut n_minus_1 = N_BE;
            n_minus_1[31] -= 1;
            // (n-1)G = -G: same x, y = p - Gy.
            let p = public_point(&n_minus_1).unwrap();
            assert_eq!(p[1..33], GX_BE);
            let neg = sub(&[0; 4], &from_be(&GY_BE));
            assert_eq!(p[33..], to_be(&neg));
        }
    }
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
    fn clock_only_increases() {
        let t = SoftTpm::new(&Seed::generate().unwrap(), 1);
        let a = t.tick();
        let b = t.tick();
        assert!(a >= CLOCK_START_MS && b > a);
    }
}
