//! Action head: clip-level class logits turned into the most probable actions.

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use super::{ClassScore, HeadError};

/// The `[heads.params]` of an action head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionParams {
    /// Number of frames sampled from a clip by default.
    pub frames: u32,
    /// Largest number of frames a request may ask for.
    pub max_frames: u32,
    /// The one clip length the model takes when its ONNX file fixes the time axis (read from
    /// the model at load, not from the manifest): every request samples exactly this many.
    #[serde(skip)]
    pub fixed_frames: Option<u32>,
}

impl Default for ActionParams {
    fn default() -> Self {
        Self {
            frames: 8,
            max_frames: 64,
            fixed_frames: None,
        }
    }
}

impl ActionParams {
    /// Checks that `1 <= frames <= max_frames`.
    pub fn validate(&self) -> Result<(), HeadError> {
        if self.frames == 0 || self.frames > self.max_frames {
            return Err(HeadError::InvalidParams(format!(
                "action: need 1 <= frames <= max_frames, got frames = {} and max_frames = {}",
                self.frames, self.max_frames
            )));
        }
        Ok(())
    }

    /// Fits the parameters to a model whose time axis is `axis` (negative: dynamic). A fixed
    /// axis must equal `frames`; requests then take exactly that many frames.
    pub fn fit_time_axis(&mut self, axis: i64) -> Result<(), HeadError> {
        if axis < 0 {
            return Ok(());
        }
        if axis != i64::from(self.frames) {
            return Err(HeadError::InvalidParams(format!(
                "action: the model takes exactly {axis} frames (its time axis is fixed), but \
                 frames = {}; set frames = {axis} or export the model with a dynamic axis 0",
                self.frames
            )));
        }
        self.max_frames = self.frames;
        self.fixed_frames = Some(self.frames);
        Ok(())
    }

    /// How many frames a request samples: `wanted`, or the default `frames` for 0, within the
    /// head's `max_frames` and the server's `server_max` (`--max-frames`), and the model's own
    /// clip length when it is fixed. The error names `field`, the request's option.
    pub fn clip_frames(&self, wanted: u32, server_max: u32, field: &str) -> Result<u32, String> {
        if let Some(fixed) = self.fixed_frames {
            return if fixed > server_max {
                Err(format!(
                    "this head's model takes exactly {fixed} frames, over the server's limit of \
                     {server_max} (--max-frames)"
                ))
            } else if wanted != 0 && wanted != fixed {
                Err(format!(
                    "{field} is {wanted}; this head's model takes exactly {fixed} frames"
                ))
            } else {
                Ok(fixed)
            };
        }
        let most = server_max.min(self.max_frames);
        let frames = if wanted == 0 {
            self.frames.min(most)
        } else {
            wanted
        };
        if frames > most {
            return Err(format!(
                "{field} is {frames}; the limit is {most} (--max-frames and the head's max_frames)"
            ));
        }
        Ok(frames)
    }

    /// Refuses a clip of `frames` sampled frames that the model cannot take: one whose clip
    /// length is fixed takes exactly that many.
    pub fn check_clip(&self, frames: usize) -> Result<(), String> {
        match self.fixed_frames {
            Some(fixed) if frames != fixed as usize => Err(format!(
                "{frames} frames were sampled from the clip; this head's model takes exactly \
                 {fixed}"
            )),
            _ => Ok(()),
        }
    }
}

/// Numerically stable softmax: the maximum is subtracted before exponentiating.
///
/// An empty input gives an empty output; non-finite logits give non-finite probabilities.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The `k` most probable classes (softmax of `logits`) by decreasing probability, ties by class id.
///
/// `k` is clamped to the number of classes.
pub fn top_k(logits: &[f32], k: usize) -> Vec<ClassScore> {
    let mut scores: Vec<ClassScore> = (0u32..)
        .zip(softmax(logits))
        .map(|(class_id, score)| ClassScore { class_id, score })
        .collect();
    scores.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.class_id.cmp(&b.class_id))
    });
    scores.truncate(k);
    scores
}

