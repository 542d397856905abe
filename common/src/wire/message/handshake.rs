//! The handshake family: `hello`, `challenge`, `evidence`,
//! `attestation-result` (PROTOCOL.md §6.1-§6.4).

use super::*;

// ------------------------------------------------------------------ hello

/// guest → host, first message of every connection (§6.3). Frozen layout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub agent_name: AgentName,
    pub agent_version: AgentVersion,
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub guest_nonce: [u8; NONCE_LEN],
}

impl Body for Hello {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "hello")?;
        let min_version = read_u16(f.required(0, "min-version")?, "min-version", 1)?;
        let max_version = read_u16(f.required(1, "max-version")?, "max-version", 1)?;
        let agent_name = AgentName::read(f.required(2, "agent-name")?)?;
        let agent_version = AgentVersion::read(f.required(3, "agent-version")?)?;
        let guest_nonce = f.required(4, "guest-nonce")?.byte_array("guest-nonce")?;
        f.finish()?;
        Ok(Self {
            min_version,
            max_version,
            agent_name,
            agent_version,
            guest_nonce,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(5);
        w.uint(0);
        w.uint(self.min_version.into());
        w.uint(1);
        w.uint(self.max_version.into());
        w.uint(2);
        w.text(self.agent_name.as_str());
        w.uint(3);
        w.text(self.agent_version.as_str());
        w.uint(4);
        w.bytes(&self.guest_nonce);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if self.min_version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "min-version",
                rule: "out of range",
            });
        }
        if self.min_version > self.max_version {
            return Err(DecodeError::InvalidValue {
                field: "max-version",
                rule: "below min-version",
            });
        }
        Ok(())
    }
}

// -------------------------------------------------------------- challenge

/// The PCRs of one bank that the quote must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct PcrBankSelection {
    pub hash_alg: HashAlg,
    /// PCR indices 0..=23, strictly ascending.
    pub pcrs: Vec<u8>,
}

pub(super) fn read_pcr_index(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let v = r.uint_in("pcr-index", 0, (MAX_PCRS_PER_BANK - 1) as u64)?;
    u8::try_from(v).map_err(|_| DecodeError::InvalidValue {
        field: "pcr-index",
        rule: "out of range",
    })
}

impl PcrBankSelection {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "pcr-bank-selection")?;
        let hash_alg = HashAlg::read(f.required(0, "hash-alg")?)?;
        let pcrs = read_array(
            f.required(1, "pcrs")?,
            "pcrs",
            1,
            MAX_PCRS_PER_BANK,
            read_pcr_index,
        )?;
        f.finish()?;
        Ok(Self { hash_alg, pcrs })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.uint(self.hash_alg.tpm_alg_id().into());
        w.uint(1);
        write_array(w, &self.pcrs, |w, p| w.uint((*p).into()));
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("pcrs", self.pcrs.len(), 1, MAX_PCRS_PER_BANK)?;
        if self
            .pcrs
            .iter()
            .any(|p| usize::from(*p) >= MAX_PCRS_PER_BANK)
        {
            return Err(DecodeError::InvalidValue {
                field: "pcr-index",
                rule: "out of range",
            });
        }
        strictly_ascending(&self.pcrs, "pcrs")
    }
}

pub(super) fn read_features(r: &mut Reader<'_>) -> Result<Features, DecodeError> {
    let n = r.map("features", 0, MAX_FEATURES)?;
    let mut features = Features::new();
    for _ in 0..n {
        let id = read_u16(r, "feature-id", 1)?;
        let state = FeatureState::read(r)?;
        // The scan has proven keys unique and ascending.
        features.insert(id, state);
    }
    Ok(features)
}

pub(super) fn write_features(w: &mut Writer, features: &Features) {
    w.map(features.len());
    for (id, state) in features {
        w.uint((*id).into());
        w.uint(state.value());
    }
}

pub(super) fn validate_features(features: &Features) -> Result<(), DecodeError> {
    check_len("features", features.len(), 0, MAX_FEATURES)?;
    if features.contains_key(&0) {
        return Err(DecodeError::InvalidValue {
            field: "feature-id",
            rule: "out of range",
        });
    }
    Ok(())
}

