//! Large message data in files of its own, one per message, beside the
//! database. sled keeps values inside its B-tree leaves and rewrites a
//! whole leaf (up to sixteen values) when it consolidates one, so a 16 MiB
//! message there could cost hundreds of MiB of writes and of transient
//! disk space. A file is written once, read once per receive and unlinked
//! once; the database only records that the file exists.
//!
//! Order of durability: a file is written and synced, with its directory,
//! before the database batch that names it, so a record never outlives a
//! crash without its file. A file is unlinked only after the flush that
//! made its removal durable, so a crash in between leaves an orphan file,
//! which the next open deletes.
//!
//! A file may be written ahead of its record ([`Spool::stage`]), on the
//! thread that read the message, so that the mailbox actor, which writes
//! the records of every send, never waits for a large file to reach the
//! disk. A staged file is not an orphan until the [`StagedData`] that names
//! it is dropped unrecorded, which unlinks it.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Data of at least this many bytes goes to a spool file.
pub const SPOOL_FROM_BYTES: usize = 64 * 1024;

/// The spool directory of one store.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Files whose removal waits for the next flush.
    unlink_after_flush: Mutex<Vec<u64>>,
    /// Files written ahead of their record, not recorded yet.
    staged: Mutex<HashSet<u64>>,
}

/// The data of a message written into the spool ahead of its record. If it
/// is dropped before the record is written (the send was refused, or never
/// reached the mailbox), its file is unlinked.
#[derive(Debug)]
pub struct StagedData {
    seq: u64,
    len: u64,
    spool: Arc<Spool>,
}

impl StagedData {
    /// The message number the file is named by, which its record must use.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes of data.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// The data, read back whole.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        self.spool.read(self.seq)
    }
}

impl Drop for StagedData {
    fn drop(&mut self) {
        if self.spool.staged().remove(&self.seq) {
            self.spool.unlink(&[self.seq]);
        }
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`.
    pub fn open(dir: PathBuf) -> io::Result<Spool> {
        fs::create_dir_all(&dir)?;
        Ok(Spool {
            dir,
            unlink_after_flush: Mutex::new(Vec::new()),
            staged: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}"))
    }

    /// Where the data of `seq` is (for messages about it).
    pub fn path_of(&self, seq: u64) -> PathBuf {
        self.path(seq)
    }

    /// Writes the data of message `seq` and makes it durable. On failure
    /// (a full disk) nothing is left behind.
    pub fn write(&self, seq: u64, data: &[u8]) -> io::Result<()> {
        let path = self.path(seq);
        let written = write_synced(&path, data).and_then(|()| sync_dir(&self.dir));
        if written.is_err() {
            let _ = fs::remove_file(&path);
        }
        written
    }

    /// Writes the data of message `seq` ahead of its record and makes it
    /// durable; until [`Spool::recorded`], the file is not an orphan.
    pub fn stage(self: &Arc<Self>, seq: u64, data: &[u8]) -> io::Result<StagedData> {
        // Marked before the file exists: a reconciliation listing the
        // directory meanwhile must not take it for an orphan.
        self.staged().insert(seq);
        let staged = StagedData {
            seq,
            len: data.len() as u64,
            spool: self.clone(),
        };
        // On failure, dropping `staged` removes what was written.
        self.write(seq, data)?;
        Ok(staged)
    }

    /// The record naming staged file `seq` is written: it is no longer the
    /// [`StagedData`]'s to unlink.
    pub fn recorded(&self, seq: u64) {
        self.staged().remove(&seq);
    }

    /// The files written ahead of their record now.
    pub fn staged_now(&self) -> HashSet<u64> {
        self.staged().clone()
    }

    fn staged(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read(&self, seq: u64) -> io::Result<Vec<u8>> {
        fs::read(self.path(seq))
    }

    /// The file of message `seq`, open for reading, and its length.
    pub fn open_data(&self, seq: u64) -> io::Result<(File, u64)> {
        let file = File::open(self.path(seq))?;
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    /// Unlinks the file of `seq` once the next flush has completed.
    pub fn remove_after_flush(&self, seq: u64) {
        self.pending().push(seq);
    }

    /// The removals a flush that starts now covers.
    pub fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pending())
    }

    /// Unlinks files whose removal is durable.
    pub fn unlink(&self, seqs: &[u64]) {
        for &seq in seqs {
            match fs::remove_file(self.path(seq)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("could not remove spool file {seq:016x}: {e}"),
            }
        }
    }

    /// The message numbers that have a file, in no particular order;
    /// names that are not spool files are skipped with a warning.
    pub fn list(&self) -> io::Result<Vec<u64>> {
        let mut seqs = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let parsed = name
                .to_str()
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            match parsed {
                Some(seq) => seqs.push(seq),
                None => log::warn!("stray file {name:?} in the spool directory left alone"),
            }
        }
        Ok(seqs)
    }

    /// Copies the file of `seq` into another spool, synced.
    pub fn copy_to(&self, seq: u64, other: &Spool) -> io::Result<()> {
        write_synced(&other.path(seq), &self.read(seq)?)
    }

    /// Syncs the directory after copies into it.
    pub fn sync(&self) -> io::Result<()> {
        sync_dir(&self.dir)
    }

    fn pending(&self) -> MutexGuard<'_, Vec<u64>> {
        self.unlink_after_flush
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(data)?;
    file.sync_data()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
