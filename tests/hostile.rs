//! A corpus of hostile inputs, built from real photos and clips: truncated and corrupted JPEG,
//! PNG and WebP, random and zero bytes, wrong magic, image bombs, damaged containers and
//! playlists that point at a local canary file. Each is answered INVALID_ARGUMENT, with a
//! message, within a time bound, while valid requests on the same server keep succeeding.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};
use polyhead_proto::v1;
use polyhead_proto::v1::recognize_action_request::Clip;
use tonic::Code;

use crate::common::{client, encoded, make_clip, noise_rgb, photo};

/// How long refusing one input may take. Every refusal here comes from a header check, a
/// decoder error or FFmpeg's probe, which take milliseconds; the bound leaves room for a
/// loaded two-core machine running the whole binary at once, yet is far below the server's
/// 60 s decode budget and the client's 30 s deadline, so a hang (a read of the canary FIFO
/// blocks for ever) or a full decode of a bomb fails the test.
const BOUND: Duration = Duration::from_secs(5);

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// What an input is sent as, and what its refusal must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Sent to Detect.
    Image,
    /// Sent to Detect; its header declares more pixels than the limits allow.
    Bomb,
    /// Sent to RecognizeAction as a video.
    Video,
}

type Case = (String, Kind, Vec<u8>);

/// Named inputs, all of one kind.
fn of_kind<N: Into<String>>(
    kind: Kind,
    inputs: impl IntoIterator<Item = (N, Vec<u8>)>,
) -> Vec<Case> {
    inputs
        .into_iter()
        .map(|(name, bytes)| (name.into(), kind, bytes))
        .collect()
}

#[tokio::test]
async fn hostile_images_are_refused_quickly_while_valid_requests_succeed() {
    let mut cases = Vec::new();
    for (format, bytes) in [
        ("png", photo("astronaut.png")),
        ("jpeg", photo("rocket.jpg")),
        ("webp", webp(&photo("chelsea.png"))),
    ] {
        cases.extend(truncations(format, &bytes));
        cases.extend(corruptions(format, &bytes));
    }
    cases.extend(junk(Kind::Image));
    cases.extend(wrong_magic());
    cases.extend(bombs());
    run_corpus(cases).await;
}

#[tokio::test]
async fn hostile_videos_are_refused_quickly_and_never_open_other_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let canary = dir.path().join("canary.mp4");
    make_fifo(&canary);
    let clip = make_clip(
        "testsrc=size=160x120:rate=10",
        1.0,
        "mp4",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let valid = recognize(clip.clone()).await;
    assert!(valid.is_ok(), "the pristine clip is accepted: {valid:?}");
    let mut cases = videos(&clip);
    cases.extend(playlists(&canary));
    cases.extend(junk(Kind::Video));
    run_corpus(cases).await;
    assert_not_opened(&canary);
}

