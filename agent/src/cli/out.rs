//! Writing lines to standard output for commands that stream (tail, export): a reader that
//! goes away (a closed pipe, as with `| head`) is a normal end, not an error.
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;

use crate::audit::query::Filter;
use crate::audit::{Reader, StoredRecord};

/// How often a following command looks for new records; well under the 100 ms a user would
/// notice.
pub const FOLLOW_POLL: Duration = Duration::from_millis(50);
/// Records read at a time.
pub const BATCH: usize = 1000;

/// Writes the records from `next` on that `filter` keeps, each as `render` makes it, flushing
/// after every batch and then telling `after_batch` the last sequence number read (export moves
/// its cursor there: only once the lines are out). With `follow`, goes on as the agent writes;
/// ends when standard output's reader goes away.
pub fn stream(
    reader: &Reader,
    mut next: u64,
    follow: bool,
    filter: &Filter,
    render: impl Fn(&StoredRecord) -> String,
    mut after_batch: impl FnMut(u64) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    loop {
        let batch = reader.read_from(next, BATCH)?;
        {
            let mut out = stdout.lock();
            for r in batch.iter().filter(|r| filter.matches(&r.record)) {
                if !line(&mut out, &render(r))? {
                    return Ok(());
                }
            }
            if !flush(&mut out)? {
                return Ok(());
            }
        }
        if let Some(last) = batch.last() {
            next = last.record.seq + 1;
            after_batch(last.record.seq)?;
        }
        if batch.len() == BATCH {
            continue;
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        reader.catch_up()?;
    }
}

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
