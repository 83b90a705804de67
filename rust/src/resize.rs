//! Resizing: bilinear in space (torch `interpolate(mode="bilinear", align_corners=False)`) and, in
//! time, linear to a number of frames or piecewise by a VAE temporal stride.

use ndarray::{Array3, ArrayView2, ArrayView3, Axis as NdAxis};
use rayon::prelude::*;

use crate::error::{try_reserve, try_vec, Error, Result};

/// Linear interpolation along one axis: output `i` is `(1 - w[i]) * src[i0[i]] + w[i] * src[i1[i]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Taps {
    pub i0: Vec<usize>,
    pub i1: Vec<usize>,
    pub w: Vec<f32>,
}

impl Taps {
    /// torch's `align_corners=False` linear taps from `n_in` to `n_out` samples (`arg` names the
    /// argument that sized them, for an allocation failure).
    pub fn linear(n_in: usize, n_out: usize, arg: &'static str) -> Result<Self> {
        let scale = n_in as f32 / n_out as f32;
        let mut taps = Taps::with_capacity(n_out, arg)?;
        for i in 0..n_out {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            taps.i0.push(i0);
            taps.i1.push(i1);
            taps.w.push(if i1 > i0 { src - i0 as f32 } else { 0.0 });
        }
        Ok(taps)
    }

    /// VAE stride taps: output frame 0 is latent frame 0, latent frame j > 0 covers output frames
    /// `(j - 1) * stride + 1 ..= j * stride`, so `n_in` latent frames give `1 + (n_in - 1) * stride`.
    pub fn stride(n_in: usize, stride: usize) -> Result<Self> {
        let n_out = 1 + (n_in - 1) * stride;
        let mut taps = Taps::with_capacity(n_out, "temporal_stride")?;
        taps.i0.extend((0..n_out).map(|t| t.div_ceil(stride)));
        taps.i1.extend_from_slice(&taps.i0);
        taps.w.resize(n_out, 0.0);
        Ok(taps)
    }

    fn with_capacity(n: usize, arg: &'static str) -> Result<Self> {
        let mut taps = Taps {
            i0: Vec::new(),
            i1: Vec::new(),
            w: Vec::new(),
        };
        try_reserve(&mut taps.i0, n, arg)?;
        try_reserve(&mut taps.i1, n, arg)?;
        try_reserve(&mut taps.w, n, arg)?;
        Ok(taps)
    }

    /// Number of output samples.
    pub fn len(&self) -> usize {
        self.w.len()
    }

    /// Whether there are no output samples.
    pub fn is_empty(&self) -> bool {
        self.w.is_empty()
    }
}

/// How latent frames become video frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    /// One output frame per input frame.
    Same,
    /// Linear interpolation (align_corners=False) to this many frames.
    Frames(usize),
    /// The VAE temporal stride (see [`Taps::stride`]).
    Stride(usize),
}

/// The output geometry: frame taps, row taps, column taps.
///
/// Only the input rows that some output row reads are resized across columns (`rows`): shrinking
/// 40,000 rows to 2 reads 4 of them, so a column pass is (at most 2H, W) whatever the input height.
#[derive(Clone, Debug)]
pub struct Plan {
    pub t: Taps,
    /// Row taps into `rows` (not into the input's rows).
    pub y: Taps,
    pub x: Taps,
    /// The input rows the output reads, ascending: row `k` of a column pass is input row `rows[k]`.
    pub rows: Vec<usize>,
    /// Input (h, w).
    pub src: (usize, usize),
}

/// The largest output side, in pixels (16 times 8K): beyond it a size is a mistake, not a video.
pub const MAX_SIDE: usize = 1 << 17;
/// The most output frames a plan may have.
pub const MAX_FRAMES: usize = 1 << 24;