pub(super) fn validate_banks<T>(
    banks: &[T],
    field: &'static str,
    alg: impl Fn(&T) -> HashAlg,
) -> Result<(), DecodeError> {
    check_len(field, banks.len(), 1, MAX_PCR_BANKS)?;
    let algs: Vec<HashAlg> = banks.iter().map(alg).collect();
    strictly_ascending(&algs, field)
}

/// host → guest (§6.4).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Challenge {
    pub version: u16,
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub host_nonce: [u8; NONCE_LEN],
    pub vm_id: VmId,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub cid: Option<u32>,
    pub pcr_selection: Vec<PcrBankSelection>,
    pub features: Features,
}

impl Body for Challenge {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "challenge")?;
        let version = read_u16(f.required(0, "version")?, "version", 1)?;
        let host_nonce = f.required(1, "host-nonce")?.byte_array("host-nonce")?;
        let vm_id = VmId::read(f.required(2, "vm-id")?)?;
        let cid = match f.optional(3)? {
            Some(r) => Some(read_u32(r, "cid", MIN_GUEST_CID, MAX_GUEST_CID)?),
            None => None,
        };
        let pcr_selection = read_array(
            f.required(4, "pcr-selection")?,
            "pcr-selection",
            1,
            MAX_PCR_BANKS,
            PcrBankSelection::read,
        )?;
        let features = read_features(f.required(5, "features")?)?;
        f.finish()?;
        Ok(Self {
            version,
            host_nonce,
            vm_id,
            cid,
            pcr_selection,
            features,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(5, &[self.cid.is_some()]));
        w.uint(0);
        w.uint(self.version.into());
        w.uint(1);
        w.bytes(&self.host_nonce);
        w.uint(2);
        w.text(self.vm_id.as_str());
        if let Some(cid) = self.cid {
            w.uint(3);
            w.uint(cid.into());
        }
        w.uint(4);
        write_array(w, &self.pcr_selection, |w, bank| bank.write(w));
        w.uint(5);
        write_features(w, &self.features);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if self.version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "version",
                rule: "out of range",
            });
        }
        if let Some(cid) = self.cid
            && !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid)
        {
            return Err(DecodeError::InvalidValue {
                field: "cid",
                rule: "out of range",
            });
        }
        validate_banks(&self.pcr_selection, "pcr-selection", |b| b.hash_alg)?;
        for bank in &self.pcr_selection {
            bank.validate()?;
        }
        validate_features(&self.features)
    }
}

// --------------------------------------------------------------- evidence

/// The values of the selected PCRs of one bank.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct PcrBankValues {
    pub hash_alg: HashAlg,
    /// PCR index → digest, each exactly the bank's digest size.
    #[cfg_attr(feature = "serde", serde(with = "hex_map"))]
    #[cfg_attr(feature = "serde", serde(rename = "pcr-digests"))]
    pub values: BTreeMap<u8, Vec<u8>>,
}

impl PcrBankValues {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "pcr-bank-values")?;
        let hash_alg = HashAlg::read(f.required(0, "hash-alg")?)?;
        let r = f.required(1, "pcr-digests")?;
        let n = r.map("pcr-digests", 1, MAX_PCRS_PER_BANK)?;
        let len = hash_alg.digest_len();
        let mut values = BTreeMap::new();
        for _ in 0..n {
            let index = read_pcr_index(r)?;
            let digest = r.bytes("pcr-digest", len, len)?;
            values.insert(index, digest.to_vec());
        }
        f.finish()?;
        Ok(Self { hash_alg, values })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.uint(self.hash_alg.tpm_alg_id().into());
        w.uint(1);
        w.map(self.values.len());
        for (index, digest) in &self.values {
            w.uint((*index).into());
            w.bytes(digest);
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("pcr-digests", self.values.len(), 1, MAX_PCRS_PER_BANK)?;
        let len = self.hash_alg.digest_len();
        for (index, digest) in &self.values {
            if usize::from(*index) >= MAX_PCRS_PER_BANK {
                return Err(DecodeError::InvalidValue {
                    field: "pcr-index",
                    rule: "out of range",
                });
            }
            check_len("pcr-digest", digest.len(), len, len)?;
        }
        Ok(())
    }
}

