//! Plain-text layout helpers: aligned tables, indentation, byte counts and mask areas.

/// Lays out rows as columns separated by two spaces; columns listed in `right` are
/// right-aligned, the others left-aligned. Every line ends with a newline.
pub(crate) fn table(rows: &[Vec<String>], right: &[usize]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &width))| {
                if right.contains(&c) {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// Indents every line of `text` by `spaces`.
pub(crate) fn indent(text: &str, spaces: usize) -> String {
    text.lines()
        .map(|line| format!("{:spaces$}{line}\n", ""))
        .collect()
}

/// A byte count in binary units: `512 B`, `1.5 MiB`.
pub(crate) fn bytes(count: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if count < 1024 {
        return format!("{count} B");
    }
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Foreground pixel count of a COCO compressed RLE counts string; `None` if it is malformed.
pub(crate) fn rle_area(counts: &str) -> Option<u64> {
    let mut runs: Vec<i64> = Vec::new();
    let mut chars = counts.bytes();
    while let Some(first) = chars.next() {
        let mut value: i64 = 0;
        let mut shift = 0;
        let mut byte = first;
        loop {
            let c = i64::from(byte.checked_sub(48).filter(|c| *c < 64)?);
            value |= (c & 0x1f) << shift;
            shift += 5;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    value |= -1i64 << shift;
                }
                break;
            }
            if shift > 55 {
                return None;
            }
            byte = chars.next()?;
        }
        if runs.len() > 2 {
            value += runs[runs.len() - 2];
        }
        if value < 0 {
            return None;
        }
        runs.push(value);
    }
    runs.iter()
        .skip(1)
        .step_by(2)
        .map(|&run| u64::try_from(run).ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["a".to_owned(), "1".to_owned()],
            vec!["bbb".to_owned(), "22".to_owned(), "x".to_owned()],
        ];
        assert_eq!(table(&rows, &[1]), "a     1\nbbb  22  x\n");
        assert_eq!(indent("a\nb\n", 2), "  a\n  b\n");
    }

    #[test]
    fn byte_counts() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn rle_areas() {
        // pycocotools.mask.encode of a 4x4 mask with a 2x2 square at rows 1-2, cols 1-2:
        // column-major runs [5, 2, 2, 2, 5] encode as "52203".
        assert_eq!(rle_area("52203"), Some(4));
        assert_eq!(rle_area("0"), Some(0));
        assert_eq!(rle_area(""), Some(0));
        assert_eq!(rle_area("\u{1}"), None);
    }
}
