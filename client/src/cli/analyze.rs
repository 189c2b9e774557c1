//! `polyhead analyze`: several heads on one image from a single backbone pass.

use std::path::PathBuf;

use clap::Args;
use polyhead_client::{Client, image_from_path, json, v1};

use super::detect::DetectFlags;
use super::{Output, Session, render};

/// Arguments of `polyhead analyze`.
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Image file (JPEG, PNG or WebP).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Head to run; repeat for several (default: every detection and segmentation head).
    #[arg(long = "head", value_name = "NAME")]
    pub heads: Vec<String>,
    /// Options of the detection heads.
    #[command(flatten)]
    pub detect: DetectFlags,
    /// Only return these detection class ids (repeat the flag or separate with commas).
    #[arg(long = "detect-class", value_name = "ID", value_delimiter = ',')]
    pub detect_classes: Vec<u32>,
    /// Only let these class ids compete in segmentation (repeat or separate with commas).
    #[arg(long = "segment-class", value_name = "ID", value_delimiter = ',')]
    pub segment_classes: Vec<u32>,
}

/// Runs `polyhead analyze`.
pub(crate) async fn run(session: &Session, out: &Output, args: AnalyzeArgs) -> anyhow::Result<()> {
    let image = image_from_path(&args.image)?;
    let client = session.connect().await?;
    let heads = if args.heads.is_empty() {
        image_heads(&client).await?
    } else {
        args.heads
    };
    let detect_options = args.detect.to_options(args.detect_classes);
    let segment_options = v1::SegmentOptions {
        class_ids: args.segment_classes,
    };
    let response = client
        .analyze(image, heads, detect_options, segment_options)
        .await?;
    out.emit(&json::AnalyzeResponse::from(&response), || {
        render::analysis(&response)
    })
}

/// Every detection and segmentation head of the model set.
async fn image_heads(client: &Client) -> anyhow::Result<Vec<String>> {
    let models = client.list_models().await?;
    let heads: Vec<String> = models
        .heads
        .into_iter()
        .filter(|head| {
            matches!(
                v1::HeadKind::try_from(head.kind),
                Ok(v1::HeadKind::Detection | v1::HeadKind::Segmentation)
            )
        })
        .map(|head| head.name)
        .collect();
    if heads.is_empty() {
        anyhow::bail!(
            "model set {:?} has no detection or segmentation heads",
            models.model_set
        );
    }
    Ok(heads)
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};

    #[test]
    fn analyze_flags() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_valid([
            "polyhead",
            "analyze",
            "street.jpg",
            "--head",
            "coco",
            "--head",
            "ade",
            "--masks",
            "--detect-class",
            "0",
            "--segment-class",
            "1,2",
        ])?;
        let Command::Analyze(args) = cli.command else {
            panic!("not analyze");
        };
        assert_eq!(args.heads, ["coco", "ade"]);
        assert!(args.detect.masks);
        assert_eq!(args.detect_classes, [0]);
        assert_eq!(args.segment_classes, [1, 2]);
        Ok(())
    }

    #[test]
    fn analyze_without_heads() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_valid(["polyhead", "analyze", "street.jpg"])?;
        let Command::Analyze(args) = cli.command else {
            panic!("not analyze");
        };
        assert!(args.heads.is_empty());
        Ok(())
    }
}