/// Turns the `[1, C]` logits of a clip into its `k` most probable classes (see [`top_k`]).
pub fn postprocess(logits: ArrayView2<'_, f32>, k: usize) -> Result<Vec<ClassScore>, HeadError> {
    if logits.nrows() != 1 || logits.ncols() == 0 {
        return Err(HeadError::shape(
            "logits",
            logits.shape(),
            "[1, C] with C >= 1",
        ));
    }
    Ok(top_k(&logits.row(0).to_vec(), k))
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn softmax_of_hand_computed_values() {
        // e^0, e^1, e^2 = 1, 2.7182817, 7.389056; sum 11.107338.
        let p = softmax(&[0.0, 1.0, 2.0]);
        assert!(
            close(&p, &[0.090_030_57, 0.244_728_48, 0.665_240_94]),
            "{p:?}"
        );
        assert!(close(&softmax(&[3.0, 3.0]), &[0.5, 0.5]));
        assert!(close(&softmax(&[5.0]), &[1.0]));
        assert!(softmax(&[]).is_empty());
    }

    #[test]
    fn softmax_does_not_overflow_on_large_logits() {
        // 1 / (1 + e) and e / (1 + e).
        let p = softmax(&[1000.0, 1001.0, -1000.0]);
        assert!(close(&p, &[0.268_941_42, 0.731_058_6, 0.0]), "{p:?}");
        let p = softmax(&[f32::MAX, f32::MAX]);
        assert!(close(&p, &[0.5, 0.5]), "{p:?}");
    }

    #[test]
    fn top_k_sorts_by_probability_then_class_id() {
        let top = top_k(&[1.0, 3.0, 0.0, 3.0, 2.0], 3);
        let ids: Vec<u32> = top.iter().map(|c| c.class_id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        let p = softmax(&[1.0, 3.0, 0.0, 3.0, 2.0]);
        assert!(close(
            &top.iter().map(|c| c.score).collect::<Vec<_>>(),
            &[p[1], p[3], p[4]]
        ));
    }

    #[test]
    fn top_k_clamps_k_to_the_number_of_classes() {
        assert_eq!(top_k(&[0.0, 1.0], 10).len(), 2);
        assert!(top_k(&[0.0, 1.0], 0).is_empty());
        assert!(top_k(&[], 5).is_empty());
    }

    #[test]
    fn postprocess_checks_the_shape() {
        let logits = Array2::from_shape_vec((1, 3), vec![0.0, 2.0, 1.0]).expect("3 values");
        let top = postprocess(logits.view(), 1).expect("valid");
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].class_id, 1);
        let two = Array2::<f32>::zeros((2, 3));
        assert!(matches!(
            postprocess(two.view(), 1),
            Err(HeadError::Shape { .. })
        ));
        let none = Array2::<f32>::zeros((1, 0));
        assert!(matches!(
            postprocess(none.view(), 1),
            Err(HeadError::Shape { .. })
        ));
    }

    #[test]
    fn params_deserialize_with_contract_defaults() {
        let parsed: ActionParams = toml::from_str("").expect("empty table");
        assert_eq!(
            parsed,
            ActionParams {
                frames: 8,
                max_frames: 64,
                fixed_frames: None,
            }
        );
        assert!(parsed.validate().is_ok());
        let parsed: ActionParams = toml::from_str("frames = 16").expect("valid");
        assert_eq!((parsed.frames, parsed.max_frames), (16, 64));
        assert!(toml::from_str::<ActionParams>("frame = 16").is_err());
        assert!(
            ActionParams {
                frames: 65,
                ..ActionParams::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            ActionParams {
                frames: 0,
                ..ActionParams::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn clip_frames_default_within_the_limits() {
        let params = ActionParams::default();
        assert_eq!(params.clip_frames(0, 64, "num_frames"), Ok(8));
        assert_eq!(params.clip_frames(0, 4, "num_frames"), Ok(4));
        assert_eq!(params.clip_frames(12, 64, "num_frames"), Ok(12));
        let over = params
            .clip_frames(20, 16, "window_frames")
            .expect_err("over");
        assert!(
            over.contains("window_frames is 20; the limit is 16"),
            "{over}"
        );
    }

    #[test]
    fn a_fixed_time_axis_must_match_frames_and_takes_exactly_that_many() {
        let mut params = ActionParams::default();
        params.fit_time_axis(-1).expect("dynamic");
        assert_eq!(params, ActionParams::default());
        let refused = ActionParams::default()
            .fit_time_axis(16)
            .expect_err("16 != 8");
        assert!(
            refused.to_string().contains("exactly 16 frames"),
            "{refused}"
        );
        params.fit_time_axis(8).expect("fixed at frames");
        assert_eq!((params.max_frames, params.fixed_frames), (8, Some(8)));
        assert_eq!(params.clip_frames(0, 64, "num_frames"), Ok(8));
        assert_eq!(params.clip_frames(8, 64, "num_frames"), Ok(8));
        let fewer = params.clip_frames(4, 64, "num_frames").expect_err("4 != 8");
        assert!(fewer.contains("takes exactly 8 frames"), "{fewer}");
        assert_eq!(params.check_clip(8), Ok(()));
        let short = params.check_clip(3).expect_err("3 != 8");
        assert!(short.contains("3 frames were sampled"), "{short}");
        assert_eq!(ActionParams::default().check_clip(3), Ok(()));
        let capped = params.clip_frames(0, 6, "num_frames").expect_err("8 > 6");
        assert!(capped.contains("limit of 6 (--max-frames)"), "{capped}");
    }
}
