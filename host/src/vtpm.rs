//! vTPM provisioning: the node's vTPM CA, and the EK, AK and AK certificate
//! a VM's vTPM gets before the VM first boots.
//!
//! What it trusts: the TPM behind the TCTI is the vTPM this host just
//! created for the VM (swtpm state the host owns, before the guest runs),
//! with empty owner auth, and empty endorsement and lockout auth unless
//! this code set them (their values are then in [`crate::vtpm_auth`]). It
//! does not trust what it finds already in the vTPM: an existing AK or EK
//! must be exactly the key this code derives, and must not be recorded for
//! another VM.
//!
//! Who may use the AK (PROTOCOL.md §7.6, §15.7). The AK is created with a
//! random authValue that only the host and the guest agent know (the
//! agent's `ak_auth_file`), so a process in the guest that can open the
//! TPM but not that file cannot quote with it. Two more settings keep that
//! true: the endorsement hierarchy gets an authValue the host keeps (or
//! anyone could derive the same primary AK again, under an authValue of
//! their own), and the lockout hierarchy too, with `disableClear` set under
//! it (TPM2_Clear would reset the endorsement auth, and the counters rewind
//! detection compares, §15.8). The owner hierarchy stays open: the guest's
//! own TPM users need it, and the AK certificate's NV index is read under
//! it; what the owner can do to the AK (evict it, disable the endorsement
//! hierarchy until the next boot) denies service and proves nothing.
//! The AK has noDA: its authValue is 256 random bits, which no dictionary
//! attack guesses, and without noDA any process that can open the TPM
//! could lock the agent out (a few wrong tries put DA-protected objects in
//! lockout, on swtpm after 3). noDA is part of the template, so it changed
//! the AK (its name, the registry's `ak_public`/`ak_name`, the
//! certificate). A vTPM provisioned before (the AK without noDA and with an
//! empty authValue, hierarchies open) keeps working, with neither
//! protection, until provisioning runs again while the VM is stopped: the
//! run recognises the old AK (it derives the old template too), evicts
//! it, persists the new one, closes the hierarchies, and rewrites the
//! certificate and the registry entry ([`ProvisionAction::AkReplaced`]).
//!
//! AK design. The AK is a *primary* key in the endorsement hierarchy, made
//! from a fixed template (restricted, sign-only, fixedTPM, fixedParent,
//! sensitiveDataOrigin; ECC P-256/ECDSA-SHA256 or RSA-2048/RSASSA-SHA256).
//! Primaries are derived from the hierarchy seed (the EPS) and the
//! template, so re-deriving it on a re-run yields the same key: that is how
//! a re-run recognises "our" AK, also after a crash before the registry
//! write. Credential activation (TPM2_ActivateCredential against the EK)
//! proves to a *remote* verifier that an AK lives in the same TPM as a
//! certified EK; here the verifier is the host that created the vTPM and
//! talked to it over a channel it controls before any guest code ran, so
//! that proof adds nothing: the host records the AK it saw created, and the
//! restricted attribute guarantees the AK signs only TPM-generated
//! attestation data (quotes), never a digest a guest chose.
//!
//! NV layout: index [`AK_CERT_NV_INDEX`] (ordinary, owner read/write, size
//! = certificate length) holds the DER AK certificate; written in chunks of
//! at most [`MAX_NV_CHUNK`] bytes (or the TPM's NV buffer size, if less).
//!
//! Bounds: the certificate is at most [`MAX_AK_CERT_NV`] bytes; the CA key
//! file at most [`MAX_CA_FILE`] bytes is read.
//!
//! Here: the provisioning run and its decisions. The node's CA (its files,
//! the AK certificate it issues) is `ca`; the TPM calls (context,
//! templates, primaries, persistent handles, the NV index) are `tpm`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tss_esapi::constants::PropertyTag;
use tss_esapi::handles::{AuthHandle, ObjectHandle};
use tss_esapi::structures::Auth;
use tss_esapi::{Context, Error as TssError};
use vkx_common::tpm::{AK_PERSISTENT_HANDLE, MAX_AK_CERT_NV};

