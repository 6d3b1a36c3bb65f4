//! An engine's log file: the engine appends to it directly; this task follows it, turning each
//! line into a tracing event (target `engine`, field `pool`), and keeps it under its size cap by
//! copying it to `<log>.1` and truncating it (the engine opened it O_APPEND, so it simply goes
//! on writing at the new end; lines written during the copy may be lost, as with logrotate's
//! copytruncate).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;
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
