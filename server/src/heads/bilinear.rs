//! Edge-clamped bilinear sampling along one axis, shared by the mask and label-map resamplers.

use crate::geometry::Geometry;

/// The two neighbouring samples of a position along one axis and the weight of the second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Tap {
    pub i0: usize,
    pub i1: usize,
    pub w1: f32,
}

impl Tap {
    /// The taps of position `p` (in sample units, sample `i` centred at `i`) on an axis of `len`
    /// samples; positions beyond either end take the edge sample.
    pub fn new(p: f32, len: usize) -> Self {
        let last = len.saturating_sub(1) as f32;
        let p = p.max(0.0).min(last);
        let f = p.floor();
        let i0 = f as usize;
        Self {
            i0,
            i1: (i0 + 1).min(len.saturating_sub(1)),
            w1: p - f,
        }
    }

    /// Interpolates between the values at `i0` (`a`) and `i1` (`b`).
    pub fn lerp(&self, a: f32, b: f32) -> f32 {
        a + (b - a) * self.w1
    }

    /// The same taps shifted down by `offset` samples, for sampling a window starting there.
    pub fn shifted(&self, offset: usize) -> Self {
        Self {
            i0: self.i0 - offset,
            i1: self.i1 - offset,
            w1: self.w1,
        }
    }
}

/// Which image coordinate a tap table is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coord {
    X,
    Y,
}

/// Taps on a map of `len` samples at `stride` input pixels for the centres of the original pixels
/// `range` along `coord`: the centre is mapped to input coordinates, then to `x_in / stride - 0.5`.
pub(crate) fn axis_taps(
    geo: &Geometry,
    coord: Coord,
    range: std::ops::Range<u32>,
    stride: u32,
    len: usize,
) -> Vec<Tap> {
    let stride = stride as f32;
    range
        .map(|i| {
            let centre = i as f32 + 0.5;
            let input = match coord {
                Coord::X => geo.to_input(centre, 0.0).0,
                Coord::Y => geo.to_input(0.0, centre).1,
            };
            Tap::new(input / stride - 0.5, len)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interior_position_splits_between_neighbours() {
        let t = Tap::new(2.25, 5);
        assert_eq!((t.i0, t.i1), (2, 3));
        assert!((t.w1 - 0.25).abs() < 1e-6);
        assert!((t.lerp(4.0, 8.0) - 5.0).abs() < 1e-6);
    }

    #[test]
    fn positions_beyond_the_edges_take_the_edge_sample() {
        let before = Tap::new(-0.7, 4);
        assert_eq!((before.i0, before.i1, before.w1), (0, 1, 0.0));
        let after = Tap::new(3.6, 4);
        assert_eq!((after.i0, after.i1, after.w1), (3, 3, 0.0));
        let single = Tap::new(0.4, 1);
        assert_eq!((single.i0, single.i1, single.w1), (0, 0, 0.0));
    }

    #[test]
    fn not_a_number_position_does_not_panic() {
        let t = Tap::new(f32::NAN, 3);
        assert!(t.i0 < 3 && t.i1 < 3);
    }

    #[test]
    fn axis_taps_follow_the_geometry() {
        // Scale 2, no padding: original pixel 1 has its centre at input x = 3, map x = 3/4 - 0.5.
        let geo = Geometry::resize(8, 8, 16, 16);
        let taps = axis_taps(&geo, Coord::X, 1..3, 4, 4);
        assert_eq!(taps.len(), 2);
        assert_eq!((taps[0].i0, taps[0].i1), (0, 1));
        assert!((taps[0].w1 - 0.25).abs() < 1e-6);
        assert!((taps[1].w1 - 0.75).abs() < 1e-6);
    }
}
