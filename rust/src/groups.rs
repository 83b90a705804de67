//! Attention probabilities summed over groups of keys, on the CPU, without the N x N map.
//!
//! For each query row `i` and head, P = softmax(scale * q k^T + bias) over every key, and the row's
//! mass is summed into columns: key `j` adds `P[i, j]` to column `columns[j]` (or nowhere for -1).
//! One column per text key gives the cross-attention map; one column per frame, given to all of
//! that frame's video keys, gives the frame-to-frame (temporal) rows. This is `P @ G` for a 0/1
//! matrix G, computed in one pass over the keys with an online softmax (running row max and sum),
//! so a row costs one q k^T product and one exp per key: about half of what an attention forward
//! (which also multiplies P by V) costs.
//!
//! Layout of the work: a task takes [`ROW_CHUNK`] query rows of one batch element through every
//! head; per head it walks the keys in blocks of [`KEY_BLOCK`] (kept in cache) and, within a block,
//! micro tiles of [`MR`] rows x [`NR`] keys whose logits live in registers. Keys are packed once per
//! call as `[tile][d][NR]`. The loops are plain Rust compiled twice, plain and for AVX2 + FMA
//! (chosen at run time), and vectorised by the compiler.

use ndarray::{Array4, ArrayView1, ArrayView3, ArrayView4};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Keys per micro tile (two AVX2 vectors).
pub(crate) const NR: usize = 16;
/// Query rows per micro tile: `MR * NR / 8` = 12 accumulators stay in registers (of 16).
pub(crate) const MR: usize = 6;
/// Query rows per task (a multiple of `MR`).
pub(crate) const ROW_CHUNK: usize = 60;
/// Keys walked per pass over a task's rows (a multiple of `NR`), so that their packed copy stays in
/// the L2 cache while every row of the task uses it.
const KEY_BLOCK: usize = 256;

/// How the keys of one micro tile map to columns, decided once per call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tile {
    /// No key of the tile has a column.
    Skip,
    /// Every key adds to the same column (a frame).
    Sum(usize),
    /// Key `j` adds to column `first + j` (consecutive text keys).
    Consecutive(usize),
    /// Anything else: key by key.
    Mixed,
}

/// The key -> column map of a call.
pub struct Groups {
    /// One entry per key, padded with -1 to whole tiles.
    columns: Vec<i64>,
    tiles: Vec<Tile>,
    pub(crate) num_columns: usize,
    /// Number of keys (before padding).
    keys: usize,
}

impl Groups {
    /// `columns[j]` is key `j`'s column in `0..num_columns`, or -1 for a key in no column.
    pub fn new(columns: ArrayView1<i64>, num_columns: usize) -> Result<Self> {
        if let Some(bad) = columns.iter().find(|&&c| c < -1 || c >= num_columns as i64) {
            return Err(Error::invalid(
                "columns",
                format!("expected values in -1..{num_columns} (num_columns), got {bad}"),
            ));
        }
        let ntiles = columns.len().div_ceil(NR);
        let mut padded = vec![-1i64; ntiles * NR];
        for (dst, &c) in padded.iter_mut().zip(columns.iter()) {
            *dst = c;
        }
        let tiles = padded.chunks_exact(NR).map(classify).collect();
        Ok(Groups {
            columns: padded,
            tiles,
            num_columns,
            keys: columns.len(),
        })
    }
}

impl Groups {
    /// Every key its own column, padded to whole tiles (so every tile is `Consecutive`): the
    /// columns are the rows of P, `ceil(nk / NR) * NR` of them (those past `nk` stay zero).
    pub fn identity(nk: usize) -> Self {
        let ntiles = nk.div_ceil(NR);
        Groups {
            columns: (0..(ntiles * NR) as i64).collect(),
            tiles: (0..ntiles).map(|t| Tile::Consecutive(t * NR)).collect(),
            num_columns: ntiles * NR,
            keys: nk,
        }
    }
}

fn classify(cols: &[i64]) -> Tile {
    let first = cols[0];
    if cols.iter().all(|&c| c == -1) {
        Tile::Skip
    } else if first >= 0 && cols.iter().all(|&c| c == first) {
        Tile::Sum(first as usize)
    } else if first >= 0 && cols.iter().enumerate().all(|(j, &c)| c == first + j as i64) {
        Tile::Consecutive(first as usize)
    } else {
        Tile::Mixed
    }
}

/// One call's inputs, checked.
pub struct Problem<'a> {
    /// Queries `[B, H, R, D]`.
    pub q: ArrayView4<'a, f32>,
    /// Keys `[B, Hk, Nk, D]`, `H % Hk == 0`: query head `h` uses key head `h / (H / Hk)`.
    pub k: ArrayView4<'a, f32>,
    /// Additive bias per key `[B, Hm, Nk]`, `Hm` 1 or H (`-inf` excludes a key).
    pub bias: Option<ArrayView3<'a, f32>>,
    /// Logit scale.
    pub scale: f32,
    /// Keep heads apart (`[B, H, R, C]`) or sum them (`[B, 1, R, C]`).
    pub per_head: bool,
}

