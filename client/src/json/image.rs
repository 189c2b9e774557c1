//! Mirrors of the image results: detections, segmentation and `Analyze`.

use polyhead_proto::v1;
use serde::Serialize;

use super::Timings;

/// Mirror of `DetectResponse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectResponse {
    /// The detections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<Detections>,
    /// Where the time went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// Mirror of `Detections`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detections {
    /// The detected objects.
    pub detections: Vec<Detection>,
    /// Original image width.
    pub image_width: u32,
    /// Original image height.
    pub image_height: u32,
}

/// Mirror of `Detection`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// Class id.
    pub class_id: u32,
    /// Class label.
    pub label: String,
    /// Class score.
    pub score: f32,
    /// Box in original-image pixels.
    #[serde(rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<BoundingBox>,
    /// Instance mask in COCO compressed RLE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<RleMask>,
}

/// Mirror of `Box`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BoundingBox {
    /// Left.
    pub x1: f32,
    /// Top.
    pub y1: f32,
    /// Right.
    pub x2: f32,
    /// Bottom.
    pub y2: f32,
}

/// Mirror of `RleMask`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RleMask {
    /// `[height, width]`.
    pub size: Vec<u32>,
    /// COCO compressed counts string.
    pub counts: String,
}

/// Mirror of `SegmentResponse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentResponse {
    /// The label map summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
    /// Where the time went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// Mirror of `Segmentation` without the PNG bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segmentation {
    /// Label map width.
    pub width: u32,
    /// Label map height.
    pub height: u32,
    /// Class names indexed by class id.
    pub class_names: Vec<String>,
    /// Classes present, by decreasing pixel fraction.
    pub present: Vec<ClassCoverage>,
}

/// Mirror of `ClassCoverage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassCoverage {
    /// Class id.
    pub class_id: u32,
    /// Class label.
    pub label: String,
    /// Fraction of the pixels.
    pub fraction: f32,
}

/// Mirror of `AnalyzeResponse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalyzeResponse {
    /// One result per head.
    pub results: Vec<HeadResult>,
    /// Where the time went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// Mirror of `HeadResult`; at most one of the results is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadResult {
    /// Head name.
    pub head: String,
    /// Result of a detection head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<Detections>,
    /// Result of a segmentation head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
}

impl From<&v1::DetectResponse> for DetectResponse {
    fn from(r: &v1::DetectResponse) -> Self {
        Self {
            detections: r.detections.as_ref().map(Into::into),
            timings: r.timings.as_ref().map(Into::into),
        }
    }
}

impl From<&v1::Detections> for Detections {
    fn from(d: &v1::Detections) -> Self {
        Self {
            detections: d.detections.iter().map(Into::into).collect(),
            image_width: d.image_width,
            image_height: d.image_height,
        }
    }
}

impl From<&v1::Detection> for Detection {
    fn from(d: &v1::Detection) -> Self {
        Self {
            class_id: d.class_id,
            label: d.label.clone(),
            score: d.score,
            bbox: d.r#box.as_ref().map(|b| BoundingBox {
                x1: b.x1,
                y1: b.y1,
                x2: b.x2,
                y2: b.y2,
            }),
            mask: d.mask.as_ref().map(|m| RleMask {
                size: m.size.clone(),
                counts: m.counts.clone(),
            }),
        }
    }
}

impl From<&v1::SegmentResponse> for SegmentResponse {
    fn from(r: &v1::SegmentResponse) -> Self {
        Self {
            segmentation: r.segmentation.as_ref().map(Into::into),
            timings: r.timings.as_ref().map(Into::into),
        }
    }
}

impl From<&v1::Segmentation> for Segmentation {
    fn from(s: &v1::Segmentation) -> Self {
        Self {
            width: s.width,
            height: s.height,
            class_names: s.class_names.clone(),
            present: s
                .present
                .iter()
                .map(|c| ClassCoverage {
                    class_id: c.class_id,
                    label: c.label.clone(),
                    fraction: c.fraction,
                })
                .collect(),
        }
    }
}

