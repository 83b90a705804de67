//! Normalisation of attention maps to [0, 1]: global or per-frame min-max, percentile clip or a
//! fixed range, then an optional gamma.
//!
//! Non-finite values (NaN, +-inf) are ignored when the range is measured and map to 0, the minimum.
//! A constant map (an empty range) maps to 0 everywhere, never NaN.

use ndarray::{Array3, ArrayView3, Axis};

use crate::error::{try_reserve, try_vec, Error, Result};

/// How the value range is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// One min-max range over every frame.
    Global,
    /// A min-max range per frame.
    Frame,
    /// One range from the `lo` and `hi` percentiles (0..=100, numpy's linear method) of every frame.
    Percentile { lo: f64, hi: f64 },
    /// The given `vmin..vmax`, nothing else rescaled.
    Fixed,
}

impl Mode {
    /// Parse `"global"`, `"frame"`, `"percentile"` or `"fixed"`; `percentile` gives the bounds.
    pub fn parse(name: &str, percentile: (f64, f64)) -> Result<Self> {
        match name {
            "global" => Ok(Mode::Global),
            "frame" => Ok(Mode::Frame),
            "percentile" => {
                let (lo, hi) = percentile;
                if !(0.0..=100.0).contains(&lo) || !(0.0..=100.0).contains(&hi) || lo >= hi {
                    return Err(Error::invalid(
                        "percentile",
                        format!("expected 0 <= lo < hi <= 100, got ({lo}, {hi})"),
                    ));
                }
                Ok(Mode::Percentile { lo, hi })
            }
            "fixed" => Ok(Mode::Fixed),
            other => Err(Error::invalid(
                "normalize",
                format!(
                    "expected \"global\", \"frame\", \"percentile\" or \"fixed\", got {other:?}"
                ),
            )),
        }
    }
}

/// Everything normalisation needs.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub mode: Mode,
    /// Overrides the measured lower bound; required with [`Mode::Fixed`].
    pub vmin: Option<f64>,
    /// Overrides the measured upper bound; required with [`Mode::Fixed`].
    pub vmax: Option<f64>,
    /// Applied after scaling to [0, 1]: `t.powf(gamma)`; 1 leaves values alone.
    pub gamma: f64,
}

impl Params {
    fn check(&self) -> Result<()> {
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            return Err(Error::invalid(
                "gamma",
                format!("expected a finite value > 0, got {}", self.gamma),
            ));
        }
        for (arg, v) in [("vmin", self.vmin), ("vmax", self.vmax)] {
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(Error::invalid(
                        arg,
                        format!("expected a finite number, got {v}"),
                    ));
                }
            }
        }
        if self.mode == Mode::Fixed && (self.vmin.is_none() || self.vmax.is_none()) {
            return Err(Error::invalid(
                "vmin",
                "normalize=\"fixed\" needs both vmin and vmax",
            ));
        }
        if let (Some(lo), Some(hi)) = (self.vmin, self.vmax) {
            if lo >= hi {
                return Err(Error::invalid(
                    "vmax",
                    format!("expected vmax > vmin, got vmin={lo}, vmax={hi}"),
                ));
            }
        }
        Ok(())
    }
}

