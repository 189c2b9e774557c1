//! Post-processing of the head outputs: from raw output tensors to results on the original image.
//!
//! Every head kind has its own module ([`detection`], [`segmentation`], [`action`]); each takes the
//! head's output tensors with the batch axis already removed, validates their shapes against the
//! model contract and returns either a result in original-image coordinates or a [`HeadError`].
//! Nothing here panics on a malformed tensor. [`rle`] writes and reads COCO compressed RLE masks and
//! [`nms`] holds the class-aware non-maximum suppression used by the detection head.

pub mod action;
mod bilinear;
pub mod detection;
pub mod nms;
pub mod rle;
pub mod segmentation;

/// An axis-aligned box given by its top-left `(x1, y1)` and bottom-right `(x2, y2)` corners.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxXyxy {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

impl BoxXyxy {
    /// Width of the box; zero when the corners are swapped.
    pub fn width(&self) -> f32 {
        (self.x2 - self.x1).max(0.0)
    }

    /// Height of the box; zero when the corners are swapped.
    pub fn height(&self) -> f32 {
        (self.y2 - self.y1).max(0.0)
    }

    /// Area of the box; zero for an empty or inverted box.
    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }
}

/// A binary mask in COCO compressed RLE (see [`rle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RleMask {
    /// Height of the image the mask covers.
    pub height: u32,
    /// Width of the image the mask covers.
    pub width: u32,
    /// The compressed counts string, exactly as `pycocotools.mask.encode` writes it.
    pub counts: String,
}

/// One detected object, in original-image coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Class index into the head's labels.
    pub class_id: u32,
    /// Class probability in `[0, 1]`.
    pub score: f32,
    /// Box clipped to the image.
    pub bbox: BoxXyxy,
    /// Instance mask covering the whole image; present only when masks were requested.
    pub mask: Option<RleMask>,
}

/// A per-pixel class map at the original image's resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Class id of every pixel, row-major, `width * height` entries.
    pub labels: Vec<u16>,
}

/// A class together with a score (a probability or a pixel fraction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassScore {
    /// Class index into the head's labels.
    pub class_id: u32,
    /// The score of the class.
    pub score: f32,
}

/// Why a head's outputs could not be turned into a result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeadError {
    /// An output tensor does not have the shape the contract and the input geometry require.
    #[error("head output `{tensor}` has shape {actual:?}, expected {expected}")]
    Shape {
        /// Name of the offending output.
        tensor: &'static str,
        /// The shape that was found.
        actual: Vec<usize>,
        /// A description of the shape that was required.
        expected: String,
    },
    /// A requested class id does not exist in the head.
    #[error("class id {class_id} is out of range: the head has {num_classes} classes")]
    UnknownClass {
        /// The requested class id.
        class_id: u32,
        /// Number of classes of the head.
        num_classes: usize,
    },
    /// A head parameter is outside its valid range.
    #[error("invalid head parameter: {0}")]
    InvalidParams(String),
    /// A compressed RLE string is malformed or does not fit the stated size.
    #[error("invalid RLE counts: {0}")]
    InvalidRle(String),
    /// The masks asked for would cover more pixels than the server computes for one image.
    #[error(
        "the masks of {detections} detections would cover {pixels} pixels, over the server's \
         limit of {limit} (--max-mask-pixels); ask for fewer detections (max_detections, a \
         higher score_threshold, a lower iou_threshold) or no masks"
    )]
    MaskPixels {
        /// Detections that would get masks.
        detections: usize,
        /// Pixels their boxes cover in all.
        pixels: u64,
        /// The limit.
        limit: u64,
    },
    /// A label map could not be encoded as PNG.
    #[error("cannot encode the label map as PNG: {0}")]
    Png(String),
}

impl HeadError {
    /// A [`HeadError::Shape`] for `tensor`, whose shape `actual` does not match `expected`.
    pub(crate) fn shape(
        tensor: &'static str,
        actual: &[usize],
        expected: impl Into<String>,
    ) -> Self {
        Self::Shape {
            tensor,
            actual: actual.to_vec(),
            expected: expected.into(),
        }
    }
}

/// The classes allowed by an optional filter, as a mask over `num_classes` class ids.
///
/// `None` and an empty filter allow every class; an id not below `num_classes` is an error.
pub(crate) fn class_mask(
    filter: Option<&[u32]>,
    num_classes: usize,
) -> Result<Vec<bool>, HeadError> {
    let filter = match filter {
        Some(ids) if !ids.is_empty() => ids,
        _ => return Ok(vec![true; num_classes]),
    };
    let mut allowed = vec![false; num_classes];
    for &class_id in filter {
        let slot = allowed
            .get_mut(class_id as usize)
            .ok_or(HeadError::UnknownClass {
                class_id,
                num_classes,
            })?;
        *slot = true;
    }
    Ok(allowed)
}
