//! Exact attention statistics on the CPU, without the N x N map: column sums (`received`), sums
//! over pairs of query and key blocks (token tiles, video cubes, frames), mass by spatio-temporal
//! offset (`distance`), each row's entropy and logsumexp, and rows of P over a range of keys
//! (`cross`, `text`, `full`), all from one pass over the keys.
//!
//! The rows are cut by [`crate::groups::split`] into a few pieces per thread (heads too, where the
//! rows are few), each piece a run of tasks of at most [`ROW_CHUNK`] rows. A task takes its rows through
//! its heads with the online softmax of [`crate::groups`], every key its own column, so that once a
//! head's keys are walked it holds its rows of P exactly (`rows x Nk`, never more), and folds them
//! into the statistics: the column sums, block sums (the rows of one block summed first, then their
//! key runs once) and offset sums add into the piece's accumulators, merged in piece order at the
//! end; the rows' own outputs (entropy, logsumexp, the dense columns) are kept per task. The entropy
//! comes from the row's sums in the same pass: with `m` the row max, `l = sum exp(s - m)` and
//! `u = sum exp(s - m) (s - m)`, `-sum P ln P = ln l - u / l`. With the rows' logsumexp given,
//! P = exp(s - lse) from the start and the entropy is `sum P (lse - s)`.

use std::ops::Range;

use ndarray::{Array3, Array4, Array5, ArrayView1};

use crate::error::{Error, Result};
use crate::groups::{
    add_scaled, set_scaled, split, sum16, zeroed, Build, Groups, Packed, Problem, Rows, Task, Work,
    MR, NR, ROW_CHUNK,
};

/// Sums of P over pairs of (query block, key block): `rows[i]` is query row `i`'s block (or -1),
/// `keys[j]` key `j`'s (or -1). Output `[B, Hs, num_rows, num_keys]`, summed over rows.
pub struct Blocks<'a> {
    pub rows: ArrayView1<'a, i64>,
    pub keys: ArrayView1<'a, i64>,
    pub num_rows: usize,
    pub num_keys: usize,
}

/// Where the video tokens sit for `distance`: query rows `row_start..` and keys `key_start..`,
/// `frames * height * width` of each in raster order.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub row_start: usize,
    pub key_start: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl Grid {
    fn tokens(&self) -> Option<usize> {
        self.frames
            .checked_mul(self.height)?
            .checked_mul(self.width)
    }
}

/// What to compute.
#[derive(Default)]
pub struct Spec<'a> {
    /// Keep each row's P over these keys: `[B, Hs, R, len]`.
    pub dense: Option<Range<usize>>,
    /// Column sums over all rows: `[B, Hs, Nk]`.
    pub received: bool,
    /// Each row's entropy `-sum P ln P` (natural log): `[B, Hs, R]`, summed over heads when not
    /// per head.
    pub entropy: bool,
    /// Block sums, one output each.
    pub blocks: Vec<Blocks<'a>>,
    /// Video query/key pairs summed by `(|dt|, |dy|, |dx|)` over the video rows:
    /// `[B, Hs, F, H, W]`.
    pub distance: Option<Grid>,
    /// Each row's logsumexp over the keys, per head: `[B, H, R]`.
    pub lse: bool,
}

/// The statistics asked for (None or empty where not).
pub struct Stats {
    pub dense: Option<Array4<f32>>,
    pub received: Option<Array3<f32>>,
    pub entropy: Option<Array3<f32>>,
    pub blocks: Vec<Array4<f32>>,
    pub distance: Option<Array5<f32>>,
    pub lse: Option<Array3<f32>>,
}

/// A run of consecutive keys of one block.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Run {
    start: usize,
    end: usize,
    block: usize,
}

/// Consecutive keys with the same block, as runs (keys in no block are left out).
fn runs(keys: &ArrayView1<i64>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (j, &g) in keys.iter().enumerate() {
        if g < 0 {
            continue;
        }
        match out.last_mut() {
            Some(run) if run.end == j && run.block == g as usize => run.end += 1,
            _ => out.push(Run {
                start: j,
                end: j + 1,
                block: g as usize,
            }),
        }
    }
    out
}

fn product(dims: &[usize], what: &'static str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| Error::invalid(what, format!("the output {dims:?} is too large")))
}

/// The checked spec and the sizes of a call.
struct Plan {
    b: usize,
    hs: usize,
    r: usize,
    nk: usize,
    per_head: bool,
    /// Rows per task.
    chunk: usize,
    dense: Option<Range<usize>>,
    received: bool,
    entropy: bool,
    lse: bool,
    /// Per block output: the query rows' blocks, the key runs, and the output's sizes.
    blocks: Vec<(Vec<i64>, Vec<Run>, usize, usize)>,
    distance: Option<Grid>,
}

