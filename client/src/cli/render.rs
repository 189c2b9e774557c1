//! Human-readable rendering of responses: detection tables, class coverage, actions, timings.

use polyhead_client::v1;

use super::layout::{indent, rle_area, table};

/// One line per detection (`label  score  [x1, y1, x2, y2]`), then a count.
pub(crate) fn detections(detections: Option<&v1::Detections>) -> String {
    let Some(detections) = detections else {
        return "no detections\n".to_owned();
    };
    let list = &detections.detections;
    let boxes: Vec<[String; 4]> = list
        .iter()
        .map(|d| {
            let b = d.r#box.unwrap_or_default();
            [b.x1, b.y1, b.x2, b.y2].map(|v| format!("{v:.1}"))
        })
        .collect();
    let width = boxes.iter().flatten().map(String::len).max().unwrap_or(0);
    let rows: Vec<Vec<String>> = list
        .iter()
        .zip(&boxes)
        .map(|(d, coords)| {
            let coords: Vec<String> = coords.iter().map(|c| format!("{c:>width$}")).collect();
            let mut row = vec![
                d.label.clone(),
                format!("{:.3}", d.score),
                format!("[{}]", coords.join(", ")),
            ];
            if let Some(mask) = &d.mask {
                row.push(
                    rle_area(&mask.counts)
                        .map_or_else(|| "mask".to_owned(), |area| format!("mask {area} px")),
                );
            }
            row
        })
        .collect();
    let mut text = table(&rows, &[1]);
    let noun = if list.len() == 1 {
        "detection"
    } else {
        "detections"
    };
    text.push_str(&format!(
        "{} {noun} (image {}x{})\n",
        list.len(),
        detections.image_width,
        detections.image_height
    ));
    text
}

/// The label map's size, then the present classes with their share of the pixels.
pub(crate) fn segmentation(segmentation: Option<&v1::Segmentation>) -> String {
    let Some(map) = segmentation else {
        return "no label map\n".to_owned();
    };
    let mut text = format!(
        "{}x{} label map, {} of {} classes present\n",
        map.width,
        map.height,
        map.present.len(),
        map.class_names.len()
    );
    let rows: Vec<Vec<String>> = map
        .present
        .iter()
        .map(|c| {
            vec![
                c.label.clone(),
                format!("{:.1}%", f64::from(c.fraction) * 100.0),
            ]
        })
        .collect();
    text.push_str(&table(&rows, &[1]));
    text
}

/// The top labels (`label  score`), then the timestamps of the frames used.
pub(crate) fn actions(actions: Option<&v1::Actions>) -> String {
    let Some(actions) = actions else {
        return "no actions\n".to_owned();
    };
    let rows: Vec<Vec<String>> = actions
        .top
        .iter()
        .map(|a| vec![a.label.clone(), format!("{:.3}", a.score)])
        .collect();
    let mut text = table(&rows, &[1]);
    let stamps: Vec<String> = actions
        .frame_timestamps
        .iter()
        .map(|t| format!("{t:.2}"))
        .collect();
    text.push_str(&format!(
        "{} frames used, at {} s\n",
        stamps.len(),
        stamps.join(", ")
    ));
    text
}

/// The stage timings on one line, then the backbone pass count on its own.
pub(crate) fn timings(timings: Option<&v1::Timings>) -> String {
    timings.map_or_else(String::new, |t| {
        format!("{}{}", stage_line(t), passes_line(t, ""))
    })
}

/// `timings: decode .. ms, ...`; `heads` is the sum of every head's inference and
/// post-processing.
fn stage_line(t: &v1::Timings) -> String {
    let heads = t
        .heads
        .iter()
        .fold(0.0, |sum, h| sum + h.inference_ms + h.postprocess_ms);
    format!(
        "timings: decode {:.1} ms, preprocess {:.1} ms, backbone {:.1} ms, heads {heads:.1} ms, \
         postprocess {:.1} ms, total {:.1} ms\n",
        t.decode_ms, t.preprocess_ms, t.backbone_ms, t.postprocess_ms, t.total_ms
    )
}

/// `backbone passes: N`, with the image count when it differs, whether the features came from
/// the server's cache, then `note`.
fn passes_line(t: &v1::Timings, note: &str) -> String {
    let mut line = format!("backbone passes: {}", t.backbone_passes);
    if t.backbone_images != t.backbone_passes {
        line.push_str(&format!(" ({} images)", t.backbone_images));
    }
    if t.features_cached {
        line.push_str(" (features from the cache)");
    }
    if !t.feature_memory.is_empty() {
        line.push_str(&format!(", features in {} memory", t.feature_memory));
    }
    line.push_str(note);
    line.push('\n');
    line
}

/// Every head's result under a heading, then per-head timings and the backbone pass count.
pub(crate) fn analysis(response: &v1::AnalyzeResponse) -> String {
    use v1::head_result::Result as R;
    let mut text = String::new();
    for result in &response.results {
        let (kind, body) = match &result.result {
            Some(R::Detections(d)) => ("detection", detections(Some(d))),
            Some(R::Segmentation(s)) => ("segmentation", segmentation(Some(s))),
            None => ("no result", String::new()),
        };
        text.push_str(&format!("== {} ({kind}) ==\n", result.head));
        text.push_str(&indent(&body, 2));
    }
    if let Some(t) = &response.timings {
        text.push_str(&stage_line(t));
        let rows: Vec<Vec<String>> = t
            .heads
            .iter()
            .map(|h| {
                vec![
                    h.head.clone(),
                    format!("inference {:.1} ms", h.inference_ms),
                    format!("postprocess {:.1} ms", h.postprocess_ms),
                ]
            })
            .collect();
        text.push_str(&indent(&table(&rows, &[]), 2));
        let heads = response.results.len();
        let note = if heads > 1 {
            format!(", shared by {heads} heads")
        } else {
            String::new()
        };
        text.push_str(&passes_line(t, &note));
    }
    text
}
#[cfg(test)]
mod tests {
    use super::*;

