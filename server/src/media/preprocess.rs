//! Turns an RGB image into the backbone's input tensor.
//!
//! The image is resized (bilinear) according to a [`ResizePolicy`], placed on a canvas filled
//! with the pad value, and normalised per channel as `(x / 255 - mean) / std` into planar CHW
//! `f32` (channel order R, G, B). The returned [`Geometry`] records where the image landed, so
//! head outputs can be mapped back onto the original.

use std::borrow::Cow;

use ::image::RgbImage;
use ::image::imageops::{self, FilterType as ImageFilter};
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};

use super::MediaError;
use crate::geometry::Geometry;

/// How an image is fitted to the backbone's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizePolicy {
    /// Keep the aspect ratio, fit inside `width` x `height` and centre on a padded canvas.
    Letterbox {
        /// Input width in pixels.
        width: u32,
        /// Input height in pixels.
        height: u32,
    },
    /// Stretch each axis to `width` x `height`.
    Resize {
        /// Input width in pixels.
        width: u32,
        /// Input height in pixels.
        height: u32,
    },
    /// Keep the aspect ratio, shrink so the longer side is at most `max_side`, place top-left and
    /// pad right and bottom up to multiples of `multiple`.
    KeepAspect {
        /// Longest side after scaling, in pixels.
        max_side: u32,
        /// Each input side is a multiple of this.
        multiple: u32,
    },
}

impl ResizePolicy {
    /// Where an image of `width` x `height` lands in the input under this policy.
    ///
    /// Zero sizes (in the image or the policy) are treated as 1 so the result is always usable.
    pub fn geometry(&self, width: u32, height: u32) -> Geometry {
        let (w, h) = (width.max(1), height.max(1));
        match *self {
            Self::Letterbox { width, height } => {
                Geometry::letterbox(w, h, width.max(1), height.max(1))
            }
            Self::Resize { width, height } => Geometry::resize(w, h, width.max(1), height.max(1)),
            Self::KeepAspect { max_side, multiple } => {
                Geometry::keep_aspect(w, h, max_side.max(1), multiple)
            }
        }
    }
}

/// Everything needed to turn an image into the backbone's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessSpec {
    /// How the image is fitted to the input.
    pub resize: ResizePolicy,
    /// Per-channel mean (R, G, B) of pixels scaled to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B) of pixels scaled to `[0, 1]`.
    pub std: [f32; 3],
    /// Value (0..=255, every channel) of the padding before normalisation.
    pub pad_value: u8,
}

impl PreprocessSpec {
    /// Number of `f32`s in the tensor for one image placed by `geometry`: `3 * H * W`.
    pub fn tensor_len(geometry: &Geometry) -> usize {
        3 * geometry.input_width as usize * geometry.input_height as usize
    }
}

/// Preprocesses one image into a fresh CHW tensor of `3 * input_height * input_width` floats.
pub fn preprocess(img: &RgbImage, spec: &PreprocessSpec) -> (Vec<f32>, Geometry) {
    let geometry = spec.resize.geometry(img.width(), img.height());
    let mut out = vec![0.0; PreprocessSpec::tensor_len(&geometry)];
    fill(img, spec, &geometry, &mut out);
    (out, geometry)
}

/// Preprocesses one image into `out`, which must hold exactly the tensor's
/// `3 * input_height * input_width` floats (see [`ResizePolicy::geometry`] and
/// [`PreprocessSpec::tensor_len`]); useful to fill one slot of a batch.
pub fn preprocess_into(
    img: &RgbImage,
    spec: &PreprocessSpec,
    out: &mut [f32],
) -> Result<Geometry, MediaError> {
    let geometry = spec.resize.geometry(img.width(), img.height());
    let expected = PreprocessSpec::tensor_len(&geometry);
    if out.len() != expected {
        return Err(MediaError::OutputSizeMismatch {
            len: out.len(),
            expected,
        });
    }
    fill(img, spec, &geometry, out);
    Ok(geometry)
}

/// Writes the padded, normalised tensor for `img` into `out` (already the right length).
fn fill(img: &RgbImage, spec: &PreprocessSpec, geometry: &Geometry, out: &mut [f32]) {
    let lut = Lut::new(spec);
    let plane = geometry.input_width as usize * geometry.input_height as usize;
    let padded = geometry.resized_width != geometry.input_width
        || geometry.resized_height != geometry.input_height;
    if padded || img.width() == 0 || img.height() == 0 {
        for (c, channel) in out.chunks_exact_mut(plane).enumerate() {
            channel.fill(lut.value(c, spec.pad_value));
        }
    }
    if img.width() == 0 || img.height() == 0 {
        return;
    }
    let resized = resized(img, geometry.resized_width, geometry.resized_height);
    write_planes(&resized, geometry, &lut, out);
}

