//! An export's persisted position (`STATE_DIR/cursors/NAME`): the last record sent on the
//! first line, the last checkpoint sent on the second. Replaced atomically, and only after the
//! destination took what it names: at least once.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::ExportError;
use super::feed::Position;

#[derive(Debug, Clone)]
pub struct Cursor {
    path: Option<PathBuf>,
}

/// The folder cursors live in.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cursors")
}

impl Cursor {
    /// The cursor NAME of `state_dir` (letters, digits, `-`, `_`).
    pub fn named(state_dir: &Path, name: &str) -> Result<Self, ExportError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ExportError::Cursor {
                path: dir(state_dir).join(name),
                why: format!("cursor names are letters, digits, `-` and `_`: `{name}` is not one"),
            });
        }
        Ok(Cursor {
            path: Some(dir(state_dir).join(name)),
        })
    }

    /// No cursor: every export starts at the beginning, and nothing is remembered.
    pub fn none() -> Self {
        Cursor { path: None }
    }

    pub fn load(&self) -> Result<Position, ExportError> {
        let Some(path) = &self.path else {
            return Ok(Position::default());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Position::default()),
            Err(e) => {
                return Err(ExportError::Cursor {
                    path: path.clone(),
                    why: e.to_string(),
                });
            }
        };
        parse(&text).ok_or_else(|| ExportError::Cursor {
            path: path.clone(),
            why: "damaged; remove it to export from the start again".into(),
        })
    }

    /// Replaces the cursor: a crash leaves the old value or the new one.
    pub fn store(&self, pos: Position) -> Result<(), ExportError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |why: String| ExportError::Cursor {
            path: path.clone(),
            why,
        };
        let dir = path.parent().expect("cursor paths have a folder");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(e.to_string()))?;
        write!(f, "{}\n{}\n", pos.record, pos.checkpoint).map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }
}

/// The first line is the record, the second (absent in older cursors) the checkpoint.
pub fn parse(text: &str) -> Option<Position> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let record = lines.next()?.parse().ok()?;
    let checkpoint = match lines.next() {
        Some(l) => l.parse().ok()?,
        None => 0,
    };
    Some(Position { record, checkpoint })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_old_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cursor::named(dir.path(), "fleet").unwrap();
        assert_eq!(c.load().unwrap(), Position::default());
        let p = Position {
            record: 42,
            checkpoint: 40,
        };
        c.store(p).unwrap();
        assert_eq!(c.load().unwrap(), p);
        assert_eq!(
            parse("17\n"),
            Some(Position {
                record: 17,
                checkpoint: 0
            })
        );
        assert_eq!(parse("x"), None);
        assert!(Cursor::named(dir.path(), "../etc").is_err());
    }
}