use crate::fsutil::FsError;
use crate::registry::{self, EkAlg, Registry, RegistryEntry, RegistryError};
use crate::vtpm_auth::{AUTH_LEN, AuthStore, AuthStoreError, VtpmAuth};
use vkx_common::tss::{describe, retry_transient};

mod ca;
mod tpm;

use ca::NodeCa;
pub use ca::{CA_CERT_DER_FILE, CA_CERT_PEM_FILE, CA_KEY_FILE, MAX_CA_FILE, ca_init};
pub(crate) use ca::{random_serial, set_validity};
use tpm::{
    DerivedKey, authorized, create_primary, ek_template, evict_persistent, legacy_ak_name,
    marshal_tpm2b_public, persist, read_nv_cert, read_persistent_name, write_nv_cert,
};
pub use tpm::{MAX_NV_CHUNK, ak_template, ek_persistent_handle, legacy_ak_template, open_context};

/// Errors of CA set-up and provisioning, by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VtpmError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("vTPM authorisation values: {0}")]
    AuthStore(#[from] AuthStoreError),
    #[error(
        "this vTPM's endorsement or lockout hierarchy has an authorisation value, but the host holds none for vm {vm_id} (in {}): it was set up by something else, or the host's copy was lost; provision a fresh vTPM",
        dir.display()
    )]
    HierarchyAuthUnknown { vm_id: String, dir: PathBuf },
    #[error("a vTPM CA already exists in {}: it signed every AK certificate of this node; remove it deliberately if you mean to start over", dir.display())]
    CaExists { dir: PathBuf },
    #[error("no vTPM CA in {}: {source} (create one with `vkx-host vtpm ca-init --dir {}`)", dir.display(), dir.display())]
    CaMissing { dir: PathBuf, source: FsError },
    #[error("vTPM CA in {} is unusable: {reason}", dir.display())]
    CaInvalid { dir: PathBuf, reason: String },
    #[error("writing the vTPM CA: {0}")]
    CaWrite(#[source] FsError),
    #[error(
        "invalid TCTI {tcti:?}: {detail} (examples: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`)"
    )]
    InvalidTcti { tcti: String, detail: String },
    #[error(
        "cannot open the TPM at {tcti:?}: {detail} (is swtpm running / does the device exist?)"
    )]
    TpmUnavailable { tcti: String, detail: String },
    #[error("TPM command {op} failed: {detail}")]
    Tpm { op: &'static str, detail: String },
    #[error(
        "this vTPM's AK (persistent handle {AK_PERSISTENT_HANDLE:#010x}) is recorded for vm {other_vm}, not {vm_id}: provision a fresh vTPM for {vm_id}, never reuse another VM's vTPM state"
    )]
    AkOfOtherVm { vm_id: String, other_vm: String },
    #[error(
        "the registry already has vm {vm_id} with a different AK (name {recorded_ak_name}, ek {recorded_ek_alg}): this is another vTPM, or a re-run with a different --ek; remove the registry entry only if the VM's old vTPM was destroyed"
    )]
    VmOnOtherVtpm {
        vm_id: String,
        recorded_ak_name: String,
        recorded_ek_alg: &'static str,
    },
    #[error(
        "persistent handle {handle:#010x} holds a key that vkx provisioning did not make ({what}): this vTPM was set up by something else; evict it (`tpm2_evictcontrol -C o -c {handle:#010x}`) only if you are sure it is unused"
    )]
    ForeignObject { handle: u32, what: &'static str },
    #[error("AK certificate of {len} bytes is larger than the NV limit of {MAX_AK_CERT_NV} bytes")]
    CertTooLarge { len: usize },
    #[error("issuing the AK certificate failed: {reason}")]
    CertIssue { reason: String },
}

