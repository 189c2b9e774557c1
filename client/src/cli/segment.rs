//! `polyhead segment`: semantic segmentation of one image.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use polyhead_client::{image_from_path, json, v1};

use super::{Output, Session, render};

/// Arguments of `polyhead segment`.
#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// Image file (JPEG, PNG or WebP).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Write the label map (PNG, pixel value = class id) to this file.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Only let these class ids compete for each pixel (repeat the flag or separate with commas).
    #[arg(long = "class", value_name = "ID", value_delimiter = ',')]
    pub classes: Vec<u32>,
    /// Segmentation head to run (default: the model set's only one).
    #[arg(long, value_name = "NAME")]
    pub head: Option<String>,
}

/// Runs `polyhead segment`.
pub(crate) async fn run(session: &Session, out: &Output, args: SegmentArgs) -> anyhow::Result<()> {
    let image = image_from_path(&args.image)?;
    let options = v1::SegmentOptions {
        class_ids: args.classes,
    };
    let head = args.head.unwrap_or_default();
    let client = session.connect().await?;
    let response = client.segment(image, options, &head).await?;
    if let Some(path) = &args.out {
        let png = response
            .segmentation
            .as_ref()
            .map(|s| s.label_map_png.as_ref())
            .unwrap_or_default();
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.emit(&json::SegmentResponse::from(&response), || {
        let mut text = render::segmentation(response.segmentation.as_ref());
        if let Some(path) = &args.out {
            text.push_str(&format!("label map written to {}\n", path.display()));
        }
        text.push_str(&render::timings(response.timings.as_ref()));
        text
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};

    #[test]
    fn segment_flags() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_valid([
            "polyhead", "segment", "room.jpg", "--out", "map.png", "--class", "0,3", "--json",
        ])?;
        assert!(cli.json);
        let Command::Segment(args) = cli.command else {
            panic!("not segment");
        };
        assert_eq!(
            args.out.as_deref().and_then(|p| p.to_str()),
            Some("map.png")
        );
        assert_eq!(args.classes, vec![0, 3]);
        assert_eq!(args.head, None);
        Ok(())
    }
}