impl Problem<'_> {
    pub(crate) fn check(&self, groups: &Groups) -> Result<()> {
        let (b, h, _, d) = self.q.dim();
        let (kb, hk, nk, kd) = self.k.dim();
        if kb != b || kd != d || hk == 0 || !h.is_multiple_of(hk) || d == 0 {
            return Err(Error::invalid(
                "k",
                format!(
                    "expected [B, Hk, Nk, D] with B = {b}, D = {d} >= 1 and Hk dividing H = {h}, got {:?}",
                    self.k.shape()
                ),
            ));
        }
        if groups.keys != nk {
            return Err(Error::invalid(
                "columns",
                format!("expected one column per key ({nk}), got {}", groups.keys),
            ));
        }
        if let Some(bias) = &self.bias {
            let (bb, hm, bn) = bias.dim();
            if bb != b || (hm != 1 && hm != h) || bn != nk {
                return Err(Error::invalid(
                    "bias",
                    format!(
                        "expected [B, 1 or H, Nk] = [{b}, 1 or {h}, {nk}], got {:?}",
                        bias.shape()
                    ),
                ));
            }
        }
        let (_, _, r, _) = self.q.dim();
        let hs = if self.per_head { h } else { 1 };
        let entries = [b, hs, r, groups.num_columns]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()));
        if entries.is_none_or(|bytes| bytes > isize::MAX as usize) {
            return Err(Error::invalid(
                "num_columns",
                format!(
                    "the output [B, Hs, R, C] = [{b}, {hs}, {r}, {}] is too large",
                    groups.num_columns
                ),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid(
                "scale",
                format!("expected a finite number, got {}", self.scale),
            ));
        }
        Ok(())
    }
}

/// `P @ G` per query row: `[B, Hs, R, C]` with `Hs` H (`per_head`) or 1 (the sum over heads).
///
/// A row whose keys are all excluded is zero; a row with NaN or `+inf` among its logits (NaN or
/// inf in q or k) is NaN in every column, never a silent number.
pub fn grouped_sums(p: &Problem, groups: &Groups) -> Result<Array4<f32>> {
    run(p, groups, has_avx2_fma())
}

/// Whether this CPU runs the AVX2 + FMA build of the kernels.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// [`grouped_sums`] with the AVX2 + FMA build (`fast`) or the plain one.
fn run(p: &Problem, groups: &Groups, fast: bool) -> Result<Array4<f32>> {
    p.check(groups)?;
    let (b, h, r, _) = p.q.dim();
    let c = groups.num_columns;
    let hs = if p.per_head { h } else { 1 };
    let mut out = Array4::from_shape_vec((b, hs, r, c), zeroed(b * hs * r * c, "num_columns")?)
        .expect("sized to the shape");
    if r == 0 || c == 0 {
        return Ok(out);
    }
    let packed = Packed::new(p, groups.tiles.len());
    let chunks = r.div_ceil(ROW_CHUNK);
    let work = Work {
        p,
        groups,
        keys: &packed.keys,
        biases: &packed.biases,
        fast,
        prefix: false,
    };
    let parts: Vec<Vec<f32>> = (0..b * chunks)
        .into_par_iter()
        .map(|t| work.task(t / chunks, (t % chunks) * ROW_CHUNK))
        .collect::<Result<_>>()?;
    for (t, part) in parts.iter().enumerate() {
        let (bi, r0) = (t / chunks, (t % chunks) * ROW_CHUNK);
        let rows = ROW_CHUNK.min(r - r0);
        for (hi, block) in part.chunks_exact(rows * c).enumerate() {
            let mut dst = out.slice_mut(ndarray::s![bi, hi, r0..r0 + rows, ..]);
            let src = ndarray::ArrayView2::from_shape((rows, c), block).expect("rows x columns");
            dst.assign(&src);
        }
    }
    Ok(out)
}

/// The keys and biases of a call, laid out once for every task.
pub(crate) struct Packed {
    /// Packed keys per `(b, key head)`: [`pack_keys`].
    pub keys: Vec<Vec<f32>>,
    /// Bias per `(b, bias head)` over `ntiles * NR` keys, `-inf` past `Nk`.
    pub biases: Vec<Vec<f32>>,
}

impl Packed {
    pub fn new(p: &Problem, ntiles: usize) -> Self {
        let (b, hk, nk, _) = p.k.dim();
        let keys = (0..b * hk)
            .into_par_iter()
            .map(|i| pack_keys(p.k.slice(ndarray::s![i / hk, i % hk, .., ..]), ntiles))
            .collect();
        let hm = p.bias.as_ref().map_or(1, |x| x.dim().1);
        let biases = (0..b * hm)
            .map(|i| {
                let mut row = vec![f32::NEG_INFINITY; ntiles * NR];
                match &p.bias {
                    Some(x) => row[..nk]
                        .iter_mut()
                        .zip(x.slice(ndarray::s![i / hm, i % hm, ..]))
                        .for_each(|(dst, &v)| *dst = v),
                    None => row[..nk].fill(0.0),
                }
                row
            })
            .collect();
        Packed { keys, biases }
    }
}

/// Keys `[Nk, D]` as tiles `[tile][d][NR]`, zero past `Nk`.
fn pack_keys(k: ndarray::ArrayView2<f32>, ntiles: usize) -> Vec<f32> {
    let (nk, d) = k.dim();
    let mut out = vec![0.0f32; ntiles * d * NR];
    for (j, row) in k.outer_iter().enumerate().take(nk) {
        let (t, lane) = (j / NR, j % NR);
        for (p, &v) in row.iter().enumerate() {
            out[(t * d + p) * NR + lane] = v;
        }
    }
    out
}

