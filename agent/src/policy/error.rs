//! Errors that point at the offending file, line and column.

use std::{fmt, path::PathBuf};

/// One reason a policy file is rejected, `file:line:column: reason` when
/// the position is known (it is for everything but I/O errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line and column.
    pub position: Option<(usize, usize)>,
    pub reason: String,
}

impl PolicyError {
    pub fn new(file: impl Into<PathBuf>, position: Option<(usize, usize)>, reason: String) -> Self {
        Self {
            file: file.into(),
            position,
            reason,
        }
    }

    pub fn line(&self) -> Option<usize> {
        self.position.map(|(line, _)| line)
    }

    pub fn column(&self) -> Option<usize> {
        self.position.map(|(_, column)| column)
    }

    /// A serde_yaml error, its position moved out of the message.
    pub(super) fn from_yaml(file: impl Into<PathBuf>, error: &serde_yaml::Error) -> Self {
        let message = error.to_string();
        let Some(location) = error.location() else {
            return Self::new(file, None, message);
        };
        // serde_yaml appends " at line L column C"; the position is shown
        // in front instead, compiler style, so drop the first copy of it.
        let suffix = format!(" at line {} column {}", location.line(), location.column());
        let reason = match message.find(&suffix) {
            Some(at) => format!("{}{}", &message[..at], &message[at + suffix.len()..]),
            None => message,
        };
        Self::new(file, Some((location.line(), location.column())), reason)
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => {
                write!(
                    f,
                    "{}:{line}:{column}: {}",
                    self.file.display(),
                    self.reason
                )
            }
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for PolicyError {}

/// Everything wrong with a candidate policy set: at least one error, in
/// file order. One bad file rejects the whole set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<PolicyError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}
