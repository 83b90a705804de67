//! Attention probabilities summed over groups of keys, on the CPU, without the N x N map.
//!
//! For each query row `i` and head, P = softmax(scale * q k^T + bias) over every key, and the row's
//! mass is summed into columns: key `j` adds `P[i, j]` to column `columns[j]` (or nowhere for -1).
//! One column per text key gives the cross-attention map; one column per frame, given to all of
//! that frame's video keys, gives the frame-to-frame (temporal) rows. This is `P @ G` for a 0/1
//! matrix G, computed in one pass over the keys with an online softmax (running row max and sum),
//! so a row costs one q k^T product and one exp per key: about half of what an attention forward
//! (which also multiplies P by V) costs. Where the caller gives each row's logsumexp (`lse`, from
//! the attention forward), P = exp(logit - lse) directly: no running max, no rescaling, no sum.
//! Each row's logsumexp can be returned too, so that sums over disjoint key shards merge exactly as
//! attention outputs do (`out = sum_i exp(lse_i - lse) out_i`).
//!
//! Layout of the work: [`split`] cuts the rows of every batch element (and, where the rows alone are
//! too few for the threads, groups of heads) into tasks of at most [`ROW_CHUNK`] rows; a task takes
//! its rows through its heads, and per head walks the keys in blocks of [`KEY_BLOCK`] (kept in
//! cache) and, within a block, micro tiles of rows x [`NR`] keys whose logits live in registers.
//! Keys are packed once per call as `[tile][d][NR]`. The loops are plain Rust compiled three times,
//! plain, for AVX2 + FMA and for AVX-512 ([`Build`], chosen at run time). Where the CPU has AMX
//! tiles, the AVX-512 copy takes its q k^T products from them instead ([`crate::amx`]: as exact as
//! f32 products, from bf16 parts), [`AMX_KEYS`] keys at a time for tasks of [`AMX_ROW_CHUNK`] rows,
//! and folds them as it folds its own.

use ndarray::{Array3, Array4, ArrayView1, ArrayView3, ArrayView4};

use crate::error::{Error, Result};

/// Keys per micro tile (one AVX-512 vector, two AVX2 vectors).
pub(crate) const NR: usize = 16;
/// Query rows per micro tile of the AVX-512 build (12 rows x 2 tiles = 24 accumulators of 32
/// registers), and the multiple a task's rows are padded to.
pub(crate) const MR: usize = 12;
/// Query rows per micro tile of the AVX2 and plain builds: `HALF * NR / 8` = 12 accumulators stay
/// in registers (of 16).
const HALF: usize = 6;
/// Query rows per task (a multiple of `MR`).
pub(crate) const ROW_CHUNK: usize = 60;
/// Keys walked per pass over a task's rows (a multiple of `2 NR`), so that their packed copy stays
/// in the L2 cache while every row of the task uses it.
const KEY_BLOCK: usize = 256;
/// Query rows per task of the AMX build (a multiple of `MR` and of [`crate::amx::ROWS`]): each
/// pass over the keys serves more rows than in the FMA builds, as their products take less time.
const AMX_ROW_CHUNK: usize = 192;
/// Keys per AMX pass over a task's rows (a multiple of `2 NR`): their parts stay in the L1 cache
/// while every block of the task's rows takes them. Where every key is its own column (`prefix`:
/// the statistics' rows of P), passes of [`KEY_BLOCK`] keys instead, so that each row's columns
/// are stored in runs of that many (N = 32,768, D = 64, two threads: `temporal` + `received`
/// 2.84 s with passes of 32 keys, 2.41-2.49 s with 256, the FMA build 2.63 s; `temporal` alone
/// 1.57 s with 32, 1.77 s with 256).
const AMX_KEYS: usize = 32;
/// Rows of one AMX block of logits, `[AMX_ROWS][2 NR]`.
const AMX_ROWS: usize = crate::amx::ROWS;
/// Rows the AMX build folds at a time: half a block, right after the block.
const AMX_FOLD: usize = 16;

/// Which compiled copy of the kernel loops runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// Plain Rust, vectorised by the compiler for the baseline instruction set.
    Plain,
    /// AVX2 + FMA: 6 rows x 16 keys per micro tile.
    Avx2,
    /// AVX-512 (F) on top of AVX2 + FMA: 12 rows x 32 keys per micro tile.
    Avx512,
    /// The AVX-512 build with the q k^T products on AMX tiles ([`crate::amx`]): blocks of 32 rows
    /// x 32 keys, folded in micro tiles as the AVX-512 build folds its own.
    Amx,
}

/// [`Build`] as a const parameter of the generic loops.
pub(crate) const PLAIN: u8 = 0;
#[cfg(target_arch = "x86_64")]
pub(crate) const AVX2: u8 = 1;
#[cfg(target_arch = "x86_64")]
pub(crate) const AVX512: u8 = 2;
#[cfg(target_arch = "x86_64")]
pub(crate) const AMX: u8 = 3;

/// The build [`Build::best`] gives instead of the fastest, as its index in [`Build::available`]
/// plus one (0: none).
static CHOSEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Build {
    /// The copy the kernels run: the fastest this CPU runs, unless [`Build::choose`] chose another.
    pub fn best() -> Build {
        let mut all = Build::available();
        match CHOSEN.load(std::sync::atomic::Ordering::Relaxed) {
            0 => all.pop().unwrap_or(Build::Plain),
            i => all[i - 1],
        }
    }

    /// Run the copy named `name` (for comparisons of the builds), or the fastest (`None`).
    pub fn choose(name: Option<&str>) -> Result<()> {
        let all = Build::available();
        let index = match name {
            None => 0,
            Some(name) => match all.iter().position(|b| b.name() == name) {
                Some(i) => i + 1,
                None => {
                    let names: Vec<&str> = all.iter().map(|b| b.name()).collect();
                    let msg = format!(
                        "expected one of the builds this CPU runs ({}) or None, got {name:?}",
                        names.join(", ")
                    );
                    return Err(Error::invalid("name", msg));
                }
            },
        };
        CHOSEN.store(index, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The name of the copy: `"plain"`, `"avx2"`, `"avx512"` or `"amx"`.
    pub fn name(self) -> &'static str {
        match self {
            Build::Plain => "plain",
            Build::Avx2 => "avx2",
            Build::Avx512 => "avx512",
            Build::Amx => "amx",
        }
    }

    /// Every copy this CPU runs, slowest first (the tests compare them).
    pub fn available() -> Vec<Build> {
        #[allow(unused_mut)]
        let mut out = vec![Build::Plain];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            out.push(Build::Avx2);
            if std::arch::is_x86_feature_detected!("avx512f") {
                out.push(Build::Avx512);
                if crate::amx::available() {
                    out.push(Build::Amx);
                }
            }
        }
        out
    }
}

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
    /// Each row's logsumexp of `scale * q k^T + bias`, `[B, H, R]`, given by the caller: then
    /// P = exp(logit - lse) as it stands (`-inf`: a row with no key, P = 0; NaN: a NaN row).
    pub lse: Option<ArrayView3<'a, f32>>,
    /// Logit scale.
    pub scale: f32,
    /// Keep heads apart (`[B, H, R, C]`) or sum them (`[B, 1, R, C]`).
    pub per_head: bool,
}

impl Problem<'_> {
    pub(crate) fn check(&self, groups: &Groups) -> Result<()> {
        let (b, h, r, d) = self.q.dim();
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
        if let Some(lse) = &self.lse {
            if lse.dim() != (b, h, r) {
                return Err(Error::invalid(
                    "lse",
                    format!(
                        "expected one logsumexp per row, [B, H, R] = [{b}, {h}, {r}], got {:?}",
                        lse.shape()
                    ),
                ));
            }
        }
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

/// One task: rows `r0..r0 + rows` of batch element `b`, through heads `h0..h1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Task {
    pub b: usize,
    pub h0: usize,
    pub h1: usize,
    pub r0: usize,
    pub rows: usize,
}

