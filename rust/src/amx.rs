//! The q k^T products of [`crate::groups`]' AMX build, on Intel's matrix tiles.
//!
//! AMX multiplies bf16 (8 significant bits) and adds in f32, 16 x 16 x 32 per instruction. To keep
//! the logits as exact as f32 products, every f32 operand is split into three bf16 parts,
//! `x = x1 + x2 + x3` with no error: `x1` is `x` rounded to bf16, `x2` the remainder rounded, `x3`
//! what is left, which fits a bf16 exactly (`|x2| <= 2^-8 |x|`, `|x3| <= 2^-16 |x|`). The product
//! `q k` is taken as the six part products `q_i k_j` with `i + j <= 4`, each exact in f32, added in
//! f32; what is left out, `q2 k3 + q3 k2 + q3 k3`, is under `2^-23 |q| |k|` per depth, the size of
//! f32's own rounding of one product. AMX reads a bf16 below 2^-126 as 0 (a part of a value below
//! about 2^-110): a product's error stays under 2^-126 |k|, which a logit notices only where the
//! other factor is near f32's largest. NaN and inf parts give NaN logits, as NaN and inf in q or k
//! must.
//!
//! One [`block`] is 32 query rows x 32 keys: four f32 accumulator tiles (`tmm0..tmm3`), two tiles
//! of 16 rows x 32 depths of q's parts (`tmm4`, `tmm5`) and two of 32 depths x 16 keys of k's parts
//! (`tmm6`, `tmm7`, pairs of depths side by side as AMX reads them). Linux hands a process the tile
//! state only once asked ([`available`] asks); a thread's tiles are configured by [`Tiles::new`]
//! and released when it drops.

use ndarray::ArrayView2;

/// Query rows per [`block`] (two tiles of 16).
pub(crate) const ROWS: usize = 32;
/// Keys per tile of k's parts (one tile's 16 f32 results per row).
const KEYS: usize = 16;
/// Depths per tile step: one 64-byte tile row of bf16.
const STEP: usize = 32;

/// The depth the parts are stored at: `d` padded with zeros to whole tile steps.
pub(crate) fn depth(d: usize) -> usize {
    d.div_ceil(STEP) * STEP
}

/// Whether this CPU has AMX tiles with bf16 products and Linux gave this process their state.
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 7 exists on every x86_64 CPU that AVX-512 runs on; on older ones it reads 0.
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    extern "C" {
        fn syscall(number: i64, ...) -> i64;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) takes two integers and changes nothing but the
    // process's permission to use the tile state; it fails (-1) where the kernel has no AMX support.
    unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits; a NaN stays a NaN.
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = if x.is_nan() {
        bits | 0x0040_0000
    } else {
        bits.wrapping_add(0x7fff + ((bits >> 16) & 1))
    };
    (rounded >> 16) as u16
}

