//! In-memory clip demuxing, probing and decoding with FFmpeg, as the action pipeline calls it,
//! under the server's default container allow-list and budgets, with the byte, duration, size
//! and frame budgets made small so each input takes milliseconds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polyhead_proto::Bytes;
use polyhead_server::media::Cancel;
use polyhead_server::media::video::{Sampling, VideoLimits, decode_clip};

fn limits() -> VideoLimits {
    VideoLimits {
        max_bytes: 1 << 20,
        max_duration_s: 10.0,
        max_width: 256,
        max_height: 256,
        max_decoded_frames: 64,
        max_packets: 512,
        max_errors: 8,
        max_output_bytes: 16 << 20,
        max_decoder_bytes: 16 << 20,
        max_decode_seconds: 2.0,
        ..VideoLimits::default()
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the sampling, so both planning paths are exercised.
    let Some((&pick, clip)) = data.split_first() else {
        return;
    };
    let frames = usize::from(pick % 8) + 1;
    let sampling = match pick & 0x80 {
        0 => Sampling::uniform(frames),
        _ => Sampling::strided(frames, usize::from((pick >> 3) % 4) + 1),
    };
    let _ = decode_clip(
        &Bytes::copy_from_slice(clip),
        &limits(),
        &sampling,
        &Cancel::default(),
    );
});
