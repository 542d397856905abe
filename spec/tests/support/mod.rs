//! Validates one encoded message against `spec/vkx.cddl` with the cddl
//! crate, working around the one thing that crate cannot do.
//!
//! vkx.cddl has table maps whose key type is a range rule: `features`
//! (`* feature-id => ...`) and the PCR digest maps of `pcr-bank-values`
//! (`1*24 pcr-index => ...`). The cddl crate (0.10.7) validates a table map
//! only when its key type is a prelude type such as `uint`: given any other
//! key type it validates the whole map against the value type, and so
//! rejects every valid message. Validation therefore takes two steps, both
//! done by the crate against rules of vkx.cddl:
//!
//! 1. the whole message, against vkx.cddl with the key type of exactly
//!    those table entries written `uint` ([`TABLE_KEYS`]);
//! 2. the keys of each such map in the message, against the key rule
//!    (`[* feature-id]`, `[* pcr-index]`).
//!
//! The two steps together check what vkx.cddl says, no less: step 2 is
//! what rejects a feature id 0 or 65536, or a PCR index 24 as a key.
//! [`validator_schema`] refuses a vkx.cddl with a table of any other
//! non-prelude key type ([`assert_table_keys_are_prelude`]), so a new one
//! cannot slip past step 2 unchecked.

#![allow(dead_code)] // Each test binary uses a different part of it.

use ciborium::Value;

/// The table entries of vkx.cddl whose key type is a rule, as written
/// there, with the number of times each occurs.
const TABLE_KEYS: &[(&str, &str, usize)] = &[
    ("* feature-id =>", "feature-id", 1),
    ("1*24 pcr-index =>", "pcr-index", 4),
];

/// Key types a table entry may use as they are (the crate handles them).
const PRELUDE_KEYS: &[&str] = &["uint", "int", "tstr", "text", "any"];

/// vkx.cddl with the key type of each [`TABLE_KEYS`] entry written `uint`.
pub(crate) fn validator_schema() -> String {
    let cddl = vkx_spec::CDDL;
    let mut schema = cddl.to_owned();
    for (entry, rule, count) in TABLE_KEYS {
        assert_eq!(
            cddl.matches(entry).count(),
            *count,
            "vkx.cddl: expected {count} table entries `{entry}`"
        );
        schema = schema.replace(entry, &entry.replace(rule, "uint"));
    }
    assert_table_keys_are_prelude(&schema);
    schema
}

/// Panics unless every table entry (`* key =>`, `1*24 key =>`, `+ key =>`)
/// of `schema` has a literal key or a key type of [`PRELUDE_KEYS`].
pub(crate) fn assert_table_keys_are_prelude(schema: &str) {
    for line in schema.lines() {
        let code = line.split(';').next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("=>") {
            let before = rest[..at].trim_end();
            let key = before
                .rsplit(|c: char| c.is_whitespace() || c == '{' || c == '(' || c == ',')
                .next()
                .unwrap_or("");
            let occurrence = before[..before.len() - key.len()]
                .trim_end()
                .rsplit(|c: char| c.is_whitespace() || c == '{' || c == '(' || c == ',')
                .next()
                .unwrap_or("");
            let is_table = occurrence.contains('*') || occurrence == "+";
            let is_value = key.chars().all(|c| c.is_ascii_digit());
            assert!(
                !is_table || is_value || PRELUDE_KEYS.contains(&key),
                "vkx.cddl: table key type `{key}` in `{}` is neither a prelude type nor in TABLE_KEYS",
                line.trim()
            );
            rest = &rest[at + 2..];
        }
    }
}

/// Validates `cbor`, one message, against vkx.cddl (steps 1 and 2 above).
pub(crate) fn validate(cbor: &[u8]) -> Result<(), String> {
    cddl::validate_cbor_from_slice(&validator_schema(), cbor, None)
        .map_err(|e| format!("message: {e}"))?;
    let msg: Value = ciborium::from_reader(cbor).map_err(|e| format!("not CBOR: {e}"))?;
    let mut feature_ids = Vec::new();
    let mut pcr_indices = Vec::new();
    // Step 1 has proven the shape, so every lookup below finds its item.
    let (kind, body) = envelope(&msg);
    match kind {
        2 => feature_ids.extend(map_keys(entry(body, 5))),
        15 => feature_ids.extend(map_keys(entry(body, 0))),
        3 => {
            for bank in entry(body, 4).as_array().into_iter().flatten() {
                pcr_indices.extend(map_keys(entry(bank, 1)));
            }
        }
        _ => {}
    }
    validate_keys("feature-id", feature_ids)?;
    validate_keys("pcr-index", pcr_indices)
}

/// Validates `keys` against `[* rule]`, with `rule` from vkx.cddl.
fn validate_keys(rule: &str, keys: Vec<Value>) -> Result<(), String> {
    if keys.is_empty() {
        return Ok(());
    }
    let schema = format!("vkx-table-keys = [* {rule}]\n{}", vkx_spec::CDDL);
    let mut bytes = Vec::new();
    ciborium::into_writer(&Value::Array(keys), &mut bytes).map_err(|e| e.to_string())?;
    cddl::validate_cbor_from_slice(&schema, &bytes, None).map_err(|e| format!("{rule} keys: {e}"))
}

fn envelope(msg: &Value) -> (u64, &Value) {
    match msg.as_array().map(Vec::as_slice) {
        Some([Value::Integer(kind), body]) => (u64::try_from(*kind).unwrap_or(0), body),
        _ => (0, msg),
    }
}

fn entry(map: &Value, key: u64) -> &Value {
    static NULL: Value = Value::Null;
    map.as_map()
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| k.as_integer().and_then(|i| u64::try_from(i).ok()) == Some(key))
        })
        .map_or(&NULL, |(_, v)| v)
}

fn map_keys(map: &Value) -> Vec<Value> {
    map.as_map()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect()
}
