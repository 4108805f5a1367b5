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

/// Reads the tmpfs `mounts` (relative paths) of the container whose root is `root` (sockets',
/// FIFOs' and devices' nodes left out); an error names what could not be read, or that it
/// holds more than children can be given.
pub fn capture(root: &Path, mounts: &[String]) -> Result<Vec<TmpfsContent>, String> {
    let mut budget = Budget::default();
    let mut held = Vec::new();
    for mount in mounts {
        let mut files = Vec::new();
        walk(&root.join(mount), "", &mut files, &mut budget)
            .map_err(|e| format!("/{mount}: {e}"))?;
        // An empty one costs a child nothing.
        if !files.is_empty() {
            held.push(TmpfsContent {
                mount: mount.clone(),
                files,
            });
        }
    }
    Ok(held)
}

#[derive(Default)]
struct Budget {
    entries: usize,
    bytes: usize,
}

fn walk(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<ContainerFile>,
    b: &mut Budget,
) -> Result<(), String> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let md = e.metadata().map_err(|e| format!("{path}: {e}"))?;
        b.entries += 1;
        if b.entries > MAX_CONTAINER_FILES {
            return Err(format!("more than {MAX_CONTAINER_FILES} entries to carry"));
        }
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            ContainerFileKind::Dir
        } else if ft.is_symlink() {
            let target = fs::read_link(e.path()).map_err(|e| format!("{path}: {e}"))?;
            ContainerFileKind::Symlink(target.to_string_lossy().into_owned())
        } else if ft.is_file() {
            let over =
                || format!("more than the {MAX_CONTAINER_FILES_BYTES} bytes children can be given");
            if b.bytes + md.len() as usize > MAX_CONTAINER_FILES_BYTES {
                return Err(over());
            }
            // Counted as read: the file may have grown since its size was.
            let content = fs::read(e.path()).map_err(|e| format!("{path}: {e}"))?;
            b.bytes += content.len();
            if b.bytes > MAX_CONTAINER_FILES_BYTES {
                return Err(over());
            }
            ContainerFileKind::File(content)
        } else {
            // A socket's or FIFO's node means nothing without its object, which stays with
            // the seed; a device node would not open (nodev).
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
            walk(&e.path(), &path, out, b)?;
        }
    }
    Ok(())
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
        let got = capture(from.path(), &["tmp".into()]).unwrap();
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
        assert_eq!(capture(to.path(), &["tmp".into()]).unwrap(), got);
        // Written again over what is there: refused, never followed.
        assert!(restore(to.path(), &got).is_err());
    }

    #[test]
    fn sockets_are_left_out_and_oversized_trees_refused() {
        let from = tempfile::tempdir().unwrap();
        let tmp = from.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(tmp.join("s")).unwrap();
        fs::write(tmp.join("f"), "x").unwrap();
        let got = capture(from.path(), &["tmp".into()]).unwrap();
        let paths: Vec<&str> = got[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["f"]);
        let big = vec![0u8; MAX_CONTAINER_FILES_BYTES + 1];
        fs::write(tmp.join("big"), big).unwrap();
        let err = capture(from.path(), &["tmp".into()]).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
    }
}