/// Sends every case while a background task keeps sending a valid image; asserts every case
/// is refused in time and every valid request succeeded.
async fn run_corpus(cases: Vec<Case>) {
    let stop = Arc::new(AtomicBool::new(false));
    let background = tokio::spawn(keep_detecting(Arc::clone(&stop)));
    let mut failures = Vec::new();
    for (name, kind, bytes) in cases {
        if let Err(failure) = check_refused(kind, bytes).await {
            failures.push(format!("{name}: {failure}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (served, errors) = background.await.expect("background task");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(served > 0, "the background task made no call");
    assert!(errors.is_empty(), "valid requests failed: {errors:?}");
}

/// Detect on a real photo, over and over, until `stop` is set (at least once): the number of
/// calls that succeeded and the errors of those that did not.
async fn keep_detecting(stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let client = client().await;
    let image = encoded(photo("coffee.png"));
    let (mut served, mut errors) = (0, Vec::new());
    loop {
        match client.detect(image.clone(), Default::default(), "").await {
            Ok(_) => served += 1,
            Err(e) => errors.push(e.to_string()),
        }
        if stop.load(Ordering::Relaxed) {
            return (served, errors);
        }
    }
}

/// Sends one case and checks its refusal: INVALID_ARGUMENT, a message, within [`BOUND`].
async fn check_refused(kind: Kind, bytes: Vec<u8>) -> Result<(), String> {
    let started = Instant::now();
    let call = async {
        match kind {
            Kind::Image | Kind::Bomb => detect(bytes).await,
            Kind::Video => recognize(bytes).await,
        }
    };
    let result = tokio::time::timeout(BOUND, call)
        .await
        .map_err(|_| format!("no answer within {BOUND:?}"))?;
    let elapsed = started.elapsed();
    let status = result.err().ok_or("accepted")?;
    let message = status.message().to_lowercase();
    if status.code() != Code::InvalidArgument || message.is_empty() {
        return Err(format!("{:?}: {}", status.code(), status.message()));
    }
    if kind == Kind::Bomb && !(message.contains("limit") || message.contains("too large")) {
        return Err(format!("refused, but not for its size: {message}"));
    }
    if elapsed > BOUND {
        return Err(format!("took {elapsed:?}"));
    }
    Ok(())
}

async fn detect(bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let request = v1::DetectRequest {
        image: Some(encoded(bytes)),
        options: None,
        head: String::new(),
    };
    client().await.raw().detect(request).await.map(drop)
}

async fn recognize(bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let request = v1::RecognizeActionRequest {
        clip: Some(Clip::Video(bytes.into())),
        options: None,
        head: String::new(),
    };
    client()
        .await
        .raw()
        .recognize_action(request)
        .await
        .map(drop)
}

/// A photo re-encoded as lossless WebP.
fn webp(png: &[u8]) -> Vec<u8> {
    let rgb = image::load_from_memory(png)
        .expect("decode photo")
        .to_rgb8();
    let mut out = Vec::new();
    WebPEncoder::new_lossless(&mut out)
        .write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encode WebP");
    out
}

/// The file cut after its magic, inside its header, at half and near its end.
fn truncations(format: &str, bytes: &[u8]) -> Vec<Case> {
    let len = bytes.len();
    [4, 30, len / 2, len * 9 / 10, len - 8]
        .into_iter()
        .map(|cut| {
            let name = format!("{format} cut at {cut} of {len} bytes");
            (name, Kind::Image, bytes[..cut].to_vec())
        })
        .collect()
}

/// The file with its header or body damaged in ways a decoder must notice.
fn corruptions(format: &str, bytes: &[u8]) -> Vec<Case> {
    let damage = |name: &str, at: usize, with: &[u8]| {
        let mut out = bytes.to_vec();
        out[at..at + with.len()].copy_from_slice(with);
        (format!("{format} {name}"), Kind::Image, out)
    };
    let noise = noise_rgb(1, 8, 2);
    match format {
        // The chunk CRCs catch any change to a chunk.
        "png" => vec![
            damage("with a noisy IHDR", 12, &noise),
            damage("with a flipped bit", bytes.len() / 2, &[0x55]),
        ],
        // Noise in APPn segments is ignored, as it should be: damage the frame header and a
        // Huffman table (declaring more codes than exist).
        "jpeg" => {
            let sof = find(bytes, &[0xFF, 0xC0]).expect("rocket.jpg is baseline");
            let dht = find(bytes, &[0xFF, 0xC4]).expect("rocket.jpg has a DHT segment");
            vec![
                damage("with a noisy frame header", sof + 2, &noise),
                damage("with a broken Huffman table", dht + 5, &[0xFF; 16]),
            ]
        }
        // The chunk header and the VP8L signature and header are checked.
        _ => vec![
            damage("with a noisy chunk header", 12, &noise),
            damage("with a bad VP8L header", 20, &[0; 5]),
        ],
    }
}

/// Inputs that are no file at all: zeros, ones, a single byte, random bytes of several sizes.
fn junk(kind: Kind) -> Vec<Case> {
    let named = |name: &str, bytes: Vec<u8>| (format!("{kind:?} {name}"), kind, bytes);
    let mut cases = vec![named("0xFF bytes", vec![0xFF; 4096])];
    if kind == Kind::Image {
        // errors.rs sends zeros as a video.
        cases.push(named("zeros", vec![0; 4096]));
        cases.push(named("single byte", vec![0x89]));
    }
    for (seed, side) in [(7, 1), (8, 37), (9, 200)] {
        cases.push(named(
            &format!("random {side}x{side}x3"),
            noise_rgb(seed, side, side),
        ));
    }
    cases
}

/// One format's magic in front of another's body.
fn wrong_magic() -> Vec<Case> {
    let png = photo("coffee.png");
    let jpeg = photo("rocket.jpg");
    let cases = [
        ("PNG magic, JPEG body", [PNG_MAGIC, &jpeg].concat()),
        ("JPEG magic, PNG body", [&jpeg[..4], &png[8..]].concat()),
        ("WebP VP8 chunk holding a PNG", webp_of(&[(b"VP8 ", &png)])),
        ("BMP magic", [b"BM".as_slice(), &png[8..]].concat()),
    ];
    of_kind(Kind::Image, cases)
}

/// Small files whose headers declare enormous images.
fn bombs() -> Vec<Case> {
    let mut jpeg = photo("rocket.jpg");
    let sof = find(&jpeg, &[0xFF, 0xC0]).expect("rocket.jpg is baseline");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    // 16000x16000: image-webp 0.2 reads 16384 (the format's largest side) as 0.
    let vp8l_bits: u32 = 15_999 | (15_999 << 14);
    let mut vp8l = vec![0x2F];
    vp8l.extend_from_slice(&vp8l_bits.to_le_bytes());
    vp8l.extend_from_slice(&noise_rgb(3, 10, 10));
    let mut vp8x = vec![0; 4];
    vp8x.extend_from_slice(&[0xFF; 6]);
    let cases = [
        ("PNG 100000x100000", png_declaring(100_000, 100_000)),
        ("PNG 8192x8192 (pixel limit)", png_declaring(8192, 8192)),
        ("JPEG 65500x65500", jpeg),
        (
            "WebP VP8L 16000x16000",
            webp_of(&[(b"VP8L", vp8l.as_slice())]),
        ),
        (
            "WebP VP8X canvas 16777216x16777216",
            webp_of(&[(b"VP8X", vp8x.as_slice()), (b"VP8L", vp8l.as_slice())]),
        ),
    ];
    of_kind(Kind::Bomb, cases)
}

/// A PNG with a valid IHDR (correct CRC) declaring `width` x `height` RGB pixels, an empty
/// zlib stream for data and IEND.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = PNG_MAGIC.to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    out.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(data.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind.as_slice(), data].concat()).to_be_bytes());
    out
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[test]
fn crc32_matches_png() {
    // Every PNG ends with IEND's CRC, AE 42 60 82.
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}

/// A RIFF WebP file made of `chunks`.
fn webp_of(chunks: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
    let mut body = b"WEBP".to_vec();
    for (kind, data) in chunks {
        body.extend_from_slice(*kind);
        body.extend_from_slice(&u32::try_from(data.len()).expect("small").to_le_bytes());
        body.extend_from_slice(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&u32::try_from(body.len()).expect("small").to_le_bytes());
    out.extend(body);
    out
}

/// Damaged copies of a real MP4 clip, and noise behind an MP4 header.
fn videos(clip: &[u8]) -> Vec<Case> {
    let len = clip.len();
    let moov = find(clip, b"moov").expect("the clip has a moov box");
    // Inside the ftyp box, in the media data, and inside the track header (the end of the moov
    // box is metadata FFmpeg rightly does without).
    let mut cases: Vec<(String, Vec<u8>)> = [32, len / 2, (moov + 200).min(len - 1)]
        .into_iter()
        .map(|cut| (format!("MP4 cut at {cut} of {len}"), clip[..cut].to_vec()))
        .collect();
    let mut corrupt = clip.to_vec();
    let noise = noise_rgb(4, 16, 16);
    let end = (moov + 4 + noise.len()).min(len);
    corrupt[moov + 4..end].copy_from_slice(&noise[..end - moov - 4]);
    cases.push(("MP4 with a corrupted moov".into(), corrupt));
    let mut ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2".to_vec();
    ftyp.extend(noise_rgb(5, 100, 100));
    cases.push(("ftyp header, random body".into(), ftyp));
    of_kind(Kind::Video, cases)
}

/// Playlists and session descriptions that name the canary, as a path, a `file:` URL, and
/// a URL no one listens on.
fn playlists(canary: &Path) -> Vec<Case> {
    let path = canary.display();
    let hls = format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{path}\n\
         #EXTINF:1.0,\nfile:{path}\n#EXTINF:1.0,\nhttp://127.0.0.1:1/a.ts\n#EXT-X-ENDLIST\n"
    );
    let concat = format!(
        "ffconcat version 1.0\nfile '{path}'\nfile 'file:{path}'\nfile 'http://127.0.0.1:1/a.mp4'\n"
    );
    let sdp = "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n\
               m=video 1 RTP/AVP 96\na=rtpmap:96 H264/90000\n";
    let cases = [
        ("HLS playlist", hls),
        ("ffconcat list", concat),
        ("SDP session", sdp.to_owned()),
    ];
    of_kind(
        Kind::Video,
        cases.map(|(name, text)| (name, text.into_bytes())),
    )
}

/// Makes a FIFO at `path`: opening it for reading blocks until a writer comes, so a request
/// that tried to read it would hang past [`BOUND`].
fn make_fifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Asserts that nothing holds the FIFO open for reading: a non-blocking open for writing fails
/// with ENXIO exactly when there is no reader. Were there one, this open also releases it.
fn assert_not_opened(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
    let error = opened.expect_err("something opened the canary for reading");
    assert_eq!(error.raw_os_error(), Some(libc::ENXIO), "{error}");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
