//! What a seed's container holds in its own tmpfs mounts (/tmp, /dev/shm, the bundle's), read
//! at prepare and written into each child's fresh container before the child runs: a child
//! finds the files its seed wrote there, as a fork in the same container would.
//!
//! Both sides go through `/proc/PID/root` (the container's own view of its mounts). Nothing is
//! followed: entries are read with `lstat`, and written in order with exclusive creates, so a
//! symlink among them cannot lead a later entry elsewhere.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, lchown};
use std::path::Path;

use mitosis_descriptor::codec::{MAX_CONTAINER_FILES, MAX_CONTAINER_FILES_BYTES};
use mitosis_descriptor::{ContainerFile, ContainerFileKind, TmpfsContent};

/// What [`capture`] read, and what it left out (a path and why: past the bounds, or gone
/// while it was read).
#[derive(Debug, Default)]
pub struct Captured {
    pub tmpfs: Vec<TmpfsContent>,
    pub left_out: Vec<String>,
}

/// Reads the tmpfs `mounts` (relative paths) of the container whose root is `root`, within
/// the descriptor's bounds: what does not fit is left out, not refused (a seed that
/// downloaded a model there and loaded it has children that need its memory, not the file);
/// sockets', FIFOs' and devices' nodes are left out silently (nothing of them would work).
pub fn capture(root: &Path, mounts: &[String]) -> Captured {
    let mut walk = Walk::default();
    for mount in mounts {
        let mut files = Vec::new();
        walk.dir(&root.join(mount), mount, "", &mut files);
        // An empty one costs a child nothing.
        if !files.is_empty() {
            walk.got.tmpfs.push(TmpfsContent {
                mount: mount.clone(),
                files,
            });
        }
    }
    walk.got
}

#[derive(Default)]
struct Walk {
    entries: usize,
    bytes: usize,
    got: Captured,
}

impl Walk {
    fn dir(&mut self, dir: &Path, mount: &str, prefix: &str, out: &mut Vec<ContainerFile>) {
        let mut left_out = |path: &str, why: String| {
            self.got.left_out.push(format!("/{mount}/{path}: {why}"));
        };
        let entries = match fs::read_dir(dir).and_then(|d| d.collect::<Result<Vec<_>, _>>()) {
            Ok(entries) => entries,
            Err(e) => return left_out(prefix, e.to_string()),
        };
        let mut entries = entries;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let Some((kind, md)) = self.kind(&e, &path, mount) else {
                continue;
            };
            let is_dir = kind == ContainerFileKind::Dir;
            out.push(ContainerFile {
                path: path.clone(),
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                kind,
            });
            if is_dir {
                self.dir(&e.path(), mount, &path, out);
            }
        }
    }

    /// What `e` is, with its metadata, if it is carried (its size counted against the
    /// bounds).
    fn kind(
        &mut self,
        e: &fs::DirEntry,
        path: &str,
        mount: &str,
    ) -> Option<(ContainerFileKind, fs::Metadata)> {
        let mut left_out = |why: String| {
            self.got.left_out.push(format!("/{mount}/{path}: {why}"));
            None
        };
        let md = match e.metadata() {
            Ok(md) => md,
            Err(err) => return left_out(err.to_string()),
        };
        if self.entries >= MAX_CONTAINER_FILES {
            return left_out(format!("past {MAX_CONTAINER_FILES} entries"));
        }
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            ContainerFileKind::Dir
        } else if ft.is_symlink() {
            match fs::read_link(e.path()) {
                Ok(t) => ContainerFileKind::Symlink(t.to_string_lossy().into_owned()),
                Err(err) => return left_out(err.to_string()),
            }
        } else if ft.is_file() {
            if self.bytes + md.len() as usize > MAX_CONTAINER_FILES_BYTES {
                return left_out(format!("past {MAX_CONTAINER_FILES_BYTES} bytes"));
            }
            match fs::read(e.path()) {
                Ok(content) => ContainerFileKind::File(content),
                Err(err) => return left_out(err.to_string()),
            }
        } else {
            return None;
        };
        // Counted as read: a file may have grown since its size was.
        let size = match &kind {
            ContainerFileKind::File(c) => c.len(),
            ContainerFileKind::Symlink(t) => t.len(),
            ContainerFileKind::Dir => 0,
        };
        if self.bytes + size > MAX_CONTAINER_FILES_BYTES {
            return left_out(format!("past {MAX_CONTAINER_FILES_BYTES} bytes"));
        }
        self.bytes += size;
        self.entries += 1;
        Some((kind, md))
    }
}

