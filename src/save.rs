//! Writing message data to disk under safe names: the admin's `mailbox show
//! --save` and the client's received messages. A name from a peer never
//! chooses where a file goes, and nothing already there is overwritten. What
//! the client saves is synced before it acknowledges the message, so a crash
//! or power cut after `done` cannot lose it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes each `(name, bytes)` into `dir` (created if missing) under a safe,
/// unique name, never over an existing file; `reserved` names are taken
/// already. With `sync`, every file and the directory are synced before
/// this returns.
pub fn write_files<'a>(
    dir: &Path,
    files: impl IntoIterator<Item = (String, &'a [u8])>,
    reserved: &[&str],
    sync: bool,
) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut used: HashSet<String> = reserved.iter().map(|name| (*name).to_owned()).collect();
    let mut written = Vec::new();
    for (index, (name, bytes)) in files.into_iter().enumerate() {
        let name = unique_name(&safe_file_name(&name, index), &mut used);
        let path = dir.join(&name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        written.push(path);
    }
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok(written)
}

/// Creates a new directory for one message under `parent`: named after the
/// message id made safe, with `2-`, `3-`… in front when that name is taken
/// (the same id received again after a crash before its `done`).
pub fn new_message_dir(parent: &Path, id: &str) -> io::Result<PathBuf> {
    std::fs::create_dir_all(parent)?;
    let base = safe_file_name(id, 0);
    let mut candidate = base.clone();
    for n in 2.. {
        let path = parent.join(&candidate);
        match std::fs::create_dir(&path) {
            Ok(()) => {
                File::open(parent)?.sync_all()?;
                return Ok(path);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => {
                candidate = format!("{n}-{base}");
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

/// A name made safe as a file name: only `A–Z a–z 0–9 . _ -`, no leading
/// dot, at most 100 characters, never empty.
pub fn safe_file_name(name: &str, index: usize) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_owned();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '_') {
        format!("attachment-{}", index + 1)
    } else {
        cleaned
    }
}

fn unique_name(name: &str, used: &mut HashSet<String>) -> String {
    let mut candidate = name.to_owned();
    let mut n = 2;
    while !used.insert(candidate.clone()) {
        candidate = format!("{n}-{name}");
        n += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_cannot_escape_the_directory() {
        assert_eq!(safe_file_name("../../etc/passwd", 0), "_.._etc_passwd");
        assert_eq!(safe_file_name("..", 3), "attachment-4");
        assert_eq!(safe_file_name(".bashrc", 0), "bashrc");
        assert_eq!(safe_file_name("a b/c\0d😀.txt", 0), "a_b_c_d_.txt");
        assert_eq!(safe_file_name("", 0), "attachment-1");
        assert_eq!(safe_file_name("///", 1), "attachment-2");
        let mut used = HashSet::new();
        assert_eq!(unique_name("a.txt", &mut used), "a.txt");
        assert_eq!(unique_name("a.txt", &mut used), "2-a.txt");
    }

    #[test]
    fn files_keep_clear_of_reserved_and_existing_names() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_files(
            dir.path(),
            [
                ("message.txt".to_owned(), &b"one"[..]),
                ("message.txt".to_owned(), &b"two"[..]),
            ],
            &["message.txt"],
            true,
        )
        .unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["2-message.txt", "3-message.txt"]);
        let first = new_message_dir(dir.path(), "m/1").unwrap();
        let second = new_message_dir(dir.path(), "m/1").unwrap();
        assert_eq!(first.file_name().unwrap(), "m_1");
        assert_eq!(second.file_name().unwrap(), "2-m_1");
    }
}
