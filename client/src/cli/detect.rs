//! `polyhead detect`: object detection on one image.

use std::path::PathBuf;

use clap::Args;
use polyhead_client::{image_from_path, json, v1};

use super::{Output, Session, parse_positive_unit, parse_unit, render};

/// Arguments of `polyhead detect`.
#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Image file (JPEG, PNG or WebP).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Detection options.
    #[command(flatten)]
    pub options: DetectFlags,
    /// Only return these class ids (repeat the flag or separate with commas).
    #[arg(long = "class", value_name = "ID", value_delimiter = ',')]
    pub classes: Vec<u32>,
    /// Detection head to run (default: the model set's only one).
    #[arg(long, value_name = "NAME")]
    pub head: Option<String>,
}

/// Detection options shared by `detect` and `analyze`.
#[derive(Debug, Args)]
pub struct DetectFlags {
    /// Minimum score in [0, 1] (default: the model set's).
    #[arg(long, value_name = "F", value_parser = parse_unit)]
    pub score_threshold: Option<f32>,
    /// IoU in (0, 1] above which overlapping boxes of a class are suppressed (default: the
    /// model set's).
    #[arg(long, value_name = "F", value_parser = parse_positive_unit)]
    pub iou_threshold: Option<f32>,
    /// Maximum number of detections (default: the model set's).
    #[arg(long, value_name = "N")]
    pub max_detections: Option<u32>,
    /// Also compute instance masks (COCO RLE).
    #[arg(long)]
    pub masks: bool,
}

impl DetectFlags {
    /// The request options, restricted to `class_ids` when not empty.
    pub fn to_options(&self, class_ids: Vec<u32>) -> v1::DetectOptions {
        v1::DetectOptions {
            score_threshold: self.score_threshold,
            iou_threshold: self.iou_threshold,
            max_detections: self.max_detections.unwrap_or(0),
            class_ids,
            masks: self.masks,
        }
    }
}

/// Runs `polyhead detect`.
pub(crate) async fn run(session: &Session, out: &Output, args: DetectArgs) -> anyhow::Result<()> {
    let image = image_from_path(&args.image)?;
    let options = args.options.to_options(args.classes);
    let head = args.head.unwrap_or_default();
    let client = session.connect().await?;
    let response = client.detect(image, options, &head).await?;
    out.emit(&json::DetectResponse::from(&response), || {
        let mut text = render::detections(response.detections.as_ref());
        text.push_str(&render::timings(response.timings.as_ref()));
        text
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};

    #[test]
    fn detect_flags() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_valid([
            "polyhead",
            "detect",
            "street.jpg",
            "--score-threshold",
            "0.4",
            "--iou-threshold=0.6",
            "--max-detections",
            "20",
            "--class",
            "1,3",
            "--class",
            "17",
            "--masks",
            "--head",
            "coco",
        ])?;
        let Command::Detect(args) = cli.command else {
            panic!("not detect: {:?}", cli.command);
        };
        assert_eq!(args.image.to_str(), Some("street.jpg"));
        assert_eq!(args.head.as_deref(), Some("coco"));
        let options = args.options.to_options(args.classes);
        assert_eq!(options.score_threshold, Some(0.4));
        assert_eq!(options.iou_threshold, Some(0.6));
        assert_eq!(options.max_detections, 20);
        assert_eq!(options.class_ids, vec![1, 3, 17]);
        assert!(options.masks);
        Ok(())
    }

    #[test]
    fn detect_defaults_leave_options_unset() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_valid(["polyhead", "detect", "a.png"])?;
        let Command::Detect(args) = cli.command else {
            panic!("not detect");
        };
        assert_eq!(args.head, None);
        let options = args.options.to_options(args.classes);
        assert_eq!(options, polyhead_client::v1::DetectOptions::default());
        Ok(())
    }
}