/// The tasks of a call with `b` batch elements, `h` heads and `r` query rows, as `pieces` runs of
/// about equal work (fewer where there is less work than that), in order.
///
/// Every task takes all heads, unless the rows are too few to give each thread of the pool `2 MR`
/// of them: then the heads are split into groups too (a batch of one short sequence still fills
/// every core). The rows of each (batch element, head group) are cut into runs at multiples of
/// `MR`, one run per piece, and each run into tasks of at most `chunk` rows. The cut depends only
/// on the sizes, `pieces` and the pool's thread count, so the same call always gives the same tasks.
pub(crate) fn split(b: usize, h: usize, r: usize, pieces: usize, chunk: usize) -> Vec<Vec<Task>> {
    let want = crate::pool::threads() * 2 * MR;
    let rows = b.saturating_mul(r);
    let wanted_groups = if rows >= want || rows == 0 {
        1
    } else {
        h.min(want.div_ceil(rows)).max(1)
    };
    let per = h.div_ceil(wanted_groups).max(1);
    let groups = h.div_ceil(per).max(1);
    let units = rows.saturating_mul(groups);
    if units == 0 {
        return Vec::new();
    }
    let pieces = pieces.clamp(1, units.div_ceil(MR));
    let chunk = chunk.max(1);
    // piece p starts at unit p * units / pieces, moved to the nearest multiple of MR in its segment
    let start = |p: usize| -> usize {
        let u = (units as u128 * p as u128 / pieces as u128) as usize;
        let (seg, off) = (u / r, u % r);
        seg * r + ((off + MR / 2) / MR * MR).min(r)
    };
    let mut out = Vec::with_capacity(pieces);
    for p in 0..pieces {
        let (lo, hi) = (start(p), start(p + 1));
        let mut tasks = Vec::new();
        let mut u = lo;
        while u < hi {
            let (seg, off) = (u / r, u % r);
            let end = hi.min((seg + 1) * r);
            let n = (end - u).min(chunk);
            let (bi, g) = (seg / groups, seg % groups);
            tasks.push(Task {
                b: bi,
                h0: g * per,
                h1: ((g + 1) * per).min(h),
                r0: off,
                rows: n,
            });
            u += n;
        }
        if !tasks.is_empty() {
            out.push(tasks);
        }
    }
    out
}

/// `P @ G` per query row: `[B, Hs, R, C]` with `Hs` H (`per_head`) or 1 (the sum over heads), and
/// with `with_lse` each row's logsumexp `[B, H, R]` over the keys (`-inf` for a row with no key).
///
/// A row whose keys are all excluded is zero; a row with NaN or `+inf` among its logits (NaN or
/// inf in q or k) is NaN in every column, never a silent number. With `per_head`, the rows and
/// their logsumexp are what shards of the keys need to merge exactly.
pub fn grouped_sums(
    p: &Problem,
    groups: &Groups,
    with_lse: bool,
) -> Result<(Array4<f32>, Option<Array3<f32>>)> {
    run(p, groups, Build::best(), with_lse)
}

/// [`grouped_sums`] in the given build.
fn run(
    p: &Problem,
    groups: &Groups,
    build: Build,
    with_lse: bool,
) -> Result<(Array4<f32>, Option<Array3<f32>>)> {
    p.check(groups)?;
    let (b, h, r, _) = p.q.dim();
    let c = groups.num_columns;
    let hs = if p.per_head { h } else { 1 };
    let mut out = Array4::from_shape_vec((b, hs, r, c), zeroed(b * hs * r * c, "num_columns")?)
        .expect("sized to the shape");
    let mut lse = match with_lse {
        true => Some(Array3::from_shape_vec((b, h, r), zeroed(b * h * r, "lse")?).expect("sized")),
        false => None,
    };
    if r == 0 || (c == 0 && !with_lse) {
        return Ok((out, lse));
    }
    let packed = Packed::new(p, groups.tiles.len(), build);
    let work = Work {
        p,
        groups,
        keys: &packed.keys,
        biases: &packed.biases,
        amx_keys: &packed.amx_keys,
        build,
        prefix: false,
    };
    // each task writes its own rows: many small pieces, handed to whichever thread is free
    let pieces = 4 * crate::pool::threads();
    let chunk = match build {
        Build::Amx => AMX_ROW_CHUNK,
        _ => ROW_CHUNK,
    };
    let tasks: Vec<Task> = split(b, h, r, pieces, chunk)
        .into_iter()
        .flatten()
        .collect();
    let parts: Vec<(Vec<f32>, Vec<f32>)> =
        crate::pool::map(tasks.len(), |i| work.task(tasks[i], with_lse))
            .into_iter()
            .collect::<Result<_>>()?;
    for (t, (part, rows_lse)) in tasks.iter().zip(&parts) {
        let rows = t.rows;
        if c > 0 {
            for (k, block) in part.chunks_exact(rows * c).enumerate() {
                let slot = if p.per_head { t.h0 + k } else { 0 };
                let src =
                    ndarray::ArrayView2::from_shape((rows, c), block).expect("rows x columns");
                // heads split over tasks add up in task order (fixed by `split`)
                out.slice_mut(ndarray::s![t.b, slot, t.r0..t.r0 + rows, ..])
                    .zip_mut_with(&src, |o, &v| *o += v);
            }
        }
        if let Some(lse) = lse.as_mut() {
            for (k, row) in rows_lse.chunks_exact(rows).enumerate() {
                lse.slice_mut(ndarray::s![t.b, t.h0 + k, t.r0..t.r0 + rows])
                    .assign(&ArrayView1::from(row));
            }
        }
    }
    Ok((out, lse))
}

/// The keys and biases of a call, laid out once for every task.
pub(crate) struct Packed {
    /// Packed keys per `(b, key head)`: [`pack_keys`].
    pub keys: Vec<Vec<f32>>,
    /// Bias per `(b, bias head)` over `ntiles * NR` keys, `-inf` past `Nk`.
    pub biases: Vec<Vec<f32>>,
    /// The keys of the AMX build per `(b, key head)`, in bf16 parts (that build only; it leaves
    /// `keys` empty).
    pub amx_keys: Vec<crate::amx::Parts>,
}

