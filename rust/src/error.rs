//! The one error type of the render core.

use std::fmt;

/// Everything that can go wrong in the render core; the bindings turn it into `AttnmapError`
/// (a `ValueError`) or `OSError`.
#[derive(Debug)]
pub enum Error {
    /// An argument has the wrong shape, size or value: `arg` names it, `msg` says what was expected.
    InvalidArgument { arg: &'static str, msg: String },
    /// A colormap name that is not one of the built-in tables.
    UnknownColormap(String),
    /// The memory for a buffer is not there: `arg` names the argument that sized it, `bytes` the
    /// request (`usize::MAX` when the size itself overflows).
    OutOfMemory { arg: &'static str, bytes: usize },
    /// An I/O failure.
    Io(std::io::Error),
}

/// Shorthand for results of the render core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidArgument`] naming `arg`.
    pub fn invalid(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            msg: msg.into(),
        }
    }
}

/// `len` copies of `value` in a vector whose memory was reserved fallibly: where the allocator (or
/// the size arithmetic) fails, an [`Error::OutOfMemory`] naming `arg` instead of an abort.
pub fn try_vec<T: Clone>(len: usize, value: T, arg: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve(&mut v, len, arg)?;
    v.resize(len, value);
    Ok(v)
}

/// Reserve room for `additional` more elements of `v` fallibly (see [`try_vec`]).
///
/// A large request (256 MiB or more) that exceeds the memory the system has available is refused
/// too: with overcommit the allocator would grant it, and filling it would get the process killed.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize, arg: &'static str) -> Result<()> {
    let bytes = additional.saturating_mul(std::mem::size_of::<T>());
    let refused = Error::OutOfMemory { arg, bytes };
    if bytes >= LARGE && available_memory().is_some_and(|free| bytes as u64 > free) {
        return Err(refused);
    }
    v.try_reserve_exact(additional).map_err(|_| refused)
}

/// Requests from this size on are checked against [`available_memory`].
const LARGE: usize = 1 << 28;

/// The bytes the system can still give without swapping (Linux: `MemAvailable` plus free swap, from
/// `/proc/meminfo`); None where that is not known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib.saturating_mul(1024))
    };
    Some(field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0)))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::UnknownColormap(name) => write!(
                f,
                "colormap: unknown colormap {name:?}; expected one of {}",
                crate::colormap::names().join(", ")
            ),
            Error::OutOfMemory { arg, bytes } if *bytes == usize::MAX => {
                write!(f, "{arg}: the buffer it asks for exceeds the address space")
            }
            Error::OutOfMemory { arg, bytes } => write!(
                f,
                "{arg}: cannot allocate {bytes} bytes ({:.1} GiB) for it",
                *bytes as f64 / (1u64 << 30) as f64
            ),
            Error::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_argument() {
        let e = Error::invalid("alpha", "expected a value in [0, 1], got 2");
        assert_eq!(e.to_string(), "alpha: expected a value in [0, 1], got 2");
        let e = Error::UnknownColormap("nope".into());
        let s = e.to_string();
        assert!(s.starts_with("colormap: unknown colormap \"nope\""));
        assert!(s.contains("viridis") && s.contains("RdBu_r"));
    }

    #[test]
    fn failed_allocations_are_errors() {
        let e = try_vec(usize::MAX / 2, 0u64, "size").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { arg: "size", .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "size: the buffer it asks for exceeds the address space"
        );
        let e = try_vec(1usize << 60, 0u8, "num_frames").unwrap_err();
        assert_eq!(
            e.to_string(),
            "num_frames: cannot allocate 1152921504606846976 bytes (1073741824.0 GiB) for it"
        );
        assert_eq!(try_vec(3, 7u8, "size").unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn requests_beyond_the_available_memory_are_refused_not_granted() {
        let Some(free) = available_memory() else {
            return;
        }; // not Linux: nothing to compare with
        assert!(free > 0);
        let too_much = usize::try_from(free).unwrap_or(usize::MAX / 2) / 4 * 2 + 1; // f32s: 2x free
        let e = try_vec(too_much, 0.0f32, "num_columns").unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutOfMemory {
                    arg: "num_columns",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("num_columns: cannot allocate"),
            "{e}"
        );
        assert_eq!(try_vec(1 << 20, 0u8, "size").unwrap().len(), 1 << 20); // a small one is granted
    }

    #[test]
    fn io_errors_convert() {
        let e: Error = std::io::Error::new(std::io::ErrorKind::NotFound, "gone").into();
        assert!(matches!(e, Error::Io(_)));
        assert!(e.to_string().contains("gone"));
    }
}