/// The shared, read-only state of one call.
pub(crate) struct Work<'a, 'v> {
    pub p: &'a Problem<'v>,
    pub groups: &'a Groups,
    /// Packed keys per `(b, key head)`.
    pub keys: &'a [Vec<f32>],
    /// Bias per `(b, bias head)`, `-inf` past `Nk`.
    pub biases: &'a [Vec<f32>],
    /// Run the AVX2 + FMA build (only set when the CPU has both).
    pub fast: bool,
    /// Column `j` is key `j` (every key its own column): while the keys are walked in order, only
    /// the columns of the keys walked so far hold mass, so a raised max rescales only those.
    pub prefix: bool,
}

/// Online-softmax state of a task's rows for one head.
pub(crate) struct Rows {
    /// `[rows][C]` unnormalised column sums, relative to `max`.
    pub acc: Vec<f32>,
    /// Running row max of the logits.
    pub max: Vec<f32>,
    /// Running row sum of `exp(logit - max)`.
    pub sum: Vec<f32>,
    /// Running row sum of `exp(logit - max) * (logit - max)` (kept for the entropy only).
    pub ent: Vec<f32>,
    /// A NaN or `+inf` logit was seen.
    pub bad: Vec<bool>,
}

/// A zeroed buffer of `n` floats, or an error naming `what` where memory runs out.
pub(crate) fn zeroed(n: usize, what: &'static str) -> Result<Vec<f32>> {
    crate::error::try_vec(n, 0.0, what)
}

impl Rows {
    /// The state of `rows` rows (a multiple of [`MR`]) of `c` columns; `what` names the argument
    /// that sets `c` in an error.
    pub fn new(rows: usize, c: usize, what: &'static str) -> Result<Self> {
        let n = rows
            .checked_mul(c)
            .ok_or_else(|| Error::invalid(what, format!("{rows} rows x {c} columns overflow")))?;
        Ok(Rows {
            acc: zeroed(n, what)?,
            max: vec![0.0; rows],
            sum: vec![0.0; rows],
            ent: vec![0.0; rows],
            bad: vec![false; rows],
        })
    }

    fn reset(&mut self) {
        self.acc.fill(0.0);
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.ent.fill(0.0);
        self.bad.fill(false);
    }

    /// Row `i`'s entropy `-sum P ln P` from its sums: `ln sum - ent / sum` (0 for a row with no
    /// key, NaN for a row with a NaN or `+inf` logit).
    pub fn entropy(&self, i: usize) -> f32 {
        if self.bad[i] {
            f32::NAN
        } else if self.sum[i] > 0.0 {
            self.sum[i].ln() - self.ent[i] / self.sum[i]
        } else {
            0.0
        }
    }

    /// `1 / sum` of row `i` (0 for a row with no key, NaN for a bad row).
    pub fn inv(&self, i: usize) -> f32 {
        if self.bad[i] {
            f32::NAN
        } else if self.sum[i] > 0.0 {
            1.0 / self.sum[i]
        } else {
            0.0
        }
    }
}

/// `dst += src * s`, element by element.
pub(crate) fn add_scaled(dst: &mut [f32], src: &[f32], s: f32) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v * s);
}