impl Packed {
    pub fn new(p: &Problem, ntiles: usize, build: Build) -> Self {
        let (b, hk, nk, _) = p.k.dim();
        let head = |i: usize| p.k.slice(ndarray::s![i / hk, i % hk, .., ..]);
        let (keys, amx_keys) = match build {
            Build::Amx => {
                // SAFETY: the AMX build runs only on CPUs with AVX-512 (`Build::available`).
                let amx = crate::pool::map(b * hk, |i| unsafe {
                    crate::amx::pack_keys(head(i), ntiles)
                });
                (Vec::new(), amx)
            }
            _ => (
                crate::pool::map(b * hk, |i| pack_keys(head(i), ntiles)),
                Vec::new(),
            ),
        };
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
        Packed {
            keys,
            biases,
            amx_keys,
        }
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
    /// The AMX build's keys per `(b, key head)`: [`crate::amx::pack_keys`] (else empty).
    pub amx_keys: &'a [crate::amx::Parts],
    /// The compiled copy of the loops to run (only one the CPU has).
    pub build: Build,
    /// Column `j` is key `j` (every key its own column): while the keys are walked in order, only
    /// the columns of the keys walked so far hold mass, so a raised max rescales only those, and
    /// each column is written once (stored, not added: the row state needs no zeroing).
    pub prefix: bool,
}

/// Online-softmax state of a task's rows for one head.
pub(crate) struct Rows {
    /// `[rows][C]` unnormalised column sums, relative to `max`.
    pub acc: Vec<f32>,
    /// Running row max of the logits; with a given logsumexp, that (`+inf` for a row with no key).
    pub max: Vec<f32>,
    /// Running row sum of `exp(logit - max)` (0 with a given logsumexp).
    pub sum: Vec<f32>,
    /// Running row sum of `exp(logit - max) * (logit - max)` (kept for the entropy only).
    pub ent: Vec<f32>,
    /// `sum` and `ent` in `NR` lanes per row (`[rows][NR]`), as the AVX-512 build adds them: one
    /// vector add per tile instead of a horizontal sum; folded in by [`Rows::settle`].
    sum16: Vec<f32>,
    ent16: Vec<f32>,
    /// The AVX-512 build's pending column of each row (`usize::MAX`: none) and its exponentials so
    /// far in `NR` lanes (`[rows][NR]`): consecutive tiles of one column (a frame's keys) add up as
    /// vectors, and the column gets their horizontal sum once, when the column changes.
    pend16: Vec<f32>,
    pend_col: Vec<usize>,
    /// A NaN or `+inf` logit (or a NaN logsumexp) was seen.
    pub bad: Vec<bool>,
    /// The rows' logsumexp was given: P = exp(logit - max), no running max, no sum.
    pub given: bool,
    /// Tiles were folded with no per-tile test for NaN or `+inf` logits (the AVX-512 build's
    /// one-column fold): [`Rows::settle`] looks for them in the columns instead.
    unchecked: bool,
}

/// No pending column (see [`Rows`]).
const NO_COLUMN: usize = usize::MAX;

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
            sum16: vec![0.0; rows * NR],
            ent16: vec![0.0; rows * NR],
            pend16: vec![0.0; rows * NR],
            pend_col: vec![NO_COLUMN; rows],
            bad: vec![false; rows],
            given: false,
            unchecked: false,
        })
    }

    /// Start a head: zero the sums (and the columns unless `keep_acc`: every column is stored
    /// before it is read), and take the rows' logsumexp where it is given (the rows past it are
    /// padding: no key).
    fn reset(&mut self, keep_acc: bool, given: Option<ArrayView1<f32>>) {
        if !keep_acc {
            self.acc.fill(0.0);
        }
        self.sum.fill(0.0);
        self.ent.fill(0.0);
        self.sum16.fill(0.0);
        self.ent16.fill(0.0);
        self.pend_col.fill(NO_COLUMN);
        self.bad.fill(false);
        self.given = given.is_some();
        self.unchecked = false;
        match given {
            None => self.max.fill(f32::NEG_INFINITY),
            Some(lse) => {
                self.max.fill(f32::INFINITY);
                for ((m, bad), &v) in self.max.iter_mut().zip(self.bad.iter_mut()).zip(lse) {
                    // -inf: no key, P = 0 (as exp(logit - inf)); NaN: a NaN row
                    *m = if v == f32::NEG_INFINITY {
                        f32::INFINITY
                    } else {
                        v
                    };
                    *bad = v.is_nan();
                }
            }
        }
    }

    /// Add row `i`'s pending column (if any) into its columns `[.., C]`.
    #[inline(always)]
    fn flush(&mut self, i: usize, c: usize) {
        let col = self.pend_col[i];
        if col != NO_COLUMN {
            let lanes: &[f32; NR] = self.pend16[i * NR..(i + 1) * NR].try_into().expect("NR");
            self.acc[i * c + col] += sum16(lanes);
            self.pend_col[i] = NO_COLUMN;
        }
    }

    /// Add the exponentials `e` of a tile whose keys all go to column `col` to row `i`'s pending
    /// column, flushing the one pending before where it is another.
    #[inline(always)]
    fn pend(&mut self, i: usize, c: usize, col: usize, e: &[f32; NR]) {
        let lanes = &mut self.pend16[i * NR..(i + 1) * NR];
        if self.pend_col[i] == col {
            lanes.iter_mut().zip(e).for_each(|(l, &v)| *l += v);
        } else {
            let old = self.pend_col[i];
            if old != NO_COLUMN {
                let total = sum16(lanes.as_ref().try_into().expect("NR"));
                self.acc[i * c + old] += total;
            }
            lanes.copy_from_slice(e);
            self.pend_col[i] = col;
        }
    }

    /// Make `col` the pending column of rows `i0..i0 + n`, which walk the same tiles and so share
    /// their pending column (flushing the one pending before where it is another); their lanes
    /// then take further exponentials by vector adds.
    #[inline(always)]
    fn pend_rows(&mut self, i0: usize, n: usize, c: usize, col: usize) {
        if self.pend_col[i0] != col {
            for i in i0..i0 + n {
                self.flush(i, c);
                self.pend16[i * NR..(i + 1) * NR].fill(0.0);
                self.pend_col[i] = col;
            }
        }
    }

    /// Fold the lane sums and pending columns of the first `rows` rows into `sum`, `ent` and
    /// their columns (`c` of them). Where tiles were folded `unchecked`, a row with a non-finite
    /// column is flagged: its exponentials met a NaN or `+inf` logit that no test looked for per
    /// tile (a P past `f32::MAX`, from a logsumexp far below a logit, is no number either).
    fn settle(&mut self, rows: usize, c: usize) {
        for i in 0..rows {
            self.flush(i, c);
            self.sum[i] += sum16(self.sum16[i * NR..(i + 1) * NR].try_into().expect("NR"));
            self.ent[i] += sum16(self.ent16[i * NR..(i + 1) * NR].try_into().expect("NR"));
            if self.unchecked && !self.acc[i * c..(i + 1) * c].iter().all(|v| v.is_finite()) {
                self.bad[i] = true;
            }
        }
    }

    /// Row `i`'s entropy `-sum P ln P` from its sums: `ln sum - ent / sum` (0 for a row with no
    /// key, NaN for a row with a NaN or `+inf` logit); with a given logsumexp,
    /// `sum P (lse - logit) = -ent`.
    pub fn entropy(&self, i: usize) -> f32 {
        if self.bad[i] {
            f32::NAN
        } else if self.given {
            -self.ent[i]
        } else if self.sum[i] > 0.0 {
            self.sum[i].ln() - self.ent[i] / self.sum[i]
        } else {
            0.0
        }
    }

    /// `1 / sum` of row `i` (0 for a row with no key, NaN for a bad row; 1 with a given
    /// logsumexp: the columns are P already).
    pub fn inv(&self, i: usize) -> f32 {
        if self.bad[i] {
            f32::NAN
        } else if self.given {
            1.0
        } else if self.sum[i] > 0.0 {
            1.0 / self.sum[i]
        } else {
            0.0
        }
    }

    /// Row `i`'s logsumexp over the keys, `max + ln sum` (the given one where it was given;
    /// `-inf` for a row with no key, NaN for a bad row).
    pub fn lse(&self, i: usize) -> f32 {
        if self.bad[i] {
            f32::NAN
        } else if self.given {
            if self.max[i] == f32::INFINITY {
                f32::NEG_INFINITY
            } else {
                self.max[i]
            }
        } else if self.sum[i] > 0.0 {
            self.max[i] + self.sum[i].ln()
        } else {
            f32::NEG_INFINITY
        }
    }
}

/// `dst += src * s`, element by element.
#[inline(always)]
pub(crate) fn add_scaled(dst: &mut [f32], src: &[f32], s: f32) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v * s);
}

/// `dst = src * s`, element by element.
#[inline(always)]
pub(crate) fn set_scaled(dst: &mut [f32], src: &[f32], s: f32) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v * s);
}

impl Work<'_, '_> {
    /// One task's rows: `[Hs][rows][C]` (`Hs` its heads with `per_head`, else 1: their sum) and,
    /// with `with_lse`, each row's logsumexp `[heads][rows]`.
    fn task(&self, t: Task, with_lse: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        #[cfg(target_arch = "x86_64")]
        match self.build {
            // SAFETY: `build` is one that `Build::available` found on this CPU.
            Build::Amx => return unsafe { self.task_amx(t, with_lse) },
            Build::Avx512 => return unsafe { self.task_avx512(t, with_lse) },
            Build::Avx2 => return unsafe { self.task_avx2(t, with_lse) },
            Build::Plain => {}
        }
        self.task_any::<PLAIN>(t, with_lse)
    }