/// `img` at `width` x `height`, borrowed when it already has that size.
fn resized(img: &RgbImage, width: u32, height: u32) -> Cow<'_, RgbImage> {
    if img.dimensions() == (width, height) {
        return Cow::Borrowed(img);
    }
    let mut dst = RgbImage::new(width, height);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    match Resizer::new().resize(img, &mut dst, &options) {
        Ok(()) => Cow::Owned(dst),
        Err(_) => Cow::Owned(imageops::resize(img, width, height, ImageFilter::Triangle)),
    }
}

/// Copies the resized image (at least 1x1) into the three planes at the geometry's offset,
/// normalising.
fn write_planes(img: &RgbImage, geometry: &Geometry, lut: &Lut, out: &mut [f32]) {
    let in_w = geometry.input_width as usize;
    let plane = in_w * geometry.input_height as usize;
    let (pad_x, pad_y) = (geometry.pad_x as usize, geometry.pad_y as usize);
    let width = (img.width() as usize).min(in_w.saturating_sub(pad_x));
    let rows = (geometry.input_height as usize).saturating_sub(pad_y);
    for (y, row) in img
        .as_raw()
        .chunks_exact(img.width() as usize * 3)
        .take(rows)
        .enumerate()
    {
        let start = (y + pad_y) * in_w + pad_x;
        for c in 0..3 {
            let dst = &mut out[c * plane + start..c * plane + start + width];
            for (d, px) in dst.iter_mut().zip(row.chunks_exact(3)) {
                *d = lut.value(c, px[c]);
            }
        }
    }
}

/// The normalised value of every byte, per channel.
struct Lut([[f32; 256]; 3]);

impl Lut {
    fn new(spec: &PreprocessSpec) -> Self {
        let mut table = [[0.0; 256]; 3];
        for (c, channel) in table.iter_mut().enumerate() {
            for (v, slot) in channel.iter_mut().enumerate() {
                *slot = (v as f32 / 255.0 - spec.mean[c]) / spec.std[c];
            }
        }
        Self(table)
    }

    fn value(&self, channel: usize, byte: u8) -> f32 {
        self.0[channel][usize::from(byte)]
    }
}

#[cfg(test)]
mod tests {
    use ::image::Rgb;