impl Work<'_, '_> {
    /// Rows `r0..r0 + ROW_CHUNK` of batch element `b`: `[Hs][rows][C]`.
    fn task(&self, b: usize, r0: usize) -> Result<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if self.fast {
            // SAFETY: `fast` says the CPU has AVX2 and FMA.
            return unsafe { self.task_fast(b, r0) };
        }
        self.task_any::<false>(b, r0)
    }

    /// [`Work::task_any`] compiled for AVX2 with fused multiply-adds, tiles in [`avx2`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn task_fast(&self, b: usize, r0: usize) -> Result<Vec<f32>> {
        self.task_any::<true>(b, r0)
    }

    #[inline(always)]
    fn task_any<const FAST: bool>(&self, b: usize, r0: usize) -> Result<Vec<f32>> {
        let p = self.p;
        let (_, h, r, d) = p.q.dim();
        let c = self.groups.num_columns;
        let rows = ROW_CHUNK.min(r - r0);
        let padded = rows.div_ceil(MR) * MR;
        let hs = if p.per_head { h } else { 1 };
        let mut out = zeroed(hs * rows * c, "num_columns")?;
        let mut q = vec![0.0f32; padded * d];
        let mut st = Rows::new(padded, c, "num_columns")?;
        for head in 0..h {
            self.softmax_head::<FAST, false>(b, head, r0, rows, &mut q, &mut st);
            let slot = if p.per_head { head } else { 0 };
            let dst = &mut out[slot * rows * c..(slot + 1) * rows * c];
            for (i, row) in dst.chunks_exact_mut(c).enumerate() {
                add_scaled(row, &st.acc[i * c..(i + 1) * c], st.inv(i)); // NaN for a bad row
            }
        }
        Ok(out)
    }

    /// [`Work::softmax_head`] in the build the CPU allows, with the entropy sums or not.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn softmax(
        &self,
        b: usize,
        head: usize,
        r0: usize,
        rows: usize,
        q: &mut [f32],
        st: &mut Rows,
        entropy: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.fast {
            // SAFETY: `fast` says the CPU has AVX2 and FMA.
            return unsafe { self.softmax_fast(b, head, r0, rows, q, st, entropy) };
        }
        self.softmax_any::<false>(b, head, r0, rows, q, st, entropy);
    }

    /// [`Work::softmax_any`] compiled for AVX2 with fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn softmax_fast(
        &self,
        b: usize,
        head: usize,
        r0: usize,
        rows: usize,
        q: &mut [f32],
        st: &mut Rows,
        entropy: bool,
    ) {
        self.softmax_any::<true>(b, head, r0, rows, q, st, entropy);
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn softmax_any<const FAST: bool>(
        &self,
        b: usize,
        head: usize,
        r0: usize,
        rows: usize,
        q: &mut [f32],
        st: &mut Rows,
        entropy: bool,
    ) {
        if entropy {
            self.softmax_head::<FAST, true>(b, head, r0, rows, q, st);
        } else {
            self.softmax_head::<FAST, false>(b, head, r0, rows, q, st);
        }
    }

    /// One head's online softmax over every key for rows `r0..r0 + rows` of batch element `b`,
    /// left in `st` (relative column sums, max, sum, and with `ENT` the entropy sums); `q` is
    /// scratch for the scaled query rows (`[padded rows][D]`).
    #[inline(always)]
    fn softmax_head<const FAST: bool, const ENT: bool>(
        &self,
        b: usize,
        head: usize,
        r0: usize,
        rows: usize,
        q: &mut [f32],
        st: &mut Rows,
    ) {
        let p = self.p;
        let (_, h, _, d) = p.q.dim();
        let hk = p.k.dim().1;
        let hm = self.biases.len() / p.q.dim().0;
        let padded = rows.div_ceil(MR) * MR;
        debug_assert!(st.max.len() >= padded && q.len() >= padded * d);
        for (i, dst) in q.chunks_exact_mut(d).enumerate().take(rows) {
            let src = p.q.slice(ndarray::s![b, head, r0 + i, ..]);
            dst.iter_mut().zip(src).for_each(|(x, &v)| *x = v * p.scale);
        }
        st.reset();
        let ntiles = self.groups.tiles.len();
        let block = KEY_BLOCK / NR;
        let keys = &self.keys[b * hk + head / (h / hk)];
        let bias = &self.biases[b * hm + if hm == 1 { 0 } else { head }];
        for t0 in (0..ntiles).step_by(block) {
            for m0 in (0..padded).step_by(MR) {
                let qt = &q[m0 * d..(m0 + MR) * d];
                for t in t0..(t0 + block).min(ntiles) {
                    let kt = &keys[t * d * NR..(t + 1) * d * NR];
                    let bt = &bias[t * NR..(t + 1) * NR];
                    #[cfg(target_arch = "x86_64")]
                    if FAST {
                        // SAFETY: FAST is only set under `target_feature(enable = "avx2,fma")`, on a
                        // CPU with AVX2 and FMA.
                        unsafe { avx2::fold_tile::<ENT>(self, qt, kt, d, t, bt, st, m0) };
                        continue;
                    }
                    let mut s = micro(qt, kt, d);
                    self.epilogue::<ENT>(&mut s, t, bt, st, m0);
                }
            }
        }
    }

    /// The columns of row state that may hold mass while tile `t` is folded in.
    #[inline(always)]
    fn walked(&self, t: usize) -> usize {
        let c = self.groups.num_columns;
        if self.prefix {
            ((t + 1) * NR).min(c)
        } else {
            c
        }
    }

    /// Fold one micro tile of logits into the rows' online softmax.
    #[inline(always)]
    fn epilogue<const ENT: bool>(
        &self,
        s: &mut [[f32; NR]; MR],
        t: usize,
        bias: &[f32],
        st: &mut Rows,
        m0: usize,
    ) {
        let c = self.groups.num_columns;
        let walked = self.walked(t);
        let tile = self.groups.tiles[t];
        for (ri, srow) in s.iter_mut().enumerate() {
            let i = m0 + ri;
            let mut bad = false;
            for (x, &bv) in srow.iter_mut().zip(bias) {
                *x += bv;
                bad |= x.is_nan() | (*x == f32::INFINITY);
            }
            st.bad[i] |= bad;
            st.raise_max::<ENT>(i, c, walked, max16(srow));
            if st.max[i] == f32::NEG_INFINITY {
                continue; // every key so far excluded
            }
            let m = st.max[i];
            let mut e = [0.0f32; NR];
            for (o, &x) in e.iter_mut().zip(srow.iter()) {
                *o = exp_small(x - m);
            }
            let total = sum16(&e);
            st.sum[i] += total;
            if ENT {
                let mut xe = [0.0f32; NR];
                for ((o, &x), &v) in xe.iter_mut().zip(srow.iter()).zip(&e) {
                    *o = v * (x - m).max(EXP_LOW); // exp(x - m) is 0 below EXP_LOW (and at -inf)
                }
                st.ent[i] += sum16(&xe);
            }
            let acc = &mut st.acc[i * c..(i + 1) * c];
            match tile {
                Tile::Skip => {}
                Tile::Sum(col) => acc[col] += total,
                Tile::Consecutive(first) => acc[first..first + NR]
                    .iter_mut()
                    .zip(&e)
                    .for_each(|(a, &v)| *a += v),
                Tile::Mixed => scatter(acc, &self.groups.columns[t * NR..(t + 1) * NR], &e),
            }
        }
    }
}