    /// [`Work::task_any`] compiled for AVX2 with fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn task_avx2(&self, t: Task, with_lse: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        self.task_any::<AVX2>(t, with_lse)
    }

    /// [`Work::task_any`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn task_avx512(&self, t: Task, with_lse: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        self.task_any::<AVX512>(t, with_lse)
    }

    /// [`Work::task_any`] compiled for AVX-512, its products on AMX (which needs no compiler
    /// feature: [`crate::amx`] is assembly).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn task_amx(&self, t: Task, with_lse: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        self.task_any::<AMX>(t, with_lse)
    }

    /// The rows of the [`Rows`] state [`Work::softmax_any`] takes for `padded` query rows: the AMX
    /// build folds whole blocks of [`crate::amx::ROWS`].
    pub(crate) fn state_rows(&self, padded: usize) -> usize {
        match self.build {
            Build::Amx => padded.div_ceil(crate::amx::ROWS) * crate::amx::ROWS,
            _ => padded,
        }
    }

    /// The length of the scratch [`Work::softmax_any`] packs `padded` query rows into.
    pub(crate) fn q_len(&self, padded: usize) -> usize {
        let d = self.p.q.dim().3;
        match self.build {
            // three bf16 parts of rows padded to AMX blocks, two to an f32, from a 64-byte boundary
            Build::Amx => {
                let tall = self.state_rows(padded);
                (3 * tall * crate::amx::depth(d)).div_ceil(2) + crate::amx::slack::<f32>()
            }
            _ => padded * d,
        }
    }

    #[inline(always)]
    fn task_any<const B: u8>(&self, t: Task, with_lse: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        let p = self.p;
        let c = self.groups.num_columns;
        let padded = t.rows.div_ceil(MR) * MR;
        let heads = t.h1 - t.h0;
        let hs = if p.per_head { heads } else { 1 };
        let mut out = zeroed(hs * t.rows * c, "num_columns")?;
        let mut lse = zeroed(if with_lse { heads * t.rows } else { 0 }, "lse")?;
        let mut q = zeroed(self.q_len(padded), "q")?;
        let mut st = Rows::new(self.state_rows(padded), c, "num_columns")?;
        for head in t.h0..t.h1 {
            self.softmax_any::<B>(t.b, head, t.r0, t.rows, &mut q, &mut st, false);
            let slot = if p.per_head { head - t.h0 } else { 0 };
            let dst = &mut out[slot * t.rows * c..(slot + 1) * t.rows * c];
            if c > 0 {
                for (i, row) in dst.chunks_exact_mut(c).enumerate() {
                    add_scaled(row, &st.acc[i * c..(i + 1) * c], st.inv(i)); // NaN for a bad row
                }
            }
            if with_lse {
                for (i, x) in lse[(head - t.h0) * t.rows..][..t.rows]
                    .iter_mut()
                    .enumerate()
                {
                    *x = st.lse(i);
                }
            }
        }
        Ok((out, lse))
    }

    /// One head's online softmax for rows `r0..r0 + rows` of batch element `b` in build `B` (the
    /// caller runs in a function compiled for it), with the entropy sums or not.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn softmax_any<const B: u8>(
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
            self.softmax_head::<B, true>(b, head, r0, rows, q, st);
        } else {
            self.softmax_head::<B, false>(b, head, r0, rows, q, st);
        }
    }

    /// One head's online softmax over every key for rows `r0..r0 + rows` of batch element `b`,
    /// left in `st` (relative column sums, max, sum, and with `ENT` the entropy sums); `q` is
    /// scratch for the scaled query rows (`[padded rows / MR][D][MR]`).
    #[inline(always)]
    fn softmax_head<const B: u8, const ENT: bool>(
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
        assert!(st.max.len() >= padded && q.len() >= self.q_len(padded));
        let given = p
            .lse
            .as_ref()
            .map(|l| l.slice(ndarray::s![b, head, r0..r0 + rows]));
        st.reset(self.prefix, given);
        let kv = b * hk + head / (h / hk);
        let bias = &self.biases[b * hm + if hm == 1 { 0 } else { head }];
        let src = p.q.slice(ndarray::s![b, head, r0..r0 + rows, ..]);
        #[cfg(target_arch = "x86_64")]
        if B == AMX {
            self.amx_head::<ENT>(src, kv, bias, q, st);
            st.settle(padded, self.groups.num_columns);
            return;
        }
        // q packed per micro tile of rows, `[padded / MR][d][MR]`: a tile's rows at one depth are
        // adjacent, so its broadcasts walk one pointer (the rows past `rows` stay 0)
        for (i, row) in src.outer_iter().enumerate() {
            let (tile, lane) = (i / MR, i % MR);
            let dst = &mut q[tile * d * MR..(tile + 1) * d * MR];
            for (e, &v) in row.iter().enumerate() {
                dst[e * MR + lane] = v * p.scale;
            }
        }
        let ntiles = self.groups.tiles.len();
        let block = KEY_BLOCK / NR;
        let keys = &self.keys[kv];
        for t0 in (0..ntiles).step_by(block) {
            let t1 = (t0 + block).min(ntiles);
            for m0 in (0..padded).step_by(MR) {
                #[cfg(target_arch = "x86_64")]
                if B == AVX512 {
                    let qt = &q[m0 * d..(m0 + MR) * d];
                    let mut t = t0;
                    while t < t1 {
                        let n = if t + 2 <= t1 { 2 } else { 1 };
                        let kt = &keys[t * d * NR..(t + n) * d * NR];
                        let bt = &bias[t * NR..(t + n) * NR];
                        // SAFETY: B is AVX512 only in a function compiled for AVX-512, run on a
                        // CPU that has it.
                        unsafe {
                            if n == 2 {
                                avx512::fold_tiles::<2, ENT>(self, qt, kt, d, t, bt, st, m0);
                            } else {
                                avx512::fold_tiles::<1, ENT>(self, qt, kt, d, t, bt, st, m0);
                            }
                        }
                        t += n;
                    }
                    continue;
                }
                let qt = &q[m0 * d..(m0 + MR) * d];
                for (half, m) in (m0..m0 + MR).step_by(HALF).enumerate() {
                    let lane = half * HALF;
                    for t in t0..t1 {
                        let kt = &keys[t * d * NR..(t + 1) * d * NR];
                        let bt = &bias[t * NR..(t + 1) * NR];
                        #[cfg(target_arch = "x86_64")]
                        if B == AVX2 {
                            // SAFETY: B is AVX2 only in a function compiled for AVX2 + FMA, run
                            // on a CPU that has both.
                            unsafe { avx2::fold_tile::<ENT>(self, qt, lane, kt, d, t, bt, st, m) };
                            continue;
                        }
                        let mut s = micro(qt, lane, kt, d);
                        self.epilogue::<ENT>(&mut s, t, bt, st, m);
                    }
                }
            }
        }
        st.settle(padded, self.groups.num_columns);
    }

    /// [`Work::softmax_head`]'s walk over the keys in the AMX build for the query rows `src`
    /// (`[rows, D]`), key head `kv` and `bias`: per [`AMX_KEYS`] keys, each block of 32 rows x 32
    /// keys from AMX, its logits folded right away, 16 rows at a time, as the AVX-512 build folds
    /// the logits of its own products (the [`Rows`] state has whole blocks of rows:
    /// [`Work::state_rows`]).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn amx_head<const ENT: bool>(
        &self,
        src: ndarray::ArrayView2<f32>,
        kv: usize,
        bias: &[f32],
        q: &mut [f32],
        st: &mut Rows,
    ) {
        let (rows, d) = src.dim();
        let tall = self.state_rows(rows.div_ceil(MR) * MR);
        let depth = crate::amx::depth(d);
        // SAFETY: any bits are a u16, whose alignment (2) divides f32's.
        let (_, parts, _) = unsafe { q.align_to_mut::<u16>() };
        let parts = crate::amx::align(parts);
        // SAFETY: this function is compiled for AVX-512 and runs on a CPU with it.
        unsafe { crate::amx::pack_rows(src, self.p.scale, tall, parts) };
        let ntiles = self.groups.tiles.len();
        let keys = self.amx_keys[kv].as_slice();
        let k_part = crate::amx::part_len(ntiles, d);
        assert!(
            keys.len() == 3 * k_part && parts.len() >= 3 * tall * depth && st.max.len() >= tall
        );
        let mut logits = crate::amx::Block::default();
        // SAFETY: this build runs only where `amx::available` said yes (`Build::available`).
        let _tiles = unsafe { crate::amx::Tiles::new() };
        let block = if self.prefix { KEY_BLOCK } else { AMX_KEYS } / NR;
        for t0 in (0..ntiles).step_by(block) {
            let t1 = (t0 + block).min(ntiles);
            for r in (0..tall).step_by(AMX_ROWS) {
                for t in (t0..t1).step_by(2) {
                    // SAFETY: rows r..r + 32 < tall of each part and tiles t, t + 1 < the keys'
                    // even tile count (asserted above); `logits` holds 32 x 32; the thread holds
                    // the tiles.
                    unsafe {
                        let (q, k) = (
                            parts.as_ptr().add(r * depth),
                            keys.as_ptr().add(t * depth * NR),
                        );
                        crate::amx::block(q, tall * depth, depth, k, k_part, &mut logits);
                    }
                    let bias = &bias[t * NR..];
                    for half in 0..AMX_ROWS / AMX_FOLD {
                        let (m0, at) =
                            (r + half * AMX_FOLD, &logits.0[half * AMX_FOLD * AMX_ROWS..]);
                        // SAFETY: AMX runs only with AVX-512 (`Build::available`), and this
                        // function is compiled for it.
                        unsafe {
                            if t + 2 <= t1 {
                                let acc = avx512::load_logits::<2, AMX_FOLD>(at, AMX_ROWS);
                                avx512::fold_logits::<2, ENT, AMX_FOLD>(
                                    self, &acc, t, bias, st, m0,
                                );
                            } else {
                                let acc = avx512::load_logits::<1, AMX_FOLD>(at, AMX_ROWS);
                                avx512::fold_logits::<1, ENT, AMX_FOLD>(
                                    self, &acc, t, bias, st, m0,
                                );
                            }
                        }
                    }
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
        s: &mut [[f32; NR]; HALF],
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
            if !st.given {
                st.raise_max::<ENT>(i, c, walked, max16(srow));
                if st.max[i] == f32::NEG_INFINITY {
                    st.skip(i, c, tile, self.prefix);
                    continue; // every key so far excluded
                }
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
                Tile::Consecutive(first) if self.prefix => {
                    acc[first..first + NR].copy_from_slice(&e)
                }
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
                let lanes = i * NR..(i + 1) * NR;
                if ENT {
                    // sum e (x - m) with m raised by delta: every term shrinks and loses delta * e
                    let delta = top - self.max[i];
                    self.ent[i] = (self.ent[i] - delta * self.sum[i]) * shrink;
                    for (e, &s) in self.ent16[lanes.clone()]
                        .iter_mut()
                        .zip(&self.sum16[lanes.clone()])
                    {
                        *e = (*e - delta * s) * shrink;
                    }
                }
                self.flush(i, c); // its columns are rescaled below
                self.sum[i] *= shrink;
                self.sum16[lanes].iter_mut().for_each(|s| *s *= shrink);
                self.acc[i * c..i * c + walked]
                    .iter_mut()
                    .for_each(|a| *a *= shrink);
            }
            self.max[i] = top;
        }
    }
}

impl Rows {
    /// Row `i` passes over a tile whose keys are all excluded so far: in prefix mode its columns,
    /// which are stored rather than added to, are set to zero.
    #[inline(always)]
    fn skip(&mut self, i: usize, c: usize, tile: Tile, prefix: bool) {
        if let (true, Tile::Consecutive(first)) = (prefix, tile) {
            self.acc[i * c + first..i * c + first + NR].fill(0.0);
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

/// Logits of the `HALF` rows from lane `lane` of a micro tile of rows (`q`, `[d][MR]`, scaled)
/// against one tile of keys (`[d][NR]`).
#[inline(always)]
fn micro(q: &[f32], lane: usize, k: &[f32], d: usize) -> [[f32; NR]; HALF] {
    let mut acc = [[0.0f32; NR]; HALF];
    for p in 0..d {
        let kv: &[f32; NR] = k[p * NR..(p + 1) * NR].try_into().expect("NR lanes");
        for (r, row) in acc.iter_mut().enumerate() {
            let a = q[p * MR + lane + r];
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

    use super::{Rows, Tile, Work, HALF, MR, NR};

    /// [`Work::epilogue`] of [`super::micro`]'s tile, vectorised; same arguments.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn fold_tile<const ENT: bool>(
        work: &Work,
        q: &[f32],
        lane: usize,
        k: &[f32],
        d: usize,
        t: usize,
        bias: &[f32],
        st: &mut Rows,
        m0: usize,
    ) {
        assert!(lane + HALF <= MR && q.len() >= MR * d && k.len() >= d * NR && bias.len() >= NR);
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; HALF];
        for p in 0..d {
            // SAFETY: p < d, so p * NR + 16 <= d * NR and p * MR + lane + r < MR * d (asserted
            // above).
            let (k0, k1) = unsafe {
                (
                    _mm256_loadu_ps(kp.add(p * NR)),
                    _mm256_loadu_ps(kp.add(p * NR + 8)),
                )
            };
            for (r, row) in acc.iter_mut().enumerate() {
                let a = unsafe { _mm256_broadcast_ss(&*qp.add(p * MR + lane + r)) };
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
            let bad = || {
                _mm256_or_ps(
                    _mm256_or_ps(
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(s0, s0),
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(s1, s1),
                    ),
                    _mm256_or_ps(
                        _mm256_cmp_ps::<_CMP_EQ_OQ>(s0, inf),
                        _mm256_cmp_ps::<_CMP_EQ_OQ>(s1, inf),
                    ),
                )
            };
            if st.given {
                st.bad[i] |= _mm256_movemask_ps(bad()) != 0;
            } else {
                // The row max is raised only when a logit passes it by more than SLACK (or is
                // NaN), so most tiles skip the horizontal max: exp(logit - max) stays below
                // e^(2 SLACK) (the bar max + SLACK is rounded in fp32), far from overflow.
                let bar = _mm256_set1_ps(st.max[i] + super::SLACK);
                let over = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_NLE_UQ>(s0, bar),
                    _mm256_cmp_ps::<_CMP_NLE_UQ>(s1, bar),
                );
                if _mm256_movemask_ps(over) != 0 {
                    st.bad[i] |= _mm256_movemask_ps(bad()) != 0;
                    st.raise_max::<ENT>(i, c, walked, unsafe { hmax(_mm256_max_ps(s0, s1)) });
                }
                if st.max[i] == f32::NEG_INFINITY {
                    st.skip(i, c, tile, work.prefix);
                    continue; // every key so far excluded
                }
            }
            let m = _mm256_set1_ps(st.max[i]);
            let (x0, x1) = (_mm256_sub_ps(s0, m), _mm256_sub_ps(s1, m));
            let e0 = unsafe { exp_small(x0) };
            let e1 = unsafe { exp_small(x1) };
            let need_total = !st.given || matches!(tile, Tile::Sum(_));
            let total = if need_total {
                unsafe { hsum(_mm256_add_ps(e0, e1)) }
            } else {
                0.0
            };
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
                        if work.prefix {
                            _mm256_storeu_ps(p, e0);
                            _mm256_storeu_ps(p.add(8), e1);
                        } else {
                            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), e0));
                            _mm256_storeu_ps(
                                p.add(8),
                                _mm256_add_ps(_mm256_loadu_ps(p.add(8)), e1),
                            );
                        }
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
            let xc = _mm256_min_ps(_mm256_max_ps(x, low), _mm256_set1_ps(super::EXP_CLAMP));
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
            let y = _mm256_blendv_ps(
                y,
                _mm256_set1_ps(f32::INFINITY),
                _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(super::EXP_HIGH)),
            );
            _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, low), y)
        }
    }
}