fn widen(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// `x` as three bf16 parts that add up to it exactly (finite `x` from 2^-111 on; below, the parts
/// hold what bf16 can). Where `x` would round to an infinite bf16 (|x| >= 3.3961776e38), the first
/// part is `x` cut, not rounded, to bf16: the rest still fits the other two.
#[inline(always)]
pub(crate) fn split(x: f32) -> [u16; 3] {
    let rounded = bf16(x);
    let first = if widen(rounded).is_infinite() && x.is_finite() {
        (x.to_bits() >> 16) as u16
    } else {
        rounded
    };
    let rest = x - widen(first);
    let second = bf16(rest);
    [first, second, bf16(rest - widen(second))]
}

/// The parts of a tile step of values (32, times `scale`; 0 past `x`), part by part: written as
/// loops over whole steps that the compiler vectorises.
#[inline(always)]
fn split_step(x: &[f32], scale: f32) -> [[u16; STEP]; 3] {
    let mut v = [0.0f32; STEP];
    v[..x.len()]
        .iter_mut()
        .zip(x)
        .for_each(|(d, &s)| *d = s * scale);
    let mut out = [[0u16; STEP]; 3];
    for (i, &x) in v.iter().enumerate() {
        let [a, b, c] = split(x);
        (out[0][i], out[1][i], out[2][i]) = (a, b, c);
    }
    out
}

/// Query rows `[rows, d]` times `scale` as parts `[3][padded / 16][depth(d) / 32][16][32]` (one
/// tile step of 16 rows is 1 KiB in a row), in `out` (at least that long; `padded` a multiple of
/// 16); rows past `rows` and depths past `d` are 0. Compiled for AVX-512, which AMX CPUs have.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
pub(crate) fn pack_rows(q: ArrayView2<f32>, scale: f32, padded: usize, out: &mut [u16]) {
    let (rows, d) = q.dim();
    let depth = depth(d);
    let part = padded * depth;
    assert!(rows <= padded && padded.is_multiple_of(16) && out.len() >= 3 * part);
    out[..3 * part].fill(0);
    for (i, row) in q.outer_iter().enumerate() {
        let row = row
            .to_slice()
            .map_or_else(|| row.to_vec().into(), std::borrow::Cow::from);
        let base = (i / 16) * 16 * depth + (i % 16) * STEP;
        for (step, x) in row.chunks(STEP).enumerate() {
            let at = base + step * 16 * STEP;
            for (p, values) in split_step(x, scale).iter().enumerate() {
                out[p * part + at..][..STEP].copy_from_slice(values);
            }
        }
    }
}

/// The part of `buf` from its first 64-byte boundary on: AMX reads and writes tile rows of 64
/// bytes, each one cache line where aligned and two where not (twice the traffic).
pub(crate) fn align<T>(buf: &mut [T]) -> &mut [T] {
    let skip = buf.as_ptr().align_offset(64).min(buf.len());
    &mut buf[skip..]
}

/// Values a buffer needs beyond what [`align`] gives back.
pub(crate) const fn slack<T>() -> usize {
    64 / std::mem::size_of::<T>()
}

/// A buffer of bf16 that starts on a 64-byte boundary.
pub(crate) struct Parts {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

impl Parts {
    fn zeroed(len: usize) -> Parts {
        Parts {
            lines: vec![Line([0; 32]); len.div_ceil(32)],
            len,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u16] {
        // SAFETY: the lines hold 32 u16 each, without padding, and `len` <= 32 * lines.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: as in `as_slice`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// The logits of one [`block`], `[ROWS][2 KEYS]`, on 64-byte lines.
#[repr(C, align(64))]
pub(crate) struct Block(pub [f32; ROWS * 2 * KEYS]);

impl Default for Block {
    fn default() -> Self {
        Block([0.0; ROWS * 2 * KEYS])
    }
}

/// The values of one part of [`pack_keys`]' keys for `tiles` tiles of 16 keys of depth `d`: the
/// tiles rounded up to whole [`block`]s (pairs of tiles), at [`depth`].
pub(crate) fn part_len(tiles: usize, d: usize) -> usize {
    tiles.div_ceil(2) * 2 * depth(d) * KEYS
}

/// Keys `[Nk, d]` in `tiles` tiles of 16 as parts `[3][tiles, even][depth(d) / 2][KEYS][2]`
/// ([`part_len`] values each), 0 past `Nk`: a tile step of one tile is 1 KiB in a row.
/// Compiled for AVX-512, which AMX CPUs have.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
pub(crate) fn pack_keys(k: ArrayView2<f32>, tiles: usize) -> Parts {
    let (nk, d) = k.dim();
    assert!(nk <= tiles * KEYS);
    let tile = depth(d) * KEYS;
    let part = part_len(tiles, d);
    let mut parts = Parts::zeroed(3 * part);
    let out = parts.as_mut_slice();
    for (j, row) in k.outer_iter().enumerate() {
        let row = row
            .to_slice()
            .map_or_else(|| row.to_vec().into(), std::borrow::Cow::from);
        let base = (j / KEYS) * tile + (j % KEYS) * 2;
        for (step, x) in row.chunks(STEP).enumerate() {
            for (p, values) in split_step(x, 1.0).iter().enumerate() {
                let at = p * part + base + step * STEP * KEYS;
                for (pair, two) in values.chunks_exact(2).enumerate() {
                    out[at + pair * 2 * KEYS..][..2].copy_from_slice(two);
                }
            }
        }
    }
    parts
}

/// The tile configuration of [`block`] on this thread, released when dropped (on this thread: not
/// `Send`).
pub(crate) struct Tiles(std::marker::PhantomData<*const ()>);

/// AMX's tile configuration (palette 1): bytes per row and rows of each of the 16 tiles.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes: [u16; 16],
    rows: [u8; 16],
}

impl Tiles {
    /// Configure tiles 0-7 as 16 rows of 64 bytes.
    ///
    /// # Safety
    /// The CPU must have AMX (which [`available`], asked here, says with the process's permission).
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn new() -> Tiles {
        // without the permission, which `available` asks for once, ldtilecfg faults (SIGILL)
        assert!(
            available(),
            "AMX tiles used without the process's permission"
        );
        let mut config = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes: [0; 16],
            rows: [0; 16],
        };
        config.bytes[..8].fill(64);
        config.rows[..8].fill(16);
        // SAFETY: the CPU has AMX and the process its state (the caller's promise); ldtilecfg only
        // reads the 64 bytes of `config`.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
        }
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Tiles` exists only where AMX runs (`Tiles::new`); tilerelease touches no memory.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// The logits of the 32 rows of `q` against the 32 keys of `k`, into `out` (`[32][32]`).
///
/// `q` points at a block's first rows in parts as [`pack_rows`] lays them (`q_part` values from one
/// part to the next), `k` at a block's first tile in parts as [`pack_keys`] does (`k_part` apart).
/// Per tile step the six products run in an order that reloads one operand at a time (16 tile loads
/// for 24 products, not 24): q1 k1, q1 k2, q2 k2, q2 k1, q3 k1, q1 k3. Tiles are not renamed, so a
/// load waits for the products that read its tile: each load comes right after the last product
/// that reads the tile it fills, and the products that do not wait for it run while it loads.
/// One assembly block from the first tile zeroed to the last stored, so that no tile is meant to
/// hold a value from one block to the next (rustc may assume a register it was not told of keeps
/// its value across a block, not that it keeps one between blocks).
///
/// # Safety
/// The thread holds a [`Tiles`]; `q` has 32 rows of `depth` (a multiple of 32) values in each part,
/// and `k` two tiles in each part.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn block(
    q: *const u16,
    q_part: usize,
    depth: usize,
    k: *const u16,
    k_part: usize,
    out: &mut Block,
) {
    assert!(
        depth >= STEP && depth.is_multiple_of(STEP),
        "depth {depth}: whole tile steps"
    );
    // bytes: a tile row is 64; a tile step of 16 rows or of 16 keys is 1 KiB
    let (half, tile) = (16 * depth * 2, depth * KEYS * 2);
    // One tile step's four products after new rows of q (tmm4, tmm5, at `a` and `a` + half), new
    // keys (tmm6, tmm7, at `b` and `b` + tile) or both: each load right after the last product that
    // reads its tile.
    #[rustfmt::skip]
    macro_rules! rows {
        ($a:literal) => {
            concat!(
                "tileloadd tmm4, [", $a, " + {row}*1]\n",
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "lea {t}, [", $a, " + {half}]\n",
                "tileloadd tmm5, [{t} + {row}*1]\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
            )
        };
    }
    #[rustfmt::skip]
    macro_rules! keys {
        ($b:literal) => {
            concat!(
                "tileloadd tmm6, [", $b, " + {row}*1]\n",
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "lea {t}, [", $b, " + {tile}]\n",
                "tileloadd tmm7, [{t} + {row}*1]\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
            )
        };
    }
    #[rustfmt::skip]
    macro_rules! both {
        ($a:literal, $b:literal) => {
            concat!(
                "tileloadd tmm4, [", $a, " + {row}*1]\n",
                "tileloadd tmm6, [", $b, " + {row}*1]\n",
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "lea {t}, [", $b, " + {tile}]\n",
                "tileloadd tmm7, [{t} + {row}*1]\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "lea {t}, [", $a, " + {half}]\n",
                "tileloadd tmm5, [{t} + {row}*1]\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
            )
        };
    }
    // SAFETY: the loads read 16 rows of 64 bytes each at q + i q_part + step KiB (+ half) and at
    // k + j k_part + step KiB (+ tile), i, j < 3 and step < depth / 32: within what the caller
    // promises; the stores write the 4 KiB of `out` (rows of 128 bytes). The tiles are declared
    // clobbered; rbx and rbp are not used.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            // {a}: q's rows of the second part, then the third; {b}: the keys likewise
            both!("{qp}", "{kp}"), // q1 k1
            "lea {b}, [{kp} + {kpart}]",
            keys!("{b}"), // q1 k2
            "lea {a}, [{qp} + {qpart}]",
            rows!("{a}"),  // q2 k2
            keys!("{kp}"), // q2 k1
            "add {a}, {qpart}",
            rows!("{a}"), // q3 k1
            "add {b}, {kpart}",
            both!("{qp}", "{b}"), // q1 k3
            // the next tile step
            "add {qp}, 1024",
            "add {kp}, 1024",
            "dec {steps}",
            "jnz 2b",
            // rows of 32 f32 (128 bytes); rows 16-31 from byte 2048
            "mov {t}, 128",
            "tilestored [{out} + {t}*1], tmm0",
            "tilestored [{out} + {t}*1 + 64], tmm1",
            "tilestored [{out} + {t}*1 + 2048], tmm2",
            "tilestored [{out} + {t}*1 + 2112], tmm3",
            qp = inout(reg) q => _,
            kp = inout(reg) k => _,
            steps = inout(reg) depth / STEP => _,
            row = in(reg) 64usize,
            half = in(reg) half,
            tile = in(reg) tile,
            qpart = in(reg) q_part * 2,
            kpart = in(reg) k_part * 2,
            out = in(reg) out.0.as_mut_ptr(),
            a = out(reg) _,
            b = out(reg) _,
            t = out(reg) _,
            out("tmm0") _,
            out("tmm1") _,
            out("tmm2") _,
            out("tmm3") _,
            out("tmm4") _,
            out("tmm5") _,
            out("tmm6") _,
            out("tmm7") _,
            options(nostack)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_adds_up_exactly() {
        let mut x = 0.1f32;
        for i in 0..100_000 {
            x = (x * 1.7 + i as f32 * 1e-3).sin() * 10f32.powi(i % 11 - 5);
            let parts = split(x);
            let sum = parts.iter().map(|&p| widen(p) as f64).sum::<f64>();
            assert_eq!(sum, x as f64, "{x}: {parts:?}");
            assert!(widen(parts[1]).abs() <= x.abs() / 256.0);
            assert!(widen(parts[2]).abs() <= x.abs() / 65536.0);
        }
        for x in [
            f32::MAX,
            -f32::MAX,
            3.396_178e38,
            f32::from_bits(0x7f7f_c000),
            1e-30,
            -0.0,
        ] {
            let sum = split(x).iter().map(|&p| widen(p) as f64).sum::<f64>();
            assert_eq!(sum, x as f64, "{x}: {:?}", split(x));
        }
        assert!(split(f32::NAN).iter().all(|&p| widen(p).is_nan()));
        assert!(widen(split(f32::INFINITY)[0]).is_infinite());
    }
}
