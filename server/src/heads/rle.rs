//! COCO compressed run-length encoding of binary masks, byte-for-byte as `pycocotools` writes it.
//!
//! The mask is flattened column-major (x outer, y inner). The run lengths alternate between 0s and
//! 1s, starting with a (possibly empty) run of 0s. From the fourth run on, each run is stored as
//! the difference to the run two places before it. Every value is written as a little-endian
//! sequence of 5-bit groups, one ASCII character (`'0'` + group) each; `0x20` marks that another
//! group follows and `0x10` in the last group is the sign.

use super::HeadError;

/// Encodes a row-major `height * width` mask (nonzero = foreground) as a COCO RLE counts string.
///
/// A mask shorter than `height * width` is treated as zero-padded; extra entries are ignored.
pub fn encode(mask: &[u8], height: u32, width: u32) -> String {
    let (height, width) = (height as usize, width as usize);
    let mut runs = RunBuilder::new();
    for x in 0..width {
        for y in 0..height {
            let bit = mask.get(y * width + x).is_some_and(|&v| v != 0);
            runs.push(bit, 1);
        }
    }
    runs.finish()
}

/// Decodes a COCO RLE counts string into a row-major `height * width` mask of 0s and 1s.
pub fn decode(counts: &str, height: u32, width: u32) -> Result<Vec<u8>, HeadError> {
    let (height, width) = (height as usize, width as usize);
    let total = height
        .checked_mul(width)
        .ok_or_else(|| HeadError::InvalidRle(format!("size {height}x{width} is too large")))?;
    let runs = parse_counts(counts)?;
    let sum = runs.iter().try_fold(0u64, |acc, &r| acc.checked_add(r));
    if sum != Some(total as u64) {
        return Err(HeadError::InvalidRle(format!(
            "the runs cover {sum:?} pixels, the mask has {total}"
        )));
    }
    let mut mask = vec![0u8; total];
    let mut pos = 0usize;
    for (i, &run) in runs.iter().enumerate() {
        let end = pos + run as usize;
        if i % 2 == 1 {
            for p in pos..end {
                mask[(p % height) * width + p / height] = 1;
            }
        }
        pos = end;
    }
    Ok(mask)
}

/// Accumulates alternating runs of 0s and 1s and writes them as a counts string.
#[derive(Debug, Default)]
pub(crate) struct RunBuilder {
    runs: Vec<u64>,
    current_bit: bool,
    current_len: u64,
}

impl RunBuilder {
    /// An empty builder; the first run is a run of 0s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `len` pixels of value `bit`.
    pub fn push(&mut self, bit: bool, len: u64) {
        if len == 0 {
            return;
        }
        if bit != self.current_bit {
            self.runs.push(self.current_len);
            self.current_bit = bit;
            self.current_len = 0;
        }
        self.current_len += len;
    }

    /// The counts string of everything pushed so far.
    pub fn finish(mut self) -> String {
        self.runs.push(self.current_len);
        counts_to_string(&self.runs)
    }
}

/// Writes run lengths in the compressed string form (pycocotools' `rleToString`).
fn counts_to_string(runs: &[u64]) -> String {
    let mut out = String::with_capacity(runs.len() * 2);
    for (i, &run) in runs.iter().enumerate() {
        let mut x = run as i64;
        if i > 2 {
            x -= runs[i - 2] as i64;
        }
        push_value(&mut out, x);
    }
    out
}

/// Appends one signed value as 5-bit groups.
fn push_value(out: &mut String, mut x: i64) {
    loop {
        let mut c = (x & 0x1f) as u8;
        x >>= 5;
        let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
        if more {
            c |= 0x20;
        }
        out.push(char::from(c + 48));
        if !more {
            return;
        }
    }
}

/// Reads run lengths from the compressed string form (pycocotools' `rleFrString`).
fn parse_counts(counts: &str) -> Result<Vec<u64>, HeadError> {
    let mut bytes = counts.bytes();
    let mut runs: Vec<u64> = Vec::new();
    while let Some(x) = read_value(&mut bytes)? {
        let i = runs.len();
        let run = if i > 2 {
            x.checked_add(runs[i - 2] as i64)
        } else {
            Some(x)
        };
        let run = run
            .and_then(|r| u64::try_from(r).ok())
            .ok_or_else(|| HeadError::InvalidRle(format!("run {i} has an invalid length")))?;
        runs.push(run);
    }
    Ok(runs)
}