/// The micro tile and its update in AVX-512: 12 rows against one or two tiles of 16 keys, each row's
/// logits of a tile one vector, kept in registers from the product to the exponentials.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Rows, Tile, Work, MR, NR};

    /// The logits of the `MR` rows `q` (`[d][MR]`, scaled) against the `TILES` tiles from tile `t`
    /// (`k`: `[TILES][d][NR]`, `bias`: `[TILES * NR]`), folded into rows `m0..m0 + MR` of `st`,
    /// tile after tile for each row.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F), AVX2 and FMA.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn fold_tiles<const TILES: usize, const ENT: bool>(
        work: &Work,
        q: &[f32],
        k: &[f32],
        d: usize,
        t: usize,
        bias: &[f32],
        st: &mut Rows,
        m0: usize,
    ) {
        assert!(q.len() >= MR * d && k.len() >= TILES * d * NR && bias.len() >= TILES * NR);
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); TILES]; MR];
        for p in 0..d {
            let mut kv = [_mm512_setzero_ps(); TILES];
            for (j, v) in kv.iter_mut().enumerate() {
                // SAFETY: (j * d + p) * NR + 16 <= TILES * d * NR (asserted above).
                *v = unsafe { _mm512_loadu_ps(kp.add((j * d + p) * NR)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: p * MR + r < MR * d (asserted above).
                let a = _mm512_set1_ps(unsafe { *qp.add(p * MR + r) });
                for (x, &kj) in row.iter_mut().zip(&kv) {
                    *x = _mm512_fmadd_ps(a, kj, *x);
                }
            }
        }
        // SAFETY: this function's CPU features; `bias` holds TILES * NR floats (asserted above).
        unsafe { fold_logits::<TILES, ENT, MR>(work, &acc, t, bias, st, m0) }
    }

    /// The logits of the first `R` rows of `logits` (`[rows][stride]`) against `TILES` tiles, as
    /// [`fold_tiles`] holds them.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F).
    #[inline(always)]
    pub(super) unsafe fn load_logits<const TILES: usize, const R: usize>(
        logits: &[f32],
        stride: usize,
    ) -> [[__m512; TILES]; R] {
        assert!(TILES * NR <= stride && logits.len() >= (R - 1) * stride + TILES * NR);
        let mut out = [[_mm512_setzero_ps(); TILES]; R];
        for (r, row) in out.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                // SAFETY: r * stride + j * NR + 16 <= logits.len() (asserted above).
                *v = unsafe { _mm512_loadu_ps(logits.as_ptr().add(r * stride + j * NR)) };
            }
        }
        out
    }

    /// Fold the logits `acc` of rows `m0..m0 + R` against the `TILES` tiles from tile `t`
    /// (`bias`: `[TILES * NR]`) into `st`, tile after tile for each row.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F), AVX2 and FMA.
    #[inline(always)]
    pub(super) unsafe fn fold_logits<const TILES: usize, const ENT: bool, const R: usize>(
        work: &Work,
        acc: &[[__m512; TILES]; R],
        t: usize,
        bias: &[f32],
        st: &mut Rows,
        m0: usize,
    ) {
        assert!(bias.len() >= TILES * NR);
        let mut bv = [_mm512_setzero_ps(); TILES];
        for (j, v) in bv.iter_mut().enumerate() {
            // SAFETY: bias holds TILES * NR floats (asserted above).
            *v = unsafe { _mm512_loadu_ps(bias.as_ptr().add(j * NR)) };
        }
        if !ENT && st.given {
            if let Some(col) = one_column(&work.groups.tiles[t..t + TILES]) {
                // without a bias, a tile whose keys all have a column is 0 there: nothing to add
                let bias = bv.map(|b| work.p.bias.as_ref().map(|_| b));
                // SAFETY: this function's CPU features.
                unsafe { fold_given_sum(st, m0, work.groups.num_columns, col, acc, &bias) };
                return;
            }
        }
        for (ri, row) in acc.iter().enumerate() {
            for (j, (&x, &b)) in row.iter().zip(&bv).enumerate() {
                unsafe { fold_row::<ENT>(work, st, m0 + ri, t + j, _mm512_add_ps(x, b)) };
            }
        }
    }

    /// The column that every key of `tiles` adds to, if they all add to one.
    #[inline(always)]
    fn one_column(tiles: &[Tile]) -> Option<usize> {
        match tiles.first() {
            Some(&Tile::Sum(col)) if tiles.iter().all(|&x| x == Tile::Sum(col)) => Some(col),
            _ => None,
        }
    }

    /// [`fold_row`] of a micro tile whose keys all add to column `col`, for rows whose logsumexp
    /// was given: each row's exponentials of every tile summed as one vector into its pending
    /// column, with no per-tile test for NaN or `+inf` logits. [`exp`] carries a NaN on and turns
    /// `+inf` into `+inf`, so such a logit leaves its column non-finite, which [`Rows::settle`]
    /// flags.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F), AVX2 and FMA.
    #[inline(always)]
    unsafe fn fold_given_sum<const TILES: usize, const R: usize>(
        st: &mut Rows,
        m0: usize,
        c: usize,
        col: usize,
        logits: &[[__m512; TILES]; R],
        bias: &[Option<__m512>; TILES],
    ) {
        st.pend_rows(m0, R, c, col);
        st.unchecked = true;
        let lse = &st.max[m0..m0 + R];
        let pend = &mut st.pend16[m0 * NR..(m0 + R) * NR];
        for (ri, (row, &m)) in logits.iter().zip(lse).enumerate() {
            let m = _mm512_set1_ps(m);
            let mut e = _mm512_setzero_ps();
            for (&x, b) in row.iter().zip(bias) {
                let s = b.map_or(x, |b| _mm512_add_ps(x, b));
                e = _mm512_add_ps(e, unsafe { exp(_mm512_sub_ps(s, m)) });
            }
            let lanes = pend[ri * NR..(ri + 1) * NR].as_mut_ptr();
            // SAFETY: lanes points at NR = 16 floats.
            unsafe { _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), e)) };
        }
    }

    /// Fold the logits `s` of row `i` over tile `t` into the row's state.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F), AVX2 and FMA.
    #[inline(always)]
    unsafe fn fold_row<const ENT: bool>(work: &Work, st: &mut Rows, i: usize, t: usize, s: __m512) {
        let c = work.groups.num_columns;
        let tile = work.groups.tiles[t];
        let bad = || {
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(s, s)
                | _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(s, _mm512_set1_ps(f32::INFINITY))
        };
        if st.given {
            st.bad[i] |= bad() != 0;
        } else {
            // the max is raised only past max + SLACK (see the AVX2 build)
            let bar = _mm512_set1_ps(st.max[i] + super::SLACK);
            if _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(s, bar) != 0 {
                st.bad[i] |= bad() != 0;
                st.raise_max::<ENT>(i, c, work.walked(t), _mm512_reduce_max_ps(s));
            }
            if st.max[i] == f32::NEG_INFINITY {
                st.skip(i, c, tile, work.prefix);
                return; // every key so far excluded
            }
        }
        let x = _mm512_sub_ps(s, _mm512_set1_ps(st.max[i]));
        let e = unsafe { exp(x) };
        let lanes = i * NR..(i + 1) * NR;
        if !st.given {
            let p = st.sum16[lanes.clone()].as_mut_ptr();
            // SAFETY: p points at NR = 16 floats.
            unsafe { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), e)) };
        }
        if ENT {
            // exp(x) is 0 below EXP_LOW (and at -inf): clamp x so that 0 * x stays 0
            let xc = _mm512_max_ps(x, _mm512_set1_ps(super::EXP_LOW));
            let p = st.ent16[lanes].as_mut_ptr();
            // SAFETY: p points at NR = 16 floats.
            unsafe { _mm512_storeu_ps(p, _mm512_fmadd_ps(e, xc, _mm512_loadu_ps(p))) };
        }
        let acc_row = &mut st.acc[i * c..(i + 1) * c];
        match tile {
            Tile::Skip => {}
            Tile::Sum(col) => {
                let mut v = [0.0f32; NR];
                // SAFETY: v holds NR = 16 floats.
                unsafe { _mm512_storeu_ps(v.as_mut_ptr(), e) };
                st.pend(i, c, col, &v);
            }
            Tile::Consecutive(first) => {
                let p = acc_row[first..first + NR].as_mut_ptr();
                // SAFETY: p points at NR = 16 floats.
                unsafe {
                    if work.prefix {
                        _mm512_storeu_ps(p, e);
                    } else {
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), e));
                    }
                }
            }
            Tile::Mixed => {
                let mut v = [0.0f32; NR];
                // SAFETY: v holds NR = 16 floats.
                unsafe { _mm512_storeu_ps(v.as_mut_ptr(), e) };
                super::scatter(acc_row, &work.groups.columns[t * NR..(t + 1) * NR], &v);
            }
        }
    }

    /// [`exp`] on a slice of 16 values (for the tests).
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn exp_in_place(x: &mut [f32]) {
        assert_eq!(x.len(), 16);
        // SAFETY: 16 floats in and out; this function has AVX-512.
        unsafe { _mm512_storeu_ps(x.as_mut_ptr(), exp(_mm512_loadu_ps(x.as_ptr()))) }
    }

    /// [`super::exp_small`] on 16 lanes, with `2^n` applied by `scalef` (which overflows to
    /// `+inf` past `ln f32::MAX` by itself); NaN in, NaN out.
    ///
    /// # Safety
    /// The CPU must have AVX-512 (F) (inlined into such a function).
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // clamped above only: below EXP_LOW (-inf included) x is masked to 0 at the end, and
        // scalef takes any n; min gives its second operand where either is NaN, so NaN stays NaN
        let low = _mm512_set1_ps(super::EXP_LOW);
        let xc = _mm512_min_ps(_mm512_set1_ps(89.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut y = _mm512_set1_ps(super::EXP_POLY[0]);
        for &coef in &super::EXP_POLY[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(coef));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(y, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let y = _mm512_scalef_ps(y, n);
        _mm512_maskz_mov_ps(!_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, low), y)
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
pub(crate) fn sum16(x: &[f32; NR]) -> f32 {
    let mut h = [0.0f32; 8];
    for j in 0..8 {
        h[j] = x[j] + x[j + 8];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

/// `exp(x)` to about 2 ulp for `x <= 88` (`+inf` past `ln f32::MAX`, `exp(88)` between; 0 below
/// `EXP_LOW` and at `-inf`), in branch-free steps the compiler vectorises: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, a degree-6 polynomial for `exp(r)`, and `2^n` written into the exponent bits.
#[inline(always)]
fn exp_small(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(EXP_LOW, EXP_CLAMP); // NaN stays NaN
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let y = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |y, &coef| y * r + coef);
    let y = (y * r) * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < EXP_LOW {
        0.0
    } else if x > EXP_HIGH {
        f32::INFINITY
    } else {
        y * scale
    }
}

/// How far a logit may pass the row max the AVX2 path divides by before the max is raised.
const SLACK: f32 = 8.0;
/// Below this, `exp(x) < 2^-125`: flushed to 0.
const EXP_LOW: f32 = -87.0;
/// `ln f32::MAX`: above it, `exp(x)` is `+inf` (only a given logsumexp far below a logit gets here).
const EXP_HIGH: f32 = 88.722_84;
/// The largest `x` whose `2^n` fits the exponent bits of [`exp_small`].
const EXP_CLAMP: f32 = 88.0;
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

    /// The builds this CPU runs: the plain one, AVX2 + FMA and AVX-512 where it has them.
    pub(crate) fn builds() -> Vec<Build> {
        Build::available()
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
            lse: None,
            scale: 0.4,
            per_head,
        };
        let groups = Groups::new(Array1::from(cols.to_vec()).view(), c).unwrap();
        let want = reference(&p, cols, c);
        assert_close(
            &grouped_sums(&p, &groups, false).unwrap().0,
            &want,
            2e-6 * h as f64,
        );
        for build in builds() {
            assert_close(
                &run(&p, &groups, build, false).unwrap().0,
                &want,
                2e-6 * h as f64,
            );
        }
    }

    /// Each row's logsumexp in f64 (`-inf` where every key is excluded).
    pub(crate) fn logsumexp(p: &Problem, bi: usize, hi: usize, i: usize) -> f64 {
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
            return m;
        }
        m + logits.iter().map(|&l| (l - m).exp()).sum::<f64>().ln()
    }

    /// Every row's logsumexp (`[B, H, R]`, as the kernels take it), from [`logsumexp`].
    pub(crate) fn logsumexps(p: &Problem) -> Array3<f32> {
        let (b, h, r, _) = p.q.dim();
        Array3::from_shape_fn((b, h, r), |(bi, hi, i)| logsumexp(p, bi, hi, i) as f32)
    }

    /// Run `f` on a pool of `threads` threads.
    pub(crate) fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn split_covers_every_row_and_head_once() {
        for (b, h, r, pieces, chunk, threads) in [
            (1, 2, 8192, 2, 60, 2),
            (3, 5, 71, 7, 24, 4),
            (1, 2, 13, 16, 60, 16), // too few rows for 16 threads: heads split
            (2, 12, 4, 64, 60, 16),
            (1, 1, 1, 1, 60, 1),
            (1, 3, 0, 4, 60, 2),
        ] {
            let tasks = on_threads(threads, || split(b, h, r, pieces, chunk));
            assert!(tasks.len() <= pieces);
            let mut seen = vec![0u8; b * h * r];
            for t in tasks.iter().flatten() {
                assert!(
                    t.rows >= 1 && t.rows <= chunk && t.r0 + t.rows <= r,
                    "{t:?}"
                );
                assert!(t.h0 < t.h1 && t.h1 <= h, "{t:?}");
                for head in t.h0..t.h1 {
                    for i in t.r0..t.r0 + t.rows {
                        seen[(t.b * h + head) * r + i] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{b} {h} {r}: {tasks:?}");
            if r > 0 && b * r < threads * 2 * MR && h > 1 {
                assert!(
                    tasks.iter().flatten().any(|t| t.h1 - t.h0 < h),
                    "heads not split"
                );
            }
        }
        // pieces of equal rows, cut at multiples of MR
        let tasks = on_threads(2, || split(1, 2, 8192, 2, 60));
        let rows: Vec<usize> = tasks
            .iter()
            .map(|p| p.iter().map(|t| t.rows).sum())
            .collect();
        assert_eq!(rows, vec![4092, 4100]);
    }

    /// `(sums [B, H, R, C], lse [B, H, R])` of a problem made per head, in one build.
    fn per_head_sums(p: &Problem, groups: &Groups, build: Build) -> (Array4<f32>, Array3<f32>) {
        let p = Problem {
            per_head: true,
            ..*p
        };
        let (sums, lse) = run(&p, groups, build, true).unwrap();
        (sums, lse.unwrap())
    }

    #[test]
    fn lse_returned_and_given() {
        let cols = joint_columns(8, 3, 16);
        let (b, h, r, nk) = (2, 4, 29, cols.len());
        let (q, k) = random_qk((b, h, r, 24), (2, nk), 11);
        let mut bias = Array3::<f32>::zeros((b, h, nk));
        bias.slice_mut(ndarray::s![0, 1, 3..20])
            .fill(f32::NEG_INFINITY);
        bias.slice_mut(ndarray::s![1, 2, ..])
            .fill(f32::NEG_INFINITY); // a head with no key
        let groups = Groups::new(Array1::from(cols.clone()).view(), 11).unwrap();
        let p = Problem {
            q: q.view(),
            k: k.view(),
            bias: Some(bias.view()),
            lse: None,
            scale: 0.3,
            per_head: true,
        };
        let want = reference(&p, &cols, 11);
        let exact = logsumexps(&p);
        for build in builds() {
            let (sums, lse) = per_head_sums(&p, &groups, build);
            assert_close(&sums, &want, 2e-6);
            for (got, want) in lse.iter().zip(exact.iter()) {
                assert!(
                    got == want || (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "lse {got} vs {want}"
                );
            }
            // the lse given back: P = exp(logit - lse), the same sums without a running max
            let given = Problem {
                lse: Some(exact.view()),
                ..p
            };
            let (again, lse_again) = per_head_sums(&given, &groups, build);
            assert_close(&again, &want, 4e-6);
            assert_eq!(lse_again, exact);
            // a logsumexp ln 2 too high halves every P, as the contract says
            let shifted = exact.mapv(|x| x + std::f32::consts::LN_2);
            let half = Problem {
                lse: Some(shifted.view()),
                per_head: false,
                ..p
            };
            let summed = run(&half, &groups, build, false).unwrap().0;
            let want_half = reference(
                &Problem {
                    per_head: false,
                    ..p
                },
                &cols,
                11,
            ) / 2.0;
            assert_close(&summed, &want_half, 8e-6);
        }
        // a NaN logsumexp is a NaN row
        let mut nan = exact.clone();
        nan[[0, 0, 5]] = f32::NAN;
        let bad = Problem {
            lse: Some(nan.view()),
            ..p
        };
        let (sums, _) = per_head_sums(&bad, &groups, Build::best());
        assert!(sums
            .slice(ndarray::s![0, 0, 5, ..])
            .iter()
            .all(|x| x.is_nan()));
        assert!(sums
            .slice(ndarray::s![0, 0, 4, ..])
            .iter()
            .all(|x| x.is_finite()));
    }

    #[test]
    fn key_shards_merge_like_attention_outputs() {
        // three shards of the keys (one of them fully masked for some rows' head), merged by their
        // lse: out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i
        let cols = joint_columns(10, 4, 12);
        let (b, h, r, nk, d) = (1, 2, 17, cols.len(), 16);
        let (q, k) = random_qk((b, h, r, d), (h, nk), 21);
        let mut bias = Array3::<f32>::zeros((b, h, nk));
        bias.slice_mut(ndarray::s![0, 1, 20..40])
            .fill(f32::NEG_INFINITY);
        let full = Problem {
            q: q.view(),
            k: k.view(),
            bias: Some(bias.view()),
            lse: None,
            scale: 0.5,
            per_head: true,
        };
        let want = reference(&full, &cols, 14);
        for build in builds() {
            let mut parts = Vec::new();
            for (lo, hi) in [(0, 20), (20, 40), (40, nk)] {
                let ks = k.slice(ndarray::s![.., .., lo..hi, ..]);
                let bs = bias.slice(ndarray::s![.., .., lo..hi]);
                let shard = Problem {
                    k: ks,
                    bias: Some(bs),
                    ..full
                };
                let g = Groups::new(Array1::from(cols[lo..hi].to_vec()).view(), 14).unwrap();
                parts.push(per_head_sums(&shard, &g, build));
            }
            let mut merged = Array4::<f64>::zeros((b, h, r, 14));
            for bi in 0..b {
                for hi in 0..h {
                    for i in 0..r {
                        let lses: Vec<f64> =
                            parts.iter().map(|p| p.1[[bi, hi, i]] as f64).collect();
                        let m = lses.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let total = m + lses.iter().map(|&l| (l - m).exp()).sum::<f64>().ln();
                        for ((sums, _), &l) in parts.iter().zip(&lses) {
                            let w = (l - total).exp(); // 0 for a shard with no key (-inf)
                            for cc in 0..14 {
                                merged[[bi, hi, i, cc]] += w * sums[[bi, hi, i, cc]] as f64;
                            }
                        }
                    }
                }
            }
            let merged = merged.mapv(|x| x as f32);
            assert_close(&merged, &want, 4e-6);
        }
    }

    #[test]
    fn any_thread_count_gives_the_same_sums() {
        // few rows and many threads: heads are split over tasks and add up in task order
        let cols = joint_columns(5, 2, 16);
        let nk = cols.len();
        let (q, k) = random_qk((2, 6, 9, 16), (3, nk), 31);
        let groups = Groups::new(Array1::from(cols.clone()).view(), 7).unwrap();
        for per_head in [false, true] {
            let p = Problem {
                q: q.view(),
                k: k.view(),
                bias: None,
                lse: None,
                scale: 0.4,
                per_head,
            };
            let want = reference(&p, &cols, 7);
            for threads in [1, 2, 3, 16] {
                let once = on_threads(threads, || grouped_sums(&p, &groups, false).unwrap().0);
                let twice = on_threads(threads, || grouped_sums(&p, &groups, false).unwrap().0);
                assert_eq!(once, twice, "{threads} threads");
                assert_close(&once, &want, 4e-6);
            }
        }
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
    fn given_lse_over_whole_frames() {
        // frames of 64 keys: pairs of tiles whose keys all add to one column, which the AVX-512
        // build sums as vectors with no per-tile test for NaN or +inf logits
        let cols = joint_columns(0, 3, 64);
        let (b, h, r, nk) = (1, 2, 30, cols.len());
        let (mut q, mut k) = random_qk((b, h, r, 16), (h, nk), 21);
        let groups = Groups::new(Array1::from(cols.clone()).view(), 3).unwrap();
        let (q0, k0) = (q.clone(), k.clone());
        let p = Problem {
            q: q0.view(),
            k: k0.view(),
            bias: None,
            lse: None,
            scale: 0.5,
            per_head: true,
        };
        let want = reference(&p, &cols, 3);
        let exact = logsumexps(&p);
        let given = |q: &Array4<f32>, k: &Array4<f32>, build: Build| {
            let p = Problem {
                q: q.view(),
                k: k.view(),
                bias: None,
                lse: Some(exact.view()),
                scale: 0.5,
                per_head: true,
            };
            run(&p, &groups, build, false).unwrap().0
        };
        for build in builds() {
            assert_close(&given(&q, &k, build), &want, 4e-6);
        }
        // a NaN in one query row of head 0, and a +inf logit in a frame key of head 1 (every
        // row's q . k there is +inf): those rows are NaN in every column, the others as before
        q[[0, 0, 13, 3]] = f32::NAN;
        k[[0, 1, 70, 0]] = f32::INFINITY;
        q.slice_mut(ndarray::s![0, 1, .., 0]).fill(0.5);
        for build in builds() {
            let out = given(&q, &k, build);
            for i in 0..r {
                let row = out.slice(ndarray::s![0, 0, i, ..]);
                if i == 13 {
                    assert!(row.iter().all(|x| x.is_nan()), "{build:?}: row 13 {row}");
                } else {
                    for (g, w) in row.iter().zip(want.slice(ndarray::s![0, 0, i, ..])) {
                        assert!(
                            (*g as f64 - w).abs() <= 4e-6,
                            "{build:?}: row {i}: {g} vs {w}"
                        );
                    }
                }
            }
            let head1 = out.slice(ndarray::s![0, 1, .., ..]);
            assert!(
                head1.iter().all(|x| x.is_nan()),
                "{build:?}: head 1 {head1}"
            );
        }
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
            lse: None,
            scale: 1.0,
            per_head: true,
        };
        let out = grouped_sums(&p, &groups, false).unwrap().0;
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
        for build in builds() {
            let other = run(&p, &groups, build, false).unwrap().0; // every build flags the same rows
            assert!(other
                .iter()
                .zip(out.iter())
                .all(|(a, b)| a.is_nan() == b.is_nan()));
        }
        let huge = Groups::new(Array1::from(vec![0i64; nk]).view(), 1usize << 61).unwrap();
        let e = grouped_sums(&p, &huge, false).err().unwrap().to_string();
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
            lse: None,
            scale: 1.0,
            per_head: false,
        };
        for build in builds() {
            let out = run(&p, &groups, build, false).unwrap().0;
            assert_eq!(out.into_raw_vec_and_offset().0, vec![0.0, 1.0, 0.0, 1.0]);
        }
    }

    /// `exp` of every value in one build's own code.
    fn exp_with(build: Build, xs: &[f32]) -> Vec<f32> {
        let mut out = xs.to_vec();
        match build {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has what the build needs (Build::available).
            Build::Avx2 => out
                .chunks_exact_mut(8)
                .for_each(|c| unsafe { avx2::exp_in_place(c) }),
            #[cfg(target_arch = "x86_64")]
            Build::Avx512 => out
                .chunks_exact_mut(16)
                .for_each(|c| unsafe { avx512::exp_in_place(c) }),
            _ => out.iter_mut().for_each(|x| *x = exp_small(*x)),
        }
        out
    }

    #[test]
    fn exp_matches_std_over_its_range() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| 10.0 - i as f32 * 4.9e-4).collect(); // 10 .. -88
        xs.extend([
            88.0,
            80.0,
            50.0,
            89.0,
            100.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
        ]);
        xs.extend([87.5, 88.9, 1e30, -87.5, -86.9, 1.0, -1.0, 20.0]);
        assert_eq!(xs.len() % 16, 0); // whole vectors of every build
        let exps = builds()
            .into_iter()
            .map(|build| exp_with(build, &xs))
            .collect::<Vec<_>>();
        let mut worst = 0.0f64;
        for (i, &x) in xs.iter().enumerate() {
            let want = (x as f64).exp();
            for got in exps.iter().map(|e| e[i] as f64) {
                if x > 88.8 {
                    assert_eq!(got, f64::INFINITY, "exp({x})");
                } else if x < -87.0 {
                    assert_eq!(got, 0.0, "exp({x})");
                } else if want > 1e-37 {
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
            lse: None,
            scale: 1.0,
            per_head: false,
        };
        let e = grouped_sums(&p, &groups, false).err().unwrap().to_string();
        assert!(e.starts_with("columns:"), "{e}");
        let k3 = Array4::<f32>::zeros((1, 3, 3, 8));
        let p = Problem { k: k3.view(), ..p };
        let e = grouped_sums(&p, &groups, false).err().unwrap().to_string();
        assert!(e.starts_with("k:"), "{e}");
        let k = Array4::<f32>::zeros((1, 1, 3, 8));
        let bias = Array3::<f32>::zeros((1, 2, 4));
        let p = Problem {
            k: k.view(),
            bias: Some(bias.view()),
            ..p
        };
        let e = grouped_sums(&p, &groups, false).err().unwrap().to_string();
        assert!(e.starts_with("bias:"), "{e}");
        let lse = Array3::<f32>::zeros((1, 2, 3));
        let p = Problem {
            bias: None,
            lse: Some(lse.view()),
            ..p
        };
        let e = grouped_sums(&p, &groups, false).err().unwrap().to_string();
        assert!(e.starts_with("lse: expected one logsumexp per row"), "{e}");
    }
}
