//! Blending a colormapped heat value onto a background pixel, and the mask outline.

use crate::error::{Error, Result};

/// How opaque the heat colour is over the background.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Alpha {
    /// The same opacity everywhere.
    Constant(f32),
    /// Opacity `alpha * value`: low attention shows the original frame.
    Attention(f32),
}

impl Alpha {
    /// Parse `mode` ("constant" or "attention") with `alpha` in [0, 1].
    pub fn parse(mode: &str, alpha: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::invalid(
                "alpha",
                format!("expected a value in [0, 1], got {alpha}"),
            ));
        }
        match mode {
            "constant" => Ok(Alpha::Constant(alpha as f32)),
            "attention" => Ok(Alpha::Attention(alpha as f32)),
            other => Err(Error::invalid(
                "alpha_mode",
                format!("expected \"constant\" or \"attention\", got {other:?}"),
            )),
        }
    }

    /// The opacity of a pixel whose normalised value is `v`.
    #[inline(always)]
    pub fn at(self, v: f32) -> f32 {
        match self {
            Alpha::Constant(a) => a,
            Alpha::Attention(a) => a * v.clamp(0.0, 1.0),
        }
    }
}

/// An outline drawn where the mask `value >= threshold` meets its complement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outline {
    pub threshold: f32,
    pub color: [u8; 3],
}

impl Outline {
    /// Check that `threshold` lies in [0, 1] (it is compared with normalised values).
    pub fn new(threshold: f64, color: [u8; 3]) -> Result<Self> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(Error::invalid(
                "outline",
                format!("expected a threshold in [0, 1], got {threshold}"),
            ));
        }
        Ok(Outline {
            threshold: threshold as f32,
            color,
        })
    }

    /// Whether the centre pixel lies on the mask's border: inside the mask with a 4-neighbour outside.
    /// Neighbours beyond the frame edge are passed as the centre value (no outline along the edge).
    #[inline]
    pub fn on_edge(&self, centre: f32, neighbours: [f32; 4]) -> bool {
        centre >= self.threshold && neighbours.iter().any(|&n| n < self.threshold)
    }
}

/// `bg * (1 - a) + fg * a`, rounded half up, per channel.
#[inline(always)]
pub fn over(bg: &[u8], fg: &[u8; 3], a: f32, out: &mut [u8]) {
    let keep = 1.0 - a;
    for c in 0..3 {
        out[c] = (bg[c] as f32 * keep + fg[c] as f32 * a + 0.5) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_is_a_rounded_mix() {
        let mut out = [0u8; 3];
        over(&[0, 100, 255], &[255, 100, 0], 0.5, &mut out);
        assert_eq!(out, [128, 100, 128]);
        over(&[10, 20, 30], &[255, 255, 255], 0.0, &mut out);
        assert_eq!(out, [10, 20, 30]);
        over(&[10, 20, 30], &[255, 254, 0], 1.0, &mut out);
        assert_eq!(out, [255, 254, 0]);
    }

    #[test]
    fn attention_alpha_grows_with_the_value() {
        let a = Alpha::parse("attention", 0.8).unwrap();
        assert_eq!(a.at(0.0), 0.0);
        assert_eq!(a.at(0.5), 0.4);
        assert_eq!(a.at(1.0), 0.8);
        assert_eq!(Alpha::parse("constant", 0.3).unwrap().at(0.9), 0.3);
    }

    #[test]
    fn bad_alpha_names_the_argument() {
        assert!(Alpha::parse("constant", 1.5)
            .unwrap_err()
            .to_string()
            .starts_with("alpha:"));
        assert!(Alpha::parse("linear", 0.5)
            .unwrap_err()
            .to_string()
            .starts_with("alpha_mode:"));
        assert!(Outline::new(2.0, [0; 3])
            .unwrap_err()
            .to_string()
            .starts_with("outline:"));
    }

    #[test]
    fn outline_marks_inside_border_pixels() {
        let o = Outline::new(0.5, [255; 3]).unwrap();
        assert!(o.on_edge(0.6, [0.6, 0.6, 0.4, 0.6]));
        assert!(!o.on_edge(0.6, [0.6; 4]));
        assert!(!o.on_edge(0.4, [0.0; 4]));
    }
}
