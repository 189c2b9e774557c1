//! Image decoding (JPEG, PNG, WebP sniffed from the bytes) under the server's default limits:
//! any input may be refused, none may panic, hang or exhaust memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polyhead_server::media::image::{ImageLimits, decode};

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, &ImageLimits::default());
});