    fn detection(label: &str, score: f32, coords: [f32; 4]) -> v1::Detection {
        v1::Detection {
            class_id: 0,
            label: label.into(),
            score,
            r#box: Some(v1::Box {
                x1: coords[0],
                y1: coords[1],
                x2: coords[2],
                y2: coords[3],
            }),
            mask: None,
        }
    }

    #[test]
    fn detections_are_aligned() {
        let list = v1::Detections {
            detections: vec![
                detection("person", 0.98213, [12.0, 34.5, 200.06, 400.0]),
                detection("dog", 0.5, [1.0, 2.0, 3.0, 4.0]),
            ],
            image_width: 640,
            image_height: 480,
        };
        assert_eq!(
            detections(Some(&list)),
            "person  0.982  [ 12.0,  34.5, 200.1, 400.0]\n\
             dog     0.500  [  1.0,   2.0,   3.0,   4.0]\n\
             2 detections (image 640x480)\n"
        );
    }

    #[test]
    fn timings_and_passes() {
        let t = v1::Timings {
            decode_ms: 1.04,
            preprocess_ms: 2.0,
            backbone_ms: 40.55,
            heads: vec![
                v1::HeadTiming {
                    head: "a".into(),
                    inference_ms: 3.0,
                    postprocess_ms: 1.0,
                },
                v1::HeadTiming {
                    head: "b".into(),
                    inference_ms: 2.0,
                    postprocess_ms: 0.0,
                },
            ],
            postprocess_ms: 0.5,
            total_ms: 50.0,
            backbone_passes: 2,
            backbone_images: 16,
            features_cached: false,
            feature_memory: "cuda:0".into(),
        };
        assert_eq!(
            timings(Some(&t)),
            "timings: decode 1.0 ms, preprocess 2.0 ms, backbone 40.5 ms, heads 6.0 ms, \
             postprocess 0.5 ms, total 50.0 ms\n\
             backbone passes: 2 (16 images), features in cuda:0 memory\n"
        );
        assert_eq!(timings(None), "");
        let idle = v1::Timings::default();
        assert!(timings(Some(&idle)).contains(" heads 0.0 ms,"));
        let cached = v1::Timings {
            features_cached: true,
            ..Default::default()
        };
        assert!(
            timings(Some(&cached)).ends_with("backbone passes: 0 (features from the cache)\n"),
            "{}",
            timings(Some(&cached))
        );
    }

    #[test]
    fn analysis_shares_one_pass() {
        let response = v1::AnalyzeResponse {
            results: vec![
                v1::HeadResult {
                    head: "coco".into(),
                    result: Some(v1::head_result::Result::Detections(v1::Detections {
                        detections: vec![detection("cat", 0.5, [1.0, 2.0, 3.0, 4.0])],
                        image_width: 8,
                        image_height: 6,
                    })),
                },
                v1::HeadResult {
                    head: "ade".into(),
                    result: None,
                },
            ],
            timings: Some(v1::Timings {
                heads: vec![v1::HeadTiming {
                    head: "coco".into(),
                    inference_ms: 2.0,
                    postprocess_ms: 1.0,
                }],
                total_ms: 9.0,
                backbone_passes: 1,
                backbone_images: 1,
                ..Default::default()
            }),
        };
        assert_eq!(
            analysis(&response),
            "== coco (detection) ==\n\
             \x20 cat  0.500  [1.0, 2.0, 3.0, 4.0]\n\
             \x20 1 detection (image 8x6)\n\
             == ade (no result) ==\n\
             timings: decode 0.0 ms, preprocess 0.0 ms, backbone 0.0 ms, heads 3.0 ms, \
             postprocess 0.0 ms, total 9.0 ms\n\
             \x20 coco  inference 2.0 ms  postprocess 1.0 ms\n\
             backbone passes: 1, shared by 2 heads\n"
        );
    }

    #[test]
    fn coverage_in_percent() {
        let map = v1::Segmentation {
            label_map_png: Vec::new().into(),
            width: 4,
            height: 2,
            class_names: vec!["sky".into(), "road".into(), "car".into()],
            present: vec![
                v1::ClassCoverage {
                    class_id: 1,
                    label: "road".into(),
                    fraction: 0.875,
                },
                v1::ClassCoverage {
                    class_id: 0,
                    label: "sky".into(),
                    fraction: 0.125,
                },
            ],
        };
        assert_eq!(
            segmentation(Some(&map)),
            "4x2 label map, 2 of 3 classes present\nroad  87.5%\nsky   12.5%\n"
        );
    }

    #[test]
    fn actions_and_timestamps() {
        let actions_list = v1::Actions {
            top: vec![v1::ActionScore {
                class_id: 3,
                label: "juggling".into(),
                score: 0.75,
            }],
            frame_timestamps: vec![0.0, 0.5, 1.0],
        };
        assert_eq!(
            actions(Some(&actions_list)),
            "juggling  0.750\n3 frames used, at 0.00, 0.50, 1.00 s\n"
        );
    }
}