/// Min and max of the finite values, or `None` when there are none.
fn finite_min_max<'a>(values: impl Iterator<Item = &'a f32>) -> Option<(f64, f64)> {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &v in values {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    (lo <= hi).then_some((lo as f64, hi as f64))
}

/// The `q`-th percentile (0..=100) of sorted values, numpy's default linear method.
fn percentile_sorted(sorted: &[f32], q: f64) -> f64 {
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let i = rank.floor() as usize;
    let frac = rank - i as f64;
    let a = sorted[i] as f64;
    if i + 1 < sorted.len() {
        a + frac * (sorted[i + 1] as f64 - a)
    } else {
        a
    }
}

/// The `(lo, hi)` range of every frame of `maps` (F, h, w) under `params`.
///
/// `lo == hi` (a constant map or no finite value) means the frame maps to zeros.
pub fn ranges(maps: ArrayView3<f32>, params: &Params) -> Result<Vec<(f64, f64)>> {
    params.check()?;
    let frames = maps.len_of(Axis(0));
    let measured: Vec<Option<(f64, f64)>> = match params.mode {
        Mode::Global => vec![finite_min_max(maps.iter()); frames],
        Mode::Frame => maps
            .axis_iter(Axis(0))
            .map(|f| finite_min_max(f.iter()))
            .collect(),
        Mode::Percentile { lo, hi } => {
            let mut finite: Vec<f32> = Vec::new();
            try_reserve(&mut finite, maps.len(), "maps")?;
            finite.extend(maps.iter().copied().filter(|v| v.is_finite()));
            let range = if finite.is_empty() {
                None
            } else {
                finite.sort_unstable_by(|a, b| a.total_cmp(b));
                Some((
                    percentile_sorted(&finite, lo),
                    percentile_sorted(&finite, hi),
                ))
            };
            vec![range; frames]
        }
        Mode::Fixed => vec![Some((0.0, 0.0)); frames],
    };
    Ok(measured
        .into_iter()
        .map(|r| {
            let (lo, hi) = r.unwrap_or((0.0, 0.0));
            (params.vmin.unwrap_or(lo), params.vmax.unwrap_or(hi))
        })
        .collect())
}

/// Scale one value into [0, 1] given its frame's range; non-finite values and empty ranges give 0.
#[inline]
pub fn scale(v: f32, lo: f64, hi: f64, gamma: f64) -> f32 {
    if !v.is_finite() || hi <= lo {
        return 0.0;
    }
    let t = ((v as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
    (if gamma == 1.0 { t } else { t.powf(gamma) }) as f32
}

/// Normalise `maps` (F, h, w) to [0, 1]: one float per input value, no NaN.
pub fn normalize(maps: ArrayView3<f32>, params: &Params) -> Result<Array3<f32>> {
    let ranges = ranges(maps, params)?;
    let zeros = try_vec(maps.len(), 0.0f32, "maps")?;
    let mut out = Array3::from_shape_vec(maps.raw_dim(), zeros).expect("sized to the shape");
    for ((src, mut dst), (lo, hi)) in maps
        .axis_iter(Axis(0))
        .zip(out.axis_iter_mut(Axis(0)))
        .zip(ranges)
    {
        dst.zip_mut_with(&src, |d, &s| *d = scale(s, lo, hi, params.gamma));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn params(mode: Mode) -> Params {
        Params {
            mode,
            vmin: None,
            vmax: None,
            gamma: 1.0,
        }
    }

    #[test]
    fn global_min_max() {
        let m = array![[[1.0f32, 2.0], [3.0, 5.0]], [[0.0, 1.0], [1.0, 1.0]]];
        let n = normalize(m.view(), &params(Mode::Global)).unwrap();
        assert_eq!(n[[0, 0, 0]], 0.2);
        assert_eq!(n[[0, 1, 1]], 1.0);
        assert_eq!(n[[1, 0, 0]], 0.0);
    }

    #[test]
    fn per_frame_and_constant_frames() {
        let m = array![[[1.0f32, 3.0]], [[7.0, 7.0]]];
        let n = normalize(m.view(), &params(Mode::Frame)).unwrap();
        assert_eq!(n.as_slice().unwrap(), &[0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn non_finite_values_are_the_minimum() {
        let m = array![[[f32::NAN, 1.0, f32::INFINITY, 3.0, f32::NEG_INFINITY]]];
        let n = normalize(m.view(), &params(Mode::Global)).unwrap();
        assert_eq!(n.as_slice().unwrap(), &[0.0, 0.0, 0.0, 1.0, 0.0]);
        let all_nan = array![[[f32::NAN, f32::NAN]]];
        let n = normalize(
            all_nan.view(),
            &params(Mode::Percentile { lo: 1.0, hi: 99.0 }),
        )
        .unwrap();
        assert_eq!(n.as_slice().unwrap(), &[0.0, 0.0]);
    }

    #[test]
    fn percentile_is_numpy_linear() {
        // np.percentile(np.arange(11.0), [10, 95]) == [1.0, 9.5]
        let m = ndarray::Array::from_iter((0..11).map(|i| i as f32))
            .into_shape_with_order((1, 1, 11))
            .unwrap();
        let r = ranges(m.view(), &params(Mode::Percentile { lo: 10.0, hi: 95.0 })).unwrap();
        assert_eq!(r, vec![(1.0, 9.5)]);
    }

    #[test]
    fn fixed_range_clips_and_gamma_applies() {
        let m = array![[[-1.0f32, 0.25, 2.0]]];
        let p = Params {
            mode: Mode::Fixed,
            vmin: Some(0.0),
            vmax: Some(1.0),
            gamma: 2.0,
        };
        let n = normalize(m.view(), &p).unwrap();
        assert_eq!(n.as_slice().unwrap(), &[0.0, 0.0625, 1.0]);
    }

    #[test]
    fn bad_params_name_the_argument() {
        let m = array![[[0.0f32]]];
        let p = Params {
            mode: Mode::Fixed,
            vmin: Some(0.0),
            vmax: None,
            gamma: 1.0,
        };
        assert!(normalize(m.view(), &p)
            .unwrap_err()
            .to_string()
            .starts_with("vmin:"));
        let p = Params {
            gamma: 0.0,
            ..params(Mode::Global)
        };
        assert!(normalize(m.view(), &p)
            .unwrap_err()
            .to_string()
            .starts_with("gamma:"));
        assert!(Mode::parse("minmax", (1.0, 99.0))
            .unwrap_err()
            .to_string()
            .starts_with("normalize:"));
        assert!(Mode::parse("percentile", (99.0, 1.0))
            .unwrap_err()
            .to_string()
            .starts_with("percentile:"));
    }
}