/// guest → host (§6.5).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Evidence {
    /// TPMS_ATTEST as marshalled by the TPM.
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub tpm_attest: Vec<u8>,
    /// TPMT_SIGNATURE as marshalled by the TPM.
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub tpm_signature: Vec<u8>,
    /// The AK's TPM name (nameAlg || digest).
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub ak_name: Vec<u8>,
    /// DER AK certificate issued at provisioning.
    #[cfg_attr(
        feature = "serde",
        serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")
    )]
    pub ak_cert: Option<Vec<u8>>,
    pub pcr_values: Vec<PcrBankValues>,
}

impl Body for Evidence {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "evidence")?;
        let tpm_attest = f
            .required(0, "tpm-attest")?
            .bytes("tpm-attest", 1, MAX_TPM_ATTEST)?
            .to_vec();
        let tpm_signature = f
            .required(1, "tpm-signature")?
            .bytes("tpm-signature", 1, MAX_TPM_SIGNATURE)?
            .to_vec();
        let ak_name = f
            .required(2, "ak-name")?
            .bytes("ak-name", MIN_AK_NAME, MAX_AK_NAME)?
            .to_vec();
        let ak_cert = match f.optional(3)? {
            Some(r) => Some(r.bytes("ak-cert", 1, MAX_AK_CERT)?.to_vec()),
            None => None,
        };
        let pcr_values = read_array(
            f.required(4, "pcr-values")?,
            "pcr-values",
            1,
            MAX_PCR_BANKS,
            PcrBankValues::read,
        )?;
        f.finish()?;
        Ok(Self {
            tpm_attest,
            tpm_signature,
            ak_name,
            ak_cert,
            pcr_values,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(4, &[self.ak_cert.is_some()]));
        w.uint(0);
        w.bytes(&self.tpm_attest);
        w.uint(1);
        w.bytes(&self.tpm_signature);
        w.uint(2);
        w.bytes(&self.ak_name);
        if let Some(cert) = &self.ak_cert {
            w.uint(3);
            w.bytes(cert);
        }
        w.uint(4);
        write_array(w, &self.pcr_values, |w, bank| bank.write(w));
    }

    fn validate(&self) -> Result<(), DecodeError> {
        check_len("tpm-attest", self.tpm_attest.len(), 1, MAX_TPM_ATTEST)?;
        check_len(
            "tpm-signature",
            self.tpm_signature.len(),
            1,
            MAX_TPM_SIGNATURE,
        )?;
        check_len("ak-name", self.ak_name.len(), MIN_AK_NAME, MAX_AK_NAME)?;
        if let Some(cert) = &self.ak_cert {
            check_len("ak-cert", cert.len(), 1, MAX_AK_CERT)?;
        }
        validate_banks(&self.pcr_values, "pcr-values", |b| b.hash_alg)?;
        for bank in &self.pcr_values {
            bank.validate()?;
        }
        Ok(())
    }

    fn capacity_hint(&self) -> usize {
        let pcrs: usize = self
            .pcr_values
            .iter()
            .map(|b| b.values.len() * (b.hash_alg.digest_len() + 4) + 8)
            .sum();
        64 + self.tpm_attest.len()
            + self.tpm_signature.len()
            + self.ak_name.len()
            + self.ak_cert.as_ref().map_or(0, Vec::len)
            + pcrs
    }
}

// ---------------------------------------------------- attestation result

/// host → guest: the evidence was accepted (§6.6).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct AttestationResult {
    #[cfg_attr(feature = "serde", serde(with = "hex_bytes"))]
    pub session_id: [u8; SESSION_ID_LEN],
    /// Seconds until the guest must attest again.
    #[cfg_attr(feature = "serde", serde(rename = "reattest-after"))]
    pub reattest_after_s: u32,
}

impl Body for AttestationResult {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "attestation-result")?;
        let session_id = f.required(0, "session-id")?.byte_array("session-id")?;
        let reattest_after_s = read_u32(
            f.required(1, "reattest-after")?,
            "reattest-after",
            MIN_REATTEST_AFTER_S,
            MAX_REATTEST_AFTER_S,
        )?;
        f.finish()?;
        Ok(Self {
            session_id,
            reattest_after_s,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(2);
        w.uint(0);
        w.bytes(&self.session_id);
        w.uint(1);
        w.uint(self.reattest_after_s.into());
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if !(MIN_REATTEST_AFTER_S..=MAX_REATTEST_AFTER_S).contains(&self.reattest_after_s) {
            return Err(DecodeError::InvalidValue {
                field: "reattest-after",
                rule: "out of range",
            });
        }
        Ok(())
    }
}
