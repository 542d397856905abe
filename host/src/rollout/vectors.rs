//! The rollout test vectors of `spec/rollout-vectors/` (spec/ROLLOUT.md
//! §12): bucket values, resolution cases and admission cases.
//!
//! Two halves. [`check_every_vector_file`] reads every file of the
//! directory (an unknown file fails) and every field of every case (a
//! field nobody reads fails, after ring's `testutil`), and checks the
//! implementation against it. The generator builds the same files
//! deterministically (Ed25519 keys from fixed seeds written into the
//! file); its case table states each expected outcome by hand and the
//! generator asserts the code agrees before writing. Regenerate with
//! `VKX_WRITE_ROLLOUT_VECTORS=1 cargo test -p vkx-host --lib
//! rollout::vectors`; [`vectors_are_reproducible`] fails when the files
//! and the generator disagree.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ring::signature::Ed25519KeyPair;
use serde_json::{Map, Value, json};
use vkx_common::wire::VmId;

use super::admit::{Accepted, Admitted, admit};
use super::document::{Document, EXAMPLE, Feature};
use super::edit::{kill, set_stage, unkill};
use super::envelope::{TrustedKey, TrustedKeys, public_key_hex, sign, unsigned};
use super::local_override::Override;
use super::resolve::{BUCKET_DOMAIN, VmFacts, bucket, resolve, ring_of, state_name};

const BUCKET_FILE: &str = "bucket.json";
const RESOLVE_FILE: &str = "resolve.json";
const ADMIT_FILE: &str = "admit.json";
const OVERLAY_FILE: &str = "drill_overlay.json";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/rollout-vectors")
}

// ------------------------------------------------------ field tracking

/// A JSON object whose every field must be read before it is dropped.
struct Obj {
    name: String,
    map: Map<String, Value>,
    used: RefCell<BTreeSet<String>>,
}

impl Obj {
    fn new(name: impl Into<String>, value: Value) -> Self {
        let name = name.into();
        let Value::Object(map) = value else {
            panic!("{name}: not a JSON object");
        };
        Self {
            name,
            map,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    fn get(&self, key: &str) -> &Value {
        self.used.borrow_mut().insert(key.to_owned());
        self.map
            .get(key)
            .unwrap_or_else(|| panic!("{}: missing field {key}", self.name))
    }

    fn str(&self, key: &str) -> &str {
        self.get(key)
            .as_str()
            .unwrap_or_else(|| panic!("{}.{key}: not a string", self.name))
    }

    fn opt_str(&self, key: &str) -> Option<&str> {
        let v = self.get(key);
        if v.is_null() {
            None
        } else {
            Some(self.str(key))
        }
    }

    fn u64(&self, key: &str) -> u64 {
        self.get(key)
            .as_u64()
            .unwrap_or_else(|| panic!("{}.{key}: not an unsigned integer", self.name))
    }

    fn bool(&self, key: &str) -> bool {
        self.get(key)
            .as_bool()
            .unwrap_or_else(|| panic!("{}.{key}: not a boolean", self.name))
    }

    fn obj(&self, key: &str) -> Obj {
        Obj::new(format!("{}.{key}", self.name), self.get(key).clone())
    }

    fn list(&self, key: &str) -> Vec<Obj> {
        let Value::Array(items) = self.get(key) else {
            panic!("{}.{key}: not an array", self.name);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| Obj::new(format!("{}.{key}[{i}]", self.name), v.clone()))
            .collect()
    }

    fn strings(&self, key: &str) -> Vec<String> {
        let Value::Array(items) = self.get(key) else {
            panic!("{}.{key}: not an array", self.name);
        };
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("{}.{key}: not strings", self.name))
                    .to_owned()
            })
            .collect()
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let used = self.used.borrow();
        let unused: Vec<&String> = self.map.keys().filter(|k| !used.contains(*k)).collect();
        assert!(
            unused.is_empty(),
            "{}: fields never used: {unused:?}",
            self.name
        );
    }
}

// ------------------------------------------------------------ consumer