/// Writes `tmpfs` into the container whose root is `root` (a fresh one: every entry is new).
pub fn restore(root: &Path, tmpfs: &[TmpfsContent]) -> io::Result<()> {
    for t in tmpfs {
        let mount = root.join(&t.mount);
        for f in &t.files {
            let path = mount.join(&f.path);
            match &f.kind {
                ContainerFileKind::Dir => fs::DirBuilder::new().mode(0o700).create(&path)?,
                ContainerFileKind::File(content) => fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?
                    .write_all(content)?,
                ContainerFileKind::Symlink(target) => std::os::unix::fs::symlink(target, &path)?,
            }
            lchown(&path, Some(f.uid), Some(f.gid))?;
            if !matches!(f.kind, ContainerFileKind::Symlink(_)) {
                fs::set_permissions(&path, fs::Permissions::from_mode(f.mode))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_read_is_written_back_the_same_and_bounds_are_kept() {
        let from = tempfile::tempdir().unwrap();
        let tmp = from.path().join("tmp");
        fs::create_dir_all(tmp.join("cache/deep")).unwrap();
        fs::write(tmp.join("cache/model.txt"), "weights").unwrap();
        fs::write(tmp.join("cache/deep/x"), "").unwrap();
        fs::set_permissions(
            tmp.join("cache/model.txt"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.join("link")).unwrap();
        let got = capture(from.path(), &["tmp".into()]).tmpfs;
        let paths: Vec<&str> = got[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cache",
                "cache/deep",
                "cache/deep/x",
                "cache/model.txt",
                "link"
            ]
        );

        let to = tempfile::tempdir().unwrap();
        fs::create_dir(to.path().join("tmp")).unwrap();
        restore(to.path(), &got).unwrap();
        let back = to.path().join("tmp");
        assert_eq!(
            fs::read_to_string(back.join("cache/model.txt")).unwrap(),
            "weights"
        );
        let mode = fs::metadata(back.join("cache/model.txt")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            fs::read_link(back.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(capture(to.path(), &["tmp".into()]).tmpfs, got);
        // Written again over what is there: refused, never followed.
        assert!(restore(to.path(), &got).is_err());
    }

    #[test]
    fn sockets_and_what_is_past_the_bounds_are_left_out() {
        let from = tempfile::tempdir().unwrap();
        let tmp = from.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(tmp.join("s")).unwrap();
        fs::write(tmp.join("f"), "x").unwrap();
        let got = capture(from.path(), &["tmp".into(), "gone".into()]);
        let paths: Vec<&str> = got.tmpfs[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["f"]);
        // A mount that is not there is said; nothing of it is carried.
        assert_eq!(got.tmpfs.len(), 1);
        assert_eq!(got.left_out.len(), 1, "{:?}", got.left_out);
        // The big one is left out; the small ones around it still go.
        fs::write(tmp.join("big"), vec![0u8; MAX_CONTAINER_FILES_BYTES + 1]).unwrap();
        fs::write(tmp.join("g"), "y").unwrap();
        let got = capture(from.path(), &["tmp".into()]);
        let paths: Vec<&str> = got.tmpfs[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["f", "g"]);
        assert!(
            got.left_out[0].contains("/tmp/big: past"),
            "{:?}",
            got.left_out
        );
    }
}