impl From<&v1::AnalyzeResponse> for AnalyzeResponse {
    fn from(r: &v1::AnalyzeResponse) -> Self {
        Self {
            results: r.results.iter().map(Into::into).collect(),
            timings: r.timings.as_ref().map(Into::into),
        }
    }
}

impl From<&v1::HeadResult> for HeadResult {
    fn from(r: &v1::HeadResult) -> Self {
        use v1::head_result::Result as R;
        let (detections, segmentation) = match &r.result {
            Some(R::Detections(d)) => (Some(d.into()), None),
            Some(R::Segmentation(s)) => (None, Some(s.into())),
            None => (None, None),
        };
        Self {
            head: r.head.clone(),
            detections,
            segmentation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings() -> v1::Timings {
        v1::Timings {
            decode_ms: 1.5,
            preprocess_ms: 2.0,
            backbone_ms: 10.25,
            heads: vec![v1::HeadTiming {
                head: "det".into(),
                inference_ms: 3.0,
                postprocess_ms: 0.5,
            }],
            postprocess_ms: 0.75,
            total_ms: 18.0,
            backbone_passes: 1,
            backbone_images: 1,
            features_cached: false,
            feature_memory: "cpu".into(),
        }
    }

    #[test]
    fn detect_response() -> serde_json::Result<()> {
        let response = v1::DetectResponse {
            detections: Some(v1::Detections {
                detections: vec![v1::Detection {
                    class_id: 17,
                    label: "cat".into(),
                    score: 0.875,
                    r#box: Some(v1::Box {
                        x1: 1.0,
                        y1: 2.5,
                        x2: 30.0,
                        y2: 40.0,
                    }),
                    mask: Some(v1::RleMask {
                        size: vec![48, 64],
                        counts: "PPa0".into(),
                    }),
                }],
                image_width: 64,
                image_height: 48,
            }),
            timings: Some(timings()),
        };
        let json = serde_json::to_string(&DetectResponse::from(&response))?;
        assert_eq!(
            json,
            concat!(
                r#"{"detections":{"detections":[{"class_id":17,"label":"cat","score":0.875,"#,
                r#""box":{"x1":1.0,"y1":2.5,"x2":30.0,"y2":40.0},"#,
                r#""mask":{"size":[48,64],"counts":"PPa0"}}],"image_width":64,"image_height":48},"#,
                r#""timings":{"decode_ms":1.5,"preprocess_ms":2.0,"backbone_ms":10.25,"#,
                r#""heads":[{"head":"det","inference_ms":3.0,"postprocess_ms":0.5}],"#,
                r#""postprocess_ms":0.75,"total_ms":18.0,"backbone_passes":1,"backbone_images":1,"#,
                r#""features_cached":false,"feature_memory":"cpu"}}"#
            )
        );
        Ok(())
    }

    #[test]
    fn segmentation_leaves_out_the_png() -> serde_json::Result<()> {
        let response = v1::SegmentResponse {
            segmentation: Some(v1::Segmentation {
                label_map_png: vec![0x89, b'P', b'N', b'G'].into(),
                width: 4,
                height: 2,
                class_names: vec!["sky".into(), "road".into()],
                present: vec![v1::ClassCoverage {
                    class_id: 1,
                    label: "road".into(),
                    fraction: 1.0,
                }],
            }),
            timings: None,
        };
        let json = serde_json::to_string(&SegmentResponse::from(&response))?;
        assert_eq!(
            json,
            r#"{"segmentation":{"width":4,"height":2,"class_names":["sky","road"],"present":[{"class_id":1,"label":"road","fraction":1.0}]}}"#
        );
        Ok(())
    }

    #[test]
    fn analyze_results_name_their_kind() -> serde_json::Result<()> {
        let response = v1::AnalyzeResponse {
            results: vec![v1::HeadResult {
                head: "det".into(),
                result: Some(v1::head_result::Result::Detections(
                    v1::Detections::default(),
                )),
            }],
            timings: None,
        };
        let json = serde_json::to_string(&AnalyzeResponse::from(&response))?;
        assert_eq!(
            json,
            r#"{"results":[{"head":"det","detections":{"detections":[],"image_width":0,"image_height":0}}]}"#
        );
        Ok(())
    }
}