impl Rows {
    /// Raise row `i`'s running max to `top` if that is higher, rescaling its sums to the new max
    /// (the first `walked` of its `c` columns; nothing while no key has counted yet).
    #[inline(always)]
    fn raise_max<const ENT: bool>(&mut self, i: usize, c: usize, walked: usize, top: f32) {
        if top > self.max[i] {
            if self.max[i] > f32::NEG_INFINITY {
                let shrink = (self.max[i] - top).exp();
                if ENT {
                    // sum e (x - m) with m raised by delta: every term shrinks and loses delta * e
                    let delta = top - self.max[i];
                    self.ent[i] = (self.ent[i] - delta * self.sum[i]) * shrink;
                }
                self.sum[i] *= shrink;
                self.acc[i * c..i * c + walked]
                    .iter_mut()
                    .for_each(|a| *a *= shrink);
            }
            self.max[i] = top;
        }
    }
}

/// Add a tile's exponentials to a row's columns key by key (a `Mixed` tile).
#[inline(always)]
fn scatter(acc: &mut [f32], cols: &[i64], e: &[f32; NR]) {
    for (&col, &v) in cols.iter().zip(e) {
        if col >= 0 {
            acc[col as usize] += v;
        }
    }
}

/// Logits of `MR` rows (`q`, `[MR][d]`, scaled) against one tile of keys (`[d][NR]`).
#[inline(always)]
fn micro(q: &[f32], k: &[f32], d: usize) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..d {
        let kv: &[f32; NR] = k[p * NR..(p + 1) * NR].try_into().expect("NR lanes");
        for (r, row) in acc.iter_mut().enumerate() {
            let a = q[r * d + p];
            for (x, &kj) in row.iter_mut().zip(kv) {
                *x += a * kj;
            }
        }
    }
    acc
}