fn tpm_err(op: &'static str) -> impl FnOnce(TssError) -> VtpmError {
    move |e| VtpmError::Tpm {
        op,
        detail: describe(&e),
    }
}

// ------------------------------------------------------------ provision

/// What `provision` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionAction {
    /// EK, AK, certificate and registry entry were created.
    Created,
    /// Everything was already in place and matched the registry.
    AlreadyProvisioned,
    /// The AK matched the registry but the NV certificate was missing or
    /// different: a fresh certificate was written.
    CertificateRewritten,
    /// The vTPM held the AK of the old template (no noDA, no authValue):
    /// it was replaced, with a new certificate and registry entry.
    AkReplaced,
}

/// The result of `provision`, with timings of the TPM work.
#[derive(Debug, Clone)]
pub struct ProvisionOutcome {
    pub action: ProvisionAction,
    /// The AK authValue, hex, for the guest's `ak_auth_file` (mode 0600).
    pub ak_auth_file: PathBuf,
    /// This run set the AK's authValue, the endorsement and lockout auth
    /// or disableClear (a new vTPM, or one provisioned before they were).
    pub hardened_now: bool,
    pub ak_name: Vec<u8>,
    pub ek_create: Duration,
    pub ak_create: Duration,
}

/// Provisions the vTPM at `tcti` for `vm_id`: EK and AK persistent, AK
/// certificate in NV, registry entry written. Idempotent; see the module
/// documentation for what it refuses.
pub fn provision(
    tcti: &str,
    vm_id: &str,
    registry_dir: &Path,
    ca_dir: &Path,
    ek_alg: EkAlg,
) -> Result<ProvisionOutcome, VtpmError> {
    let vm = registry::validate_vm_id(vm_id)?;
    let vm_id = vm.as_str();
    let registry = Registry::open(registry_dir)?;
    let ca = NodeCa::load(ca_dir)?;
    let store = AuthStore::new(registry_dir);
    let mut ctx = open_context(tcti)?;

    // The authorisation values: the host's, or new ones for a vTPM whose
    // hierarchies are still open.
    let hardening = Hardening::read(&mut ctx)?;
    let (auth, auth_is_new) = match store.load(vm_id)? {
        Some(auth) => (auth, false),
        None if hardening.endorsement_auth || hardening.lockout_auth => {
            // Most likely another VM's vTPM: say so if the registry knows.
            if let Some(name) = read_persistent_name(&mut ctx, AK_PERSISTENT_HANDLE)?
                && let Some(other) = registry.by_ak_name(&name)?
                && other.vm_id != vm_id
            {
                return Err(VtpmError::AkOfOtherVm {
                    vm_id: vm_id.into(),
                    other_vm: other.vm_id,
                });
            }
            return Err(VtpmError::HierarchyAuthUnknown {
                vm_id: vm_id.into(),
                dir: store.dir().to_path_buf(),
            });
        }
        None => (VtpmAuth::generate()?, true),
    };
    if hardening.endorsement_auth {
        set_hierarchy_auth(&mut ctx, ObjectHandle::Endorsement, &auth.endorsement)?;
    }
    if hardening.lockout_auth {
        set_hierarchy_auth(&mut ctx, ObjectHandle::Lockout, &auth.lockout)?;
    }

    // Derive both keys; nothing is changed in the TPM before every check
    // has passed.
    let started = Instant::now();
    let ek = create_primary(&mut ctx, ek_template(ek_alg)?, None, "CreatePrimary (EK)")?;
    let ek_create = started.elapsed();
    let started = Instant::now();
    let ak = create_primary(
        &mut ctx,
        ak_template(ek_alg)?,
        Some(auth_value(&auth.ak)?),
        "CreatePrimary (AK)",
    )?;
    let ak_create = started.elapsed();
    let keys = Keys {
        ek_alg,
        ek: &ek,
        ak: &ak,
    };
    let auth = NewAuth {
        store: &store,
        auth: &auth,
        is_new: auth_is_new,
        hardening,
    };
    let result = provision_with_keys(&mut ctx, &registry, &ca, vm_id, &keys, &auth);
    // Persisting made copies; the transient objects go either way.
    let _ = ctx.flush_context(ObjectHandle::from(ek.handle));
    let _ = ctx.flush_context(ObjectHandle::from(ak.handle));
    let (action, ak_auth_file) = result?;
    Ok(ProvisionOutcome {
        action,
        ak_auth_file,
        hardened_now: !hardening.complete(),
        ak_name: ak.name,
        ek_create,
        ak_create,
    })
}

