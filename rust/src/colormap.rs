//! Colormaps: 256-level RGB tables generated from matplotlib (`scripts/gen_colormaps.py`).
//!
//! A value x in [0, 1] selects level `min(floor(x * 256), 255)`, exactly as matplotlib's
//! `Colormap.__call__(x, bytes=True)` quantises floats; values below 0 (and NaN) take level 0.

use crate::colormap_tables::TABLES;
use crate::error::{Error, Result};

/// One colormap: 256 RGB levels.
pub type Table = [[u8; 3]; 256];

/// The names of every built-in colormap, in table order.
pub fn names() -> Vec<&'static str> {
    TABLES.iter().map(|(name, _)| *name).collect()
}

/// The table of the colormap called `name` (case-sensitive, as in matplotlib).
pub fn table(name: &str) -> Result<&'static Table> {
    TABLES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::UnknownColormap(name.to_string()))
}

/// The level of a value, matplotlib's quantisation: `floor(x * 256)` clipped to 0..=255.
#[inline(always)]
pub fn level(x: f32) -> usize {
    // `as` saturates and maps NaN to 0, so no value can index out of the table.
    ((x * 256.0) as i32).clamp(0, 255) as usize
}

/// Colour every value of `values` into `out` (3 bytes per value).
pub fn colorize(values: &[f32], table: &Table, out: &mut [u8]) {
    for (v, px) in values.iter().zip(out.chunks_exact_mut(3)) {
        px.copy_from_slice(&table[level(*v)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_maps_exist_with_256_levels() {
        for name in [
            "hot", "jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray", "coolwarm",
            "RdBu_r",
        ] {
            assert!(table(name).is_ok(), "{name} missing");
        }
        assert_eq!(names().len(), TABLES.len());
    }

    #[test]
    fn gray_is_a_ramp_from_black_to_white() {
        // matplotlib's gray rounds level i to within one step of i, rising monotonically.
        let t = table("gray").unwrap();
        assert_eq!((t[0], t[255]), ([0; 3], [255; 3]));
        for (i, rgb) in t.iter().enumerate() {
            assert!(rgb[0] == rgb[1] && rgb[1] == rgb[2] && (rgb[0] as i32 - i as i32).abs() <= 1);
        }
        assert!(t.windows(2).all(|w| w[0][0] <= w[1][0]));
    }

    #[test]
    fn level_matches_matplotlib_quantisation() {
        assert_eq!(level(0.0), 0);
        assert_eq!(level(1.0 / 256.0 - 1e-7), 0);
        assert_eq!(level(1.0 / 256.0), 1);
        assert_eq!(level(0.5), 128);
        assert_eq!(level(1.0), 255);
        assert_eq!(level(2.0), 255);
        assert_eq!(level(-0.5), 0);
        assert_eq!(level(f32::NAN), 0);
    }

    #[test]
    fn unknown_name_lists_valid_names() {
        let err = table("Viridis").unwrap_err().to_string();
        assert!(err.contains("\"Viridis\"") && err.contains("viridis"));
    }

    #[test]
    fn colorize_writes_three_bytes_per_value() {
        let t = table("gray").unwrap();
        let mut out = [0u8; 6];
        colorize(&[0.0, 1.0], t, &mut out);
        assert_eq!(out, [0, 0, 0, 255, 255, 255]);
    }
}