impl Plan {
    fn new(p: &Problem, spec: &Spec) -> Result<Self> {
        let (b, h, r, _) = p.q.dim();
        let nk = p.k.dim().2;
        let hs = if p.per_head { h } else { 1 };
        if let Some(d) = &spec.dense {
            if d.start > d.end || d.end > nk {
                return Err(Error::invalid(
                    "dense",
                    format!("expected key columns lo..hi within 0..{nk}, got {d:?}"),
                ));
            }
            product(&[b, hs, r, d.end - d.start], "dense")?;
        }
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for blk in &spec.blocks {
            if blk.rows.len() != r || blk.keys.len() != nk {
                return Err(Error::invalid(
                    "blocks",
                    format!(
                        "expected a block per query row ({r}) and per key ({nk}), got {} and {}",
                        blk.rows.len(),
                        blk.keys.len()
                    ),
                ));
            }
            let bad_row = blk
                .rows
                .iter()
                .find(|&&g| g < -1 || g >= blk.num_rows as i64);
            let bad_key = blk
                .keys
                .iter()
                .find(|&&g| g < -1 || g >= blk.num_keys as i64);
            if let Some(g) = bad_row.or(bad_key) {
                return Err(Error::invalid(
                    "blocks",
                    format!(
                        "expected row blocks in -1..{} and key blocks in -1..{}, got {g}",
                        blk.num_rows, blk.num_keys
                    ),
                ));
            }
            product(&[b, hs, blk.num_rows, blk.num_keys], "blocks")?;
            blocks.push((
                blk.rows.to_vec(),
                runs(&blk.keys),
                blk.num_rows,
                blk.num_keys,
            ));
        }
        if let Some(g) = spec.distance {
            let fits = g.tokens().is_some_and(|nv| {
                nv > 0
                    && g.row_start.checked_add(nv).is_some_and(|e| e <= r)
                    && g.key_start.checked_add(nv).is_some_and(|e| e <= nk)
            });
            if !fits {
                return Err(Error::invalid(
                    "distance",
                    format!(
                        "expected a grid of F x H x W >= 1 video tokens from row {} (of {r}) and key {} (of {nk}), got {g:?}",
                        g.row_start, g.key_start
                    ),
                ));
            }
            product(&[b, hs, g.frames, g.height, g.width], "distance")?;
        }
        if spec.received {
            product(&[b, hs, nk], "received")?;
        }
        Ok(Plan {
            b,
            hs,
            r,
            nk,
            per_head: p.per_head,
            chunk: ROW_CHUNK,
            dense: spec.dense.clone(),
            received: spec.received,
            entropy: spec.entropy,
            lse: spec.lse,
            blocks,
            distance: spec.distance,
        })
    }

    fn dense_len(&self) -> usize {
        self.dense.as_ref().map_or(0, |d| d.end - d.start)
    }
}

/// The summed statistics of one piece of the work (a run of tasks, on one thread), the rows its
/// tasks kept, and its scratch buffers.
struct Acc {
    received: Vec<f32>,
    blocks: Vec<Vec<f32>>,
    distance: Vec<f32>,
    rows: Vec<Kept>,
    scratch: Option<Scratch>,
}

/// The rows' own outputs of one task: `dense` `[Hs][rows][len]`, `entropy` `[Hs][rows]`, `lse`
/// `[heads][rows]` (each empty where not asked for).
struct Kept {
    task: Task,
    dense: Vec<f32>,
    entropy: Vec<f32>,
    lse: Vec<f32>,
}

/// Buffers reused by every task of a piece: the online-softmax state, the head sum of the rows,
/// the scaled query rows, a block's rows summed, each row's scale and the rows ordered by block.
struct Scratch {
    st: Rows,
    summed: Vec<f32>,
    q: Vec<f32>,
    tmp: Vec<f32>,
    scale: Vec<f32>,
    order: Vec<(i64, usize)>,
}

impl Acc {
    fn new(plan: &Plan) -> Result<Self> {
        let (b, hs) = (plan.b, plan.hs);
        let received = if plan.received {
            zeroed(b * hs * plan.nk, "received")?
        } else {
            Vec::new()
        };
        let blocks = plan
            .blocks
            .iter()
            .map(|(_, _, nr, nc)| zeroed(b * hs * nr * nc, "blocks"))
            .collect::<Result<_>>()?;
        let distance = match plan.distance.and_then(|g| g.tokens()) {
            Some(nv) => zeroed(b * hs * nv, "distance")?,
            None => Vec::new(),
        };
        Ok(Acc {
            received,
            blocks,
            distance,
            rows: Vec::new(),
            scratch: None,
        })
    }

    /// Bytes of the summed statistics of one piece.
    fn bytes(plan: &Plan) -> usize {
        let (b, hs) = (plan.b, plan.hs);
        let received = if plan.received { plan.nk } else { 0 };
        let blocks: usize = plan.blocks.iter().map(|(_, _, nr, nc)| nr * nc).sum();
        let distance = plan.distance.and_then(|g| g.tokens()).unwrap_or(0);
        (b * hs).saturating_mul(received + blocks + distance) * 4
    }

    fn merge(mut self, other: Acc) -> Acc {
        add(&mut self.received, &other.received);
        for (a, o) in self.blocks.iter_mut().zip(&other.blocks) {
            add(a, o);
        }
        add(&mut self.distance, &other.distance);
        self.rows.extend(other.rows);
        self
    }
}

#[inline(always)]
fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
}

/// The sum of `x`, in `NR` independent lanes (so that it vectorises) folded as a tree.
#[inline(always)]
fn total(x: &[f32]) -> f32 {
    if x.len() < 2 * NR {
        return x.iter().sum();
    }
    let mut lanes = [0.0f32; NR];
    let chunks = x.chunks_exact(NR);
    let rest = chunks.remainder();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
    }
    rest.iter().fold(sum16(&lanes), |s, &v| s + v)
}

