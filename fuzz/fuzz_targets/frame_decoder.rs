//! A byte stream cut into arbitrary chunks, through the frame decoder and
//! then the message decoder. The first byte chooses how many following
//! bytes give the chunk sizes; the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vkx_common::wire::selfcheck::check_frame_stream;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    check_frame_stream(sizes, stream);
});
