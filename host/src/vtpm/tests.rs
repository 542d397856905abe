//! Unit tests of the vTPM CA and templates (the TPM itself: `tests/tests/tpm_provision.rs`).

use std::fs;

use super::ca::der_rsa_public_key;
use super::*;

#[test]
fn rsa_public_key_der() {
    // modulus 0x80 0x01 needs a sign byte; exponent 65537.
    let der = der_rsa_public_key(&[0x00, 0x80, 0x01], 65_537);
    assert_eq!(
        der,
        [
            0x30, 0x0a, 0x02, 0x03, 0x00, 0x80, 0x01, 0x02, 0x03, 0x01, 0x00, 0x01
        ]
    );
    // A 256-byte modulus needs a long-form length.
    let der = der_rsa_public_key(&[0xff; 256], 3);
    assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x08]);
    assert_eq!(&der[4..8], &[0x02, 0x82, 0x01, 0x01]);
}

#[test]
fn ca_init_refuses_to_overwrite_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    ca_init(&ca_dir).unwrap();
    assert!(matches!(ca_init(&ca_dir), Err(VtpmError::CaExists { .. })));
    NodeCa::load(&ca_dir).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A key that does not match the certificate is refused.
    let other = tempfile::tempdir().unwrap();
    ca_init(other.path()).unwrap();
    fs::copy(other.path().join(CA_KEY_FILE), ca_dir.join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        NodeCa::load(&ca_dir),
        Err(VtpmError::CaInvalid { .. })
    ));
}

#[test]
fn ca_files_are_read_capped_and_must_be_regular() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // No CA: missing, with the file-system error that says where.
    assert!(matches!(
        NodeCa::load(&ca_dir),
        Err(VtpmError::CaMissing {
            source: FsError::Io { .. },
            ..
        })
    ));
    ca_init(&ca_dir).unwrap();
    // A certificate file over the cap is unusable, not read whole.
    let over = usize::try_from(MAX_CA_FILE).unwrap() + 1;
    fs::write(ca_dir.join(CA_CERT_DER_FILE), vec![0u8; over]).unwrap();
    assert!(matches!(
        NodeCa::load(&ca_dir),
        Err(VtpmError::CaInvalid { .. })
    ));
    // So is a directory where the key file should be.
    fs::remove_file(ca_dir.join(CA_KEY_FILE)).unwrap();
    fs::create_dir(ca_dir.join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        NodeCa::load(&ca_dir),
        Err(VtpmError::CaInvalid { .. })
    ));
}

#[test]
fn ca_write_failures_carry_the_file_system_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    // The CA directory cannot be made under a regular file.
    assert!(matches!(
        ca_init(&file.join("ca")),
        Err(VtpmError::CaWrite(FsError::Io { .. }))
    ));
}

#[test]
fn templates_build() {
    for alg in [EkAlg::Ecc, EkAlg::Rsa] {
        let ak = ak_template(alg).unwrap();
        assert!(ak.object_attributes().restricted());
        assert!(ak.object_attributes().no_da());
        assert_eq!(
            u32::from(ak.object_attributes()),
            crate::drill::softtpm::AK_ATTRIBUTES
        );
        let old = legacy_ak_template(alg).unwrap();
        assert!(!old.object_attributes().no_da());
        assert_eq!(
            u32::from(old.object_attributes()) | 0x400,
            u32::from(ak.object_attributes())
        );
        ek_template(alg).unwrap();
    }
}