fn check_overlays(v: &Obj) {
    use super::drill_overlay::DrillOverlay;
    for c in v.list("valid") {
        let text = c.str("text");
        let o = DrillOverlay::parse(text.as_bytes())
            .unwrap_or_else(|e| panic!("{}: refused: {e}", c.name));
        assert_eq!(o.drill(), c.str("drill"), "{}", c.name);
        assert_eq!(o.feature().name(), c.str("feature"), "{}", c.name);
        assert_eq!(o.ring(), c.str("ring"), "{}", c.name);
        assert_eq!(o.started_unix(), c.u64("started_unix"), "{}", c.name);
        assert_eq!(o.expires_unix(), c.u64("expires_unix"), "{}", c.name);
        assert_eq!(o.to_bytes(), text.as_bytes(), "{}: canonical", c.name);
    }
    for c in v.list("invalid") {
        let why = c.str("why");
        assert!(
            DrillOverlay::parse(c.str("text").as_bytes()).is_err(),
            "{}: accepted ({why})",
            c.name
        );
    }
}

#[test]
fn check_every_vector_file() {
    let mut seen = BTreeSet::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let value: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let v = Obj::new(name.clone(), value);
        let _ = v.str("description");
        match name.as_str() {
            BUCKET_FILE => check_buckets(&v),
            RESOLVE_FILE => check_resolution(&v),
            ADMIT_FILE => check_admission(&v),
            OVERLAY_FILE => check_overlays(&v),
            other => panic!("spec/rollout-vectors/{other}: no test reads this file"),
        }
        seen.insert(name);
    }
    let want: BTreeSet<String> = [BUCKET_FILE, RESOLVE_FILE, ADMIT_FILE, OVERLAY_FILE]
        .map(str::to_owned)
        .into();
    assert_eq!(seen, want, "rollout vector files missing");
}

/// The descriptive JSON Schema states the same limits as the code.
#[test]
fn schema_limits_match_the_code() {
    use super::document::{MAX_RING_MEMBERS, MAX_RING_NAME, MAX_RINGS};
    let path = dir().join("../rollout.schema.json");
    let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let defs = &schema["$defs"];
    let max_rings = defs["document"]["properties"]["rings"]["maxItems"].as_u64();
    assert_eq!(max_rings, u64::try_from(MAX_RINGS).ok());
    let max_members = defs["nameList"]["maxItems"].as_u64();
    assert_eq!(max_members, u64::try_from(MAX_RING_MEMBERS).ok());
    assert_eq!(
        defs["ringName"]["pattern"].as_str(),
        Some(format!("^[a-z0-9._-]{{1,{MAX_RING_NAME}}}$").as_str())
    );
    assert_eq!(
        defs["ring"]["properties"]["buckets_below"]["maximum"].as_u64(),
        Some(u64::from(super::document::BUCKETS))
    );
}

fn check_buckets(v: &Obj) {
    assert_eq!(hex::decode(v.str("domain_hex")).unwrap(), BUCKET_DOMAIN);
    for case in v.list("cases") {
        let id = VmId::new(case.str("vm_id")).unwrap();
        let mut input = BUCKET_DOMAIN.to_vec();
        input.extend_from_slice(id.as_str().as_bytes());
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        assert_eq!(
            case.str("sha256"),
            hex::encode(digest.as_ref()),
            "{}",
            case.name
        );
        assert_eq!(u64::from(bucket(&id)), case.u64("bucket"), "{}", case.name);
    }
}

fn features_of(expected: &Obj) -> BTreeMap<u16, String> {
    Feature::ALL
        .into_iter()
        .map(|f| (f.id(), expected.str(f.name()).to_owned()))
        .collect()
}

fn ga_of(names: &[String]) -> BTreeSet<u16> {
    names
        .iter()
        .map(|n| Feature::from_name(n).unwrap().id())
        .collect()
}