impl Plan {
    /// Plan a resize of (F, h, w) maps to `size` = (H, W) and `time` frames.
    pub fn new(shape: (usize, usize, usize), size: (usize, usize), time: Time) -> Result<Self> {
        let (f, h, w) = shape;
        if f == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(
                "maps",
                format!("expected a non-empty (F, h, w) map, got ({f}, {h}, {w})"),
            ));
        }
        if size.0 == 0 || size.1 == 0 {
            return Err(Error::invalid(
                "size",
                format!("expected a positive (H, W), got {size:?}"),
            ));
        }
        if size.0 > MAX_SIDE || size.1 > MAX_SIDE {
            return Err(Error::invalid(
                "size",
                format!("expected at most {MAX_SIDE} pixels a side, got {size:?}"),
            ));
        }
        let frames = match time {
            Time::Same => Some(f),
            Time::Frames(n) => Some(n),
            Time::Stride(s) => s.checked_mul(f - 1).and_then(|n| n.checked_add(1)),
        };
        if frames.is_none_or(|n| n > MAX_FRAMES) {
            let arg = if matches!(time, Time::Stride(_)) {
                "temporal_stride"
            } else {
                "num_frames"
            };
            return Err(Error::invalid(
                arg,
                format!(
                    "expected at most {MAX_FRAMES} output frames, got {time:?} for {f} map frames"
                ),
            ));
        }
        let t = match time {
            Time::Same => Taps::linear(f, f, "maps")?,
            Time::Frames(0) => {
                return Err(Error::invalid(
                    "num_frames",
                    "expected a positive number of frames, got 0",
                ))
            }
            Time::Frames(n) => Taps::linear(f, n, "num_frames")?,
            Time::Stride(0) => {
                return Err(Error::invalid(
                    "temporal_stride",
                    "expected a positive stride, got 0",
                ))
            }
            Time::Stride(s) => Taps::stride(f, s)?,
        };
        let (y, rows) = compact(Taps::linear(h, size.0, "size")?)?;
        Ok(Plan {
            t,
            y,
            x: Taps::linear(w, size.1, "size")?,
            rows,
            src: (h, w),
        })
    }

    /// Number of output frames.
    pub fn frames(&self) -> usize {
        self.t.len()
    }

    /// Output (H, W).
    pub fn size(&self) -> (usize, usize) {
        (self.y.len(), self.x.len())
    }

    /// Output frame `t` interpolated in time and across columns only, for the input rows the output
    /// reads: (`rows.len()`, W) values, row-major. Rows of the final frame are then
    /// `(1 - wy) * pass[y0] + wy * pass[y1]` (see [`lerp_rows`]).
    pub fn column_pass(&self, maps: ArrayView3<f32>, t: usize) -> Result<Vec<f32>> {
        let w = self.src.1;
        let out_w = self.x.len();
        let (f0, f1, wt) = (self.t.i0[t], self.t.i1[t], self.t.w[t]);
        let a = maps.index_axis(NdAxis(0), f0);
        let b = maps.index_axis(NdAxis(0), f1);
        let mut mixed = try_vec(w, 0.0f32, "maps")?;
        let len = self.rows.len().saturating_mul(out_w);
        let mut out = try_vec(len, 0.0f32, "size")?;
        for (k, &y) in self.rows.iter().enumerate() {
            mix_row(a, b, y, wt, &mut mixed);
            let row = &mut out[k * out_w..(k + 1) * out_w];
            for (o, ((&i0, &i1), &wx)) in row
                .iter_mut()
                .zip(self.x.i0.iter().zip(&self.x.i1).zip(&self.x.w))
            {
                *o = (1.0 - wx) * mixed[i0] + wx * mixed[i1];
            }
        }
        Ok(out)
    }
}

/// Row taps into the input rows they read, remapped onto those rows alone: (taps into `rows`, `rows`).
/// The taps ascend (both `i0` and `i1`), so the rows come out in one merge.
fn compact(mut y: Taps) -> Result<(Taps, Vec<usize>)> {
    let mut rows: Vec<usize> = Vec::new();
    try_reserve(&mut rows, y.len().min(usize::MAX / 2) * 2, "size")?;
    for (&a, &b) in y.i0.iter().zip(&y.i1) {
        for r in [a, b] {
            if rows.last().is_none_or(|&last| last < r) {
                rows.push(r);
            }
        }
    }
    let at = |r: usize| rows.partition_point(|&x| x < r);
    for i in 0..y.len() {
        y.i0[i] = at(y.i0[i]);
        y.i1[i] = at(y.i1[i]);
    }
    Ok((y, rows))
}

fn mix_row(a: ArrayView2<f32>, b: ArrayView2<f32>, y: usize, wt: f32, out: &mut [f32]) {
    let ra = a.row(y);
    let rb = b.row(y);
    for ((o, &va), &vb) in out.iter_mut().zip(ra.iter()).zip(rb.iter()) {
        *o = if wt == 0.0 {
            va
        } else {
            (1.0 - wt) * va + wt * vb
        };
    }
}

/// Row `y` of an output frame from its column pass (h, W): writes W values into `out`.
#[inline(always)]
pub fn lerp_rows(cols: &[f32], plan: &Plan, y: usize, out: &mut [f32]) {
    let out_w = plan.x.len();
    let (y0, y1, wy) = (plan.y.i0[y], plan.y.i1[y], plan.y.w[y]);
    let a = &cols[y0 * out_w..(y0 + 1) * out_w];
    let b = &cols[y1 * out_w..(y1 + 1) * out_w];
    for ((o, &va), &vb) in out.iter_mut().zip(a).zip(b) {
        *o = (1.0 - wy) * va + wy * vb;
    }
}