/// The micro tile and its online-softmax update in AVX2 + FMA intrinsics: the logits of a tile stay
/// in registers (two vectors per row) from the product to the exponentials.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Rows, Tile, Work, MR, NR};

    /// [`Work::epilogue`] of [`super::micro`]'s tile, vectorised; same arguments.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn fold_tile<const ENT: bool>(
        work: &Work,
        q: &[f32],
        k: &[f32],
        d: usize,
        t: usize,
        bias: &[f32],
        st: &mut Rows,
        m0: usize,
    ) {
        assert!(q.len() >= MR * d && k.len() >= d * NR && bias.len() >= NR);
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..d {
            // SAFETY: p < d, so p * NR + 16 <= d * NR and r * d + p < MR * d (asserted above).
            let (k0, k1) = unsafe {
                (
                    _mm256_loadu_ps(kp.add(p * NR)),
                    _mm256_loadu_ps(kp.add(p * NR + 8)),
                )
            };
            for (r, row) in acc.iter_mut().enumerate() {
                let a = unsafe { _mm256_broadcast_ss(&*qp.add(r * d + p)) };
                row[0] = _mm256_fmadd_ps(a, k0, row[0]);
                row[1] = _mm256_fmadd_ps(a, k1, row[1]);
            }
        }
        let c = work.groups.num_columns;
        let walked = work.walked(t);
        let tile = work.groups.tiles[t];
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(bias.as_ptr()),
                _mm256_loadu_ps(bias.as_ptr().add(8)),
            )
        };
        let inf = _mm256_set1_ps(f32::INFINITY);
        for (ri, row) in acc.iter().enumerate() {
            let i = m0 + ri;
            let s0 = _mm256_add_ps(row[0], b0);
            let s1 = _mm256_add_ps(row[1], b1);
            // The row max is raised only when a logit passes it by more than SLACK (or is NaN), so
            // most tiles skip the horizontal max: exp(logit - max) stays below e^(2 SLACK) (the
            // bar max + SLACK is rounded in fp32), far from overflow.
            let bar = _mm256_set1_ps(st.max[i] + super::SLACK);
            let over = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_NLE_UQ>(s0, bar),
                _mm256_cmp_ps::<_CMP_NLE_UQ>(s1, bar),
            );
            if _mm256_movemask_ps(over) != 0 {
                let bad = _mm256_or_ps(
                    _mm256_or_ps(
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(s0, s0),
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(s1, s1),
                    ),
                    _mm256_or_ps(
                        _mm256_cmp_ps::<_CMP_EQ_OQ>(s0, inf),
                        _mm256_cmp_ps::<_CMP_EQ_OQ>(s1, inf),
                    ),
                );
                st.bad[i] |= _mm256_movemask_ps(bad) != 0;
                st.raise_max::<ENT>(i, c, walked, unsafe { hmax(_mm256_max_ps(s0, s1)) });
            }
            if st.max[i] == f32::NEG_INFINITY {
                continue; // every key so far excluded
            }
            let m = _mm256_set1_ps(st.max[i]);
            let (x0, x1) = (_mm256_sub_ps(s0, m), _mm256_sub_ps(s1, m));
            let e0 = unsafe { exp_small(x0) };
            let e1 = unsafe { exp_small(x1) };
            let total = unsafe { hsum(_mm256_add_ps(e0, e1)) };
            st.sum[i] += total;
            if ENT {
                // exp(x) is 0 below EXP_LOW (and at -inf): clamp x so that 0 * x stays 0
                let low = _mm256_set1_ps(super::EXP_LOW);
                let xe = _mm256_fmadd_ps(
                    e1,
                    _mm256_max_ps(x1, low),
                    _mm256_mul_ps(e0, _mm256_max_ps(x0, low)),
                );
                st.ent[i] += unsafe { hsum(xe) };
            }
            let acc_row = &mut st.acc[i * c..(i + 1) * c];
            match tile {
                Tile::Skip => {}
                Tile::Sum(col) => acc_row[col] += total,
                Tile::Consecutive(first) => {
                    let dst = &mut acc_row[first..first + NR];
                    let p = dst.as_mut_ptr();
                    // SAFETY: dst holds NR = 16 floats.
                    unsafe {
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), e0));
                        _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), e1));
                    }
                }
                Tile::Mixed => {
                    let mut e = [0.0f32; NR];
                    unsafe {
                        _mm256_storeu_ps(e.as_mut_ptr(), e0);
                        _mm256_storeu_ps(e.as_mut_ptr().add(8), e1);
                    }
                    super::scatter(acc_row, &work.groups.columns[t * NR..(t + 1) * NR], &e);
                }
            }
        }
    }

    /// The 8 lanes of `x` folded into one with `op` (a lane-wise max or sum), pairing halves.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (inlined into such a function).
    #[inline(always)]
    unsafe fn fold8(x: __m256, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
        unsafe {
            let m = op(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let m = op(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(op(m, _mm_movehdup_ps(m)))
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA (inlined into such a function).
    #[inline(always)]
    unsafe fn hmax(x: __m256) -> f32 {
        unsafe { fold8(x, |a, b| _mm_max_ps(a, b)) }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA (inlined into such a function).
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        unsafe { fold8(x, |a, b| _mm_add_ps(a, b)) }
    }

    /// [`exp_small`] on a slice of 8 values (for the tests).
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_in_place(x: &mut [f32]) {
        assert_eq!(x.len(), 8);
        // SAFETY: 8 floats in and out; this function has AVX2 and FMA.
        unsafe { _mm256_storeu_ps(x.as_mut_ptr(), exp_small(_mm256_loadu_ps(x.as_ptr()))) }
    }

    /// [`super::exp_small`] on 8 lanes: the same steps, with fused multiply-adds.
    /// # Safety
    /// The CPU must have AVX2 and FMA (inlined into such a function).
    #[inline(always)]
    unsafe fn exp_small(x: __m256) -> __m256 {
        unsafe {
            let low = _mm256_set1_ps(super::EXP_LOW);
            let xc = _mm256_max_ps(x, low);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
            let mut y = _mm256_set1_ps(super::EXP_POLY[0]);
            for &coef in &super::EXP_POLY[1..] {
                y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(coef));
            }
            let one = _mm256_set1_ps(1.0);
            let y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, one));
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            let y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
            _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, low), y)
        }
    }
}

/// Largest of 16 values, as a tree of lane-wise maxima (NaN ignored: such rows are flagged).
#[inline(always)]
fn max16(x: &[f32; NR]) -> f32 {
    let mut h = [0.0f32; 8];
    for j in 0..8 {
        h[j] = x[j].max(x[j + 8]);
    }
    let (a, b) = (
        h[0].max(h[4]).max(h[1].max(h[5])),
        h[2].max(h[6]).max(h[3].max(h[7])),
    );
    a.max(b)
}

