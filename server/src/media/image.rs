//! Still-image decoding: JPEG, PNG and WebP from untrusted bytes into RGB8.
//!
//! The format is chosen from the file's magic bytes, never from a name or MIME type. The image's
//! dimensions are read from its header and checked against [`ImageLimits`] before any pixel
//! buffer is allocated, and the decoders also run under [`image::Limits`], so a small file that
//! claims an enormous image is refused at once. EXIF orientation is applied, so the result is
//! upright as a viewer would show it.

use std::io::Cursor;

use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::error::ImageError;
use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, RgbImage};

use super::MediaError;
use super::memory::{DecodingMemory, Hold};

/// Bounds on the images [`decode`] and [`from_raw`] accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Most memory, in bytes, the decoder may allocate for one image.
    pub max_decode_bytes: u64,
    /// The memory all decodes in the process share (see [`super::memory`]).
    pub memory: DecodingMemory,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_width: 8192,
            max_height: 8192,
            max_pixels: 40_000_000,
            max_decode_bytes: 512 * 1024 * 1024,
            memory: DecodingMemory::default(),
        }
    }
}

/// The formats [`decode`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jpeg,
    Png,
    WebP,
}

impl Format {
    /// Identifies the format from the first bytes of the file.
    fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(Self::WebP)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
            Self::WebP => "WebP",
        }
    }
}

/// An image decoded by [`decode_holding`], and the share of the decoding memory it holds until
/// it is dropped: its own bytes.
#[derive(Debug)]
pub struct Decoded {
    /// The upright RGB8 image.
    pub image: RgbImage,
    /// Its hold on `limits.memory`.
    pub memory: Hold,
}

/// Decodes a JPEG, PNG or WebP image into upright RGB8, within `limits`.
///
/// Alpha, if any, is dropped; grey and 16-bit images are converted to 8-bit RGB.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, MediaError> {
    decode_holding(bytes, limits).map(|decoded| decoded.image)
}

/// Decodes like [`decode`], holding in `limits.memory` the most the decoding takes at once:
/// the decoder's pixels and, unless they are RGB8 already, their RGB8 copy; or, for an image
/// its EXIF turns, the RGB8 pixels and their turned copy. Then the image's own bytes, for as
/// long as the caller keeps the hold. ([`decode`] gives the hold back as it returns.)
pub fn decode_holding(bytes: &[u8], limits: &ImageLimits) -> Result<Decoded, MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Empty("image"));
    }
    let format = Format::sniff(bytes).ok_or(MediaError::UnsupportedImageFormat)?;
    let wrap = |e| map_error(format, e);
    match format {
        Format::Jpeg if !jpeg_is_complete(bytes) => Err(MediaError::CorruptImage {
            format: format.name(),
            detail: "the data ends before the end-of-image marker (truncated file)".to_owned(),
        }),
        Format::Jpeg => finish(
            JpegDecoder::new(Cursor::new(bytes)).map_err(wrap)?,
            limits,
            format,
        ),
        Format::Png => {
            if let Some((width, height)) = png_dimensions(bytes) {
                check_dimensions(width, height, limits)?;
            }
            let decoder = PngDecoder::with_limits(Cursor::new(bytes), decoder_limits(limits));
            finish(decoder.map_err(wrap)?, limits, format)
        }
        Format::WebP => finish(
            WebPDecoder::new(Cursor::new(bytes)).map_err(wrap)?,
            limits,
            format,
        ),
    }
}

/// Wraps caller-supplied raw RGB8 pixels (row-major, 3 bytes per pixel) as an image, within
/// `limits`.
pub fn from_raw(
    width: u32,
    height: u32,
    rgb: Vec<u8>,
    limits: &ImageLimits,
) -> Result<RgbImage, MediaError> {
    check_dimensions(width, height, limits)?;
    let expected = u64::from(width) * u64::from(height) * 3;
    let len = rgb.len() as u64;
    if len != expected {
        return Err(MediaError::RawLengthMismatch {
            width,
            height,
            len,
            expected,
        });
    }
    RgbImage::from_raw(width, height, rgb).ok_or(MediaError::RawLengthMismatch {
        width,
        height,
        len,
        expected,
    })
}

