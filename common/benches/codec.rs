//! Codec figures for `make bench`: strict decode (all three gates) and
//! encode per message, on the spec's positive vectors, beside the bare
//! structural scan (gate 1) for scale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use vkx_common::wire::{FrameDecoder, Message, encode_frame, scan::scan};

fn vectors() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors/messages");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("vectors") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        // A tiny extraction so the bench needs no JSON crate.
        let start = text.find("\"cbor\": \"").expect("cbor field") + 9;
        let end = start + text[start..].find('"').expect("end quote");
        let name = path
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        out.push((name, hex::decode(&text[start..end]).expect("hex")));
    }
    out.sort();
    out
}

fn codec(c: &mut Criterion) {
    let vectors = vectors();
    for (name, bytes) in &vectors {
        if !["hello", "challenge", "evidence", "key-release", "ping"].contains(&name.as_str()) {
            continue;
        }
        let mut g = c.benchmark_group(format!("{name} ({} B)", bytes.len()));
        g.bench_function("scan", |b| b.iter(|| scan(black_box(bytes))));
        g.bench_function("decode", |b| b.iter(|| Message::decode(black_box(bytes))));
        let m = Message::decode(bytes).expect("vector decodes");
        g.bench_function("encode", |b| b.iter(|| black_box(&m).encode()));
        g.finish();
    }
    // All vectors framed in one stream, through the frame decoder and the
    // message decoder: the host's receive path per message.
    let mut stream = Vec::new();
    for (_, bytes) in &vectors {
        encode_frame(bytes, &mut stream).expect("frame");
    }
    let n = vectors.len();
    c.bench_function(&format!("receive path, {n} framed messages"), |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            let mut rest = black_box(&stream[..]);
            let mut count = 0;
            while let Ok(Some(p)) = d.decode(&mut rest) {
                count += usize::from(Message::decode(p).is_ok());
            }
            assert_eq!(count, n);
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
