//! attnmap's native core: the render path (normalise -> resize -> colormap -> blend, fused per
//! output pixel) and the CPU attention kernels, which never hold the N x N map: [`groups`] sums
//! attention probabilities into key groups (cross and temporal maps), [`stats`] forms the exact
//! statistics (column sums, block sums, mass by offset, entropy) in the same one pass.
//!
//! The modules are plain Rust on `ndarray` views and know nothing of Python; this file only binds
//! them as `attnmap._native` (feature `python`). Every binding releases the GIL while it works.

mod amx;
pub mod blend;
pub mod colormap;
mod colormap_tables;
pub mod error;
pub mod groups;
pub mod normalize;
pub mod pool;
pub mod render;
pub mod resize;
pub mod stats;
pub mod yuv;

pub use error::{Error, Result};

#[cfg(feature = "python")]
mod bindings {
    use ndarray::{Array2, ArrayViewD, IxDyn};
    use numpy::{
        IntoPyArray, PyArray2, PyArray3, PyArray4, PyArrayDyn, PyArrayMethods, PyReadonlyArray1,
        PyReadonlyArray3, PyReadonlyArray4, PyReadonlyArrayDyn,
    };
    use std::borrow::Cow;

    use pyo3::exceptions::{PyMemoryError, PyOSError};
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    use crate::blend::{Alpha, Outline};
    use crate::error::{try_reserve, Error};
    use crate::normalize::{Mode, Params};
    use crate::render::{Background, Style};
    use crate::resize::{Plan, Time};

    pyo3::create_exception!(
        attnmap._native,
        AttnmapError,
        pyo3::exceptions::PyValueError,
        "Bad input to attnmap's render core; a ValueError subclass."
    );

    impl From<Error> for PyErr {
        fn from(e: Error) -> Self {
            match e {
                Error::Io(_) => PyOSError::new_err(e.to_string()),
                _ => AttnmapError::new_err(e.to_string()),
            }
        }
    }

    fn time(num_frames: Option<usize>, temporal_stride: Option<usize>) -> PyResult<Time> {
        match (num_frames, temporal_stride) {
            (Some(_), Some(_)) => Err(Error::invalid(
                "num_frames",
                "give num_frames or temporal_stride, not both",
            )
            .into()),
            (Some(n), None) => Ok(Time::Frames(n)),
            (None, Some(s)) => Ok(Time::Stride(s)),
            (None, None) => Ok(Time::Same),
        }
    }