fn check_resolution(v: &Obj) {
    for case in v.list("cases") {
        let _ = case.str("name");
        let doc = match case.get("document") {
            Value::Null => None,
            d => Some(Document::parse(&serde_json::to_vec(d).unwrap()).unwrap()),
        };
        let local = Override::parse(case.str("override")).unwrap();
        let ga = ga_of(&case.strings("ga"));
        let facts = case.obj("vm");
        let vm = VmFacts {
            vm_id: VmId::new(facts.str("vm_id")).unwrap(),
            image: facts.opt_str("image").map(str::to_owned),
            node: facts.str("node").to_owned(),
        };
        assert_eq!(
            u64::from(bucket(&vm.vm_id)),
            case.u64("bucket"),
            "{}",
            case.name
        );
        let ring = doc.as_ref().and_then(|d| ring_of(d, &vm)).map(|p| p.name);
        assert_eq!(ring.as_deref(), case.opt_str("ring"), "{}", case.name);
        let got: BTreeMap<u16, String> = resolve(doc.as_ref(), &local, &ga, &vm)
            .into_iter()
            .map(|(id, s)| (id, state_name(s).to_owned()))
            .collect();
        assert_eq!(got, features_of(&case.obj("expected")), "{}", case.name);
    }
}

fn check_admission(v: &Obj) {
    let mut trusted = Vec::new();
    for key in v.list("keys") {
        let seed: [u8; 32] = hex::decode(key.str("seed")).unwrap().try_into().unwrap();
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(public_key_hex(&pair), key.str("public_key"), "{}", key.name);
        if key.bool("trusted") {
            trusted.push(TrustedKey {
                id: key.str("key_id").to_owned(),
                public_key: key.str("public_key").to_owned(),
            });
        } else {
            let _ = key.str("key_id");
        }
    }
    let trusted = TrustedKeys::new(trusted).unwrap();
    let ga = ga_of(&v.strings("ga"));
    for case in v.list("cases") {
        let _ = case.str("name");
        let current = case
            .opt_str("current")
            .map(|c| Accepted::restore(c.as_bytes().to_vec(), &trusted).unwrap());
        let outcome = admit(
            case.str("candidate").as_bytes(),
            current.as_ref(),
            &ga,
            &trusted,
        );
        let (label, signed_by) = outcome_label(&outcome);
        assert_eq!(label, case.str("expected"), "{}: {outcome:?}", case.name);
        assert_eq!(
            signed_by.as_deref(),
            case.opt_str("signed_by"),
            "{}",
            case.name
        );
    }
}

fn outcome_label(
    outcome: &Result<Admitted, super::admit::Refusal>,
) -> (&'static str, Option<String>) {
    match outcome {
        Ok(Admitted::New(a)) => ("accepted", a.signed_by().map(str::to_owned)),
        Ok(Admitted::Unchanged) => ("unchanged", None),
        Err(r) => (r.label(), None),
    }
}

// ----------------------------------------------------------- generator

/// Seeds of the vector keys: bytes 0..32 (trusted) and 32..64 (not).
fn seed(first: u8) -> [u8; 32] {
    std::array::from_fn(|i| first + u8::try_from(i).unwrap())
}

fn generate() -> BTreeMap<&'static str, Value> {
    BTreeMap::from([
        (BUCKET_FILE, bucket_vectors()),
        (RESOLVE_FILE, resolve_vectors()),
        (ADMIT_FILE, admit_vectors()),
        (OVERLAY_FILE, overlay_vectors()),
    ])
}