/// Reads one signed value, or `None` at the end of the string.
fn read_value(bytes: &mut impl Iterator<Item = u8>) -> Result<Option<i64>, HeadError> {
    let Some(mut byte) = bytes.next() else {
        return Ok(None);
    };
    let mut x: i64 = 0;
    for shift in (0..60).step_by(5) {
        let c = byte
            .checked_sub(48)
            .filter(|c| *c < 64)
            .ok_or_else(|| HeadError::InvalidRle(format!("unexpected character {byte:#04x}")))?;
        x |= i64::from(c & 0x1f) << shift;
        if c & 0x20 == 0 {
            if c & 0x10 != 0 {
                x |= -1i64 << (shift + 5);
            }
            return Ok(Some(x));
        }
        byte = bytes
            .next()
            .ok_or_else(|| HeadError::InvalidRle("the string ends inside a value".into()))?;
    }
    Err(HeadError::InvalidRle("a value is too long".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a row-major mask from one string of `0`/`1` per row.
    fn mask_from_rows(rows: &[&str]) -> Vec<u8> {
        rows.iter()
            .flat_map(|r| r.bytes().map(|b| u8::from(b == b'1')))
            .collect()
    }

    /// A `height * width` mask set where `inside(y, x)` holds.
    fn mask_where(height: usize, width: usize, inside: impl Fn(usize, usize) -> bool) -> Vec<u8> {
        (0..height * width)
            .map(|i| u8::from(inside(i / width, i % width)))
            .collect()
    }

    fn assert_round_trip(mask: &[u8], height: u32, width: u32, expected: &str) {
        assert_eq!(encode(mask, height, width), expected);
        let decoded = decode(expected, height, width).expect("reference string decodes");
        assert_eq!(decoded, mask);
    }

    // The reference strings below were produced by pycocotools 2.0.11 (`pycocotools.mask.encode`
    // on the same masks as Fortran-ordered uint8 arrays).

    #[test]
    fn empty_mask_matches_pycocotools() {
        assert_round_trip(&[0; 24], 4, 6, "h0");
    }

    #[test]
    fn full_mask_matches_pycocotools() {
        assert_round_trip(&[1; 24], 4, 6, "0h0");
    }

    #[test]
    fn single_pixel_matches_pycocotools() {
        let mask = mask_where(5, 4, |y, x| (y, x) == (2, 3));
        assert_round_trip(&mask, 5, 4, "a012");
    }

    #[test]
    fn random_7x5_matches_pycocotools() {
        let mask = mask_from_rows(&[
            "00011", "01001", "11110", "00000", "11011", "01000", "11110",
        ]);
        assert_round_trip(&mask, 7, 5, "21100001011N11NO00021N0");
    }

    #[test]
    fn blob_30x40_matches_pycocotools() {
        let mask = mask_where(30, 40, |y, x| {
            let (dx, dy) = (x as i64 - 20, y as i64 - 15);
            dx * dx * 64 + dy * dy * 100 <= 6400
        });
        assert_eq!(mask.iter().map(|&v| usize::from(v)).sum::<usize>(), 245);
        assert_round_trip(
            &mask,
            30,
            40,
            "k91j06L2N2N2O0O2O00000O20N1000001N101N2N2N4JR8",
        );
    }

    #[test]
    fn long_runs_match_pycocotools() {
        let mask = mask_where(200, 300, |y, x| {
            (50..150).contains(&y) && (100..250).contains(&x)
        });
        let expected = format!("bbc0T3T3{}nf9", "0".repeat(297));
        assert_round_trip(&mask, 200, 300, &expected);
    }

    #[test]
    fn half_plane_with_a_stray_pixel_matches_pycocotools() {
        let mask = mask_where(200, 300, |y, x| x >= 150 || (y, x) == (0, 0));
        assert_round_trip(&mask, 200, 300, "01_Ym0_Ym0");
    }

    #[test]
    fn random_masks_round_trip() {
        let mut state = 0x2545_f491_u32;
        for (height, width) in [(1, 1), (3, 17), (16, 9), (64, 48)] {
            let mask: Vec<u8> = (0..height * width)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    u8::from(state % 5 < 2)
                })
                .collect();
            let counts = encode(&mask, height as u32, width as u32);
            let decoded = decode(&counts, height as u32, width as u32).expect("own output decodes");
            assert_eq!(decoded, mask, "{height}x{width}");
        }
    }

    #[test]
    fn builder_merges_runs_like_pixelwise_encoding() {
        let mut runs = RunBuilder::new();
        runs.push(false, 3);
        runs.push(false, 2);
        runs.push(true, 0);
        runs.push(true, 4);
        runs.push(false, 1);
        let mask = [0, 0, 0, 0, 0, 1, 1, 1, 1, 0];
        assert_eq!(runs.finish(), encode(&mask, 10, 1));
    }

    #[test]
    fn malformed_strings_are_errors() {
        assert!(matches!(decode("h0", 4, 5), Err(HeadError::InvalidRle(_))));
        assert!(matches!(decode("h", 4, 6), Err(HeadError::InvalidRle(_))));
        assert!(matches!(decode("h0 ", 4, 6), Err(HeadError::InvalidRle(_))));
        assert!(matches!(
            decode("\u{e9}", 4, 6),
            Err(HeadError::InvalidRle(_))
        ));
        assert!(matches!(
            decode(&"o".repeat(40), 4, 6),
            Err(HeadError::InvalidRle(_))
        ));
        assert!(matches!(decode("1O", 2, 2), Err(HeadError::InvalidRle(_))));
    }
}
