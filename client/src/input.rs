//! Building request inputs: images from files, bytes or raw pixels, and clips from a video file
//! or a list of encoded frames.

use std::path::Path;

use polyhead_proto::Bytes;
use polyhead_proto::v1::{self, recognize_action_request::Clip};

use crate::error::{ClientError, Result};

/// Reads a whole file, naming it in the error.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    std::fs::read(path).map_err(|source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// An image from an encoded file (JPEG, PNG or WebP); the server decodes it.
pub fn image_from_path(path: impl AsRef<Path>) -> Result<v1::Image> {
    read_file(path).map(image_from_bytes)
}

/// An image from encoded file bytes (JPEG, PNG or WebP).
pub fn image_from_bytes(encoded: impl Into<Bytes>) -> v1::Image {
    v1::Image {
        source: Some(v1::image::Source::Encoded(encoded.into())),
    }
}

/// An image from tightly packed RGB8 pixels, row-major, `width * height * 3` bytes.
pub fn raw_image(width: u32, height: u32, rgb: impl Into<Bytes>) -> v1::Image {
    v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width,
            height,
            rgb: rgb.into(),
        })),
    }
}

/// An image named by a feature handle from [`crate::Client::extract_features`]: the heads run on
/// the features the server kept, and the image is not sent again.
pub fn handle_image(handle: impl Into<String>) -> v1::Image {
    v1::Image {
        source: Some(v1::image::Source::FeatureHandle(handle.into())),
    }
}

/// A clip from an encoded video file's bytes.
pub fn video_clip(video: impl Into<Bytes>) -> Clip {
    Clip::Video(video.into())
}

/// A clip from encoded frames in temporal order, played at `fps` (0: 1 frame per second).
pub fn frames_clip(frames: Vec<Vec<u8>>, fps: f32) -> Clip {
    let frames = frames.into_iter().map(Bytes::from).collect();
    Clip::Frames(v1::EncodedFrames { frames, fps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images() {
        let encoded = image_from_bytes(vec![1, 2, 3]);
        assert_eq!(
            encoded.source,
            Some(v1::image::Source::Encoded(Bytes::from_static(&[1, 2, 3])))
        );
        let raw = raw_image(1, 1, vec![9u8, 8, 7]);
        let Some(v1::image::Source::Raw(pixels)) = raw.source else {
            panic!("not a raw image");
        };
        assert_eq!(
            (pixels.width, pixels.height, pixels.rgb.as_ref()),
            (1, 1, &[9, 8, 7][..])
        );
    }

    #[test]
    fn missing_files_are_named() {
        let err = image_from_path("/nonexistent/polyhead.jpg").err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with("cannot read /nonexistent/polyhead.jpg: "),
            "{text}"
        );
    }

    #[test]
    fn clips() {
        assert_eq!(video_clip(vec![0u8; 4]), Clip::Video(vec![0; 4].into()));
        let Clip::Frames(frames) = frames_clip(vec![vec![1], vec![2]], 25.0) else {
            panic!("not frames");
        };
        assert_eq!(frames.frames.len(), 2);
        assert_eq!(frames.fps, 25.0);
    }
}