    /// Normalise maps (F, h, w) float32 to [0, 1] float32.
    #[pyfunction]
    #[pyo3(signature = (maps, *, mode="global", vmin=None, vmax=None, percentile=(1.0, 99.0), gamma=1.0))]
    fn normalize<'py>(
        py: Python<'py>,
        maps: PyReadonlyArray3<'py, f32>,
        mode: &str,
        vmin: Option<f64>,
        vmax: Option<f64>,
        percentile: (f64, f64),
        gamma: f64,
    ) -> PyResult<Bound<'py, PyArray3<f32>>> {
        let params = Params {
            mode: Mode::parse(mode, percentile)?,
            vmin,
            vmax,
            gamma,
        };
        let view = maps.as_array();
        let out = py.detach(|| crate::normalize::normalize(view, &params))?;
        Ok(out.into_pyarray(py))
    }

    /// Resize maps (F, h, w) float32 to (T, H, W) float32: bilinear in space, linear or by stride in time.
    #[pyfunction]
    #[pyo3(signature = (maps, *, size, num_frames=None, temporal_stride=None))]
    fn resize<'py>(
        py: Python<'py>,
        maps: PyReadonlyArray3<'py, f32>,
        size: (usize, usize),
        num_frames: Option<usize>,
        temporal_stride: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray3<f32>>> {
        let time = time(num_frames, temporal_stride)?;
        let view = maps.as_array();
        let out = py.detach(|| crate::resize::resize(view, size, time))?;
        Ok(out.into_pyarray(py))
    }

    /// Render frames start..stop of normalised maps (F, h, w) into (n, H, W, 3) uint8.
    #[pyfunction]
    #[pyo3(signature = (maps, *, size, num_frames=None, temporal_stride=None, start=0, stop=None,
                        colormap="hot", background=None, alpha=0.6, alpha_mode="constant",
                        outline=None, outline_color=(255, 255, 255)))]
    #[allow(clippy::too_many_arguments)]
    fn render<'py>(
        py: Python<'py>,
        maps: PyReadonlyArray3<'py, f32>,
        size: (usize, usize),
        num_frames: Option<usize>,
        temporal_stride: Option<usize>,
        start: usize,
        stop: Option<usize>,
        colormap: &str,
        background: Option<PyReadonlyArrayDyn<'py, u8>>,
        alpha: f64,
        alpha_mode: &str,
        outline: Option<f64>,
        outline_color: (u8, u8, u8),
    ) -> PyResult<Bound<'py, PyArray4<u8>>> {
        let view = maps.as_array();
        let plan = Plan::new(view.dim(), size, time(num_frames, temporal_stride)?)?;
        let stop = stop.unwrap_or(plan.frames());
        if start > stop {
            return Err(Error::invalid(
                "start",
                format!("expected start <= stop, got {start} > {stop}"),
            )
            .into());
        }
        let style = Style {
            table: crate::colormap::table(colormap)?,
            alpha: Alpha::parse(alpha_mode, alpha)?,
            outline: outline
                .map(|t| Outline::new(t, [outline_color.0, outline_color.1, outline_color.2]))
                .transpose()?,
        };
        let (oh, ow) = plan.size();
        let bg_view = background.as_ref().map(|b| b.as_array());
        let bg = match &bg_view {
            None => None,
            Some(b) => Some(background_frames(b, stop - start, (oh, ow))?),
        };
        let n = stop - start;
        // `render` writes every byte before Python can see the array, and an error drops it unseen.
        let out = empty(py, &[n, oh, ow, 3], "size")?.cast_into::<PyArray4<u8>>()?;
        let buf = unsafe { out.as_slice_mut() }.expect("fresh arrays are contiguous");
        py.detach(|| -> crate::Result<()> {
            let owned;
            let bg = match &bg {
                None => None,
                Some((view, frames)) => {
                    owned = contiguous(view, "background")?;
                    Some(Background {
                        data: &owned,
                        frames: *frames,
                    })
                }
            };
            crate::render::render(view, &plan, start..stop, bg, &style, buf)
        })?;
        Ok(out)
    }

    /// `numpy.empty(shape, uint8)`: numpy's allocator (huge pages for big arrays) without a zeroing
    /// pass; where the memory is not there, an `AttnmapError` naming `arg` (numpy's `MemoryError`).
    fn empty<'py>(
        py: Python<'py>,
        shape: &[usize],
        arg: &'static str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX);
        let dims = pyo3::types::PyTuple::new(py, shape)?;
        py.import("numpy")?
            .call_method1("empty", (dims, "uint8"))
            .map_err(|e| {
                if e.is_instance_of::<PyMemoryError>(py) {
                    Error::OutOfMemory { arg, bytes }.into()
                } else {
                    e
                }
            })
    }

    /// The elements of `view` in standard (C) order: borrowed when they already are, else copied
    /// into a buffer reserved fallibly (an `OutOfMemory` naming `arg`, never an abort).
    fn contiguous<'a, T: Copy, D: ndarray::Dimension>(
        view: &'a ndarray::ArrayView<'a, T, D>,
        arg: &'static str,
    ) -> crate::Result<Cow<'a, [T]>> {
        if let Some(slice) = view.as_slice() {
            return Ok(Cow::Borrowed(slice));
        }
        let mut owned = Vec::new();
        try_reserve(&mut owned, view.len(), arg)?;
        owned.extend(view.iter().copied());
        Ok(Cow::Owned(owned))
    }

    /// Check a background's shape: (n, H, W, 3) for n frames or a still (H, W, 3).
    fn background_frames<'a>(
        b: &ArrayViewD<'a, u8>,
        n: usize,
        (oh, ow): (usize, usize),
    ) -> PyResult<(ArrayViewD<'a, u8>, usize)> {
        let shape = b.shape();
        let ok = match shape {
            [t, h, w, 3] => (*t == n || *t == 1) && *h == oh && *w == ow,
            [h, w, 3] => *h == oh && *w == ow,
            _ => false,
        };
        if !ok {
            return Err(Error::invalid(
                "background",
                format!("expected uint8 ({n}, {oh}, {ow}, 3) frames or one ({oh}, {ow}, 3) image, got shape {shape:?}"),
            )
            .into());
        }
        let frames = if shape.len() == 4 { shape[0] } else { 1 };
        Ok((b.clone(), frames))
    }

    /// Colour values in [0, 1] (any shape) with a colormap: uint8 (..., 3).
    #[pyfunction]
    #[pyo3(signature = (values, colormap="hot"))]
    fn colorize<'py>(
        py: Python<'py>,
        values: PyReadonlyArrayDyn<'py, f32>,
        colormap: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let table = crate::colormap::table(colormap)?;
        let view = values.as_array();
        let out = py.detach(|| -> crate::Result<_> {
            let flat = contiguous(&view, "values")?;
            let len = flat.len().saturating_mul(3);
            let mut buf = crate::error::try_vec(len, 0u8, "values")?;
            crate::colormap::colorize(&flat, table, &mut buf);
            let mut shape = view.shape().to_vec();
            shape.push(3);
            Ok(ndarray::Array::from_shape_vec(IxDyn(&shape), buf)
                .expect("buffer sized to the shape"))
        })?;
        Ok(out.into_pyarray(py))
    }

    /// The (256, 3) uint8 table of a colormap.
    #[pyfunction]
    fn colormap_table<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let table = crate::colormap::table(name)?;
        let flat: Vec<u8> = table.iter().flatten().copied().collect();
        Ok(Array2::from_shape_vec((256, 3), flat)
            .expect("256 x 3")
            .into_pyarray(py))
    }

    /// RGB frames (n, H, W, 3) uint8, H and W even, to I420 frames (n, H * 3 / 2, W) uint8: the Y plane,
    /// then Cb and Cr (BT.601 limited range, chroma the mean of each 2x2 block), as PyAV's yuv420p takes.
    #[pyfunction]
    fn rgb_to_yuv420<'py>(
        py: Python<'py>,
        frames: PyReadonlyArray4<'py, u8>,
    ) -> PyResult<Bound<'py, PyArray3<u8>>> {
        let view = frames.as_array();
        let (n, h, w, c) = view.dim();
        if c != 3 || !h.is_multiple_of(2) || !w.is_multiple_of(2) || h == 0 || w == 0 {
            return Err(Error::invalid(
                "frames",
                format!(
                    "expected uint8 (n, H, W, 3) with H and W even and positive, got shape {:?}",
                    view.shape()
                ),
            )
            .into());
        }
        let out = empty(py, &[n, h * 3 / 2, w], "frames")?.cast_into::<PyArray3<u8>>()?;
        let buf = unsafe { out.as_slice_mut() }.expect("fresh arrays are contiguous");
        py.detach(|| {
            let owned = contiguous(&view, "frames")?;
            crate::yuv::rgb_to_i420(&owned, n, h, w, buf)
        })?;
        Ok(out)
    }

    /// The CPU kernels' inputs as views of the numpy arrays.
    fn problem<'a>(
        q: &'a PyReadonlyArray4<'_, f32>,
        k: &'a PyReadonlyArray4<'_, f32>,
        bias: &'a Option<PyReadonlyArray3<'_, f32>>,
        lse: &'a Option<PyReadonlyArray3<'_, f32>>,
        scale: f64,
        per_head: bool,
    ) -> crate::groups::Problem<'a> {
        crate::groups::Problem {
            q: q.as_array(),
            k: k.as_array(),
            bias: bias.as_ref().map(|b| b.as_array()),
            lse: lse.as_ref().map(|x| x.as_array()),
            scale: scale as f32,
            per_head,
        }
    }

    /// Attention probabilities summed into key groups, per query row: q (B, H, R, D) and k (B, Hk, Nk, D)
    /// float32, columns (Nk,) int64 (each key's column in 0..num_columns, or -1), bias (B, 1 or H, Nk)
    /// additive float32 or None, lse (B, H, R) float32 each row's logsumexp when the caller has it (then
    /// P = exp(logit - lse), no running max). Returns (B, H or 1, R, num_columns) float32, and with
    /// return_lse a pair of it and each row's logsumexp over the keys (B, H, R).
    #[pyfunction]
    #[pyo3(signature = (q, k, columns, num_columns, *, scale, bias=None, per_head=false, lse=None,
                        return_lse=false))]
    #[allow(clippy::too_many_arguments)]
    fn attention_groups<'py>(
        py: Python<'py>,
        q: PyReadonlyArray4<'py, f32>,
        k: PyReadonlyArray4<'py, f32>,
        columns: PyReadonlyArray1<'py, i64>,
        num_columns: usize,
        scale: f64,
        bias: Option<PyReadonlyArray3<'py, f32>>,
        per_head: bool,
        lse: Option<PyReadonlyArray3<'py, f32>>,
        return_lse: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let groups = crate::groups::Groups::new(columns.as_array(), num_columns)?;
        let problem = problem(&q, &k, &bias, &lse, scale, per_head);
        let (out, rows_lse) =
            py.detach(|| crate::groups::grouped_sums(&problem, &groups, return_lse))?;
        let out = out.into_pyarray(py).into_any();
        match rows_lse {
            Some(l) => Ok((out, l.into_pyarray(py)).into_pyobject(py)?.into_any()),
            None => Ok(out),
        }
    }

    /// One query block's and one key block's number per row and key, and the numbers of each.
    type BlockSpec<'py> = (
        PyReadonlyArray1<'py, i64>,
        PyReadonlyArray1<'py, i64>,
        usize,
        usize,
    );

    /// Exact attention statistics of q (B, H, R, D) and k (B, Hk, Nk, D) float32, bias (B, 1 or H, Nk)
    /// or None, in one pass: a dict with "dense" (B, Hs, R, hi - lo), P over key columns dense = (lo, hi);
    /// "received" (B, Hs, Nk), column sums; "entropy" (B, Hs, R), -sum P ln P per row; "blocks", a
    /// list of (B, Hs, num_row_blocks, num_key_blocks), P summed by (row block, key block) for each
    /// (row_blocks (R,), key_blocks (Nk,), num_row_blocks, num_key_blocks) with -1 for none; and
    /// "distance" (B, Hs, F, H, W), P of the video rows row_start.. and keys key_start.. summed by
    /// (|dt|, |dy|, |dx|), for distance = (row_start, key_start, F, H, W); with return_lse, "lse"
    /// (B, H, R), each row's logsumexp over the keys. Hs is H with per_head, else 1. A given lse
    /// (B, H, R) float32 sets P = exp(logit - lse) (no running max).
    #[pyfunction]
    #[pyo3(signature = (q, k, *, scale, bias=None, per_head=false, dense=None, received=false,
                        entropy=false, blocks=None, distance=None, lse=None, return_lse=false))]
    #[allow(clippy::too_many_arguments)]
    fn attention_stats<'py>(
        py: Python<'py>,
        q: PyReadonlyArray4<'py, f32>,
        k: PyReadonlyArray4<'py, f32>,
        scale: f64,
        bias: Option<PyReadonlyArray3<'py, f32>>,
        per_head: bool,
        dense: Option<(usize, usize)>,
        received: bool,
        entropy: bool,
        blocks: Option<Vec<BlockSpec<'py>>>,
        distance: Option<(usize, usize, usize, usize, usize)>,
        lse: Option<PyReadonlyArray3<'py, f32>>,
        return_lse: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        use crate::stats::{Blocks, Grid, Spec};

        let blocks = blocks.unwrap_or_default();
        let spec = Spec {
            dense: dense.map(|(lo, hi)| lo..hi),
            received,
            entropy,
            blocks: blocks
                .iter()
                .map(|(rows, keys, num_rows, num_keys)| Blocks {
                    rows: rows.as_array(),
                    keys: keys.as_array(),
                    num_rows: *num_rows,
                    num_keys: *num_keys,
                })
                .collect(),
            distance: distance.map(|(row_start, key_start, frames, height, width)| Grid {
                row_start,
                key_start,
                frames,
                height,
                width,
            }),
            lse: return_lse,
        };
        let problem = problem(&q, &k, &bias, &lse, scale, per_head);
        let out = py.detach(|| crate::stats::attention_stats(&problem, &spec))?;
        let dict = PyDict::new(py);
        if let Some(x) = out.dense {
            dict.set_item("dense", x.into_pyarray(py))?;
        }
        if let Some(x) = out.received {
            dict.set_item("received", x.into_pyarray(py))?;
        }
        if let Some(x) = out.entropy {
            dict.set_item("entropy", x.into_pyarray(py))?;
        }
        if !out.blocks.is_empty() {
            let list: Vec<_> = out.blocks.into_iter().map(|x| x.into_pyarray(py)).collect();
            dict.set_item("blocks", list)?;
        }
        if let Some(x) = out.distance {
            dict.set_item("distance", x.into_pyarray(py))?;
        }
        if let Some(x) = out.lse {
            dict.set_item("lse", x.into_pyarray(py))?;
        }
        Ok(dict)
    }

    /// The CPU attention kernels' pool and threads (the OpenMP team torch's operators use, sized by
    /// torch.set_num_threads, where an OpenMP runtime is loaded; else rayon's pool:
    /// RAYON_NUM_THREADS, else one per logical CPU) and the copy of their loops this CPU runs:
    /// {"pool": "openmp" | "rayon", "threads": n, "build": "amx" | "avx512" | "avx2" | "plain",
    /// "builds": every copy this CPU runs, slowest first}.
    #[pyfunction]
    fn kernel_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("pool", crate::pool::pool().name())?;
        dict.set_item("threads", crate::pool::threads())?;
        dict.set_item("build", crate::groups::Build::best().name())?;
        let builds: Vec<&str> = crate::groups::Build::available()
            .iter()
            .map(|b| b.name())
            .collect();
        dict.set_item("builds", builds)?;
        Ok(dict)
    }

    /// Run the CPU attention kernels on rayon's pool even where an OpenMP runtime is loaded
    /// (`rayon_only=True`), or on the OpenMP team where one is (False, the default): for
    /// comparisons of the two.
    #[pyfunction]
    fn set_kernel_pool(rayon_only: bool) {
        crate::pool::set_rayon_only(rayon_only);
    }

    /// Run the CPU attention kernels' copy of their loops named `name` (one this CPU runs:
    /// "plain", "avx2", "avx512", "amx"), or the fastest (None, the default): for comparisons.
    /// attention_stats takes the "amx" build only where its keys fit its memory budget (else
    /// "avx512").
    #[pyfunction]
    #[pyo3(signature = (name=None))]
    fn set_kernel_build(name: Option<&str>) -> PyResult<()> {
        Ok(crate::groups::Build::choose(name)?)
    }

    /// Names of the built-in colormaps.
    #[pyfunction]
    fn colormap_names() -> Vec<&'static str> {
        crate::colormap::names()
    }

    #[pymodule]
    fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("AttnmapError", m.py().get_type::<AttnmapError>())?;
        m.add_function(wrap_pyfunction!(normalize, m)?)?;
        m.add_function(wrap_pyfunction!(resize, m)?)?;
        m.add_function(wrap_pyfunction!(render, m)?)?;
        m.add_function(wrap_pyfunction!(colorize, m)?)?;
        m.add_function(wrap_pyfunction!(colormap_table, m)?)?;
        m.add_function(wrap_pyfunction!(colormap_names, m)?)?;
        m.add_function(wrap_pyfunction!(rgb_to_yuv420, m)?)?;
        m.add_function(wrap_pyfunction!(attention_groups, m)?)?;
        m.add_function(wrap_pyfunction!(attention_stats, m)?)?;
        m.add_function(wrap_pyfunction!(kernel_info, m)?)?;
        m.add_function(wrap_pyfunction!(set_kernel_pool, m)?)?;
        m.add_function(wrap_pyfunction!(set_kernel_build, m)?)?;
        Ok(())
    }
}
