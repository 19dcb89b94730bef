//! Torn last lines of append-only JSONL files.
//!
//! Every writer appends whole lines (`...\n`) with one write each, so a process killed mid-write,
//! or a full disk, leaves at most one partial line at the end: one without its newline.
//! Appending after it would fuse the next record into it. [`repair_torn_tail`] moves such a
//! line aside to `<file>.torn` (appended there, so nothing is lost) and cuts the file after its
//! last complete line; writers call it before appending, and resume before reading.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What [`repair_torn_tail`] moved aside.
#[derive(Debug, Clone, PartialEq)]
pub struct TornLine {
    pub path: PathBuf,
    pub moved_to: PathBuf,
    pub bytes: u64,
}

impl std::fmt::Display for TornLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: the last line was torn ({} bytes without a newline, left by an interrupted \
             writer); moved it to {} and continued after the last complete line",
            self.path.display(),
            self.bytes,
            self.moved_to.display()
        )
    }
}

/// `<file>.torn` next to `path`.
pub fn torn_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".torn");
    PathBuf::from(name)
}

/// Offset just after the last `\n` of `file` (0 if none), reading backwards in blocks.
fn after_last_newline(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// If `path` ends without a newline, moves its last partial line to `<path>.torn` and truncates
/// `path` after its last complete line. A missing or empty file, or one that ends with a
/// newline, is left alone (None).
pub fn repair_torn_tail(path: &Path) -> std::io::Result<Option<TornLine>> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(None);
    }
    let keep = after_last_newline(&mut file, len)?;
    let mut tail = Vec::with_capacity((len - keep) as usize);
    file.seek(SeekFrom::Start(keep))?;
    file.read_to_end(&mut tail)?;
    let moved_to = torn_path(path);
    let mut torn = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&moved_to)?;
    tail.push(b'\n');
    torn.write_all(&tail)?;
    torn.sync_all()?;
    // Only once the fragment is safe elsewhere is it cut from the file.
    file.set_len(keep)?;
    file.sync_all()?;
    Ok(Some(TornLine {
        path: path.to_path_buf(),
        moved_to,
        bytes: len - keep,
    }))
}

/// [`repair_torn_tail`], printing a warning when it repaired something.
pub fn repair_and_warn(path: &Path) -> crate::Result<()> {
    match repair_torn_tail(path) {
        Ok(Some(t)) => {
            eprintln!("warning: {t}");
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(crate::Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_is_moved_aside_and_complete_lines_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("m.jsonl");
        assert_eq!(repair_torn_tail(&p).unwrap(), None, "missing file");
        std::fs::write(&p, "").unwrap();
        assert_eq!(repair_torn_tail(&p).unwrap(), None, "empty file");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":2}\n").unwrap();
        assert_eq!(repair_torn_tail(&p).unwrap(), None, "clean file");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let t = repair_torn_tail(&p).unwrap().unwrap();
        assert_eq!(t.bytes, 5);
        assert_eq!(t.moved_to, tmp.path().join("m.jsonl.torn"));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        assert_eq!(std::fs::read_to_string(&t.moved_to).unwrap(), "{\"c\":\n");
        assert!(t.to_string().contains("m.jsonl.torn"), "{t}");
        // A file that is one partial line; a second repair appends to the same .torn file.
        std::fs::write(&p, "x".repeat(70_000)).unwrap();
        let t = repair_torn_tail(&p).unwrap().unwrap();
        assert_eq!(t.bytes, 70_000);
        assert_eq!(std::fs::read(&p).unwrap().len(), 0);
        let torn = std::fs::read_to_string(&t.moved_to).unwrap();
        assert_eq!(torn.lines().count(), 2);
    }
}
