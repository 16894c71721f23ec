//! Writing lines to standard output for commands that stream (tail, export): a reader that
//! goes away (a closed pipe, as with `| head`) is a normal end, not an error.
use std::io::Write;

use anyhow::Context as _;

/// Writes one line; false when the reader has gone.
pub fn line(out: &mut impl Write, text: &str) -> anyhow::Result<bool> {
    gone_is_false(writeln!(out, "{text}"))
}

/// Flushes; false when the reader has gone.
pub fn flush(out: &mut impl Write) -> anyhow::Result<bool> {
    gone_is_false(out.flush())
}

fn gone_is_false(r: std::io::Result<()>) -> anyhow::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to standard output"),
    }
}