/// Resize `maps` (F, h, w) to (T, H, W) floats: bilinear in space, `time` in time.
pub fn resize(maps: ArrayView3<f32>, size: (usize, usize), time: Time) -> Result<Array3<f32>> {
    let plan = Plan::new(maps.dim(), size, time)?;
    let (oh, ow) = plan.size();
    let len = plan.frames() * oh * ow; // at most 2^58: no overflow on 64-bit targets
    let buf = try_vec(len, 0.0f32, "size")?;
    let mut out = Array3::from_shape_vec((plan.frames(), oh, ow), buf).expect("sized to the shape");
    let data = out.as_slice_mut().expect("fresh arrays are contiguous");
    data.par_chunks_mut(oh * ow)
        .enumerate()
        .try_for_each(|(t, frame)| {
            let cols = plan.column_pass(maps, t)?;
            for (y, row) in frame.chunks_exact_mut(ow).enumerate() {
                lerp_rows(&cols, &plan, y, row);
            }
            Ok::<(), Error>(())
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn linear_taps_match_torch_align_corners_false() {
        // torch: interpolate(arange(2.)[None, None], size=4, mode="linear") == [0, .25, .75, 1]
        let m = array![[[0.0f32, 1.0]]];
        let r = resize(m.view(), (1, 4), Time::Same).unwrap();
        assert_eq!(r.as_slice().unwrap(), &[0.0, 0.25, 0.75, 1.0]);
        // downsampling 4 -> 2 averages pairs
        let m = array![[[0.0f32, 1.0, 2.0, 3.0]]];
        let r = resize(m.view(), (1, 2), Time::Same).unwrap();
        assert_eq!(r.as_slice().unwrap(), &[0.5, 2.5]);
    }

    #[test]
    fn absurd_sizes_are_errors_not_aborts() {
        let m = ndarray::Array3::<f32>::zeros((3, 2, 2));
        let e = resize(m.view(), (MAX_SIDE + 1, 4), Time::Same).unwrap_err();
        assert!(e.to_string().starts_with("size: expected at most"), "{e}");
        let e = Plan::new((3, 2, 2), (4, 4), Time::Frames(MAX_FRAMES + 1)).unwrap_err();
        assert!(
            e.to_string().starts_with("num_frames: expected at most"),
            "{e}"
        );
        let e = Plan::new((3, 2, 2), (4, 4), Time::Stride(usize::MAX)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("temporal_stride: expected at most"),
            "{e}"
        );
    }

    #[test]
    fn only_the_rows_read_are_resized() {
        // 40,000 rows to 2: each output row lerps two neighbours, 4 rows in all
        let plan = Plan::new((1, 40_000, 1), (2, 131_072), Time::Same).unwrap();
        assert_eq!(plan.rows, vec![9_999, 10_000, 29_999, 30_000]);
        assert_eq!(
            (plan.y.i0.clone(), plan.y.i1.clone()),
            (vec![0, 2], vec![1, 3])
        );
        let m = ndarray::Array3::from_shape_fn((1, 40_000, 1), |(_, y, _)| y as f32);
        let r = resize(m.view(), (2, 131_072), Time::Same).unwrap();
        // torch: rows at src 9999.5 and 29999.5
        assert_eq!((r[[0, 0, 0]], r[[0, 1, 131_071]]), (9_999.5, 29_999.5));
        // upsampling reads every row once
        let plan = Plan::new((1, 3, 2), (7, 5), Time::Same).unwrap();
        assert_eq!(plan.rows, vec![0, 1, 2]);
    }

    #[test]
    fn identity_size_is_a_copy() {
        let m = array![[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]];
        let r = resize(m.view(), (2, 3), Time::Same).unwrap();
        assert_eq!(r, m);
    }

    #[test]
    fn stride_maps_21_latents_to_81_frames() {
        let taps = Taps::stride(21, 4).unwrap();
        assert_eq!(taps.len(), 81);
        assert_eq!(taps.i0[0], 0);
        assert_eq!(&taps.i0[1..5], &[1, 1, 1, 1]);
        assert_eq!(taps.i0[5], 2);
        assert_eq!(taps.i0[80], 20);
    }

    #[test]
    fn time_linear_interpolates_frames() {
        let m = array![[[0.0f32]], [[1.0]]];
        let r = resize(m.view(), (1, 1), Time::Frames(4)).unwrap();
        assert_eq!(r.as_slice().unwrap(), &[0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn zero_sizes_are_rejected() {
        let m = array![[[0.0f32]]];
        assert!(resize(m.view(), (0, 3), Time::Same)
            .unwrap_err()
            .to_string()
            .starts_with("size:"));
        assert!(resize(m.view(), (1, 1), Time::Stride(0))
            .unwrap_err()
            .to_string()
            .starts_with("temporal_stride:"));
        assert!(resize(m.view(), (1, 1), Time::Frames(0))
            .unwrap_err()
            .to_string()
            .starts_with("num_frames:"));
    }
}
