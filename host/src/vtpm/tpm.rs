//! The TPM side of provisioning: opening a context, the EK and AK
//! templates, primaries derived in the endorsement hierarchy, persistent
//! handles, and the AK certificate's NV index (read, and written in
//! chunks of at most [`MAX_NV_CHUNK`] bytes). Every call goes through
//! tss-esapi, retried when transient, with errors described for the
//! operator ([`VtpmError::Tpm`]).

use std::str::FromStr;

use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
use tss_esapi::abstraction::ek::create_ek_public_from_default_template_2;
use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder};
use tss_esapi::constants::PropertyTag;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{
    KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, MaxNvBuffer,
    NvPublicBuilder, Public, PublicBuffer, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, Error as TssError};
use vkx_common::tpm::{
    AK_CERT_NV_INDEX, EK_ECC_PERSISTENT_HANDLE, EK_RSA_PERSISTENT_HANDLE, MAX_AK_CERT_NV,
};

use crate::registry::EkAlg;
use vkx_common::tss::{TssFault, classify, describe, handle_exists, retry_transient};

use super::{VtpmError, tpm_err};

/// NV writes go in chunks of at most this size: TPM2_NV_Write takes one
/// TPM2B_MAX_NV_BUFFER, which PC-client TPMs size at 512..1024 bytes.
pub const MAX_NV_CHUNK: usize = 512;

pub(super) struct DerivedKey {
    pub(super) handle: KeyHandle,
    pub(super) public: Public,
    pub(super) name: Vec<u8>,
}

pub fn ek_persistent_handle(alg: EkAlg) -> u32 {
    match alg {
        EkAlg::Ecc => EK_ECC_PERSISTENT_HANDLE,
        EkAlg::Rsa => EK_RSA_PERSISTENT_HANDLE,
    }
}

/// Opens a TPM context for a TCTI string such as `device:/dev/tpmrm0` or
/// `swtpm:host=127.0.0.1,port=2321`.
pub fn open_context(tcti: &str) -> Result<Context, VtpmError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| VtpmError::InvalidTcti {
        tcti: tcti.into(),
        detail: e.to_string(),
    })?;
    Context::new(conf).map_err(|e| VtpmError::TpmUnavailable {
        tcti: tcti.into(),
        detail: describe(&e),
    })
}

/// The TCG EK Credential Profile default template (low range: RSA-2048
/// or ECC P-256), as `tpm2_createek` uses it.
pub(super) fn ek_template(alg: EkAlg) -> Result<Public, VtpmError> {
    let selection = match alg {
        EkAlg::Ecc => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        EkAlg::Rsa => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
    };
    create_ek_public_from_default_template_2(selection, None).map_err(tpm_err("EK template"))
}

/// The AK template: a restricted signing key that can only sign
/// TPM-generated data, bound to this TPM, exempt from dictionary-attack
/// lockout (see the module documentation).
pub fn ak_template(alg: EkAlg) -> Result<Public, VtpmError> {
    ak_template_with(alg, true)
}

/// The AK template of vTPMs provisioned before the AK had an authValue:
/// the same without noDA. Provisioning derives it only to recognise such
/// an AK and replace it.
pub fn legacy_ak_template(alg: EkAlg) -> Result<Public, VtpmError> {
    ak_template_with(alg, false)
}

fn ak_template_with(alg: EkAlg, no_da: bool) -> Result<Public, VtpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(no_da)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()
        .map_err(tpm_err("AK template"))?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    let public = match alg {
        EkAlg::Ecc => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .with_is_decryption_key(false)
                    .with_restricted(true)
                    .build()
                    .map_err(tpm_err("AK template"))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build(),
        EkAlg::Rsa => builder
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_scheme(RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_key_bits(RsaKeyBits::Rsa2048)
                    .with_exponent(RsaExponent::default())
                    .with_is_signing_key(true)
                    .with_is_decryption_key(false)
                    .with_restricted(true)
                    .build()
                    .map_err(tpm_err("AK template"))?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build(),
    };
    public.map_err(tpm_err("AK template"))
}