/// TPMA_PERMANENT bits (TPM 2.0 Part 2, 8.6), read with TPM_PT_PERMANENT.
const PERMANENT_ENDORSEMENT_AUTH_SET: u32 = 1 << 1;
const PERMANENT_LOCKOUT_AUTH_SET: u32 = 1 << 2;
const PERMANENT_DISABLE_CLEAR: u32 = 1 << 8;

/// What of the hardening a vTPM already has.
#[derive(Debug, Clone, Copy)]
struct Hardening {
    endorsement_auth: bool,
    lockout_auth: bool,
    disable_clear: bool,
}

impl Hardening {
    fn read(ctx: &mut Context) -> Result<Self, VtpmError> {
        let bits = retry_transient(|| ctx.get_tpm_property(PropertyTag::Permanent))
            .map_err(tpm_err("GetCapability (TPM_PT_PERMANENT)"))?
            .ok_or_else(|| VtpmError::Tpm {
                op: "GetCapability (TPM_PT_PERMANENT)",
                detail: "the TPM did not report TPM_PT_PERMANENT".into(),
            })?;
        Ok(Self {
            endorsement_auth: bits & PERMANENT_ENDORSEMENT_AUTH_SET != 0,
            lockout_auth: bits & PERMANENT_LOCKOUT_AUTH_SET != 0,
            disable_clear: bits & PERMANENT_DISABLE_CLEAR != 0,
        })
    }

    /// Set in the order [`harden`] sets them, after the AK was persisted
    /// with its authValue: all three set means the AK has it too.
    fn complete(self) -> bool {
        self.endorsement_auth && self.lockout_auth && self.disable_clear
    }
}

fn auth_value(value: &[u8; AUTH_LEN]) -> Result<Auth, VtpmError> {
    Auth::try_from(value.to_vec()).map_err(tpm_err("authValue"))
}

fn set_hierarchy_auth(
    ctx: &mut Context,
    hierarchy: ObjectHandle,
    value: &[u8; AUTH_LEN],
) -> Result<(), VtpmError> {
    let auth = auth_value(value)?;
    ctx.tr_set_auth(hierarchy, auth)
        .map_err(tpm_err("Esys_TR_SetAuth"))
}

/// Sets what is missing, in this order: endorsement auth, lockout auth,
/// disableClear (under the lockout auth).
fn harden(ctx: &mut Context, auth: &VtpmAuth, was: Hardening) -> Result<(), VtpmError> {
    if !was.endorsement_auth {
        let new = auth_value(&auth.endorsement)?;
        authorized(ctx, |ctx| {
            ctx.hierarchy_change_auth(AuthHandle::Endorsement, new.clone())
        })
        .map_err(tpm_err("HierarchyChangeAuth (endorsement)"))?;
        set_hierarchy_auth(ctx, ObjectHandle::Endorsement, &auth.endorsement)?;
    }
    if !was.lockout_auth {
        let new = auth_value(&auth.lockout)?;
        authorized(ctx, |ctx| {
            ctx.hierarchy_change_auth(AuthHandle::Lockout, new.clone())
        })
        .map_err(tpm_err("HierarchyChangeAuth (lockout)"))?;
        set_hierarchy_auth(ctx, ObjectHandle::Lockout, &auth.lockout)?;
    }
    if !was.disable_clear {
        authorized(ctx, |ctx| ctx.clear_control(AuthHandle::Lockout, true))
            .map_err(tpm_err("ClearControl (disableClear)"))?;
    }
    Ok(())
}

