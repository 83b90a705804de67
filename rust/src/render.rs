//! The fused render pass: resize (time, space) -> colormap -> blend, one pass per output pixel,
//! parallel over bands of output rows of all frames. The row loops are straight loops over slices that
//! the compiler vectorises (8 lanes where the CPU has AVX2, chosen at run time). The maps come in
//! already normalised to [0, 1] (see `normalize`).

use std::ops::Range;

use ndarray::ArrayView3;
use rayon::prelude::*;

use crate::blend::{Alpha, Outline};
use crate::colormap::Table;
use crate::error::{try_reserve, try_vec, Error, Result};
use crate::resize::{lerp_rows, Plan};

/// How a frame is drawn.
#[derive(Clone, Copy, Debug)]
pub struct Style<'a> {
    pub table: &'a Table,
    pub alpha: Alpha,
    pub outline: Option<Outline>,
}

/// Background frames, (n, H, W, 3) contiguous bytes: one per rendered frame, or one still image.
#[derive(Clone, Copy, Debug)]
pub struct Background<'a> {
    pub data: &'a [u8],
    pub frames: usize,
}

/// Levels live in "level space": the normalised value times 256, so a level is `floor(s)` clamped to
/// 0..=255. Scaling by a power of two commutes with every rounding of the lerps, so resizing the
/// scaled map gives exactly 256 times what resizing the map gives: the same levels, one multiply less.
const LEVELS: f32 = 256.0;

/// The fewest pixels a rayon task renders, in whole rows (19 rows of 832 columns): enough to amortise
/// the task, small enough that both cores stay busy on a few small frames.
const TASK_PIXELS: usize = 16 * 1024;