pub(super) fn create_primary(
    ctx: &mut Context,
    template: Public,
    auth_value: Option<Auth>,
    op: &'static str,
) -> Result<DerivedKey, VtpmError> {
    let created = authorized(ctx, |ctx| {
        ctx.create_primary(
            Hierarchy::Endorsement,
            template.clone(),
            auth_value.clone(),
            None,
            None,
            None,
        )
    })
    .map_err(tpm_err(op))?;
    let (public, name, _) =
        retry_transient(|| ctx.read_public(created.key_handle)).map_err(tpm_err("ReadPublic"))?;
    Ok(DerivedKey {
        handle: created.key_handle,
        public,
        name: name.value().to_vec(),
    })
}

/// The name of the AK the old template (no noDA) gives in this vTPM,
/// derived once per run and kept in `cache`.
pub(super) fn legacy_ak_name<'a>(
    ctx: &mut Context,
    alg: EkAlg,
    cache: &'a mut Option<Vec<u8>>,
) -> Result<&'a [u8], VtpmError> {
    if cache.is_none() {
        let old = create_primary(
            ctx,
            legacy_ak_template(alg)?,
            None,
            "CreatePrimary (old AK template)",
        )?;
        let _ = ctx.flush_context(ObjectHandle::from(old.handle));
        *cache = Some(old.name);
    }
    Ok(cache.as_deref().unwrap_or_default())
}

/// The TPM name of the object at a persistent handle, or `None` if the
/// handle is empty.
pub(super) fn read_persistent_name(
    ctx: &mut Context,
    handle: u32,
) -> Result<Option<Vec<u8>>, VtpmError> {
    let tpm_handle = PersistentTpmHandle::new(handle).map_err(tpm_err("persistent handle"))?;
    if !handle_exists(ctx, handle).map_err(tpm_err("GetCapability (handles)"))? {
        return Ok(None);
    }
    let object = match retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)))
    {
        Ok(o) => o,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(e) => return Err(tpm_err("ReadPublic (persistent)")(e)),
    };
    let read = retry_transient(|| ctx.read_public(KeyHandle::from(object)));
    let mut object = object;
    let _ = ctx.tr_close(&mut object);
    let (_, name, _) = read.map_err(tpm_err("ReadPublic (persistent)"))?;
    Ok(Some(name.value().to_vec()))
}

/// TPM_RC_HANDLE (or TPM_RC_VALUE for an NV index): nothing is there.
fn is_absent(e: &TssError) -> bool {
    matches!(
        classify(e),
        TssFault::Tpm(Tss2ResponseCodeKind::Handle | Tss2ResponseCodeKind::Value)
    )
}

/// Runs a command that needs hierarchy authorization (a password session
/// with the value set on the hierarchy's ESYS_TR: empty for the owner),
/// with the bounded retry of transient TPM refusals.
pub(super) fn authorized<T>(
    ctx: &mut Context,
    mut command: impl FnMut(&mut Context) -> tss_esapi::Result<T>,
) -> tss_esapi::Result<T> {
    retry_transient(|| ctx.execute_with_session(Some(AuthSession::Password), &mut command))
}

pub(super) fn persist(
    ctx: &mut Context,
    key: KeyHandle,
    handle: u32,
    op: &'static str,
) -> Result<(), VtpmError> {
    let persistent = PersistentTpmHandle::new(handle).map_err(tpm_err(op))?;
    authorized(ctx, |ctx| {
        ctx.evict_control(
            Provision::Owner,
            ObjectHandle::from(key),
            Persistent::Persistent(persistent),
        )
    })
    .map_err(tpm_err(op))?;
    Ok(())
}

/// Removes the persistent object at `handle` (owner authorization).
pub(super) fn evict_persistent(
    ctx: &mut Context,
    handle: u32,
    op: &'static str,
) -> Result<(), VtpmError> {
    let persistent = PersistentTpmHandle::new(handle).map_err(tpm_err(op))?;
    let object = retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
        .map_err(tpm_err(op))?;
    authorized(ctx, |ctx| {
        ctx.evict_control(Provision::Owner, object, Persistent::Persistent(persistent))
    })
    .map_err(tpm_err(op))?;
    Ok(())
}

