#[cfg(feature = "python")]
use pyo3::prelude::*;

#[cfg(feature = "python")]
pyo3::create_exception!(attnmap._native, AttnmapError, pyo3::exceptions::PyValueError);

#[cfg(feature = "python")]
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("AttnmapError", m.py().get_type::<AttnmapError>())?;
    Ok(())
}