    use super::*;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];

    fn spec(resize: ResizePolicy) -> PreprocessSpec {
        PreprocessSpec {
            resize,
            mean: MEAN,
            std: STD,
            pad_value: 114,
        }
    }

    fn norm(value: u8, c: usize) -> f32 {
        (f32::from(value) / 255.0 - MEAN[c]) / STD[c]
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-4
    }

    /// The value at channel `c`, row `y`, column `x` of a CHW tensor of width `w`, height `h`.
    fn at(t: &[f32], w: usize, h: usize, c: usize, y: usize, x: usize) -> f32 {
        t[c * w * h + y * w + x]
    }

    #[test]
    fn constant_image_normalises_per_channel() {
        let img = RgbImage::from_pixel(8, 4, Rgb([10, 128, 250]));
        let (t, g) = preprocess(
            &img,
            &spec(ResizePolicy::Resize {
                width: 6,
                height: 3,
            }),
        );
        assert_eq!((g.input_width, g.input_height), (6, 3));
        assert_eq!(t.len(), 3 * 6 * 3);
        for (c, value) in [10u8, 128, 250].into_iter().enumerate() {
            let plane = &t[c * 18..(c + 1) * 18];
            assert!(
                plane.iter().all(|&v| close(v, norm(value, c))),
                "channel {c}: {plane:?}"
            );
        }
    }

    #[test]
    fn letterbox_pads_top_and_bottom_of_a_wide_image() {
        let img = RgbImage::from_pixel(8, 4, Rgb([200, 100, 50]));
        let (t, g) = preprocess(
            &img,
            &spec(ResizePolicy::Letterbox {
                width: 4,
                height: 4,
            }),
        );
        assert_eq!(g, Geometry::letterbox(8, 4, 4, 4));
        assert_eq!(
            (g.resized_width, g.resized_height, g.pad_x, g.pad_y),
            (4, 2, 0.0, 1.0)
        );
        for c in 0..3 {
            for x in 0..4 {
                assert!(close(at(&t, 4, 4, c, 0, x), norm(114, c)));
                assert!(close(at(&t, 4, 4, c, 3, x), norm(114, c)));
                for y in 1..3 {
                    assert!(close(at(&t, 4, 4, c, y, x), norm([200, 100, 50][c], c)));
                }
            }
        }
    }

    #[test]
    fn keep_aspect_places_top_left_and_pads_right_and_bottom() {
        let img = RgbImage::from_pixel(5, 3, Rgb([0, 255, 0]));
        let policy = ResizePolicy::KeepAspect {
            max_side: 100,
            multiple: 4,
        };
        let (t, g) = preprocess(&img, &spec(policy));
        assert_eq!((g.input_width, g.input_height), (8, 4));
        assert_eq!((g.resized_width, g.resized_height), (5, 3));
        for y in 0..4 {
            for x in 0..8 {
                let inside = x < 5 && y < 3;
                let expected = if inside { 255 } else { 114 };
                assert!(
                    close(at(&t, 8, 4, 1, y, x), norm(expected, 1)),
                    "({x}, {y})"
                );
            }
        }
    }

    #[test]
    fn layout_is_chw_in_rgb_order_without_resizing() {
        let img = RgbImage::from_fn(3, 2, |x, y| {
            Rgb([(10 * x + y) as u8, 100 + x as u8, 200 + y as u8])
        });
        let unit = PreprocessSpec {
            resize: ResizePolicy::Resize {
                width: 3,
                height: 2,
            },
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            pad_value: 0,
        };
        let (t, _) = preprocess(&img, &unit);
        let expected: Vec<f32> = [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]
            .into_iter()
            .chain([100.0, 101.0, 102.0, 100.0, 101.0, 102.0])
            .chain([200.0, 200.0, 200.0, 201.0, 201.0, 201.0])
            .collect();
        assert!(
            t.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-3),
            "{t:?}"
        );
    }

    #[test]
    fn downscaling_keeps_the_picture_where_it_was() {
        let img = RgbImage::from_fn(64, 32, |x, _| {
            if x < 32 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let (t, g) = preprocess(
            &img,
            &spec(ResizePolicy::Letterbox {
                width: 16,
                height: 16,
            }),
        );
        assert_eq!((g.resized_width, g.resized_height, g.pad_y), (16, 8, 4.0));
        assert!(close(at(&t, 16, 16, 0, 8, 2), norm(255, 0)));
        assert!(close(at(&t, 16, 16, 2, 8, 2), norm(0, 2)));
        assert!(close(at(&t, 16, 16, 0, 8, 13), norm(0, 0)));
        assert!(close(at(&t, 16, 16, 2, 8, 13), norm(255, 2)));
    }

    #[test]
    fn preprocess_into_checks_the_buffer_and_matches_preprocess() {
        let img = RgbImage::from_fn(7, 5, |x, y| Rgb([x as u8 * 30, y as u8 * 40, 77]));
        let s = spec(ResizePolicy::Letterbox {
            width: 8,
            height: 8,
        });
        let (expected, g) = preprocess(&img, &s);
        let mut batch = vec![f32::NAN; 2 * expected.len()];
        let (first, second) = batch.split_at_mut(expected.len());
        assert_eq!(preprocess_into(&img, &s, second), Ok(g));
        assert_eq!(second, &expected[..]);
        assert!(first.iter().all(|v| v.is_nan()));
        let err = preprocess_into(&img, &s, &mut batch).expect_err("wrong length");
        assert!(matches!(err, MediaError::OutputSizeMismatch { .. }));
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let empty = RgbImage::new(0, 0);
        let (t, _) = preprocess(
            &empty,
            &spec(ResizePolicy::Letterbox {
                width: 4,
                height: 4,
            }),
        );
        assert!(
            t.iter()
                .enumerate()
                .all(|(i, &v)| close(v, norm(114, i / 16)))
        );
        let img = RgbImage::from_pixel(1, 1000, Rgb([1, 2, 3]));
        let (t, g) = preprocess(
            &img,
            &spec(ResizePolicy::Letterbox {
                width: 0,
                height: 0,
            }),
        );
        assert_eq!((t.len(), g.input_width), (3, 1));
        let (t, _) = preprocess(
            &img,
            &spec(ResizePolicy::KeepAspect {
                max_side: 0,
                multiple: 0,
            }),
        );
        assert_eq!(t.len(), 3);
    }
}