pub(super) fn marshal_tpm2b_public(public: &Public) -> Result<Vec<u8>, VtpmError> {
    PublicBuffer::try_from(public.clone())
        .and_then(|b| b.marshall())
        .map_err(tpm_err("marshal TPM2B_PUBLIC"))
}

fn nv_chunk_size(ctx: &mut Context) -> usize {
    ctx.get_tpm_property(PropertyTag::NvBufferMax)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
        .map_or(MAX_NV_CHUNK, |v| v.min(MAX_NV_CHUNK))
}

fn open_nv(ctx: &mut Context) -> Result<Option<NvIndexHandle>, VtpmError> {
    let index = NvIndexTpmHandle::new(AK_CERT_NV_INDEX).map_err(tpm_err("NV index"))?;
    if !handle_exists(ctx, AK_CERT_NV_INDEX).map_err(tpm_err("GetCapability (handles)"))? {
        return Ok(None);
    }
    match retry_transient(|| ctx.tr_from_tpm_public(TpmHandle::NvIndex(index))) {
        Ok(o) => Ok(Some(NvIndexHandle::from(o))),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(tpm_err("NV_ReadPublic")(e)),
    }
}

/// The certificate in NV, if the index exists (and is not over the limit).
pub(super) fn read_nv_cert(ctx: &mut Context) -> Result<Option<Vec<u8>>, VtpmError> {
    let Some(handle) = open_nv(ctx)? else {
        return Ok(None);
    };
    let (public, _) =
        retry_transient(|| ctx.nv_read_public(handle)).map_err(tpm_err("NV_ReadPublic"))?;
    let size = public.data_size();
    if size > MAX_AK_CERT_NV {
        // Not ours: it will be rewritten.
        return Ok(Some(Vec::new()));
    }
    let chunk = nv_chunk_size(ctx);
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let len = chunk.min(size - out.len());
        let (len16, off16) = (to_u16(len)?, to_u16(out.len())?);
        let data = authorized(ctx, |ctx| ctx.nv_read(NvAuth::Owner, handle, len16, off16))
            .map_err(tpm_err("NV_Read"))?;
        if data.is_empty() {
            break;
        }
        out.extend_from_slice(data.value());
    }
    Ok(Some(out))
}

fn to_u16(v: usize) -> Result<u16, VtpmError> {
    u16::try_from(v).map_err(|_| VtpmError::CertTooLarge { len: v })
}

/// (Re)defines the AK certificate index with the certificate's size and
/// writes it in chunks.
pub(super) fn write_nv_cert(ctx: &mut Context, cert: &[u8], exists: bool) -> Result<(), VtpmError> {
    if exists && let Some(handle) = open_nv(ctx)? {
        authorized(ctx, |ctx| ctx.nv_undefine_space(Provision::Owner, handle))
            .map_err(tpm_err("NV_UndefineSpace"))?;
    }
    let index = NvIndexTpmHandle::new(AK_CERT_NV_INDEX).map_err(tpm_err("NV index"))?;
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .map_err(tpm_err("NV attributes"))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(cert.len())
        .build()
        .map_err(tpm_err("NV public"))?;
    let handle = authorized(ctx, |ctx| {
        ctx.nv_define_space(Provision::Owner, None, public.clone())
    })
    .map_err(tpm_err("NV_DefineSpace"))?;
    let chunk = nv_chunk_size(ctx);
    for (i, part) in cert.chunks(chunk).enumerate() {
        let offset = to_u16(i * chunk)?;
        let data = MaxNvBuffer::try_from(part.to_vec()).map_err(tpm_err("NV buffer"))?;
        authorized(ctx, |ctx| {
            ctx.nv_write(NvAuth::Owner, handle, data.clone(), offset)
        })
        .map_err(tpm_err("NV_Write"))?;
    }
    Ok(())
}