/// Every statistic of `spec` for the rows of `p.q`, exact (softmax over every key).
///
/// A row whose keys are all excluded contributes zero (entropy 0); a row with NaN or `+inf` among
/// its logits is NaN in everything it touches, never a silent number. With a given logsumexp
/// (`p.lse`), P = exp(logit - lse) and the entropy is `sum P (lse - logit)`.
///
/// The rows are cut into [`PIECES_PER_THREAD`] pieces per thread of the pool (fewer where their
/// summed statistics would cost more than [`PIECE_MEMORY`] of the materialised map), which the
/// pool ([`crate::pool`]) hands to whichever thread is free; each piece sums into its own
/// accumulators, merged in piece order at the end, so the same call with the same thread count
/// always gives the same bits.
pub fn attention_stats(p: &Problem, spec: &Spec) -> Result<Stats> {
    run(p, spec, within_memory(p, Build::best()))
}

/// The share of the materialised map that the AMX build's keys may take beyond the f32 keys of
/// the other builds.
const AMX_KEY_MEMORY: f64 = 0.0025;

/// `build`, or the AVX-512 build where `build` is the AMX one and its keys (three bf16 parts: half
/// again the f32 keys) would take more than [`AMX_KEY_MEMORY`] of the map beyond the f32 keys: the
/// statistics keep under 2% of the map, and at short sequences the keys are a share of it (at
/// D = 64 and 8,192 keys, the f32 keys are 0.8%).
fn within_memory(p: &Problem, build: Build) -> Build {
    let (b, h, r, d) = p.q.dim();
    let (_, hk, nk, _) = p.k.dim();
    let map = (b * h * r) as f64 * nk as f64 * 4.0;
    let tiles = nk.div_ceil(NR);
    // bytes: three bf16 parts against one f32, per (batch element, key head)
    let amx = 6.0 * (b * hk * crate::amx::part_len(tiles, d)) as f64;
    let f32_keys = 4.0 * (b * hk * tiles * NR * d) as f64;
    match build {
        Build::Amx if amx - f32_keys > AMX_KEY_MEMORY * map => Build::Avx512,
        _ => build,
    }
}

/// The share of the materialised map (`B H R Nk` floats) that the pieces' accumulators may take
/// together (at least one piece always runs).
const PIECE_MEMORY: f64 = 0.005;
/// Pieces per thread of the pool (each with its own accumulators).
const PIECES_PER_THREAD: usize = 4;
/// The share of the map that the pieces' rows of P may take together: tasks have fewer rows than
/// [`ROW_CHUNK`] where many threads share a short call (never fewer than `2 MR`).
const ROW_MEMORY: f64 = 0.0075;

/// [`attention_stats`] in the given build.
fn run(p: &Problem, spec: &Spec, build: Build) -> Result<Stats> {
    let nk = p.k.dim().2;
    let ntiles = nk.div_ceil(NR);
    let groups = Groups::identity(nk);
    p.check(&groups)?;
    let plan = Plan::new(p, spec)?;
    let (b, h, r) = (plan.b, p.q.dim().1, plan.r);
    let packed = Packed::new(p, ntiles, build);
    let work = Work {
        p,
        groups: &groups,
        keys: &packed.keys,
        biases: &packed.biases,
        amx_keys: &packed.amx_keys,
        build,
        prefix: true,
    };
    let threads = crate::pool::threads();
    let map = (b * h * r) as f64 * nk as f64 * 4.0;
    let afford = (PIECE_MEMORY * map / Acc::bytes(&plan).max(1) as f64) as usize;
    // a few pieces per thread, so that a thread held up by other work on a shared machine does
    // not hold up the call: the pool hands the next piece to whichever thread is free
    let pieces = (PIECES_PER_THREAD * threads).min(afford).max(1);
    // the rows of P (and their head sums) of the pieces running at once within ROW_MEMORY of the map
    let buffers = if p.per_head { 1.0 } else { 2.0 };
    let rows = ROW_MEMORY * (b * h * r) as f64 / (threads.min(pieces) as f64 * buffers);
    let chunk = ((rows as usize) / MR * MR).clamp(2 * MR, ROW_CHUNK);
    let plan = Plan { chunk, ..plan };
    let pieces = split(b, h, r, pieces, chunk);
    let accs: Vec<Acc> = crate::pool::map(pieces.len(), |i| {
        let mut acc = Acc::new(&plan)?;
        for &t in &pieces[i] {
            work_task(&work, &plan, &mut acc, t)?;
        }
        acc.scratch = None;
        Ok(acc)
    })
    .into_iter()
    .collect::<Result<_>>()?;
    let mut accs = accs.into_iter();
    let acc = match accs.next() {
        Some(first) => accs.fold(first, Acc::merge),
        None => Acc::new(&plan)?, // no rows
    };
    assemble(&plan, h, acc)
}