/// Checks an image's dimensions against `limits`.
pub fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<(), MediaError> {
    if width == 0 || height == 0 {
        return Err(MediaError::ZeroSize { width, height });
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(MediaError::ImageTooLarge {
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(MediaError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// Checks the header, then decodes, orients and converts the image.
fn finish<D: ImageDecoder>(
    mut decoder: D,
    limits: &ImageLimits,
    format: Format,
) -> Result<Decoded, MediaError> {
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let needed = decoder.total_bytes();
    if needed > limits.max_decode_bytes {
        return Err(MediaError::TooMuchMemory {
            needed,
            limit: limits.max_decode_bytes,
        });
    }
    let wrap = |e| map_error(format, e);
    decoder.set_limits(decoder_limits(limits)).map_err(wrap)?;
    let orientation = decoder.orientation().map_err(wrap)?;
    let rgb_bytes = u64::from(width) * u64::from(height) * 3;
    let copy = if decoder.color_type() == ColorType::Rgb8 {
        0
    } else {
        rgb_bytes
    };
    let turned = if orientation == Orientation::NoTransforms {
        0
    } else {
        rgb_bytes
    };
    // The decoder's pixels are freed once converted, and the unturned ones once turned.
    let most = needed.saturating_add(copy).max(rgb_bytes + turned);
    let mut memory = limits.memory.take(most)?;
    // Converted before it is turned, so that turning copies 8-bit RGB rather than the decoded
    // pixels (up to 8 bytes each, for 16-bit RGBA), which are freed first.
    let rgb = DynamicImage::from_decoder(decoder)
        .map_err(wrap)?
        .into_rgb8();
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    memory.resize(rgb_bytes)?;
    Ok(Decoded {
        image: image.into_rgb8(),
        memory,
    })
}

/// The `image` crate's limits matching ours.
fn decoder_limits(limits: &ImageLimits) -> image::Limits {
    let mut out = image::Limits::default();
    out.max_image_width = Some(limits.max_width);
    out.max_image_height = Some(limits.max_height);
    out.max_alloc = Some(limits.max_decode_bytes);
    out
}

/// Reads width and height from a PNG's IHDR chunk, which the format requires to come first.
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let ihdr = bytes.get(8..24)?;
    if &ihdr[4..8] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(ihdr[8..12].try_into().ok()?);
    let height = u32::from_be_bytes(ihdr[12..16].try_into().ok()?);
    Some((width, height))
}

/// Whether a JPEG's marker structure runs on to an end-of-image marker. Decoders fill in the
/// missing part of a truncated scan silently; this catches such files. Data after the end-of-image
/// marker is ignored, and structures this walk does not understand are left to the decoder.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut pos = 2;
    while let (Some(&prefix), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) {
        match (prefix, marker) {
            (0xFF, 0xD9) => return true,
            (0xFF, 0xFF) => pos += 1,
            (0xFF, 0x01 | 0xD0..=0xD7) => pos += 2,
            (0xFF, _) => {
                let Some(len) = bytes.get(pos + 2..pos + 4) else {
                    return false;
                };
                pos += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xDA {
                    pos = skip_entropy_coded(bytes, pos);
                }
            }
            _ => return true,
        }
    }
    false
}

/// The position of the first marker after entropy-coded data starting at `pos`, or the end.
fn skip_entropy_coded(bytes: &[u8], mut pos: usize) -> usize {
    while let (Some(&byte), Some(&next)) = (bytes.get(pos), bytes.get(pos + 1)) {
        if byte == 0xFF && !matches!(next, 0x00 | 0xFF | 0xD0..=0xD7) {
            return pos;
        }
        pos += 1;
    }
    bytes.len()
}

/// Turns a decoder error into a message about the input.
fn map_error(format: Format, error: ImageError) -> MediaError {
    let name = format.name();
    match error {
        ImageError::Limits(e) => MediaError::ExceedsDecoderLimits {
            format: name,
            detail: e.to_string(),
        },
        ImageError::Unsupported(e) => MediaError::UnsupportedImageFeature {
            format: name,
            detail: e.to_string(),
        },
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            MediaError::CorruptImage {
                format: name,
                detail: "the data ends early (truncated file)".to_owned(),
            }
        }
        other => MediaError::CorruptImage {
            format: name,
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ExtendedColorType, ImageEncoder, Rgb};

    use super::*;

    /// A `width` x `height` image whose left half is red and right half is blue.
    fn halves(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, _| {
            if x < width / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    /// A smooth gradient, which compresses into a long JPEG scan.
    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 9]))
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ExtendedColorType::Rgb8,
            )
            .expect("encode PNG");
        out
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ExtendedColorType::Rgb8,
            )
            .expect("encode JPEG");
        out
    }

    fn webp(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        WebPEncoder::new_lossless(&mut out)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ExtendedColorType::Rgb8,
            )
            .expect("encode WebP");
        out
    }

    /// Inserts an EXIF APP1 segment carrying `orientation` right after the JPEG's SOI marker.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes());
        tiff.extend_from_slice(&0x0112u16.to_be_bytes());
        tiff.extend_from_slice(&3u16.to_be_bytes());
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut segment = vec![0xFF, 0xE1];
        let len = u16::try_from(2 + 6 + tiff.len()).expect("small segment");
        segment.extend_from_slice(&len.to_be_bytes());
        segment.extend_from_slice(b"Exif\x00\x00");
        segment.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&segment);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    fn near(a: &Rgb<u8>, b: [u8; 3]) -> bool {
        a.0.iter().zip(b).all(|(&x, y)| x.abs_diff(y) <= 40)
    }

    #[test]
    fn decodes_png_exactly() {
        let img = halves(32, 16);
        let out = decode(&png(&img), &ImageLimits::default()).expect("decode");
        assert_eq!(out, img);
    }

    #[test]
    fn decodes_jpeg() {
        let out = decode(&jpeg(&halves(32, 16)), &ImageLimits::default()).expect("decode");
        assert_eq!(out.dimensions(), (32, 16));
        assert!(
            near(out.get_pixel(2, 8), [255, 0, 0]),
            "{:?}",
            out.get_pixel(2, 8)
        );
        assert!(
            near(out.get_pixel(29, 8), [0, 0, 255]),
            "{:?}",
            out.get_pixel(29, 8)
        );
    }

    #[test]
    fn jpeg_with_trailing_data_decodes() {
        let mut bytes = jpeg(&gradient(16, 16));
        bytes.extend_from_slice(b"trailing \xFF\xDA bytes");
        let out = decode(&bytes, &ImageLimits::default()).expect("decode");
        assert_eq!(out.dimensions(), (16, 16));
    }

    #[test]
    fn decodes_webp() {
        let img = halves(20, 10);
        let out = decode(&webp(&img), &ImageLimits::default()).expect("decode");
        assert_eq!(out, img);
    }

    #[test]
    fn decodes_rgba_and_grey_png_to_rgb() {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(
                &[10, 20, 30, 0, 40, 50, 60, 255],
                2,
                1,
                ExtendedColorType::Rgba8,
            )
            .expect("encode");
        let rgb = decode(&out, &ImageLimits::default()).expect("decode");
        assert_eq!(rgb.as_raw(), &[10, 20, 30, 40, 50, 60]);
        let mut grey = Vec::new();
        PngEncoder::new(&mut grey)
            .write_image(&[7, 200], 1, 2, ExtendedColorType::L8)
            .expect("encode");
        let rgb = decode(&grey, &ImageLimits::default()).expect("decode");
        assert_eq!(rgb.as_raw(), &[7, 7, 7, 200, 200, 200]);
    }

    #[test]
    fn exif_orientation_6_rotates_clockwise() {
        let bytes = with_exif_orientation(&jpeg(&halves(32, 16)), 6);
        let out = decode(&bytes, &ImageLimits::default()).expect("decode");
        assert_eq!(out.dimensions(), (16, 32));
        // Rotating 90° clockwise brings the left (red) half to the top.
        assert!(
            near(out.get_pixel(8, 2), [255, 0, 0]),
            "{:?}",
            out.get_pixel(8, 2)
        );
        assert!(
            near(out.get_pixel(8, 29), [0, 0, 255]),
            "{:?}",
            out.get_pixel(8, 29)
        );
    }

    #[test]
    fn truncated_png_is_corrupt() {
        let bytes = png(&halves(64, 64));
        let err =
            decode(&bytes[..bytes.len() / 2], &ImageLimits::default()).expect_err("truncated");
        assert!(
            matches!(err, MediaError::CorruptImage { format: "PNG", .. }),
            "{err}"
        );
    }

    #[test]
    fn truncated_jpeg_is_corrupt() {
        let bytes = jpeg(&gradient(64, 64));
        for cut in [bytes.len() - 1, bytes.len() - 20, bytes.len() / 2, 40, 4] {
            let err = decode(&bytes[..cut], &ImageLimits::default()).expect_err("truncated");
            assert!(
                matches!(err, MediaError::CorruptImage { format: "JPEG", .. }),
                "{cut}: {err}"
            );
        }
    }

    #[test]
    fn truncated_webp_is_corrupt() {
        let bytes = webp(&halves(64, 64));
        let err =
            decode(&bytes[..bytes.len() / 2], &ImageLimits::default()).expect_err("truncated");
        assert!(
            matches!(err, MediaError::CorruptImage { format: "WebP", .. }),
            "{err}"
        );
    }

    #[test]
    fn a_decoded_image_holds_its_bytes_of_the_shared_memory() {
        let memory = DecodingMemory::new(10_000);
        let limits = ImageLimits {
            memory: memory.clone(),
            ..ImageLimits::default()
        };
        let img = halves(32, 16);
        let decoded = decode_holding(&png(&img), &limits).expect("decode");
        assert_eq!(decoded.image, img);
        assert_eq!(
            (decoded.memory.bytes(), memory.held()),
            (32 * 16 * 3, 32 * 16 * 3)
        );
        drop(decoded);
        assert_eq!(memory.held(), 0);

        // RGB8 pixels need no copy: 1,536 bytes while decoding.
        let others = memory.take(10_000 - 1500).expect("another decode's hold");
        let err = decode(&png(&img), &limits).expect_err("1,536 bytes, 1,500 left");
        assert!(
            matches!(
                err,
                MediaError::DecodingMemoryFull {
                    needed: 1536,
                    others: 8500,
                    limit: 10_000
                }
            ),
            "{err}"
        );
        assert!(err.is_full() && !err.is_limit(), "{err}");
        drop(others);
        // Grey pixels take a third of that, and then their RGB8 copy: 2,048 bytes at once.
        let mut grey = Vec::new();
        PngEncoder::new(&mut grey)
            .write_image(&[9; 32 * 16], 32, 16, ExtendedColorType::L8)
            .expect("encode");
        let small = ImageLimits {
            memory: DecodingMemory::new(2047),
            ..ImageLimits::default()
        };
        assert!(decode(&png(&img), &small).is_ok());
        let err = decode(&grey, &small).expect_err("2,048 bytes for grey");
        assert!(
            matches!(
                err,
                MediaError::DecodingMemoryTooSmall {
                    needed: 2048,
                    limit: 2047
                }
            ),
            "{err}"
        );
        // An EXIF-turned image needs its turned copy beside it.
        let turned = with_exif_orientation(&jpeg(&halves(32, 16)), 6);
        let err = decode(&turned, &small).expect_err("3,072 bytes to turn it");
        assert!(
            matches!(err, MediaError::DecodingMemoryTooSmall { needed: 3072, .. }),
            "{err}"
        );
        assert!(err.is_limit(), "{err}");
        assert_eq!(small.memory.held(), 0);
    }

    #[test]
    fn huge_png_header_is_refused_at_once() {
        let mut bytes = png(&halves(4, 4));
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let limits = ImageLimits {
            max_width: 200_000,
            max_height: 200_000,
            ..ImageLimits::default()
        };
        let start = Instant::now();
        let err = decode(&bytes, &limits).expect_err("too many pixels");
        assert!(start.elapsed() < Duration::from_millis(50));
        assert_eq!(
            err.to_string(),
            "image is 100000x100000 = 10000000000 pixels, the limit is 40000000"
        );
        assert!(err.is_limit());
        let err = decode(&bytes, &ImageLimits::default()).expect_err("too wide");
        assert_eq!(
            err.to_string(),
            "image is 100000x100000, the limit is 8192x8192"
        );
    }

    #[test]
    fn jpeg_over_the_limits_is_refused() {
        let limits = ImageLimits {
            max_pixels: 100,
            ..ImageLimits::default()
        };
        let err = decode(&jpeg(&halves(32, 16)), &limits).expect_err("too many pixels");
        assert!(
            matches!(err, MediaError::TooManyPixels { pixels: 512, .. }),
            "{err}"
        );
        let mut huge = jpeg(&halves(32, 16));
        let sof = huge
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline frame header");
        huge[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let start = Instant::now();
        let err = decode(&huge, &ImageLimits::default()).expect_err("too large");
        assert!(start.elapsed() < Duration::from_millis(50));
        assert_eq!(
            err.to_string(),
            "image is 60000x60000, the limit is 8192x8192"
        );
    }

    #[test]
    fn memory_limit_is_enforced() {
        let limits = ImageLimits {
            max_decode_bytes: 100,
            ..ImageLimits::default()
        };
        let err = decode(&webp(&halves(32, 16)), &limits).expect_err("too much memory");
        assert!(err.is_limit(), "{err}");
    }

    #[test]
    fn empty_and_unknown_inputs_are_refused() {
        let limits = ImageLimits::default();
        assert_eq!(decode(&[], &limits), Err(MediaError::Empty("image")));
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        assert_eq!(
            decode(&noise, &limits),
            Err(MediaError::UnsupportedImageFormat)
        );
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        let err = decode(gif, &limits).expect_err("GIF is not accepted");
        assert_eq!(
            err.to_string(),
            "unsupported image format: expected JPEG, PNG or WebP"
        );
    }

    #[test]
    fn magic_followed_by_noise_is_corrupt() {
        let limits = ImageLimits::default();
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend((0..200u8).map(|i| i.wrapping_mul(37)));
        assert!(matches!(
            decode(&bytes, &limits),
            Err(MediaError::CorruptImage { .. })
        ));
        let mut bytes = vec![0xFF, 0xD8, 0xFF];
        bytes.extend((0..200u8).map(|i| i.wrapping_mul(91)));
        assert!(decode(&bytes, &limits).is_err());
        assert!(decode(b"RIFF\x10\x00\x00\x00WEBPVP8 ", &limits).is_err());
    }

    #[test]
    fn raw_rgb_is_validated() {
        let limits = ImageLimits::default();
        let img = from_raw(2, 1, vec![1, 2, 3, 4, 5, 6], &limits).expect("valid");
        assert_eq!(img.get_pixel(1, 0), &Rgb([4, 5, 6]));
        let err = from_raw(2, 2, vec![0; 11], &limits).expect_err("short");
        assert_eq!(
            err.to_string(),
            "raw RGB data is 11 bytes, a 2x2 image needs 12"
        );
        assert!(matches!(
            from_raw(0, 5, vec![], &limits),
            Err(MediaError::ZeroSize { .. })
        ));
        let err = from_raw(9000, 1, vec![0; 27_000], &limits).expect_err("too wide");
        assert!(err.is_limit());
    }
}