/// The keys derived for this run.
struct Keys<'a> {
    ek_alg: EkAlg,
    ek: &'a DerivedKey,
    ak: &'a DerivedKey,
}

/// The authorisation values of this run and what the vTPM already has.
struct NewAuth<'a> {
    store: &'a AuthStore,
    auth: &'a VtpmAuth,
    /// Generated by this run: not yet in the store.
    is_new: bool,
    hardening: Hardening,
}

fn provision_with_keys(
    ctx: &mut Context,
    registry: &Registry,
    ca: &NodeCa,
    vm_id: &str,
    keys: &Keys<'_>,
    auth: &NewAuth<'_>,
) -> Result<(ProvisionAction, PathBuf), VtpmError> {
    let Keys { ek_alg, ek, ak } = *keys;
    let ak_name_hex = hex::encode(&ak.name);
    // 1. The registry: this AK must not be another VM's, and this VM must
    //    not already have another AK.
    if let Some(other) = registry.by_ak_name(&ak.name)?
        && other.vm_id != vm_id
    {
        return Err(VtpmError::AkOfOtherVm {
            vm_id: vm_id.into(),
            other_vm: other.vm_id,
        });
    }
    let recorded = registry.by_vm_id(vm_id)?;
    // The old template's AK of this vTPM, derived only when needed.
    let mut legacy = None;
    if let Some(r) = &recorded
        && !r.ak_name.eq_ignore_ascii_case(&ak_name_hex)
        && !r
            .ak_name
            .eq_ignore_ascii_case(&hex::encode(legacy_ak_name(ctx, ek_alg, &mut legacy)?))
    {
        return Err(VtpmError::VmOnOtherVtpm {
            vm_id: vm_id.into(),
            recorded_ak_name: r.ak_name.clone(),
            recorded_ek_alg: r.ek_alg.as_str(),
        });
    }
    // 2. What the vTPM already holds at the persistent handles.
    let persisted_ak = read_persistent_name(ctx, AK_PERSISTENT_HANDLE)?;
    if let Some(name) = &persisted_ak
        && *name != ak.name
        && *name == legacy_ak_name(ctx, ek_alg, &mut legacy)?
    {
        // The old template's AK: replaced below, unless another VM's.
        if let Some(other) = registry.by_ak_name(name)?
            && other.vm_id != vm_id
        {
            return Err(VtpmError::AkOfOtherVm {
                vm_id: vm_id.into(),
                other_vm: other.vm_id,
            });
        }
    } else if let Some(name) = &persisted_ak
        && *name != ak.name
    {
        // Maybe a vkx AK of the other algorithm, recorded for a VM.
        if let Some(other) = registry.by_ak_name(name)? {
            if other.vm_id != vm_id {
                return Err(VtpmError::AkOfOtherVm {
                    vm_id: vm_id.into(),
                    other_vm: other.vm_id,
                });
            }
            return Err(VtpmError::VmOnOtherVtpm {
                vm_id: vm_id.into(),
                recorded_ak_name: other.ak_name,
                recorded_ek_alg: other.ek_alg.as_str(),
            });
        }
        return Err(VtpmError::ForeignObject {
            handle: AK_PERSISTENT_HANDLE,
            what: "not the vkx AK of this vTPM",
        });
    }
    let ek_handle = ek_persistent_handle(ek_alg);
    let persisted_ek = read_persistent_name(ctx, ek_handle)?;
    if let Some(name) = &persisted_ek
        && *name != ek.name
    {
        return Err(VtpmError::ForeignObject {
            handle: ek_handle,
            what: "not the TCG default-template EK of this vTPM",
        });
    }
    // 3. The authorisation values are on disk before the TPM holds them.
    if auth.is_new {
        auth.store.create(vm_id, auth.auth)?;
    }
    let ak_auth_file = auth.store.write_ak_auth(vm_id, auth.auth)?;
    // 4. Make keys persistent where missing. Until the hardening is
    //    complete, a persisted AK may be the old template's, or lack its
    //    authValue (an interrupted run): persist it again from the
    //    transient copy, made with the authValue.
    if persisted_ek.is_none() {
        persist(ctx, ek.handle, ek_handle, "EvictControl (EK)")?;
    }
    let ak_in_place =
        persisted_ak.as_deref() == Some(ak.name.as_slice()) && auth.hardening.complete();
    if persisted_ak.is_some() && !ak_in_place {
        evict_persistent(ctx, AK_PERSISTENT_HANDLE, "EvictControl (evict old AK)")?;
    }
    if !ak_in_place {
        persist(ctx, ak.handle, AK_PERSISTENT_HANDLE, "EvictControl (AK)")?;
    }
    harden(ctx, auth.auth, auth.hardening)?;
    let action = certificate_and_entry(ctx, ca, registry, recorded, vm_id, keys)?;
    Ok((action, ak_auth_file))
}