/// The outputs from the summed accumulator and the rows each task kept (in task order: heads
/// split over tasks add up in the same order every time).
fn assemble(plan: &Plan, h: usize, acc: Acc) -> Result<Stats> {
    let (b, hs, r, nk) = (plan.b, plan.hs, plan.r, plan.nk);
    let nd = plan.dense_len();
    let mut dense = match &plan.dense {
        Some(_) => Some(
            Array4::from_shape_vec((b, hs, r, nd), zeroed(b * hs * r * nd, "dense")?)
                .expect("sized"),
        ),
        None => None,
    };
    let mut entropy = if plan.entropy {
        Some(Array3::from_shape_vec((b, hs, r), zeroed(b * hs * r, "entropy")?).expect("sized"))
    } else {
        None
    };
    let mut lse = if plan.lse {
        Some(Array3::from_shape_vec((b, h, r), zeroed(b * h * r, "lse")?).expect("sized"))
    } else {
        None
    };
    for Kept {
        task: t,
        dense: d,
        entropy: e,
        lse: l,
    } in &acc.rows
    {
        let (bi, r0, rows) = (t.b, t.r0, t.rows);
        let slots = if plan.per_head { t.h1 - t.h0 } else { 1 };
        for k in 0..slots {
            let s = if plan.per_head { t.h0 + k } else { 0 };
            if let Some(out) = dense.as_mut() {
                let src =
                    ndarray::ArrayView2::from_shape((rows, nd), &d[k * rows * nd..][..rows * nd])
                        .expect("rows x columns");
                out.slice_mut(ndarray::s![bi, s, r0..r0 + rows, ..])
                    .zip_mut_with(&src, |o, &v| *o += v);
            }
            if let Some(out) = entropy.as_mut() {
                let src = ArrayView1::from(&e[k * rows..(k + 1) * rows]);
                out.slice_mut(ndarray::s![bi, s, r0..r0 + rows])
                    .zip_mut_with(&src, |o, &v| *o += v);
            }
        }
        if let Some(out) = lse.as_mut() {
            for k in 0..t.h1 - t.h0 {
                out.slice_mut(ndarray::s![bi, t.h0 + k, r0..r0 + rows])
                    .assign(&ArrayView1::from(&l[k * rows..(k + 1) * rows]));
            }
        }
    }
    let received = plan
        .received
        .then(|| Array3::from_shape_vec((b, hs, nk), acc.received).expect("sized"));
    let blocks = plan
        .blocks
        .iter()
        .zip(acc.blocks)
        .map(|((_, _, nr, nc), v)| Array4::from_shape_vec((b, hs, *nr, *nc), v).expect("sized"))
        .collect();
    let distance = plan.distance.map(|g| {
        Array5::from_shape_vec((b, hs, g.frames, g.height, g.width), acc.distance).expect("sized")
    });
    Ok(Stats {
        dense,
        received,
        entropy,
        blocks,
        distance,
        lse,
    })
}

