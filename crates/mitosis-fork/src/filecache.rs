//! File identities (size + BLAKE3 of the content), cached per file version.
//!
//! Hashing a 30 MiB library takes tens of milliseconds, so each host hashes a given file
//! version once: the cache key is (device, inode, size, mtime, ctime).

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use mitosis_descriptor::FileIdentity;

type Key = (u64, u64, u64, i64, i64, i64, i64);

#[derive(Default)]
pub struct FileCache {
    hashes: Mutex<HashMap<Key, [u8; 32]>>,
}

impl FileCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity of the open `file`, reported under `path`.
    pub fn identify(&self, file: &File, path: &str) -> io::Result<FileIdentity> {
        let md = file.metadata()?;
        if let Some(id) = self.known(&md, path) {
            return Ok(id);
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file)?;
        let hash = *hasher.finalize().as_bytes();
        self.hashes
            .lock()
            .expect("file cache lock")
            .insert(key_of(&md), hash);
        Ok(FileIdentity {
            path: path.into(),
            size: md.size(),
            hash,
        })
    }

    /// The identity of the file version `md` describes, if this host has hashed it.
    pub fn known(&self, md: &Metadata, path: &str) -> Option<FileIdentity> {
        let hash = *self
            .hashes
            .lock()
            .expect("file cache lock")
            .get(&key_of(md))?;
        Some(FileIdentity {
            path: path.into(),
            size: md.size(),
            hash,
        })
    }

    /// True if this host has a file at `path` (`want.path` as this host sees it) with the
    /// same size and content. A file version seen before costs one stat.
    pub fn is_identical(&self, want: &FileIdentity, path: &Path) -> bool {
        let have = match std::fs::metadata(path) {
            Ok(md) if md.size() != want.size => return false,
            Ok(md) => self.known(&md, &want.path),
            Err(_) => return false,
        };
        let have = match have {
            Some(id) => Ok(id),
            None => File::open(path).and_then(|f| self.identify(&f, &want.path)),
        };
        have.is_ok_and(|have| have == *want)
    }
}

fn key_of(md: &Metadata) -> Key {
    (
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn identical_only_when_content_matches() {
        let dir = std::env::temp_dir().join(format!("mitosis-filecache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"hello").unwrap();
        let cache = FileCache::new();
        let p = path.to_str().unwrap();
        let id = cache.identify(&File::open(&path).unwrap(), p).unwrap();
        assert!(cache.is_identical(&id, Path::new(&id.path)));
        // Same size, other content: a new mtime/ctime makes a new cache key.
        std::thread::sleep(std::time::Duration::from_millis(10));
        File::create(&path).unwrap().write_all(b"jello").unwrap();
        assert!(!cache.is_identical(&id, Path::new(&id.path)));
        std::fs::remove_file(&path).unwrap();
        assert!(!cache.is_identical(&id, Path::new(&id.path)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