/// Step 5 of provisioning: the certificate in NV, and the registry entry.
fn certificate_and_entry(
    ctx: &mut Context,
    ca: &NodeCa,
    registry: &Registry,
    recorded: Option<RegistryEntry>,
    vm_id: &str,
    keys: &Keys<'_>,
) -> Result<ProvisionAction, VtpmError> {
    let Keys { ek_alg, ek, ak } = *keys;
    let ak_name_hex = hex::encode(&ak.name);
    // 5. The certificate in NV, and the registry entry.
    let stored_cert = read_nv_cert(ctx)?;
    if let Some(r) = &recorded
        && !r.ak_name.eq_ignore_ascii_case(&ak_name_hex)
    {
        // Recorded with the old template's AK (step 1 checked it is this
        // vTPM's): the new AK, its certificate, the same VM.
        let cert = ca.issue_ak_cert(vm_id, &ak.public)?;
        write_nv_cert(ctx, &cert, stored_cert.is_some())?;
        let entry = RegistryEntry {
            ak_public: hex::encode(marshal_tpm2b_public(&ak.public)?),
            ak_name: ak_name_hex,
            ak_cert_sha256: sha256_hex(&cert),
            ..r.clone()
        };
        registry.replace(&entry)?;
        return Ok(ProvisionAction::AkReplaced);
    }
    if let Some(r) = recorded {
        let matches = stored_cert.as_deref().is_some_and(|c| {
            hex::encode(ring::digest::digest(&ring::digest::SHA256, c)) == r.ak_cert_sha256
        });
        if matches {
            return Ok(ProvisionAction::AlreadyProvisioned);
        }
        let cert = ca.issue_ak_cert(vm_id, &ak.public)?;
        write_nv_cert(ctx, &cert, stored_cert.is_some())?;
        let entry = RegistryEntry {
            ak_cert_sha256: sha256_hex(&cert),
            ..r
        };
        registry.replace(&entry)?;
        return Ok(ProvisionAction::CertificateRewritten);
    }
    let cert = ca.issue_ak_cert(vm_id, &ak.public)?;
    write_nv_cert(ctx, &cert, stored_cert.is_some())?;
    let entry = RegistryEntry {
        vm_id: vm_id.into(),
        ek_alg,
        ek_public: hex::encode(marshal_tpm2b_public(&ek.public)?),
        ak_public: hex::encode(marshal_tpm2b_public(&ak.public)?),
        ak_name: ak_name_hex,
        ak_cert_sha256: sha256_hex(&cert),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        last_quote: None,
    };
    registry.insert(&entry)?;
    Ok(ProvisionAction::Created)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

#[cfg(test)]
mod tests;
