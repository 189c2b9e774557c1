//! Class-aware greedy non-maximum suppression.

use super::BoxXyxy;

/// A scored box competing in [`nms`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Class the box was scored for; only boxes of the same class suppress each other.
    pub class_id: u32,
    /// The class score.
    pub score: f32,
    /// The box.
    pub bbox: BoxXyxy,
    /// Where the candidate came from (the anchor index, for the detection head).
    pub index: usize,
}

/// Intersection over union of two boxes; 0 when the union is empty.
pub fn iou(a: &BoxXyxy, b: &BoxXyxy) -> f32 {
    let inter = BoxXyxy {
        x1: a.x1.max(b.x1),
        y1: a.y1.max(b.y1),
        x2: a.x2.min(b.x2),
        y2: a.y2.min(b.y2),
    }
    .area();
    let union = a.area() + b.area() - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Greedy class-aware NMS.
///
/// Sorts `cands` by decreasing score (ties keep their order) and walks them: a candidate is kept
/// unless its IoU with an already kept candidate of the same class exceeds `iou_threshold`.
/// Stops after `max_keep` candidates; returns the kept ones by decreasing score.
pub fn nms(cands: &mut [Candidate], iou_threshold: f32, max_keep: usize) -> Vec<Candidate> {
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::with_capacity(max_keep.min(cands.len()));
    for cand in cands.iter() {
        if kept.len() >= max_keep {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| k.class_id == cand.class_id && iou(&k.bbox, &cand.bbox) > iou_threshold);
        if !suppressed {
            kept.push(*cand);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(x1: f32, y1: f32, x2: f32, y2: f32) -> BoxXyxy {
        BoxXyxy { x1, y1, x2, y2 }
    }

    fn cand(index: usize, class_id: u32, score: f32, bbox: BoxXyxy) -> Candidate {
        Candidate {
            class_id,
            score,
            bbox,
            index,
        }
    }

    #[test]
    fn iou_of_hand_computed_pairs() {
        // Overlap 5x10 = 50, union 100 + 100 - 50 = 150.
        let a = bx(0.0, 0.0, 10.0, 10.0);
        assert!((iou(&a, &bx(5.0, 0.0, 15.0, 10.0)) - 1.0 / 3.0).abs() < 1e-6);
        // Overlap 5x5 = 25, union 175.
        assert!((iou(&a, &bx(5.0, 5.0, 15.0, 15.0)) - 25.0 / 175.0).abs() < 1e-6);
        // Contained 4x4 = 16 in 100.
        assert!((iou(&a, &bx(2.0, 2.0, 6.0, 6.0)) - 0.16).abs() < 1e-6);
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(iou(&a, &bx(10.0, 0.0, 20.0, 10.0)), 0.0);
        assert_eq!(iou(&a, &bx(20.0, 20.0, 30.0, 30.0)), 0.0);
    }

    #[test]
    fn iou_of_empty_boxes_is_zero() {
        let empty = bx(3.0, 3.0, 3.0, 3.0);
        assert_eq!(iou(&empty, &empty), 0.0);
        let inverted = bx(5.0, 5.0, 1.0, 1.0);
        assert_eq!(iou(&inverted, &bx(0.0, 0.0, 10.0, 10.0)), 0.0);
    }

    #[test]
    fn suppresses_overlaps_within_a_class_only() {
        let a = bx(0.0, 0.0, 10.0, 10.0);
        let b = bx(1.0, 0.0, 11.0, 10.0); // IoU with a: 90 / 110 = 0.818
        let c = bx(5.0, 0.0, 15.0, 10.0); // IoU with a: 1/3, with b: 60 / 140 = 0.43
        let mut cands = vec![
            cand(0, 0, 0.6, b),
            cand(1, 0, 0.9, a),
            cand(2, 1, 0.7, b),
            cand(3, 0, 0.5, c),
        ];
        let kept: Vec<usize> = nms(&mut cands, 0.5, 10).iter().map(|c| c.index).collect();
        assert_eq!(kept, vec![1, 2, 3]);
    }

    #[test]
    fn threshold_is_exclusive() {
        let a = bx(0.0, 0.0, 10.0, 10.0);
        let c = bx(5.0, 0.0, 15.0, 10.0);
        let mut cands = vec![cand(0, 0, 0.9, a), cand(1, 0, 0.8, c)];
        assert_eq!(nms(&mut cands, 0.34, 10).len(), 2);
        assert_eq!(nms(&mut cands, 0.33, 10).len(), 1);
    }

    #[test]
    fn stops_at_max_keep() {
        let mut cands: Vec<Candidate> = (0..5)
            .map(|i| {
                let x = i as f32 * 20.0;
                cand(i, 0, 0.1 * i as f32, bx(x, 0.0, x + 10.0, 10.0))
            })
            .collect();
        let kept: Vec<usize> = nms(&mut cands, 0.5, 2).iter().map(|c| c.index).collect();
        assert_eq!(kept, vec![4, 3]);
        assert!(nms(&mut cands, 0.5, 0).is_empty());
        assert!(nms(&mut [], 0.5, 3).is_empty());
    }
}