/// Live-drill overlays (spec/ROLLOUT.md §13.5): the example and edge
/// cases that parse, and one case per rule that refuses.
fn overlay_vectors() -> Value {
    use super::drill_overlay::{DrillOverlay, EXAMPLE as OVERLAY};
    let long_id = format!("{:a<64}", "d-");
    let valid: Vec<Value> = [
        OVERLAY.to_owned(),
        OVERLAY.replace(r#""d-20261204-1""#, &format!("{long_id:?}")),
        OVERLAY.replace("1764860600", "1764863600"),
        OVERLAY.replace(r#""canary""#, r#""no.such_ring-1""#),
    ]
    .iter()
    .map(|text| {
        let o = DrillOverlay::parse(text.as_bytes()).unwrap();
        assert_eq!(o.to_bytes(), text.as_bytes(), "canonical");
        json!({
            "text": text,
            "drill": o.drill(),
            "feature": o.feature().name(),
            "ring": o.ring(),
            "started_unix": o.started_unix(),
            "expires_unix": o.expires_unix(),
        })
    })
    .collect();
    let invalid: Vec<Value> = [
        (
            "format 2",
            OVERLAY.replace(r#""format":1"#, r#""format":2"#),
        ),
        (
            "empty drill id",
            OVERLAY.replace(r#""d-20261204-1""#, r#""""#),
        ),
        (
            "drill id over 64",
            OVERLAY.replace(r#""d-20261204-1""#, &format!("{:?}", format!("{long_id}a"))),
        ),
        (
            "drill id outside [a-z0-9-]",
            OVERLAY.replace("d-20261204-1", "D_1"),
        ),
        (
            "unknown feature",
            OVERLAY.replace("key-release", "key-teleport"),
        ),
        (
            "ring outside the ring alphabet",
            OVERLAY.replace("canary", "Canary"),
        ),
        (
            "expires not after started",
            OVERLAY.replace("1764860600", "1764860000"),
        ),
        (
            "longer than an hour",
            OVERLAY.replace("1764860600", "1764863601"),
        ),
        ("unknown member", OVERLAY.replace('}', r#","why":1}"#)),
        (
            "repeated member",
            OVERLAY.replace(r#""ring":"canary""#, r#""ring":"canary","ring":"all""#),
        ),
        (
            "missing member",
            OVERLAY.replace(r#","started_unix":1764860000"#, ""),
        ),
        ("trailing bytes", format!("{OVERLAY}{{}}")),
        ("negative time", OVERLAY.replace("1764860000", "-1")),
        ("not an object", "[1]".to_owned()),
    ]
    .iter()
    .map(|(why, text)| {
        assert!(
            DrillOverlay::parse(text.as_bytes()).is_err(),
            "{why}: {text}"
        );
        json!({"why": why, "text": text})
    })
    .collect();
    json!({
        "description": "Live-drill overlays (spec/ROLLOUT.md §13.5): `valid` parse to the given fields and re-encode to the same bytes; `invalid` are refused, each for the rule it names.",
        "valid": valid,
        "invalid": invalid,
    })
}

fn bucket_vectors() -> Value {
    let cases: Vec<Value> = [
        "vm-1",
        "vm-2",
        "vm-17",
        "vm-300",
        "a",
        "ubuntu-24.04:web+7",
        "VM_00000000-0000-0000-0000-000000000001",
    ]
    .iter()
    .map(|id| {
        let mut input = BUCKET_DOMAIN.to_vec();
        input.extend_from_slice(id.as_bytes());
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        json!({
            "vm_id": id,
            "sha256": hex::encode(digest.as_ref()),
            "bucket": bucket(&VmId::new(*id).unwrap()),
        })
    })
    .collect();
    json!({
        "description": "bucket(vm_id) = u64 from the first 8 bytes (big-endian) of SHA-256(domain || vm_id), mod 10000 (ROLLOUT.md §4.2)",
        "domain_hex": hex::encode(BUCKET_DOMAIN),
        "cases": cases,
    })
}

fn example() -> Document {
    Document::parse(EXAMPLE.as_bytes()).unwrap()
}

fn doc_value(doc: &Document) -> Value {
    serde_json::from_slice(&doc.canonical_bytes()).unwrap()
}

fn resolve_vectors() -> Value {
    let d = example();
    let killed_rotation = kill(Some(&d), Feature::KeyRotation, 1764860100).unwrap();
    // (name, document, override, ga, vm (id, image, node), expected states)
    type Case<'a> = (
        &'a str,
        Option<&'a Document>,
        &'a str,
        &'a [&'a str],
        (&'a str, Option<&'a str>, &'a str),
        [&'a str; 3],
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "canary member by vm-id: release at 'all', derivation killed, rotation at 'canary'",
            Some(&d),
            "",
            &[],
            ("vm-1", None, "node-z"),
            ["enabled", "disabled", "enabled"],
        ),
        (
            "member of 'debian' by image: rotation not yet",
            Some(&d),
            "",
            &[],
            ("vm-40", Some("debian-12"), "node-z"),
            ["enabled", "disabled", "not-yet"],
        ),
        (
            "member of 'debian' by node",
            Some(&d),
            "",
            &[],
            ("vm-41", None, "node-a"),
            ["enabled", "disabled", "not-yet"],
        ),
        (
            "bucket ring member",
            Some(&d),
            "",
            &["key-rotation"],
            ("vm-17", None, "node-z"),
            ["enabled", "disabled", "not-yet"],
        ),
        (
            "local override kills key-release",
            Some(&d),
            "killed = [\"key-release\"]\n",
            &[],
            ("vm-1", None, "node-z"),
            ["disabled", "disabled", "enabled"],
        ),
        (
            "document kills key-rotation; its stage is kept",
            Some(&killed_rotation),
            "",
            &[],
            ("vm-1", None, "node-z"),
            ["enabled", "disabled", "disabled"],
        ),
        (
            "no document: host.toml GA features enabled, others not yet",
            None,
            "",
            &["key-release", "key-rotation"],
            ("vm-1", None, "node-z"),
            ["enabled", "not-yet", "enabled"],
        ),
        (
            "no document, override kills a GA feature",
            None,
            "killed = [\"key-rotation\"]\n",
            &["key-release", "key-rotation"],
            ("vm-1", None, "node-z"),
            ["enabled", "not-yet", "disabled"],
        ),
    ];
    let narrow = Document::parse(
        br#"{"format":1,"revision":3,"issued_at":1764860000,
            "rings":[{"name":"canary","vm_ids":["vm-1"]},{"name":"half","buckets_below":5000}],
            "features":{"key-release":{"stage":"canary","killed":false}}}"#,
    )
    .unwrap();
    let mut out: Vec<Value> = cases
        .into_iter()
        .map(|(name, doc, local, ga, vm, expected)| {
            resolve_case(name, doc, local, ga, vm, expected)
        })
        .collect();
    // A VM in no ring, and GA fallback for features the document does not name.
    let outside = (2..)
        .map(|i| format!("vm-{i}"))
        .find(|id| bucket(&VmId::new(id.as_str()).unwrap()) >= 5000)
        .unwrap();
    out.push(resolve_case(
        "VM in no ring: staged feature not yet; unnamed features fall back on GA",
        Some(&narrow),
        "",
        &["key-derivation"],
        (&outside, None, "node-z"),
        ["not-yet", "enabled", "not-yet"],
    ));
    json!({
        "description": "resolution: (document, override file text, host.toml GA list, VM facts) -> the VM's ring and feature map (ROLLOUT.md §5)",
        "cases": out,
    })
}

fn resolve_case(
    name: &str,
    doc: Option<&Document>,
    local: &str,
    ga: &[&str],
    (vm_id, image, node): (&str, Option<&str>, &str),
    expected: [&str; 3],
) -> Value {
    let vm = VmFacts {
        vm_id: VmId::new(vm_id).unwrap(),
        image: image.map(str::to_owned),
        node: node.to_owned(),
    };
    let ga_ids = ga_of(&ga.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
    let got = resolve(doc, &Override::parse(local).unwrap(), &ga_ids, &vm);
    let got: Vec<&str> = got.values().map(|s| state_name(*s)).collect();
    assert_eq!(got, expected, "generator case {name}");
    json!({
        "name": name,
        "document": doc.map_or(Value::Null, doc_value),
        "override": local,
        "ga": ga,
        "vm": {"vm_id": vm_id, "image": image, "node": node},
        "bucket": bucket(&vm.vm_id),
        "ring": doc.and_then(|d| ring_of(d, &vm)).map(|p| p.name),
        "expected": {
            "key-release": expected[0],
            "key-derivation": expected[1],
            "key-rotation": expected[2],
        },
    })
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

fn admit_vectors() -> Value {
    const NOW: u64 = 1764860100;
    let release = Ed25519KeyPair::from_seed_unchecked(&seed(0)).unwrap();
    let rogue = Ed25519KeyPair::from_seed_unchecked(&seed(32)).unwrap();
    let signed = |d: &Document| text(sign(d, &release, "release-2026").unwrap());
    let plain = |d: &Document| text(unsigned(d));
    let d7 = example();
    let k8 = kill(Some(&d7), Feature::KeyRelease, NOW).unwrap();
    let u9 = unkill(Some(&k8), Feature::KeyRelease, NOW).unwrap();
    let raised = set_stage(Some(&d7), Feature::KeyRotation, Some("1pct"), NOW).unwrap();
    let lowered = set_stage(Some(&d7), Feature::KeyRelease, Some("50pct"), NOW).unwrap();
    let ring_edit = Document::parse(
        EXAMPLE
            .replace("\"vm-2\"]", "\"vm-2\", \"vm-3\"]")
            .replace("\"revision\": 7", "\"revision\": 8")
            .as_bytes(),
    )
    .unwrap();
    let jump = Document::parse(
        EXAMPLE
            .replace("\"revision\": 7", "\"revision\": 1048584")
            .replace("\"stage\": \"all\"", "\"stage\": \"1pct\"")
            .as_bytes(),
    )
    .unwrap();
    let flipped = {
        let mut s = signed(&k8).into_bytes();
        let at = s.len() - 4; // a hex digit of the signature
        s[at] = if s[at] == b'0' { b'1' } else { b'0' };
        text(s)
    };
    let body =
        |rest: &str| format!(r#"{{"document":{{"format":1,"revision":9,"issued_at":0,{rest}}}}}"#);
    let many_rings: Vec<String> = (0..33)
        .map(|i| format!(r#"{{"name":"r{i}","buckets_below":1}}"#))
        .collect();
    let malformed = [
        (
            "malformed: duplicate key",
            body(
                r#""rings":[],"features":{"key-release":{"stage":null,"killed":true},"key-release":{"stage":null,"killed":false}}"#,
            ),
        ),
        (
            "malformed: unknown field",
            body(r#""rings":[],"features":{},"expires":0"#),
        ),
        (
            "malformed: unknown feature",
            body(r#""rings":[],"features":{"key-escrow":{"stage":null,"killed":true}}"#),
        ),
        (
            "malformed: more than 32 rings",
            body(&format!(
                r#""rings":[{}],"features":{{}}"#,
                many_rings.join(",")
            )),
        ),
        (
            "malformed: stage names no ring",
            body(
                r#""rings":[{"name":"canary","vm_ids":["vm-1"]}],"features":{"key-release":{"stage":"cannary","killed":false}}"#,
            ),
        ),
        (
            "malformed: buckets_below 0",
            body(r#""rings":[{"name":"none","buckets_below":0}],"features":{}"#),
        ),
        (
            "malformed: signature of 63 bytes",
            format!(
                r#"{{"document":{},"signature":{{"key_id":"release-2026","ed25519":"{}"}}}}"#,
                text(k8.canonical_bytes()),
                "00".repeat(63)
            ),
        ),
    ];
    // (name, current, candidate, expected, signed_by)
    // (name, current, candidate, expected, signed_by)
    type Case<'a> = (String, Option<String>, String, &'a str, Option<&'a str>);
    let mut cases: Vec<Case<'_>> = vec![
        ("first document, signed".into(), None, signed(&d7), "accepted", Some("release-2026")),
        (
            "first document, unsigned: staging key-rotation (not GA) widens the no-document baseline".into(),
            None, plain(&d7), "unsigned-widening", None,
        ),
        ("kill key-release, unsigned: narrowing".into(), Some(signed(&d7)), plain(&k8), "accepted", None),
        (
            "the same document again (another envelope): unchanged".into(),
            Some(signed(&d7)), plain(&d7), "unchanged", None,
        ),
        ("unkill, unsigned: widening".into(), Some(plain(&k8)), plain(&u9), "unsigned-widening", None),
        ("unkill, signed".into(), Some(plain(&k8)), signed(&u9), "accepted", Some("release-2026")),
        (
            "replay of the older signed enable after the kill".into(),
            Some(plain(&k8)), signed(&d7), "replay", None,
        ),
        ("raise a stage, unsigned: widening".into(), Some(signed(&d7)), plain(&raised), "unsigned-widening", None),
        ("raise a stage, signed".into(), Some(signed(&d7)), signed(&raised), "accepted", Some("release-2026")),
        ("lower a stage, unsigned: narrowing".into(), Some(signed(&d7)), plain(&lowered), "accepted", None),
        (
            "edit a ring inside a stage's prefix, unsigned: not provably narrowing".into(),
            Some(signed(&d7)), plain(&ring_edit), "unsigned-widening", None,
        ),
        ("forged: one bit of the signature flipped".into(), Some(signed(&d7)), flipped, "bad-signature", None),
        (
            "forged: signed by another key under the trusted key id".into(),
            Some(signed(&d7)), text(sign(&k8, &rogue, "release-2026").unwrap()), "bad-signature", None,
        ),
        (
            "signed by an untrusted key, even though narrowing".into(),
            Some(signed(&d7)), text(sign(&k8, &rogue, "rogue").unwrap()), "unknown-key", None,
        ),
        (
            "unsigned narrowing that jumps the revision by more than 2^20".into(),
            Some(signed(&d7)), plain(&jump), "revision-jump", None,
        ),
    ];
    // The reason each malformed case must fail for, so that no case
    // passes by accident (a typo in its own framing).
    let reasons = [
        "duplicate field `key-release`",
        "unknown field `expires`",
        "unknown field `key-escrow`",
        "33 rings",
        "stage \"cannary\" names no ring",
        "buckets_below 0",
        "ed25519 must be 64 bytes",
    ];
    for ((name, candidate), reason) in malformed.into_iter().zip(reasons) {
        let e = super::envelope::Envelope::parse(candidate.as_bytes()).unwrap_err();
        assert!(e.to_string().contains(reason), "generator case {name}: {e}");
        cases.push((name.into(), Some(signed(&d7)), candidate, "malformed", None));
    }
    let trusted = TrustedKeys::new([TrustedKey {
        id: "release-2026".into(),
        public_key: public_key_hex(&release),
    }])
    .unwrap();
    let ga: BTreeSet<u16> = [Feature::KeyRelease.id()].into();
    let cases: Vec<Value> = cases
        .into_iter()
        .map(|(name, current, candidate, expected, signed_by)| {
            let restored = current
                .as_ref()
                .map(|c| Accepted::restore(c.as_bytes().to_vec(), &trusted).unwrap());
            let outcome = admit(candidate.as_bytes(), restored.as_ref(), &ga, &trusted);
            let (label, by) = outcome_label(&outcome);
            assert_eq!(
                (label, by.as_deref()),
                (expected, signed_by),
                "generator case {name}: {outcome:?}"
            );
            json!({
                "name": name,
                "current": current,
                "candidate": candidate,
                "expected": expected,
                "signed_by": signed_by,
            })
        })
        .collect();
    json!({
        "description": "admission (ROLLOUT.md §8): (current accepted envelope, candidate envelope bytes) -> accepted / unchanged / refusal label. Keys are Ed25519 from the 32-byte seeds given; host.toml trusts the keys marked trusted; GA = ga.",
        "keys": [
            {"key_id": "release-2026", "seed": hex::encode(seed(0)), "public_key": public_key_hex(&release), "trusted": true},
            {"key_id": "rogue", "seed": hex::encode(seed(32)), "public_key": public_key_hex(&rogue), "trusted": false},
        ],
        "ga": ["key-release"],
        "cases": cases,
    })
}

fn render(value: &Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap();
    s.push('\n');
    s
}

#[test]
fn vectors_are_reproducible() {
    let write = std::env::var_os("VKX_WRITE_ROLLOUT_VECTORS").is_some();
    if write {
        std::fs::create_dir_all(dir()).unwrap();
    }
    for (name, value) in generate() {
        let path = dir().join(name);
        let want = render(&value);
        if write {
            std::fs::write(&path, &want).unwrap();
        } else {
            let have = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                have == want,
                "{} differs from the generator: regenerate with VKX_WRITE_ROLLOUT_VECTORS=1",
                path.display()
            );
        }
    }
}
