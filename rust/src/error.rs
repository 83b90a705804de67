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

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::UnknownColormap(name) => write!(
                f,
                "colormap: unknown colormap {name:?}; expected one of {}",
                crate::colormap::names().join(", ")
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
    fn io_errors_convert() {
        let e: Error = std::io::Error::new(std::io::ErrorKind::NotFound, "gone").into();
        assert!(matches!(e, Error::Io(_)));
        assert!(e.to_string().contains("gone"));
    }
}
