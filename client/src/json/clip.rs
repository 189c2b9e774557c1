//! Mirrors of the action recognition results.

use polyhead_proto::v1;
use serde::Serialize;

use super::Timings;

/// Mirror of `RecognizeActionResponse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecognizeActionResponse {
    /// The top labels and frame timestamps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<Actions>,
    /// Where the time went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// Mirror of `Actions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Actions {
    /// Labels by decreasing probability.
    pub top: Vec<ActionScore>,
    /// Timestamps of the frames used, in seconds.
    pub frame_timestamps: Vec<f64>,
}

/// Mirror of `ActionScore`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionScore {
    /// Class id.
    pub class_id: u32,
    /// Class label.
    pub label: String,
    /// Softmax probability.
    pub score: f32,
}

impl From<&v1::RecognizeActionResponse> for RecognizeActionResponse {
    fn from(r: &v1::RecognizeActionResponse) -> Self {
        Self {
            actions: r.actions.as_ref().map(|a| Actions {
                top: a
                    .top
                    .iter()
                    .map(|s| ActionScore {
                        class_id: s.class_id,
                        label: s.label.clone(),
                        score: s.score,
                    })
                    .collect(),
                frame_timestamps: a.frame_timestamps.clone(),
            }),
            timings: r.timings.as_ref().map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_response() -> serde_json::Result<()> {
        let response = v1::RecognizeActionResponse {
            actions: Some(v1::Actions {
                top: vec![v1::ActionScore {
                    class_id: 7,
                    label: "juggling".into(),
                    score: 0.75,
                }],
                frame_timestamps: vec![0.0, 0.5],
            }),
            timings: None,
        };
        let json = serde_json::to_string(&RecognizeActionResponse::from(&response))?;
        assert_eq!(
            json,
            r#"{"actions":{"top":[{"class_id":7,"label":"juggling","score":0.75}],"frame_timestamps":[0.0,0.5]}}"#
        );
        Ok(())
    }
}
