//! Where an original image sits inside the backbone's input tensor, and the maps between the two.
//!
//! Every head result is produced in backbone-input coordinates; [`Geometry`] carries what is
//! needed to map it back onto the caller's image without re-deriving the resize.

/// The placement of an original image inside the backbone input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Original image size, after EXIF orientation.
    pub orig_width: u32,
    pub orig_height: u32,
    /// Backbone input size.
    pub input_width: u32,
    pub input_height: u32,
    /// Input pixels per original pixel, per axis.
    pub scale_x: f32,
    pub scale_y: f32,
    /// Offset of the resized image inside the input, in input pixels.
    pub pad_x: f32,
    pub pad_y: f32,
    /// Size of the resized image inside the input (the rest is padding).
    pub resized_width: u32,
    pub resized_height: u32,
}

impl Geometry {
    /// Keeps the aspect ratio, scales to fit `input_w` x `input_h` and centres the result.
    pub fn letterbox(orig_w: u32, orig_h: u32, input_w: u32, input_h: u32) -> Self {
        let scale = (input_w as f32 / orig_w as f32).min(input_h as f32 / orig_h as f32);
        let resized_w = ((orig_w as f32 * scale).round() as u32).clamp(1, input_w);
        let resized_h = ((orig_h as f32 * scale).round() as u32).clamp(1, input_h);
        Self {
            orig_width: orig_w,
            orig_height: orig_h,
            input_width: input_w,
            input_height: input_h,
            scale_x: resized_w as f32 / orig_w as f32,
            scale_y: resized_h as f32 / orig_h as f32,
            pad_x: ((input_w - resized_w) / 2) as f32,
            pad_y: ((input_h - resized_h) / 2) as f32,
            resized_width: resized_w,
            resized_height: resized_h,
        }
    }

    /// Stretches each axis independently to the input size.
    pub fn resize(orig_w: u32, orig_h: u32, input_w: u32, input_h: u32) -> Self {
        Self {
            orig_width: orig_w,
            orig_height: orig_h,
            input_width: input_w,
            input_height: input_h,
            scale_x: input_w as f32 / orig_w as f32,
            scale_y: input_h as f32 / orig_h as f32,
            pad_x: 0.0,
            pad_y: 0.0,
            resized_width: input_w,
            resized_height: input_h,
        }
    }

    /// Keeps the aspect ratio, scales down so the longer side is at most `max_side`, places the
    /// image top-left and pads each side up to a multiple of `multiple`.
    pub fn keep_aspect(orig_w: u32, orig_h: u32, max_side: u32, multiple: u32) -> Self {
        let longer = orig_w.max(orig_h) as f32;
        let scale = (max_side as f32 / longer).min(1.0);
        let resized_w = ((orig_w as f32 * scale).round() as u32).max(1);
        let resized_h = ((orig_h as f32 * scale).round() as u32).max(1);
        let multiple = multiple.max(1);
        Self {
            orig_width: orig_w,
            orig_height: orig_h,
            input_width: resized_w.div_ceil(multiple) * multiple,
            input_height: resized_h.div_ceil(multiple) * multiple,
            scale_x: resized_w as f32 / orig_w as f32,
            scale_y: resized_h as f32 / orig_h as f32,
            pad_x: 0.0,
            pad_y: 0.0,
            resized_width: resized_w,
            resized_height: resized_h,
        }
    }

    /// Maps a point from input coordinates to original-image coordinates.
    pub fn to_original(&self, x: f32, y: f32) -> (f32, f32) {
        (
            (x - self.pad_x) / self.scale_x,
            (y - self.pad_y) / self.scale_y,
        )
    }

    /// Maps a point from original-image coordinates to input coordinates.
    pub fn to_input(&self, x: f32, y: f32) -> (f32, f32) {
        (x * self.scale_x + self.pad_x, y * self.scale_y + self.pad_y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_wide_image_is_centred_vertically() {
        let g = Geometry::letterbox(448, 224, 224, 224);
        assert_eq!((g.resized_width, g.resized_height), (224, 112));
        assert_eq!((g.pad_x, g.pad_y), (0.0, 56.0));
        assert_eq!(g.scale_x, 0.5);
        assert_eq!(g.to_original(0.0, 56.0), (0.0, 0.0));
        assert_eq!(g.to_original(224.0, 168.0), (448.0, 224.0));
    }

    #[test]
    fn round_trip_through_input_coordinates() {
        let g = Geometry::letterbox(640, 427, 224, 224);
        let (x, y) = g.to_input(123.0, 321.0);
        let (bx, by) = g.to_original(x, y);
        assert!((bx - 123.0).abs() < 1e-3 && (by - 321.0).abs() < 1e-3);
    }

    #[test]
    fn keep_aspect_rounds_sides_up_to_the_multiple() {
        let g = Geometry::keep_aspect(2000, 1000, 1024, 32);
        assert_eq!((g.resized_width, g.resized_height), (1024, 512));
        assert_eq!((g.input_width, g.input_height), (1024, 512));
        let small = Geometry::keep_aspect(100, 50, 1024, 32);
        assert_eq!((small.resized_width, small.resized_height), (100, 50));
        assert_eq!((small.input_width, small.input_height), (128, 64));
        assert_eq!(small.scale_x, 1.0);
    }

    #[test]
    fn resize_stretches_each_axis() {
        let g = Geometry::resize(100, 50, 224, 224);
        assert_eq!(g.to_original(224.0, 224.0), (100.0, 50.0));
    }
}
