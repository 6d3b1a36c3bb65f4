//! An engine's log file: the engine appends to it directly; this task follows it, turning each
//! line into a tracing event (target `engine`, field `pool`), and keeps it under its size cap by
//! copying it to `<log>.1` and truncating it (the engine opened it O_APPEND, so it simply goes
//! on writing at the new end; lines written during the copy may be lost, as with logrotate's
//! copytruncate).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const POLL: Duration = Duration::from_millis(200);
pub const DEFAULT_LOG_CAP_BYTES: u64 = 16 * 1024 * 1024;

pub async fn follow_log(path: PathBuf, pool: String, cap_bytes: u64, stop: CancellationToken) {
    let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        let len = match std::fs::metadata(&path) {
            Ok(metadata) => metadata.len(),
            Err(_) => continue,
        };
        if len < offset {
            offset = 0;
        }
        if len > offset
            && let Ok(mut file) = std::fs::File::open(&path)
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut bytes = Vec::new();
            // Bounded: never more than the cap in one go.
            let _ = file.take(cap_bytes).read_to_end(&mut bytes);
            offset += bytes.len() as u64;
            partial.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(newline) = partial.find('\n') {
                let line: String = partial.drain(..=newline).collect();
                tracing::info!(target: "engine", pool = %pool, "{}", line.trim_end());
            }
        }
        if len > cap_bytes {
            let rotated = path.with_extension("log.1");
            match std::fs::copy(&path, &rotated).and_then(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|file| file.set_len(0))
            }) {
                Ok(()) => offset = 0,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot rotate engine log")
                }
            }
        }
    }
}