/// Render output frames `frames` of `plan` from normalised `maps` (F, h, w) into `out`
/// ((frames.len(), H, W, 3) bytes). Without a background the frames are the colormap alone.
///
/// Every byte of `out` is overwritten, so its old contents do not matter (the bindings pass numpy's
/// `empty`).
/// The work: one column pass (h, W) per distinct output frame (frames that share their latent frame
/// share it), then every output row is a lerp of two of its rows, quantised to levels and blended;
/// rayon splits the rows of all frames into tasks of about 16k pixels.
pub fn render(
    maps: ArrayView3<f32>,
    plan: &Plan,
    frames: Range<usize>,
    background: Option<Background>,
    style: &Style,
    out: &mut [u8],
) -> Result<()> {
    let (oh, ow) = plan.size();
    let n = frames.len();
    if frames.end > plan.frames() {
        return Err(Error::invalid(
            "stop",
            format!(
                "expected frames within 0..{}, got {}..{}",
                plan.frames(),
                frames.start,
                frames.end
            ),
        ));
    }
    if out.len() != n * oh * ow * 3 {
        return Err(Error::invalid(
            "out",
            format!("expected {} bytes, got {}", n * oh * ow * 3, out.len()),
        ));
    }
    if let Some(bg) = background {
        if !(bg.frames == n || bg.frames == 1) || bg.data.len() != bg.frames * oh * ow * 3 {
            return Err(Error::invalid(
                "background",
                format!(
                    "expected ({n}, {oh}, {ow}, 3) or ({oh}, {ow}, 3) bytes, got {} bytes",
                    bg.data.len()
                ),
            ));
        }
    }
    let (Alpha::Constant(a) | Alpha::Attention(a)) = style.alpha;
    if !(0.0..=1.0).contains(&a) {
        return Err(Error::invalid(
            "alpha",
            format!("expected a value in [0, 1], got {a}"),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let (slot, cols) = level_columns(maps, plan, frames)?;
    let ink = background.map(|_| Ink::new(style.alpha));
    let outline = style.outline.map(|o| Outline {
        threshold: o.threshold * LEVELS,
        ..o
    });
    let painter = Painter {
        plan,
        slot: &slot,
        cols: &cols,
        background,
        ink,
        packed: pack(style.table),
        outline,
        #[cfg(target_arch = "x86_64")]
        avx2: std::arch::is_x86_feature_detected!("avx2"),
    };
    out.par_chunks_mut(ow * 3)
        .enumerate()
        .with_min_len((TASK_PIXELS / ow).max(1))
        .try_for_each_init(
            || Scratch::new(ow),
            |s, (r, row)| {
                let s = s.as_mut().map_err(|_| Error::OutOfMemory {
                    arg: "size",
                    bytes: Scratch::bytes(ow),
                })?;
                painter.paint(s, r, row);
                Ok(())
            },
        )
}

/// Everything a row needs, prepared once per call.
struct Painter<'a> {
    plan: &'a Plan,
    /// Each output frame's column pass in `cols`.
    slot: &'a [usize],
    /// Column passes (h, W) in level space.
    cols: &'a [Vec<f32>],
    background: Option<Background<'a>>,
    /// The blend's colours; None without a background.
    ink: Option<Ink>,
    /// The colormap's colours as little-endian `r | g << 8 | b << 16`.
    packed: [u32; 256],
    /// The outline, its threshold in level space.
    outline: Option<Outline>,
    /// Whether the CPU has AVX2, so the row loops may run 8 lanes wide.
    #[cfg(target_arch = "x86_64")]
    avx2: bool,
}

impl Painter<'_> {
    /// Paint output row `r` (frame `r / H`, row `r % H`) into `row` (W * 3 bytes).
    fn paint(&self, s: &mut Scratch, r: usize, row: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` says the CPU has AVX2.
            return unsafe { self.paint_avx2(s, r, row) };
        }
        self.paint_any(s, r, row)
    }

    /// [`Painter::paint_any`] compiled for AVX2: the same operations in the same order, so the same
    /// bytes, twice as many lanes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn paint_avx2(&self, s: &mut Scratch, r: usize, row: &mut [u8]) {
        self.paint_any(s, r, row)
    }

    #[inline(always)]
    fn paint_any(&self, s: &mut Scratch, r: usize, row: &mut [u8]) {
        let (oh, ow) = self.plan.size();
        let (i, y) = (r / oh, r % oh);
        let cols = &self.cols[self.slot[i]];
        let needs_values =
            self.outline.is_some() || matches!(self.ink, Some(Ink::Attention { .. }));
        if needs_values {
            lerp_rows(cols, self.plan, y, &mut s.values);
            levels_of(&s.values, &mut s.levels);
        } else {
            lerp_levels(cols, self.plan, y, &mut s.levels);
        }
        let bg_row = self.background.map(|bg| {
            let f = if bg.frames == 1 { 0 } else { i };
            let start = (f * oh + y) * ow * 3;
            &bg.data[start..start + ow * 3]
        });
        colorize_levels(&s.levels, &self.packed, row);
        match (self.ink, bg_row) {
            (Some(Ink::Constant { alpha, keep }), Some(bg)) => blend_constant(bg, alpha, keep, row),
            (Some(Ink::Attention { alpha }), Some(bg)) => {
                attention_alphas(&s.values, alpha, &mut s.alphas);
                blend_attention(bg, &s.alphas, row)
            }
            _ => {}
        }
        if let Some(outline) = &self.outline {
            draw_outline(cols, self.plan, y, outline, s, row);
        }
    }
}

/// How the colormap's colours go over a background.
#[derive(Clone, Copy)]
enum Ink {
    /// Constant `alpha`, and `keep = 1 - alpha`, the background's weight.
    Constant { alpha: f32, keep: f32 },
    /// Opacity `alpha * value`: low attention shows the background.
    Attention { alpha: f32 },
}

impl Ink {
    fn new(alpha: Alpha) -> Self {
        match alpha {
            Alpha::Constant(alpha) => Ink::Constant {
                alpha,
                keep: 1.0 - alpha,
            },
            Alpha::Attention(alpha) => Ink::Attention { alpha },
        }
    }
}

/// Per-task row buffers, so no row allocates.
struct Scratch {
    /// The row's values in level space (W), when alpha or the outline needs them.
    values: Vec<f32>,
    /// The row's colormap levels (W).
    levels: Vec<u8>,
    /// The alpha of every channel of the row (3W), attention alpha only.
    alphas: Vec<f32>,
    /// The rows above and below (W each), for the outline.
    up: Vec<f32>,
    down: Vec<f32>,
}

impl Scratch {
    /// The bytes of the buffers of a row of `ow` pixels.
    fn bytes(ow: usize) -> usize {
        ow * (4 + 1 + 12 + 4 + 4)
    }

    fn new(ow: usize) -> Result<Self> {
        Ok(Scratch {
            values: try_vec(ow, 0.0, "size")?,
            levels: try_vec(ow, 0, "size")?,
            alphas: try_vec(ow * 3, 0.0, "size")?,
            up: try_vec(ow, 0.0, "size")?,
            down: try_vec(ow, 0.0, "size")?,
        })
    }
}

/// The column pass of every distinct frame of `frames`, in level space, and each frame's slot in it.
/// Consecutive output frames with the same time taps (a VAE stride repeats each latent frame) share one.
/// Every buffer is reserved fallibly: a render too large for the memory there is is an error.
fn level_columns(
    maps: ArrayView3<f32>,
    plan: &Plan,
    frames: Range<usize>,
) -> Result<(Vec<usize>, Vec<Vec<f32>>)> {
    let key = |t: usize| (plan.t.i0[t], plan.t.i1[t], plan.t.w[t].to_bits());
    let mut firsts: Vec<usize> = Vec::new();
    let mut slot = Vec::new();
    try_reserve(&mut slot, frames.len(), "stop")?;
    for t in frames {
        if firsts.last().map(|&f| key(f)) != Some(key(t)) {
            try_reserve(&mut firsts, 1, "stop")?;
            firsts.push(t);
        }
        slot.push(firsts.len() - 1);
    }
    let mut cols = try_vec(firsts.len(), Vec::new(), "stop")?;
    cols.par_iter_mut()
        .zip(&firsts)
        .try_for_each(|(c, &t)| -> Result<()> {
            *c = plan.column_pass(maps, t)?;
            c.iter_mut().for_each(|v| *v *= LEVELS);
            Ok(())
        })?;
    Ok((slot, cols))
}

/// The level of a level-space value: `floor(s)` clamped to 0..=255, NaN to 0; the same as
/// [`crate::colormap::level`] of `s / 256`, in a form that vectorises.
#[inline(always)]
fn level_of(s: f32) -> u8 {
    // Selects rather than `clamp`: a NaN fails `s > 0` and becomes 0.
    let s = if s > 0.0 { s } else { 0.0 };
    floor_byte(if s < 255.0 { s } else { 255.0 })
}

/// `floor(x)` for `x` in [0, 256). A plain float-to-int cast checks for NaN and saturates, one lane at
/// a time; this one compiles to packed truncating conversions.
#[inline(always)]
fn floor_byte(x: f32) -> u8 {
    debug_assert!((0.0..256.0).contains(&x), "{x} outside [0, 256)");
    // SAFETY: every caller passes a finite value in [0, 256) (a clamped level, or a blend of bytes
    // with weights in [0, 1] that `render` checked), which truncates to an i32 without overflow.
    unsafe { x.to_int_unchecked::<i32>() as u8 }
}

/// Levels of a row of level-space values.
#[inline(always)]
fn levels_of(values: &[f32], levels: &mut [u8]) {
    for (l, &s) in levels.iter_mut().zip(values) {
        *l = level_of(s);
    }
}

/// Levels of output row `y`, straight from the two column-pass rows it lerps (see [`lerp_rows`]).
#[inline(always)]
fn lerp_levels(cols: &[f32], plan: &Plan, y: usize, levels: &mut [u8]) {
    let ow = plan.x.len();
    let (y0, y1, wy) = (plan.y.i0[y], plan.y.i1[y], plan.y.w[y]);
    let a = &cols[y0 * ow..(y0 + 1) * ow];
    let b = &cols[y1 * ow..(y1 + 1) * ow];
    for ((l, &va), &vb) in levels.iter_mut().zip(a).zip(b) {
        *l = level_of((1.0 - wy) * va + wy * vb);
    }
}

/// The colours of `table` packed as little-endian `r | g << 8 | b << 16`.
fn pack(table: &Table) -> [u32; 256] {
    table.map(|[r, g, b]| u32::from_le_bytes([r, g, b, 0]))
}

/// Without a background: the colormap's bytes of every level, four pixels (three words) at a time.
#[inline(always)]
fn colorize_levels(levels: &[u8], packed: &[u32; 256], row: &mut [u8]) {
    let mut px4 = row.chunks_exact_mut(12);
    let mut l4 = levels.chunks_exact(4);
    for (px, l) in (&mut px4).zip(&mut l4) {
        let [p0, p1, p2, p3] = [l[0], l[1], l[2], l[3]].map(|l| packed[l as usize]);
        px[0..4].copy_from_slice(&(p0 | p1 << 24).to_le_bytes());
        px[4..8].copy_from_slice(&(p1 >> 8 | p2 << 16).to_le_bytes());
        px[8..12].copy_from_slice(&(p2 >> 16 | p3 << 8).to_le_bytes());
    }
    for (px, &l) in px4.into_remainder().chunks_exact_mut(3).zip(l4.remainder()) {
        px.copy_from_slice(&packed[l as usize].to_le_bytes()[..3]);
    }
}

/// Constant-alpha blend of a colourised row in place: `bg * keep + (colour * alpha + 0.5)`, the
/// operations of [`crate::blend::over`] in its order, so the same bytes; one straight vector loop.
#[inline(always)]
fn blend_constant(bg: &[u8], alpha: f32, keep: f32, row: &mut [u8]) {
    for (o, &b) in row.iter_mut().zip(bg) {
        // bg * (1 - alpha) + colour * alpha + 0.5 lies in [0.5, 255.5].
        *o = floor_byte(b as f32 * keep + (*o as f32 * alpha + 0.5));
    }
}

/// The opacity of every channel of a row (3W) from its level-space values (W): `alpha * value`, as
/// [`Alpha::at`], with NaN (the minimum) giving 0 where `clamp` would keep it.
#[inline(always)]
fn attention_alphas(values: &[f32], alpha: f32, alphas: &mut [f32]) {
    for (a, &s) in alphas.chunks_exact_mut(3).zip(values) {
        // Dividing by 256 is exact: the value the plain resize gives.
        let v = s * (1.0 / LEVELS);
        a.fill(alpha * if v > 0.0 { v.min(1.0) } else { 0.0 });
    }
}

/// Attention-alpha blend of a colourised row in place: [`crate::blend::over`] with a per-channel
/// opacity, bit for bit.
#[inline(always)]
fn blend_attention(bg: &[u8], alphas: &[f32], row: &mut [u8]) {
    for ((o, &b), &a) in row.iter_mut().zip(bg).zip(alphas) {
        *o = floor_byte(b as f32 * (1.0 - a) + *o as f32 * a + 0.5);
    }
}

/// Paint the outline colour over the mask border pixels of row `y` (level-space values in
/// `s.values`, `outline.threshold` in level space too).
#[inline(always)]
fn draw_outline(
    cols: &[f32],
    plan: &Plan,
    y: usize,
    outline: &Outline,
    s: &mut Scratch,
    row: &mut [u8],
) {
    let (oh, ow) = plan.size();
    let v = &s.values;
    if y > 0 {
        lerp_rows(cols, plan, y - 1, &mut s.up);
    } else {
        s.up.copy_from_slice(v);
    }
    if y + 1 < oh {
        lerp_rows(cols, plan, y + 1, &mut s.down);
    } else {
        s.down.copy_from_slice(v);
    }
    for x in 0..ow {
        let left = if x > 0 { v[x - 1] } else { v[x] };
        let right = if x + 1 < ow { v[x + 1] } else { v[x] };
        if outline.on_edge(v[x], [s.up[x], s.down[x], left, right]) {
            row[x * 3..x * 3 + 3].copy_from_slice(&outline.color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blend::over;
    use crate::colormap::{level, table};
    use crate::resize::{resize, Time};
    use ndarray::{array, Array3};

    fn style(alpha: Alpha) -> Style<'static> {
        Style {
            table: table("gray").unwrap(),
            alpha,
            outline: None,
        }
    }

    #[test]
    fn without_background_frames_are_the_colormap_of_the_resized_map() {
        let m = array![[[0.0f32, 1.0], [0.5, 0.25]], [[1.0, 0.0], [0.0, 1.0]]];
        let plan = Plan::new(m.dim(), (3, 5), Time::Frames(3)).unwrap();
        let mut out = vec![0u8; 3 * 3 * 5 * 3];
        render(
            m.view(),
            &plan,
            0..3,
            None,
            &style(Alpha::Constant(0.5)),
            &mut out,
        )
        .unwrap();
        let r = resize(m.view(), (3, 5), Time::Frames(3)).unwrap();
        for (px, &x) in out.chunks_exact(3).zip(r.iter()) {
            assert_eq!(px, [level(x) as u8; 3]);
        }
    }

    #[test]
    fn chunks_equal_the_whole() {
        let m = Array3::from_shape_fn((3, 4, 5), |(f, y, x)| {
            ((f * 7 + y * 3 + x) % 11) as f32 / 10.0
        });
        let plan = Plan::new(m.dim(), (6, 7), Time::Stride(4)).unwrap();
        let n = plan.frames();
        let bg: Vec<u8> = (0..n * 6 * 7 * 3).map(|i| (i % 251) as u8).collect();
        let s = Style {
            outline: Some(Outline::new(0.5, [0, 255, 0]).unwrap()),
            ..style(Alpha::Attention(0.7))
        };
        let mut whole = vec![0u8; bg.len()];
        render(
            m.view(),
            &plan,
            0..n,
            Some(Background {
                data: &bg,
                frames: n,
            }),
            &s,
            &mut whole,
        )
        .unwrap();
        let fb = 6 * 7 * 3;
        let mut part = vec![0u8; 4 * fb];
        render(
            m.view(),
            &plan,
            3..7,
            Some(Background {
                data: &bg[3 * fb..7 * fb],
                frames: 4,
            }),
            &s,
            &mut part,
        )
        .unwrap();
        assert_eq!(&whole[3 * fb..7 * fb], &part[..]);
    }

    #[test]
    fn constant_alpha_blend_matches_over() {
        let m = array![[[0.0f32, 0.5, 1.0]]];
        let plan = Plan::new(m.dim(), (1, 3), Time::Same).unwrap();
        let bg = [200u8, 10, 30, 0, 0, 0, 255, 255, 255];
        let mut out = [0u8; 9];
        let s = style(Alpha::Constant(0.25));
        render(
            m.view(),
            &plan,
            0..1,
            Some(Background {
                data: &bg,
                frames: 1,
            }),
            &s,
            &mut out,
        )
        .unwrap();
        let mut want = [0u8; 9];
        for (i, &x) in [0.0f32, 0.5, 1.0].iter().enumerate() {
            over(
                &bg[i * 3..i * 3 + 3],
                &s.table[level(x)],
                0.25,
                &mut want[i * 3..i * 3 + 3],
            );
        }
        assert_eq!(out, want);
    }

    /// The reference: resize, quantise each value with `level`, `over` each pixel.
    fn reference(m: &Array3<f32>, plan: &Plan, bg: &[u8], s: &Style) -> Vec<u8> {
        let (oh, ow) = plan.size();
        let r = resize(m.view(), (oh, ow), Time::Frames(plan.frames())).unwrap();
        let mut want = vec![0u8; bg.len()];
        for ((px, b), &x) in want
            .chunks_exact_mut(3)
            .zip(bg.chunks_exact(3))
            .zip(r.iter())
        {
            over(b, &s.table[level(x)], s.alpha.at(x), px);
        }
        want
    }

    #[test]
    fn vector_loops_equal_the_reference_bit_for_bit() {
        // Widths 1..9 leave every remainder of the four-pixel colour writes; values run past [0, 1].
        for ow in 1..10 {
            let m = Array3::from_shape_fn((3, 4, 5), |(f, y, x)| {
                ((f * 13 + y * 7 + x * 3) % 23) as f32 / 20.0 - 0.05
            });
            let plan = Plan::new(m.dim(), (7, ow), Time::Frames(4)).unwrap();
            let bg: Vec<u8> = (0..4 * 7 * ow * 3).map(|i| (i * 37 % 256) as u8).collect();
            for alpha in [
                Alpha::Constant(0.0),
                Alpha::Constant(0.37),
                Alpha::Constant(1.0),
                Alpha::Attention(0.8),
            ] {
                let s = Style {
                    table: table("viridis").unwrap(),
                    alpha,
                    outline: None,
                };
                let mut out = vec![0u8; bg.len()];
                let b = Background {
                    data: &bg,
                    frames: 4,
                };
                render(m.view(), &plan, 0..4, Some(b), &s, &mut out).unwrap();
                assert_eq!(out, reference(&m, &plan, &bg, &s), "width {ow}, {alpha:?}");
            }
        }
    }

    #[test]
    fn nan_takes_the_lowest_level_and_no_opacity() {
        // (An infinity turns into NaN in the resize lerps already: 0 * inf.)
        let m = array![[[f32::NAN, 2.0, 0.5, -1.0]]];
        let plan = Plan::new(m.dim(), (1, 4), Time::Same).unwrap();
        let mut out = [0u8; 12];
        render(
            m.view(),
            &plan,
            0..1,
            None,
            &style(Alpha::Constant(1.0)),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [0, 0, 0, 255, 255, 255, 128, 128, 128, 0, 0, 0]);
        let bg = [9u8; 12];
        render(
            m.view(),
            &plan,
            0..1,
            Some(Background {
                data: &bg,
                frames: 1,
            }),
            &style(Alpha::Attention(1.0)),
            &mut out,
        )
        .unwrap();
        assert_eq!((&out[..3], &out[9..]), (&[9; 3][..], &[9; 3][..]));
    }

    #[test]
    fn alpha_outside_the_unit_range_is_an_error() {
        let m = array![[[0.5f32]]];
        let plan = Plan::new(m.dim(), (1, 1), Time::Same).unwrap();
        let bg = [0u8; 3];
        let mut out = [0u8; 3];
        for alpha in [Alpha::Constant(f32::NAN), Alpha::Attention(1.5)] {
            let e = render(
                m.view(),
                &plan,
                0..1,
                Some(Background {
                    data: &bg,
                    frames: 1,
                }),
                &style(alpha),
                &mut out,
            );
            assert!(e.unwrap_err().to_string().starts_with("alpha:"));
        }
    }

    #[test]
    fn outline_follows_the_mask_border() {
        let mut m = Array3::<f32>::zeros((1, 5, 5));
        m.slice_mut(ndarray::s![.., 1..4, 1..4]).fill(1.0);
        let plan = Plan::new(m.dim(), (5, 5), Time::Same).unwrap();
        let s = Style {
            outline: Some(Outline::new(0.5, [0, 255, 0]).unwrap()),
            ..style(Alpha::Constant(1.0))
        };
        let mut out = vec![0u8; 5 * 5 * 3];
        render(m.view(), &plan, 0..1, None, &s, &mut out).unwrap();
        let green: Vec<bool> = out.chunks_exact(3).map(|p| p == [0, 255, 0]).collect();
        for y in 0..5 {
            for x in 0..5 {
                let inside = (1..4).contains(&y) && (1..4).contains(&x);
                let border = inside && !(y == 2 && x == 2);
                assert_eq!(green[y * 5 + x], border, "pixel ({y}, {x})");
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let m = array![[[0.0f32]]];
        let plan = Plan::new(m.dim(), (2, 2), Time::Same).unwrap();
        let mut out = vec![0u8; 12];
        let bg = [0u8; 6];
        let e = render(
            m.view(),
            &plan,
            0..1,
            Some(Background {
                data: &bg,
                frames: 1,
            }),
            &style(Alpha::Constant(0.5)),
            &mut out,
        );
        assert!(e.unwrap_err().to_string().starts_with("background:"));
        let e = render(
            m.view(),
            &plan,
            0..2,
            None,
            &style(Alpha::Constant(0.5)),
            &mut out,
        );
        assert!(e.unwrap_err().to_string().starts_with("stop:"));
    }
}
