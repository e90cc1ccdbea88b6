//! Reading an instance's log files for an operator.
//!
//! The shim appends the task's stdout and stderr to `stdout.log` and
//! `stderr.log` in the instance directory (two files: see
//! `runtime::container`). A read returns the last N lines of stdout
//! followed by stderr (N counted over both, stderr's lines last), then,
//! when following, whatever is appended to either file, found by polling.
//! A file that shrinks (rotated or truncated) is read again from its start.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

/// How often a followed log is checked for new data.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Largest chunk sent at once.
const CHUNK: usize = 64 << 10;
/// Chunks buffered for a slow reader.
const CHANNEL_DEPTH: usize = 16;

/// Starts reading the logs in `dir`; see the module docs.
pub async fn open(
    dir: &Path,
    tail_lines: u32,
    follow: bool,
) -> std::io::Result<mpsc::Receiver<Vec<u8>>> {
    let files = [dir.join("stdout.log"), dir.join("stderr.log")];
    let dir_owned = dir.to_path_buf();
    // Where to start in each file, and where the backlog ends.
    let ranges = {
        let files = files.clone();
        tokio::task::spawn_blocking(move || backlog_ranges(&files, tail_lines))
            .await
            .map_err(std::io::Error::other)??
    };
    if !dir_owned.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the instance has no log directory yet",
        ));
    }
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    tokio::spawn(async move {
        let mut positions = [0u64; 2];
        for (i, (start, end)) in ranges.iter().enumerate() {
            positions[i] = *end;
            if send_range(&files[i], *start, *end, &tx).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
            if !dir_owned.is_dir() {
                // The instance was removed: nothing more will come.
                return;
            }
            for (i, file) in files.iter().enumerate() {
                let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                if len < positions[i] {
                    positions[i] = 0;
                }
                if len > positions[i] {
                    if send_range(file, positions[i], len, &tx).await.is_err() {
                        return;
                    }
                    positions[i] = len;
                }
            }
        }
    });
    Ok(rx)
}

/// Sends bytes `start..end` of `path` in chunks; an error means the
/// receiver is gone.
async fn send_range(
    path: &Path,
    start: u64,
    end: u64,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Result<(), ()> {
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos).unwrap_or(CHUNK).min(CHUNK);
        let path_owned = path.to_path_buf();
        let chunk = tokio::task::spawn_blocking(move || read_at(&path_owned, pos, want))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let chunk = match chunk {
            Ok(c) if !c.is_empty() => c,
            // Truncated under us or unreadable: the follow loop re-syncs.
            _ => return Ok(()),
        };
        pos += chunk.len() as u64;
        tx.send(chunk).await.map_err(|_| ())?;
    }
    Ok(())
}

fn read_at(path: &Path, pos: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(pos))?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// `(start, end)` of the backlog in stdout and stderr: all of both for
/// `tail == 0`, else the last `tail` lines of stdout-then-stderr.
fn backlog_ranges(files: &[PathBuf; 2], tail: u32) -> std::io::Result<[(u64, u64); 2]> {
    let len = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    };
    let (out_len, err_len) = (len(&files[0])?, len(&files[1])?);
    if tail == 0 {
        return Ok([(0, out_len), (0, err_len)]);
    }
    let (err_start, err_lines) = tail_start(&files[1], err_len, tail)?;
    let out_start = if err_lines >= tail {
        out_len
    } else {
        tail_start(&files[0], out_len, tail - err_lines)?.0
    };
    Ok([(out_start, out_len), (err_start, err_len)])
}

/// Where the last `want` lines of the first `len` bytes of `path` begin,
/// and how many lines (at most `want`) that range holds. A final line
/// without a newline counts as a line.
pub fn tail_start(path: &Path, len: u64, want: u32) -> std::io::Result<(u64, u32)> {
    if len == 0 || want == 0 {
        return Ok((len, 0));
    }
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((len, 0)),
        Err(e) => return Err(e),
    };
    // Newlines seen, not counting one that ends the data.
    let mut newlines = 0u32;
    let mut end = len;
    let mut buf = vec![0u8; 8192];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            let at = start + i as u64;
            if buf[i] == b'\n' && at != len - 1 {
                newlines += 1;
                if newlines == want {
                    return Ok((at + 1, want));
                }
            }
        }
        end = start;
    }
    Ok((0, newlines + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(data: &[u8], want: u32) -> (Vec<u8>, u32) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, data).unwrap();
        let (start, lines) = tail_start(&p, data.len() as u64, want).unwrap();
        (data[start as usize..].to_vec(), lines)
    }

    #[test]
    fn tails() {
        assert_eq!(tail_of(b"a\nb\nc\n", 2), (b"b\nc\n".to_vec(), 2));
        assert_eq!(tail_of(b"a\nb\nc", 2), (b"b\nc".to_vec(), 2));
        assert_eq!(tail_of(b"a\nb\nc\n", 5), (b"a\nb\nc\n".to_vec(), 3));
        assert_eq!(tail_of(b"", 3), (Vec::new(), 0));
        let big: Vec<u8> = (0..5000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let (t, n) = tail_of(&big, 3);
        assert_eq!(n, 3);
        assert_eq!(t, b"line 4997\nline 4998\nline 4999\n");
    }

    #[tokio::test]
    async fn backlog_is_stdout_then_stderr_and_follow_sees_appends() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stdout.log"), b"o1\no2\no3\n").unwrap();
        std::fs::write(dir.path().join("stderr.log"), b"e1\n").unwrap();
        let mut rx = open(dir.path(), 3, false).await.unwrap();
        let mut all = Vec::new();
        while let Some(c) = rx.recv().await {
            all.extend(c);
        }
        assert_eq!(all, b"o2\no3\ne1\n");

        let mut rx = open(dir.path(), 1, true).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), b"e1\n");
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("stdout.log"))
            .unwrap()
            .write_all(b"later\n")
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"later\n");
    }
}
