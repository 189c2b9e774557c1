//! The benchmark's inputs: a real photo, preprocessed with the server's own decoder and
//! preprocessing, and clips made from a photo with the `ffmpeg` CLI whose frames are decoded
//! with the server's own video decoder, so the in-process rows see the same pixels the server does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use image::RgbImage;
use polyhead_client::Bytes;
use polyhead_server::geometry::Geometry;
use polyhead_server::manifest::Manifest;
use polyhead_server::media::Cancel;
use polyhead_server::media::image::{ImageLimits, decode};
use polyhead_server::media::preprocess::{PreprocessSpec, preprocess};
use polyhead_server::media::video::{Sampling, VideoLimits, decode_clip};

use crate::raw::Tensor;

/// The backbone's preprocessing, as the server derives it from the manifest.
pub fn preprocess_spec(models: &Path) -> Result<PreprocessSpec> {
    let manifest = Manifest::load(models).map_err(|e| anyhow!("{e}"))?;
    Ok(polyhead_server::model_set::preprocess_spec(
        &manifest.backbone,
    ))
}

/// The photo's encoded bytes, its RGB pixels and its `[1, 3, H, W]` input tensor.
pub struct Photo {
    pub encoded: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    pub tensor: Tensor,
    /// The preprocessing that made `tensor`.
    pub spec: PreprocessSpec,
}

/// Decodes and preprocesses the photo at `path` as the server would.
pub fn photo(path: &Path, spec: &PreprocessSpec) -> Result<Photo> {
    let encoded = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let (image, tensor, _) = prepare(&encoded, spec)?;
    Ok(Photo {
        encoded,
        width: image.width(),
        height: image.height(),
        rgb: image.into_raw(),
        tensor,
        spec: *spec,
    })
}

/// `encoded` decoded and preprocessed with the server's own functions: its pixels, its
/// `[1, 3, H, W]` backbone input and the geometry that maps results back onto it.
pub fn prepare(encoded: &[u8], spec: &PreprocessSpec) -> Result<(RgbImage, Tensor, Geometry)> {
    let image = decode(encoded, &ImageLimits::default()).map_err(|e| anyhow!("{e}"))?;
    let (data, geometry) = preprocess(&image, spec);
    let shape = [
        1,
        3,
        geometry.input_height as usize,
        geometry.input_width as usize,
    ];
    Ok((image, Tensor { shape, data }, geometry))
}

/// Makes an H.264 MP4 of `frames` frames at 16 frames/s from `photo`, a window panning across it
/// so that consecutive frames differ, unless `out` already exists.
pub fn make_clip(photo: &Path, frames: usize, out: &Path) -> Result<PathBuf> {
    if out.is_file() {
        return Ok(out.to_path_buf());
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let status = Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-framerate", "16", "-loop", "1", "-i"])
        .arg(photo)
        .args([
            "-vf",
            "crop=iw*3/4:ih*3/4:x='mod(n*3,iw/4)':y='mod(n*2,ih/4)',scale=trunc(iw/2)*2:trunc(ih/2)*2",
            "-frames:v",
            &frames.to_string(),
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(out)
        .status()
        .context("run ffmpeg (the CLI makes the benchmark's clips)")?;
    if !status.success() {
        bail!("ffmpeg failed ({status}) making {}", out.display());
    }
    Ok(out.to_path_buf())
}

/// The clip's `frames` uniformly sampled frames, decoded by the server's decoder and
/// preprocessed into one `[frames, 3, H, W]` batch.
pub fn clip_tensor(clip: &Bytes, frames: usize, spec: &PreprocessSpec) -> Result<Tensor> {
    let decoded = decode_clip(
        clip,
        &VideoLimits::default(),
        &Sampling::uniform(frames),
        &Cancel::default(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let mut data = Vec::new();
    let mut shape = [decoded.frames.len(), 3, 0, 0];
    for frame in &decoded.frames {
        let (tensor, geometry) = preprocess(frame, spec);
        shape[2] = geometry.input_height as usize;
        shape[3] = geometry.input_width as usize;
        data.extend_from_slice(&tensor);
    }
    if decoded.frames.len() != frames {
        bail!(
            "the clip gave {} frames, {frames} wanted",
            decoded.frames.len()
        );
    }
    Ok(Tensor { shape, data })
}

/// `rgb` (`width` pixels a row) with its top 16 rows overwritten by `n`'s 32 low bits as black
/// and white blocks: a different image for every `n` that stays different after the backbone's
/// downscaling (a feature-cache miss), at the same cost to decode and preprocess.
pub fn variant(rgb: &[u8], width: u32, n: u64) -> Vec<u8> {
    let mut out = rgb.to_vec();
    let width = width.max(1) as usize;
    let block = (width / 32).max(1);
    for row in out.chunks_exact_mut(width * 3).take(16) {
        for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
            let bit = (x / block).min(31);
            let on = (n >> bit) & 1 == 1;
            pixel.fill(if on { 255 } else { 0 });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_differ_only_in_their_top_rows() {
        let rgb = vec![7u8; 64 * 20 * 3];
        let (a, b) = (variant(&rgb, 64, 1), variant(&rgb, 64, 2));
        assert_ne!(a, b);
        assert_eq!(a.len(), rgb.len());
        assert_eq!(a[64 * 16 * 3..], rgb[64 * 16 * 3..]);
    }
}
