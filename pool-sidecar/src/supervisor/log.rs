//! An engine's log file: the engine appends to it directly; this task follows it, turning each
//! line into a tracing event (target `engine`, field `pool`), and keeps it under its size cap by
//! copying it to `<log>.1` and truncating it (the engine opened it O_APPEND, so it simply goes
//! on writing at the new end; lines written during the copy may be lost, as with logrotate's
//! copytruncate).
//!
//! [`LogTail`] is how operators read it (`pool-managerd logs`, the shim's `/pools/{id}/logs`): the
//! last lines, then what is appended, across rotations — a rotation is seen by the file being
//! shorter than what was read, and the part of the old file not yet read is taken from
//! `<log>.1` (a full copy, so at the same offsets) before the new file is read from its start.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

const POLL: Duration = Duration::from_millis(200);
pub const DEFAULT_LOG_CAP_BYTES: u64 = 16 * 1024 * 1024;

/// Longest line kept whole; a longer run without a newline is logged in pieces.
const MAX_LINE: usize = 64 * 1024;

pub async fn follow_log(path: PathBuf, pool: String, cap_bytes: u64, stop: CancellationToken) {
    let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        // File reads and the rotation's copy block: keep them off the async workers.
        let file = path.clone();
        let Ok((bytes, next_offset)) =
            tokio::task::spawn_blocking(move || read_and_rotate(&file, offset, cap_bytes)).await
        else {
            continue;
        };
        offset = next_offset;
        partial.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(newline) = partial.find('\n') {
            let line: String = partial.drain(..=newline).collect();
            tracing::info!(target: "engine", pool = %pool, "{}", line.trim_end());
        }
        if partial.len() > MAX_LINE {
            tracing::info!(target: "engine", pool = %pool, "{}", partial);
            partial.clear();
        }
    }
}

/// New bytes after `offset` (at most one cap's worth), and the offset to read from next time;
/// rotates the file when it is over the cap.
fn read_and_rotate(path: &Path, mut offset: u64, cap_bytes: u64) -> (Vec<u8>, u64) {
    let mut bytes = Vec::new();
    let Ok(metadata) = std::fs::metadata(path) else {
        return (bytes, offset);
    };
    let len = metadata.len();
    if len < offset {
        offset = 0;
    }
    if len > offset
        && let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.take(cap_bytes).read_to_end(&mut bytes);
        offset += bytes.len() as u64;
    }
    if len > cap_bytes {
        let rotated = path.with_extension("log.1");
        match std::fs::copy(path, &rotated).and_then(|_| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| file.set_len(0))
        }) {
            Ok(()) => offset = 0,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot rotate engine log")
            }
        }
    }
    (bytes, offset)
}

/// The most one [`LogTail::read_new`] returns; the rest comes with the next call.
const MAX_READ: u64 = 1024 * 1024;

/// How often a follower looks for new lines.
pub const FOLLOW_POLL: Duration = POLL;

/// Where an operator reading an engine's log has got to (module header).
#[derive(Debug)]
pub struct LogTail {
    path: PathBuf,
    rotated: PathBuf,
    offset: u64,
    /// `<log>.1` as last seen (length, modification time): a change means a rotation.
    rotated_seen: Option<(u64, SystemTime)>,
    partial: Vec<u8>,
}

fn identity(path: &Path) -> Option<(u64, SystemTime)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.len(), metadata.modified().ok()?))
}

/// Bytes of `path` from `from` to its end (at most `limit`).
fn read_range(path: &Path, from: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

impl LogTail {
    /// A tail of the log at `path` with its last `lines` lines (from `<log>.1` too when the
    /// current file holds fewer), positioned at the end.
    pub fn open(path: &Path, lines: usize) -> std::io::Result<(LogTail, Vec<String>)> {
        let rotated = path.with_extension("log.1");
        let length = std::fs::metadata(path)?.len();
        let mut tail = LogTail {
            path: path.to_owned(),
            rotated_seen: identity(&rotated),
            rotated,
            offset: length,
            partial: Vec::new(),
        };
        let start = length.saturating_sub(MAX_READ);
        let mut text = read_range(path, start, length - start)?;
        if start == 0
            && count_lines(&text) < lines
            && let Some((old_length, _)) = tail.rotated_seen
        {
            let old_start = old_length.saturating_sub(MAX_READ);
            if let Ok(mut old) = read_range(&tail.rotated, old_start, old_length - old_start) {
                old.extend_from_slice(&text);
                text = old;
            }
        }
        let mut last = tail.lines_of(&text);
        // An unfinished last line stays for the next read.
        let skip = last.len().saturating_sub(lines);
        last.drain(..skip);
        Ok((tail, last))
    }

    /// The whole lines appended since the last call (across a rotation).
    pub fn read_new(&mut self) -> std::io::Result<Vec<String>> {
        let mut bytes = Vec::new();
        let length = std::fs::metadata(&self.path)?.len();
        if length < self.offset {
            // Truncated. The supervisor truncates only after `<log>.1` holds the whole old file,
            // so a `<log>.1` that changed since the last look has the part not yet read (a
            // `<log>.1` still being copied is never taken for a finished rotation).
            let rotated_now = identity(&self.rotated);
            if rotated_now != self.rotated_seen
                && let Some((old_length, _)) = rotated_now
                && old_length > self.offset
            {
                bytes = read_range(&self.rotated, self.offset, old_length - self.offset)?;
            }
            self.rotated_seen = rotated_now;
            self.offset = 0;
        }
        if length > self.offset {
            let fresh = read_range(&self.path, self.offset, MAX_READ)?;
            self.offset += fresh.len() as u64;
            bytes.extend_from_slice(&fresh);
        }
        Ok(self.lines_of(&bytes))
    }

    /// The whole lines of `bytes` after what was left over; keeps an unfinished last line (cut
    /// into pieces past [`MAX_LINE`]).
    fn lines_of(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(newline) = self.partial.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=newline).collect();
            lines.push(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            );
        }
        if self.partial.len() > MAX_LINE {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
        lines
    }
}

fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&byte| byte == b'\n').count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn append(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|error| panic!("{error}"));
        file.write_all(text.as_bytes())
            .unwrap_or_else(|error| panic!("{error}"));
    }

    #[test]
    fn a_tail_gives_the_last_lines_then_every_new_one_once_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let path = dir.path().join("p.log");
        append(&path, "one\ntwo\nthree\nfour");
        let (mut tail, last) = LogTail::open(&path, 2).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(last, ["two", "three"]);
        append(&path, " and more\nfive\n");
        assert_eq!(
            tail.read_new().unwrap_or_else(|error| panic!("{error}")),
            ["four and more", "five"]
        );
        // Written after the last read, then the file is rotated as the supervisor does it.
        append(&path, "six\n");
        std::fs::copy(&path, path.with_extension("log.1"))
            .unwrap_or_else(|error| panic!("{error}"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_len(0))
            .unwrap_or_else(|error| panic!("{error}"));
        append(&path, "seven\n");
        assert_eq!(
            tail.read_new().unwrap_or_else(|error| panic!("{error}")),
            ["six", "seven"]
        );
        assert!(
            tail.read_new()
                .unwrap_or_else(|error| panic!("{error}"))
                .is_empty()
        );
        append(&path, "eight\n");
        assert_eq!(
            tail.read_new().unwrap_or_else(|error| panic!("{error}")),
            ["eight"]
        );
        // Fewer lines in the new file than asked: the rotated one supplies the rest.
        let (_, last) = LogTail::open(&path, 4).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(last, ["five", "six", "seven", "eight"]);
    }
}