/// One task's rows into `acc`, in the build the work asks for.
fn work_task(work: &Work, plan: &Plan, acc: &mut Acc, t: Task) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    match work.build {
        // SAFETY: `build` is one that `Build::available` found on this CPU.
        Build::Amx => return unsafe { work_task_amx(work, plan, acc, t) },
        Build::Avx512 => return unsafe { work_task_avx512(work, plan, acc, t) },
        Build::Avx2 => return unsafe { work_task_avx2(work, plan, acc, t) },
        Build::Plain => {}
    }
    work_task_any::<{ crate::groups::PLAIN }>(work, plan, acc, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn work_task_avx2(work: &Work, plan: &Plan, acc: &mut Acc, t: Task) -> Result<()> {
    work_task_any::<{ crate::groups::AVX2 }>(work, plan, acc, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn work_task_avx512(work: &Work, plan: &Plan, acc: &mut Acc, t: Task) -> Result<()> {
    work_task_any::<{ crate::groups::AVX512 }>(work, plan, acc, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn work_task_amx(work: &Work, plan: &Plan, acc: &mut Acc, t: Task) -> Result<()> {
    work_task_any::<{ crate::groups::AMX }>(work, plan, acc, t)
}

/// Rows `t.r0..t.r0 + t.rows` of batch element `t.b` through heads `t.h0..t.h1` into `acc`.
#[inline(always)]
fn work_task_any<const B: u8>(work: &Work, plan: &Plan, acc: &mut Acc, t: Task) -> Result<()> {
    let c = work.groups.num_columns;
    let per_head = work.p.per_head;
    let chunk = plan.chunk;
    if acc.scratch.is_none() {
        let padded = chunk.div_ceil(MR) * MR;
        acc.scratch = Some(Scratch {
            st: Rows::new(work.state_rows(padded), c, "k")?,
            summed: if per_head {
                Vec::new()
            } else {
                zeroed(chunk * c, "k")?
            },
            q: zeroed(work.q_len(padded), "q")?,
            tmp: zeroed(if plan.blocks.is_empty() { 0 } else { c }, "k")?,
            scale: vec![0.0; padded],
            order: Vec::with_capacity(padded),
        });
    }
    let rows = t.rows;
    let heads = t.h1 - t.h0;
    let slots = if per_head { heads } else { 1 };
    let nd = plan.dense_len();
    let mut dense = zeroed(if nd > 0 { slots * rows * nd } else { 0 }, "dense")?;
    let mut entropy = zeroed(if plan.entropy { slots * rows } else { 0 }, "entropy")?;
    let mut lse = zeroed(if plan.lse { heads * rows } else { 0 }, "lse")?;
    let mut scratch = acc.scratch.take().expect("made above");
    let Scratch {
        st,
        summed,
        q,
        tmp,
        scale,
        order,
    } = &mut scratch;
    // one head (or heads kept apart): each head's rows go to the statistics as they are; else the
    // heads' rows are summed first and go once
    let direct = per_head || heads == 1;
    for head in t.h0..t.h1 {
        work.softmax_any::<B>(t.b, head, t.r0, rows, q, st, plan.entropy);
        let slot = if per_head { head - t.h0 } else { 0 };
        for i in 0..rows {
            if plan.entropy {
                entropy[slot * rows + i] += st.entropy(i);
            }
            if plan.lse {
                lse[(head - t.h0) * rows + i] = st.lse(i);
            }
            scale[i] = st.inv(i); // NaN for a bad row
        }
        if direct {
            let keep = &mut dense[slot * rows * nd..(slot + 1) * rows * nd];
            let out_slot = if per_head { head } else { 0 };
            let sunk = Sunk {
                rows: &st.acc,
                c,
                scale: &scale[..rows],
            };
            sink(plan, acc, (t.b, out_slot, t.r0), sunk, keep, tmp, order);
        } else {
            for i in 0..rows {
                let (dst, src) = (&mut summed[i * c..(i + 1) * c], &st.acc[i * c..(i + 1) * c]);
                if head == t.h0 {
                    set_scaled(dst, src, scale[i]);
                } else {
                    add_scaled(dst, src, scale[i]);
                }
            }
        }
    }
    if !direct {
        scale[..rows].fill(1.0);
        let sunk = Sunk {
            rows: summed,
            c,
            scale: &scale[..rows],
        };
        sink(plan, acc, (t.b, 0, t.r0), sunk, &mut dense, tmp, order);
    }
    acc.scratch = Some(scratch);
    acc.rows.push(Kept {
        task: t,
        dense,
        entropy,
        lse,
    });
    Ok(())
}

/// A task's rows of P for one output slot: row `i` is `rows[i * c..][..Nk] * scale[i]`.
struct Sunk<'a> {
    rows: &'a [f32],
    c: usize,
    scale: &'a [f32],
}

/// Fold a task's rows (batch element, output slot, first row `at`) into the statistics; `keep`
/// takes their dense columns (`[rows][len]`). Rows of the same block are summed first (into
/// `tmp`), so that each block's key runs are summed once per block and task, not per row.
#[inline(always)]
fn sink(
    plan: &Plan,
    acc: &mut Acc,
    (b, slot, r0): (usize, usize, usize),
    sunk: Sunk,
    keep: &mut [f32],
    tmp: &mut [f32],
    order: &mut Vec<(i64, usize)>,
) {
    let (hs, nk) = (plan.hs, plan.nk);
    let n = sunk.scale.len();
    let row = |i: usize| &sunk.rows[i * sunk.c..i * sunk.c + nk];
    if let Some(d) = &plan.dense {
        let nd = d.end - d.start;
        for i in 0..n {
            set_scaled(
                &mut keep[i * nd..(i + 1) * nd],
                &row(i)[d.clone()],
                sunk.scale[i],
            );
        }
    }
    if plan.received {
        let dst = &mut acc.received[(b * hs + slot) * nk..][..nk];
        for i in 0..n {
            add_scaled(dst, row(i), sunk.scale[i]);
        }
    }
    for ((rows, runs, nr, nc), out) in plan.blocks.iter().zip(acc.blocks.iter_mut()) {
        order.clear();
        order.extend((0..n).filter_map(|i| {
            let g = rows[r0 + i];
            (g >= 0).then_some((g, i))
        }));
        order.sort_unstable(); // by block, then row: the same order every time
        for group in order.chunk_by(|x, y| x.0 == y.0) {
            let sum = &mut tmp[..nk];
            let (_, first) = group[0];
            set_scaled(sum, row(first), sunk.scale[first]);
            for &(_, i) in &group[1..] {
                add_scaled(sum, row(i), sunk.scale[i]);
            }
            let dst = &mut out[((b * hs + slot) * nr + group[0].0 as usize) * nc..][..*nc];
            for run in runs {
                dst[run.block] += total(&sum[run.start..run.end]);
            }
        }
    }
    if let Some(g) = plan.distance {
        let nv = g.frames * g.height * g.width;
        for i in 0..n {
            let row_at = r0 + i;
            if row_at < g.row_start || row_at >= g.row_start + nv {
                continue;
            }
            let v = row_at - g.row_start;
            let (tq, yq, xq) = (
                v / (g.height * g.width),
                v / g.width % g.height,
                v % g.width,
            );
            let video = &row(i)[g.key_start..g.key_start + nv];
            let out = &mut acc.distance[(b * hs + slot) * nv..][..nv];
            fold_offsets(video, sunk.scale[i], out, g, (tq, yq, xq));
        }
    }
}

/// Add a video row `p * s` (`p`: `[F * H * W]`, keys in raster order) of a query at `(tq, yq, xq)`
/// into `out[|dt|][|dy|][|dx|]`.
#[inline(always)]
fn fold_offsets(p: &[f32], s: f32, out: &mut [f32], g: Grid, (tq, yq, xq): (usize, usize, usize)) {
    let (h, w) = (g.height, g.width);
    for tk in 0..g.frames {
        let dt = tq.abs_diff(tk);
        for yk in 0..h {
            let dy = yq.abs_diff(yk);
            let src = &p[(tk * h + yk) * w..][..w];
            let dst = &mut out[(dt * h + dy) * w..][..w];
            // keys left of the query fall on dx = xq - xk, the others on xk - xq
            let (left, right) = src.split_at(xq);
            dst[1..=xq]
                .iter_mut()
                .zip(left.iter().rev())
                .for_each(|(o, &v)| *o += v * s);
            dst[..w - xq]
                .iter_mut()
                .zip(right)
                .for_each(|(o, &v)| *o += v * s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::tests::{
        builds, logsumexps, noise, on_threads, probabilities as row_probabilities, random_qk,
    };
    use ndarray::{Array1, Array3 as A3, Array4 as A4};

    /// P of every row and head in f64, materialised: `[B][H][R][Nk]`.
    fn probabilities(p: &Problem) -> Vec<Vec<Vec<Vec<f64>>>> {
        let (b, h, r, _) = p.q.dim();
        (0..b)
            .map(|bi| {
                (0..h)
                    .map(|hi| (0..r).map(|i| row_probabilities(p, bi, hi, i)).collect())
                    .collect()
            })
            .collect()
    }

    /// A problem without bias at scale 1.
    fn unbiased<'a>(q: &'a A4<f32>, k: &'a A4<f32>, per_head: bool) -> Problem<'a> {
        Problem {
            q: q.view(),
            k: k.view(),
            bias: None,
            lse: None,
            scale: 1.0,
            per_head,
        }
    }

    fn close(got: f32, want: f64, tol: f64, what: &str) {
        assert!(
            (got as f64 - want).abs() <= tol,
            "{what}: got {got}, want {want}"
        );
    }

    struct Case {
        b: usize,
        h: usize,
        hk: usize,
        r: usize,
        nk: usize,
        d: usize,
        per_head: bool,
        bias: Option<A3<f32>>,
    }

    /// Every statistic of one case against the f64 materialised P, both builds.
    fn check(case: Case, grid: Grid, seed: u64) {
        let Case {
            b,
            h,
            hk,
            r,
            nk,
            d,
            per_head,
            bias,
        } = case;
        let (q, k) = random_qk((b, h, r, d), (hk, nk), seed);
        let p = Problem {
            q: q.view(),
            k: k.view(),
            bias: bias.as_ref().map(|x| x.view()),
            lse: None,
            scale: 0.4,
            per_head,
        };
        // token tiles of 5 rows x 7 keys, and blocks that skip some rows and keys
        let tile_rows = Array1::from_iter((0..r as i64).map(|i| i / 5));
        let tile_keys = Array1::from_iter((0..nk as i64).map(|j| j / 7));
        let odd_rows =
            Array1::from_iter((0..r as i64).map(|i| if i % 3 == 0 { -1 } else { i % 4 }));
        let odd_keys =
            Array1::from_iter((0..nk as i64).map(|j| if j % 5 == 1 { -1 } else { (j / 2) % 3 }));
        let spec = Spec {
            dense: Some(3..nk - 2),
            received: true,
            entropy: true,
            blocks: vec![
                Blocks {
                    rows: tile_rows.view(),
                    keys: tile_keys.view(),
                    num_rows: r.div_ceil(5),
                    num_keys: nk.div_ceil(7),
                },
                Blocks {
                    rows: odd_rows.view(),
                    keys: odd_keys.view(),
                    num_rows: 4,
                    num_keys: 3,
                },
            ],
            distance: Some(grid),
            lse: true,
        };
        let probs = probabilities(&p);
        let hs = if per_head { h } else { 1 };
        let tol = 3e-6 * h as f64;
        let exact = logsumexps(&p);
        let given = Problem {
            lse: Some(exact.view()),
            ..p
        };
        // each build, with the row statistics formed online and with the exact lse given
        let runs = builds()
            .into_iter()
            .flat_map(|build| [(build, &p), (build, &given)]);
        for (build, problem) in runs {
            let out = run(problem, &spec, build).unwrap();
            let (dense, received, entropy, distance, lse) = (
                out.dense.unwrap(),
                out.received.unwrap(),
                out.entropy.unwrap(),
                out.distance.unwrap(),
                out.lse.unwrap(),
            );
            for (got, want) in lse.iter().zip(exact.iter()) {
                let ok = got == want || (got - want).abs() <= 3e-6 * want.abs().max(1.0);
                assert!(ok, "lse {got} vs {want}");
            }
            let nv = grid.frames * grid.height * grid.width;
            for bi in 0..b {
                for s in 0..hs {
                    let heads: Vec<usize> = if per_head { vec![s] } else { (0..h).collect() };
                    let row = |i: usize, j: usize| {
                        heads.iter().map(|&hi| probs[bi][hi][i][j]).sum::<f64>()
                    };
                    for i in 0..r {
                        for j in 3..nk - 2 {
                            close(dense[[bi, s, i, j - 3]], row(i, j), tol, "dense");
                        }
                        let ent: f64 = heads
                            .iter()
                            .map(|&hi| {
                                -probs[bi][hi][i]
                                    .iter()
                                    .map(|&x| if x > 0.0 { x * x.ln() } else { 0.0 })
                                    .sum::<f64>()
                            })
                            .sum();
                        close(entropy[[bi, s, i]], ent, 2e-5 * h as f64, "entropy");
                    }
                    for j in 0..nk {
                        let want: f64 = (0..r).map(|i| row(i, j)).sum();
                        close(received[[bi, s, j]], want, tol * r as f64, "received");
                    }
                    for (blk, got) in spec.blocks.iter().zip(&out.blocks) {
                        let mut want = vec![0.0f64; blk.num_rows * blk.num_keys];
                        for i in 0..r {
                            for j in 0..nk {
                                let (gr, gk) = (blk.rows[i], blk.keys[j]);
                                if gr >= 0 && gk >= 0 {
                                    want[gr as usize * blk.num_keys + gk as usize] += row(i, j);
                                }
                            }
                        }
                        for (x, &w) in want.iter().enumerate() {
                            let got = got[[bi, s, x / blk.num_keys, x % blk.num_keys]];
                            close(got, w, tol * r as f64, "blocks");
                        }
                    }
                    let mut want = vec![0.0f64; nv];
                    let pos = |v: usize| {
                        (
                            v / (grid.height * grid.width),
                            v / grid.width % grid.height,
                            v % grid.width,
                        )
                    };
                    for vi in 0..nv {
                        for vj in 0..nv {
                            let ((a, b_, c), (x, y, z)) = (pos(vi), pos(vj));
                            let bin = (a.abs_diff(x) * grid.height + b_.abs_diff(y)) * grid.width
                                + c.abs_diff(z);
                            want[bin] += row(grid.row_start + vi, grid.key_start + vj);
                        }
                    }
                    for (x, &w) in want.iter().enumerate() {
                        let (t, y, z) = pos(x);
                        close(distance[[bi, s, t, y, z]], w, tol * nv as f64, "distance");
                    }
                }
            }
        }
    }

    fn grid(row_start: usize, key_start: usize, f: usize, h: usize, w: usize) -> Grid {
        Grid {
            row_start,
            key_start,
            frames: f,
            height: h,
            width: w,
        }
    }

    #[test]
    fn every_statistic_against_f64() {
        // rows cross task chunks (60) and micro tiles; keys cross tiles (16) and key blocks (256)
        let case = Case {
            b: 2,
            h: 3,
            hk: 3,
            r: 71,
            nk: 300,
            d: 20,
            per_head: false,
            bias: None,
        };
        check(case, grid(4, 10, 3, 4, 5), 1);
        let case = Case {
            b: 1,
            h: 4,
            hk: 2,
            r: 33,
            nk: 45,
            d: 9,
            per_head: true,
            bias: None,
        };
        check(case, grid(3, 1, 2, 2, 7), 2);
    }

    #[test]
    fn any_thread_count_and_few_rows() {
        // 16 threads for 5 rows: the heads are split over tasks, their rows add up in task order
        for (threads, per_head) in [(16, false), (16, true), (3, false), (1, true)] {
            let case = || Case {
                b: 1,
                h: 4,
                hk: 2,
                r: 5,
                nk: 40,
                d: 8,
                per_head,
                bias: None,
            };
            on_threads(threads, || check(case(), grid(1, 3, 1, 2, 2), 5));
        }
        // the same call on the same pool gives the same bits
        let (q, k) = random_qk((1, 2, 150, 16), (2, 300), 6);
        let p = unbiased(&q, &k, false);
        let spec = || Spec {
            received: true,
            entropy: true,
            ..Spec::default()
        };
        for threads in [2, 7] {
            let a = on_threads(threads, || attention_stats(&p, &spec()).unwrap());
            let b = on_threads(threads, || attention_stats(&p, &spec()).unwrap());
            assert_eq!(a.received, b.received);
            assert_eq!(a.entropy, b.entropy);
        }
    }

    #[test]
    fn masks_and_dead_rows() {
        let (b, h, nk) = (2, 2, 40);
        let mut bias = A3::<f32>::zeros((b, h, nk));
        for j in 30..40 {
            bias[[0, 1, j]] = f32::NEG_INFINITY;
        }
        bias[[0, 0, 5]] = -30.0;
        bias.slice_mut(ndarray::s![1, 0, ..])
            .fill(f32::NEG_INFINITY); // a head with no key
        let case = Case {
            b,
            h,
            hk: 1,
            r: 13,
            nk,
            d: 16,
            per_head: true,
            bias: Some(bias.clone()),
        };
        check(case, grid(1, 4, 1, 3, 4), 3);
        let shared = bias.slice(ndarray::s![.., 0..1, ..]).to_owned();
        let case = Case {
            b,
            h,
            hk: 1,
            r: 13,
            nk,
            d: 16,
            per_head: false,
            bias: Some(shared),
        };
        check(case, grid(0, 0, 2, 2, 3), 4);
    }

    #[test]
    fn huge_and_rising_logits_keep_entropy_and_mass_exact() {
        // logits 10 j over 40 keys: each tile raises the row max; key 0 of row 1 sits 1e4 above
        let mut q = A4::from_elem((1, 1, 2, 2), 0.0f32);
        q[[0, 0, 0, 0]] = 1.0e4;
        q[[0, 0, 1, 1]] = 1.0e4;
        let mut k = A4::zeros((1, 1, 40, 2));
        for j in 0..40 {
            k[[0, 0, j, 0]] = j as f32 * 1e-3;
        }
        k[[0, 0, 0, 1]] = 1.0;
        let p = unbiased(&q, &k, false);
        let spec = Spec {
            received: true,
            entropy: true,
            ..Spec::default()
        };
        let rows: Vec<Vec<f64>> = (0..2).map(|i| row_probabilities(&p, 0, 0, i)).collect();
        for fast in builds() {
            let out = run(&p, &spec, fast).unwrap();
            let (received, entropy) = (out.received.unwrap(), out.entropy.unwrap());
            for (j, &got) in received.iter().enumerate() {
                close(got, rows[0][j] + rows[1][j], 1e-6, "received");
            }
            for (i, row) in rows.iter().enumerate() {
                let want: f64 = -row
                    .iter()
                    .filter(|&&x| x > 0.0)
                    .map(|&x| x * x.ln())
                    .sum::<f64>();
                close(entropy[[0, 0, i]], want, 1e-5, "entropy");
            }
            assert!(entropy[[0, 0, 0]] > 1e-4 && entropy[[0, 0, 1]] == 0.0);
        }
    }

    #[test]
    fn the_amx_build_runs_where_its_keys_fit_the_memory_budget() {
        // beyond the f32 keys, the AMX keys take 2 bytes per key and depth: 0.25% of the map
        // (4 bytes per row and key) from 200 rows per depth on
        let k = A4::zeros((1, 1, 64, 64));
        for (rows, want) in [(12_000, Build::Avx512), (14_000, Build::Amx)] {
            let q = A4::zeros((1, 1, rows, 64));
            assert_eq!(within_memory(&unbiased(&q, &k, false), Build::Amx), want);
            assert_eq!(
                within_memory(&unbiased(&q, &k, false), Build::Avx2),
                Build::Avx2
            );
        }
    }

    #[test]
    fn nan_rows_stay_nan() {
        let mut q = A4::from_shape_vec((1, 2, 6, 8), noise(96, 8, 1.0)).unwrap();
        let k = A4::from_shape_vec((1, 2, 20, 8), noise(320, 9, 1.0)).unwrap();
        q[[0, 0, 3, 2]] = f32::NAN;
        let p = unbiased(&q, &k, true);
        let spec = Spec {
            dense: Some(0..20),
            entropy: true,
            ..Spec::default()
        };
        let out = run(&p, &spec, Build::Plain).unwrap();
        let (dense, entropy) = (out.dense.unwrap(), out.entropy.unwrap());
        for i in 0..6 {
            assert_eq!(entropy[[0, 0, i]].is_nan(), i == 3);
            assert!(!entropy[[0, 1, i]].is_nan());
            assert!(dense
                .slice(ndarray::s![0, 0, i, ..])
                .iter()
                .all(|x| x.is_nan() == (i == 3)));
        }
    }

    #[test]
    fn runs_merge_consecutive_keys() {
        let keys = Array1::from(vec![0i64, 0, 1, 1, -1, 1, 0, 0]);
        let want = [(0, 2, 0), (2, 4, 1), (5, 6, 1), (6, 8, 0)];
        let got: Vec<(usize, usize, usize)> = runs(&keys.view())
            .iter()
            .map(|r| (r.start, r.end, r.block))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bad_specs_name_their_argument() {
        let q = A4::<f32>::zeros((1, 1, 4, 8));
        let k = A4::<f32>::zeros((1, 1, 5, 8));
        let p = unbiased(&q, &k, false);
        let message = |spec: Spec| attention_stats(&p, &spec).err().unwrap().to_string();
        let e = message(Spec {
            dense: Some(2..6),
            ..Spec::default()
        });
        assert!(e.starts_with("dense: expected key columns"), "{e}");
        let rows = Array1::from(vec![0i64; 4]);
        let keys = Array1::from(vec![0i64, 1, 2, 3, 4]);
        let blk = |num_keys| Blocks {
            rows: rows.view(),
            keys: keys.view(),
            num_rows: 1,
            num_keys,
        };
        let e = message(Spec {
            blocks: vec![blk(4)],
            ..Spec::default()
        });
        assert!(
            e.starts_with("blocks: expected row blocks in -1..1 and key blocks in -1..4, got 4"),
            "{e}"
        );
        let e = message(Spec {
            blocks: vec![blk(1 << 62)],
            ..Spec::default()
        });
        assert!(e.starts_with("blocks: the output"), "{e}");
        let e = message(Spec {
            distance: Some(grid(1, 0, 1, 2, 2)),
            ..Spec::default()
        });
        assert!(e.starts_with("distance: expected a grid"), "{e}");
        let e = message(Spec {
            distance: Some(grid(0, 0, 1 << 40, 1 << 40, 1 << 40)),
            ..Spec::default()
        });
        assert!(e.starts_with("distance: expected a grid"), "{e}");
    }
}
