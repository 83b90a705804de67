//! The fused render pass: resize (time, space) -> colormap -> blend, one pass per output pixel,
//! parallel over output rows. The maps come in already normalised to [0, 1] (see `normalize`).

use std::ops::Range;

use ndarray::ArrayView3;
use rayon::prelude::*;

use crate::blend::{over, Alpha, Outline};
use crate::colormap::{level, Table};
use crate::error::{Error, Result};
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

/// Render output frames `frames` of `plan` from normalised `maps` (F, h, w) into `out`
/// ((frames.len(), H, W, 3) bytes). Without a background the frames are the colormap alone.
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
    if n == 0 {
        return Ok(());
    }
    let premul = match style.alpha {
        Alpha::Constant(a) => Some(premultiply(style.table, a)),
        Alpha::Attention(_) => None,
    };
    let cols: Vec<Vec<f32>> = frames
        .clone()
        .into_par_iter()
        .map(|t| plan.column_pass(maps, t))
        .collect();
    out.par_chunks_mut(ow * 3).enumerate().for_each(|(r, row)| {
        let (i, y) = (r / oh, r % oh);
        let cols = &cols[i];
        let mut v = vec![0.0f32; ow];
        lerp_rows(cols, plan, y, &mut v);
        let bg_row = background.map(|bg| {
            let f = if bg.frames == 1 { 0 } else { i };
            let start = (f * oh + y) * ow * 3;
            &bg.data[start..start + ow * 3]
        });
        match bg_row {
            Some(bg) => match (style.alpha, &premul) {
                (Alpha::Constant(a), Some(p)) => blend_constant(&v, bg, p, 1.0 - a, row),
                (alpha, _) => {
                    for ((px, b), &x) in row.chunks_exact_mut(3).zip(bg.chunks_exact(3)).zip(&v) {
                        over(b, &style.table[level(x)], alpha.at(x), px);
                    }
                }
            },
            None => crate::colormap::colorize(&v, style.table, row),
        }
        if let Some(outline) = style.outline {
            draw_outline(cols, plan, y, &v, &outline, row);
        }
    });
    Ok(())
}

/// Every level's colour times `a`, plus the 0.5 that rounds the blend.
fn premultiply(table: &Table, a: f32) -> [[f32; 3]; 256] {
    let mut premul = [[0.0f32; 3]; 256];
    for (p, c) in premul.iter_mut().zip(table) {
        *p = [
            c[0] as f32 * a + 0.5,
            c[1] as f32 * a + 0.5,
            c[2] as f32 * a + 0.5,
        ];
    }
    premul
}

/// Constant-alpha blend of one row: `bg * keep + premul[level]`, the same rounding as [`over`].
fn blend_constant(v: &[f32], bg: &[u8], premul: &[[f32; 3]; 256], keep: f32, row: &mut [u8]) {
    for ((px, b), &x) in row.chunks_exact_mut(3).zip(bg.chunks_exact(3)).zip(v) {
        let p = &premul[level(x)];
        px[0] = (b[0] as f32 * keep + p[0]) as u8;
        px[1] = (b[1] as f32 * keep + p[1]) as u8;
        px[2] = (b[2] as f32 * keep + p[2]) as u8;
    }
}

/// Paint the outline colour over the mask border pixels of row `y` (values `v`).
fn draw_outline(cols: &[f32], plan: &Plan, y: usize, v: &[f32], outline: &Outline, row: &mut [u8]) {
    let (oh, ow) = plan.size();
    let mut up = vec![0.0f32; ow];
    let mut down = vec![0.0f32; ow];
    if y > 0 {
        lerp_rows(cols, plan, y - 1, &mut up);
    } else {
        up.copy_from_slice(v);
    }
    if y + 1 < oh {
        lerp_rows(cols, plan, y + 1, &mut down);
    } else {
        down.copy_from_slice(v);
    }
    for x in 0..ow {
        let left = if x > 0 { v[x - 1] } else { v[x] };
        let right = if x + 1 < ow { v[x + 1] } else { v[x] };
        if outline.on_edge(v[x], [up[x], down[x], left, right]) {
            row[x * 3..x * 3 + 3].copy_from_slice(&outline.color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colormap::table;
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