/// Sum of 16 values as a tree of lane-wise sums.
#[inline(always)]
fn sum16(x: &[f32; NR]) -> f32 {
    let mut h = [0.0f32; 8];
    for j in 0..8 {
        h[j] = x[j] + x[j + 8];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

/// `exp(x)` for `x <= 88` (and `-inf`, which gives 0) to about 2 ulp, in branch-free steps the
/// compiler vectorises: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6 polynomial for
/// `exp(r)`, and `2^n` written into the exponent bits.
#[inline(always)]
fn exp_small(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.max(EXP_LOW);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let y = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |y, &coef| y * r + coef);
    let y = (y * r) * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < EXP_LOW {
        0.0
    } else {
        y * scale
    }
}

/// How far a logit may pass the row max the AVX2 path divides by before the max is raised.
const SLACK: f32 = 8.0;
/// Below this, `exp(x) < 2^-125`: flushed to 0.
const EXP_LOW: f32 = -87.0;
/// ln 2 in two parts, the first exact in few bits, so that `x - n ln 2` loses nothing.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `(exp(r) - 1 - r) / r^2` on `|r| <= ln 2 / 2` as a polynomial, highest degree first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ndarray::{Array1, Array3};

    /// A small deterministic generator (no dependency): values in [-amp, amp).
    pub(crate) fn noise(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// Random q `[b, h, r, d]` and k `[b, hk, nk, d]` in [-2, 2), from seeds `seed` and `seed + 1`.
    pub(crate) fn random_qk(
        (b, h, r, d): (usize, usize, usize, usize),
        (hk, nk): (usize, usize),
        seed: u64,
    ) -> (Array4<f32>, Array4<f32>) {
        let q = Array4::from_shape_vec((b, h, r, d), noise(b * h * r * d, seed, 2.0)).unwrap();
        let k = Array4::from_shape_vec((b, hk, nk, d), noise(b * hk * nk * d, seed + 1, 2.0));
        (q, k.unwrap())
    }

    /// Row `i` of P for batch element `bi` and head `hi` in f64, from the logits one by one
    /// (zero where every key is excluded).
    pub(crate) fn probabilities(p: &Problem, bi: usize, hi: usize, i: usize) -> Vec<f64> {
        let (_, h, _, d) = p.q.dim();
        let (_, hk, nk, _) = p.k.dim();
        let logits: Vec<f64> = (0..nk)
            .map(|j| {
                let dot: f64 = (0..d)
                    .map(|e| p.q[[bi, hi, i, e]] as f64 * p.k[[bi, hi / (h / hk), j, e]] as f64)
                    .sum();
                let bias = p.bias.as_ref().map_or(0.0, |x| {
                    x[[bi, if x.dim().1 == 1 { 0 } else { hi }, j]] as f64
                });
                dot * p.scale as f64 + bias
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return vec![0.0; nk];
        }
        let z: f64 = logits.iter().map(|&l| (l - m).exp()).sum();
        logits.iter().map(|&l| (l - m).exp() / z).collect()
    }

    /// The builds this CPU runs: the plain one, and AVX2 + FMA where it has both.
    pub(crate) fn builds() -> Vec<bool> {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            return vec![false, true];
        }
        vec![false]
    }

    /// P @ G in f64 with the N x N map materialised, row by row.
    fn reference(p: &Problem, cols: &[i64], c: usize) -> Array4<f64> {
        let (b, h, r, _) = p.q.dim();
        let hs = if p.per_head { h } else { 1 };
        let mut out = Array4::<f64>::zeros((b, hs, r, c));
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..r {
                    let slot = if p.per_head { hi } else { 0 };
                    for (j, x) in probabilities(p, bi, hi, i).into_iter().enumerate() {
                        if cols[j] >= 0 {
                            out[[bi, slot, i, cols[j] as usize]] += x;
                        }
                    }
                }
            }
        }
        out
    }

    fn assert_close(got: &Array4<f32>, want: &Array4<f64>, tol: f64) {
        assert_eq!(got.shape(), want.shape());
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((*g as f64 - w).abs() <= tol, "got {g}, want {w}");
        }
    }

    /// A joint-like layout: `text` keys each their own column, then `frames` frames of `hw` keys.
    fn joint_columns(text: usize, frames: usize, hw: usize) -> Vec<i64> {
        (0..text as i64)
            .chain((0..frames * hw).map(|j| (text + j / hw) as i64))
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn case(
        b: usize,
        h: usize,
        hk: usize,
        r: usize,
        d: usize,
        cols: &[i64],
        c: usize,
        bias: Option<Array3<f32>>,
        per_head: bool,
        seed: u64,
    ) {
        let nk = cols.len();
        let (q, k) = random_qk((b, h, r, d), (hk, nk), seed);
        let p = Problem {
            q: q.view(),
            k: k.view(),
            bias: bias.as_ref().map(|x| x.view()),
            scale: 0.4,
            per_head,
        };
        let groups = Groups::new(Array1::from(cols.to_vec()).view(), c).unwrap();
        let want = reference(&p, cols, c);
        assert_close(&grouped_sums(&p, &groups).unwrap(), &want, 2e-6 * h as f64);
        assert_close(&run(&p, &groups, false).unwrap(), &want, 2e-6 * h as f64);
        // the plain build
    }

    #[test]
    fn joint_layout_every_tile_kind() {
        // text keys span Consecutive and Mixed tiles, frames of 20 keys span Sum and Mixed tiles
        let cols = joint_columns(21, 5, 20);
        case(2, 3, 3, 70, 32, &cols, 26, None, false, 1);
        case(1, 2, 2, 9, 40, &cols, 26, None, true, 2);
    }

    #[test]
    fn grouped_query_heads_and_odd_sizes() {
        let cols = joint_columns(0, 3, 7);
        case(1, 6, 2, 131, 17, &cols, 3, None, true, 3);
        case(1, 6, 3, 5, 1, &cols, 3, None, false, 4);
    }

    #[test]
    fn keys_without_a_column_still_take_mass() {
        // a prefix key (CLS) in no column: the rows sum to less than 1
        let mut cols = vec![-1i64];
        cols.extend(joint_columns(0, 2, 40));
        case(1, 2, 2, 30, 32, &cols, 2, None, false, 5);
    }

    #[test]
    fn bias_masks_keys_and_dead_rows_are_zero() {
        let cols = joint_columns(8, 2, 16);
        let nk = cols.len();
        let mut bias = Array3::<f32>::zeros((2, 3, nk));
        for j in 5..8 {
            bias[[0, 1, j]] = f32::NEG_INFINITY; // padded text keys
        }
        bias[[0, 2, 10]] = -10000.0;
        bias.slice_mut(ndarray::s![1, 0, ..])
            .fill(f32::NEG_INFINITY); // every key of one head excluded
        case(2, 3, 3, 12, 32, &cols, 10, Some(bias.clone()), true, 6);
        let shared = bias.slice(ndarray::s![.., 0..1, ..]).to_owned();
        case(2, 3, 3, 12, 32, &cols, 10, Some(shared), false, 7);
    }

    #[test]
    fn nan_and_inf_rows_are_nan() {
        let cols = joint_columns(4, 2, 16);
        let nk = cols.len();
        let mut q = Array4::from_shape_vec((1, 2, 6, 8), noise(96, 8, 1.0)).unwrap();
        let mut k = Array4::from_shape_vec((1, 2, nk, 8), noise(2 * nk * 8, 9, 1.0)).unwrap();
        q[[0, 0, 3, 2]] = f32::NAN;
        k[[0, 1, 20, 0]] = f32::INFINITY;
        q.slice_mut(ndarray::s![0, 1, .., 0]).fill(0.5); // so q . k = +inf (-inf would only mask)
        let groups = Groups::new(Array1::from(cols).view(), 6).unwrap();
        let p = Problem {
            q: q.view(),
            k: k.view(),
            bias: None,
            scale: 1.0,
            per_head: true,
        };
        let out = grouped_sums(&p, &groups).unwrap();
        for i in 0..6 {
            let row = out.slice(ndarray::s![0, 0, i, ..]);
            assert_eq!(row.iter().all(|x| x.is_nan()), i == 3, "row {i} of head 0");
            assert!(row.iter().all(|x| x.is_nan()) || row.iter().all(|x| x.is_finite()));
        }
        // +inf in a key: softmax of a row with a +inf logit is NaN
        assert!(out
            .slice(ndarray::s![0, 1, .., ..])
            .iter()
            .all(|x| x.is_nan()));
        let plain = run(&p, &groups, false).unwrap(); // the plain build flags the same rows
        assert!(plain
            .iter()
            .zip(out.iter())
            .all(|(a, b)| a.is_nan() == b.is_nan()));
        let huge = Groups::new(Array1::from(vec![0i64; nk]).view(), 1usize << 61).unwrap();
        let e = grouped_sums(&p, &huge).err().unwrap().to_string();
        assert!(e.starts_with("num_columns: the output"), "{e}");
    }

    #[test]
    fn huge_logits_stay_exact() {
        let cols = joint_columns(0, 2, 16);
        let q = Array4::from_elem((1, 1, 2, 1), 1.0e4f32);
        let mut k = Array4::zeros((1, 1, 32, 1));
        k[[0, 0, 20, 0]] = 1.0f32; // logit 1e4 against 0: all mass on key 20 (frame 1)
        let groups = Groups::new(Array1::from(cols).view(), 2).unwrap();
        let p = Problem {
            q: q.view(),
            k: k.view(),
            bias: None,
            scale: 1.0,
            per_head: false,
        };
        let out = grouped_sums(&p, &groups).unwrap();
        assert_eq!(out.into_raw_vec_and_offset().0, vec![0.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn exp_matches_std_over_its_range() {
        let xs: Vec<f32> = (0..200_000).map(|i| 10.0 - i as f32 * 4.9e-4).collect(); // 10 .. -88
        let mut lanes = xs.clone();
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            for chunk in lanes.chunks_exact_mut(8) {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { avx2::exp_in_place(chunk) };
            }
        } else {
            lanes.iter_mut().for_each(|x| *x = exp_small(*x));
        }
        let mut worst = 0.0f64;
        for (&x, &vector) in xs.iter().zip(&lanes) {
            let want = (x as f64).exp();
            if want > 1e-37 {
                for got in [exp_small(x) as f64, vector as f64] {
                    worst = worst.max((got - want).abs() / want);
                }
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_small(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_small(0.0), 1.0);
    }

    #[test]
    fn bad_arguments_name_themselves() {
        let cols = Array1::from(vec![0i64, 1, 2]);
        let e = Groups::new(cols.view(), 2).err().unwrap().to_string();
        assert!(e.starts_with("columns:"), "{e}");
        let groups = Groups::new(cols.view(), 3).unwrap();
        let q = Array4::<f32>::zeros((1, 2, 4, 8));
        let k = Array4::<f32>::zeros((1, 2, 5, 8));
        let p = Problem {
            q: q.view(),
            k: k.view(),
            bias: None,
            scale: 1.0,
            per_head: false,
        };
        let e = grouped_sums(&p, &groups).err().unwrap().to_string();
        assert!(e.starts_with("columns:"), "{e}");
        let k3 = Array4::<f32>::zeros((1, 3, 3, 8));
        let p = Problem { k: k3.view(), ..p };
        let e = grouped_sums(&p, &groups).err().unwrap().to_string();
        assert!(e.starts_with("k:"), "{e}");
        let k = Array4::<f32>::zeros((1, 1, 3, 8));
        let bias = Array3::<f32>::zeros((1, 2, 4));
        let p = Problem {
            k: k.view(),
            bias: Some(bias.view()),
            ..p
        };
        let e = grouped_sums(&p, &groups).err().unwrap().to_string();
        assert!(e.starts_with("bias:"), "{e}");
    }
}
