//! Syncing sled's own files to the platter after each flush. sled 0.34.7's
//! `flush` writes its log with `pwrite` and then `sync_file_range`, which
//! starts and waits for the write-back of those pages but neither flushes
//! the drive's write cache nor writes the file's metadata (a grown size):
//! after a power cut the last commits can be gone although `flush`
//! returned. It fsyncs only from its background flusher, every 500 ms, and
//! it writes a page too big for the log (a "blob") into a file of its own
//! under `blobs/` with no sync at all. So every flush of the store is
//! followed by `fdatasync` of the log, `fdatasync` of each blob file not
//! synced before and `fsync` of the blob directory when one is new; only
//! then is a commit answered. At open, sled's `conf` file (which it never
//! syncs) and the store directory are synced once.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct Platter {
    log: File,
    blobs: PathBuf,
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl Platter {
    /// For the sled database in `dir`, once sled has opened it. Syncs the
    /// directory itself, so the files sled created in it stay.
    pub fn open(dir: &Path) -> io::Result<Platter> {
        let log = File::open(dir.join("db"))?;
        // sled writes its `conf` (segment size, version) at creation and
        // never syncs it.
        match File::open(dir.join("conf")) {
            Ok(conf) => conf.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        File::open(dir)?.sync_all()?;
        let platter = Platter {
            log,
            blobs: dir.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
        };
        platter.sync()?;
        Ok(platter)
    }

    /// Makes everything sled has written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_blobs()?;
        self.log.sync_data()
    }

    fn sync_blobs(&self) -> io::Result<()> {
        let entries = match fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashSet::new();
        let mut added = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                match File::open(self.blobs.join(&name)) {
                    Ok(file) => file.sync_data()?,
                    // Collected by sled meanwhile: nothing to keep.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                added = true;
            }
            present.insert(name);
        }
        if added {
            File::open(&self.blobs)?.sync_all()?;
        }
        // Forget the names sled has collected, so the set stays as small as
        // the directory.
        *synced = present;
        Ok(())
    }
}
