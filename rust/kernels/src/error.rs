use std::fmt;

/// Why a kernel refused to run. The Python layer validates first; this is the last line
/// of defence so a bad call can never read or write out of bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length does not match the dimensions it was passed with.
    Length {
        name: &'static str,
        expected: usize,
        got: usize,
    },
    /// An argument is outside what the op accepts.
    Argument(String),
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Length {
                name,
                expected,
                got,
            } => write!(
                f,
                "buffer `{name}` has {got} elements, the dimensions need {expected}"
            ),
            KernelError::Argument(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for KernelError {}

/// Checks that `buf` holds exactly `expected` elements.
pub fn check_len<T>(name: &'static str, buf: &[T], expected: usize) -> Result<(), KernelError> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            name,
            expected,
            got: buf.len(),
        })
    }
}
