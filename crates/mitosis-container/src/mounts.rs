//! A bundle's own mounts: bind mounts of host paths and tmpfs, with their options, made by
//! every container of the bundle (its seed's and each child's) in the order the config lists
//! them, after the standard ones.
//!
//! The options are read as runc reads them: flags (`ro`, `nosuid`, `bind`, `rbind`, ...),
//! propagation (`rprivate`, ...), and anything else is the filesystem's data (`size=64m`). A
//! destination is made inside the rootfs if missing, and a path through a symlink is refused:
//! a rootfs must not point a mount outside itself.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};

use crate::spec::BundleError;

/// One of the config's mounts beyond the standard and listed ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMount {
    /// Absolute, without `..`.
    pub destination: String,
    pub kind: MountKind,
    /// `MsFlags` bits set (`MS_BIND` and `MS_REC` included for a bind mount).
    pub flags: u64,
    /// `MsFlags` propagation bits, applied once mounted (0: none asked).
    pub propagation: u64,
    /// The filesystem's options (a tmpfs's `size=`, `mode=`).
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountKind {
    /// A host path (absolute; a relative source is the bundle directory's).
    Bind {
        source: PathBuf,
    },
    Tmpfs,
}

/// Flags an option sets (`true`) or clears (`false`), as mount(8) and runc name them.
const FLAG_OPTIONS: [(&str, bool, MsFlags); 22] = [
    ("ro", true, MsFlags::MS_RDONLY),
    ("rw", false, MsFlags::MS_RDONLY),
    ("nosuid", true, MsFlags::MS_NOSUID),
    ("suid", false, MsFlags::MS_NOSUID),
    ("nodev", true, MsFlags::MS_NODEV),
    ("dev", false, MsFlags::MS_NODEV),
    ("noexec", true, MsFlags::MS_NOEXEC),
    ("exec", false, MsFlags::MS_NOEXEC),
    ("sync", true, MsFlags::MS_SYNCHRONOUS),
    ("async", false, MsFlags::MS_SYNCHRONOUS),
    ("dirsync", true, MsFlags::MS_DIRSYNC),
    ("noatime", true, MsFlags::MS_NOATIME),
    ("atime", false, MsFlags::MS_NOATIME),
    ("nodiratime", true, MsFlags::MS_NODIRATIME),
    ("diratime", false, MsFlags::MS_NODIRATIME),
    ("relatime", true, MsFlags::MS_RELATIME),
    ("norelatime", false, MsFlags::MS_RELATIME),
    ("strictatime", true, MsFlags::MS_STRICTATIME),
    ("nostrictatime", false, MsFlags::MS_STRICTATIME),
    ("bind", true, MsFlags::MS_BIND),
    ("rbind", true, MsFlags::MS_BIND.union(MsFlags::MS_REC)),
    ("defaults", false, MsFlags::empty()),
];

const PROPAGATION_OPTIONS: [(&str, MsFlags); 8] = [
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

impl UserMount {
    /// Reads one of the config's mounts; `bundle` resolves a relative bind source.
    pub fn parse(
        destination: &Path,
        typ: Option<&str>,
        source: Option<&Path>,
        options: &[String],
        bundle: &Path,
    ) -> Result<UserMount, BundleError> {
        let unsupported = |what: String| Err(BundleError::Unsupported(what));
        let dest = destination.to_string_lossy().into_owned();
        let plain = destination
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !destination.is_absolute() || !plain || destination == Path::new("/") {
            return unsupported(format!(
                "mount destination {dest:?} (an absolute path below / without `..`)"
            ));
        }
        let (mut flags, mut propagation, mut data) = (MsFlags::empty(), MsFlags::empty(), vec![]);
        for option in options {
            if let Some(&(_, set, flag)) = FLAG_OPTIONS.iter().find(|(o, ..)| o == option) {
                flags = if set { flags | flag } else { flags - flag };
            } else if let Some(&(_, flag)) = PROPAGATION_OPTIONS.iter().find(|(o, _)| o == option) {
                propagation |= flag;
            } else {
                data.push(option.as_str());
            }
        }
        let bind = flags.contains(MsFlags::MS_BIND) || typ == Some("bind");
        let kind = if bind {
            let Some(source) = source else {
                return unsupported(format!("mount {dest} binds no source"));
            };
            if !data.is_empty() {
                return unsupported(format!("mount {dest}'s options {data:?} on a bind mount"));
            }
            flags |= MsFlags::MS_BIND;
            MountKind::Bind {
                source: bundle.join(source),
            }
        } else if typ == Some("tmpfs") {
            MountKind::Tmpfs
        } else {
            return unsupported(format!(
                "mount {dest} of type {} (a bundle may add bind and tmpfs mounts)",
                typ.unwrap_or("none")
            ));
        };
        Ok(UserMount {
            destination: dest,
            kind,
            flags: flags.bits(),
            propagation: propagation.bits(),
            data: data.join(","),
        })
    }

    /// Mounts it under `root` (the rootfs, before it becomes `/`).
    pub fn mount_under(&self, root: &Path) -> Result<(), String> {
        let none: Option<&str> = None;
        let at = |e: nix::errno::Errno| format!("mounting {}: {e}", self.destination);
        let flags = MsFlags::from_bits_truncate(self.flags);
        let target = match &self.kind {
            MountKind::Bind { source } => {
                let is_dir = fs::metadata(source)
                    .map_err(|e| {
                        format!(
                            "bind source {} of {}: {e}",
                            source.display(),
                            self.destination
                        )
                    })?
                    .is_dir();
                let target = mount_point(root, &self.destination, is_dir)
                    .map_err(|e| format!("mount point {}: {e}", self.destination))?;
                mount(
                    Some(source),
                    &target,
                    none,
                    flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
                    none,
                )
                .map_err(at)?;
                // A bind mount takes its other flags only when remounted.
                let rest = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
                if !rest.is_empty() {
                    let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest;
                    mount(none, &target, none, remount, none).map_err(at)?;
                }
                target
            }
            MountKind::Tmpfs => {
                let target = mount_point(root, &self.destination, true)
                    .map_err(|e| format!("mount point {}: {e}", self.destination))?;
                let data = (!self.data.is_empty()).then_some(self.data.as_str());
                mount(Some("tmpfs"), &target, Some("tmpfs"), flags, data).map_err(at)?;
                target
            }
        };
        let propagation = MsFlags::from_bits_truncate(self.propagation);
        if !propagation.is_empty() {
            mount(none, &target, none, propagation, none).map_err(at)?;
        }
        Ok(())
    }
}

/// `destination` under `root`, made (a directory, or an empty file for a file's bind mount)
/// where missing; an error if any part of it is a symlink, which could lead out of `root`.
fn mount_point(root: &Path, destination: &str, dir: bool) -> io::Result<PathBuf> {
    let parts: Vec<_> = Path::new(destination)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let mut path = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(io::Error::other(format!(
                    "{} is a symlink in the rootfs",
                    path.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if last && !dir {
                    fs::File::create(&path)?;
                } else {
                    fs::create_dir(&path)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        dest: &str,
        typ: &str,
        source: &str,
        options: &[&str],
    ) -> Result<UserMount, BundleError> {
        let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        UserMount::parse(
            Path::new(dest),
            Some(typ),
            Some(Path::new(source)),
            &options,
            Path::new("/bundles/fn"),
        )
    }

    #[test]
    fn a_read_only_bind_mount_keeps_its_flags_for_the_remount_and_its_source_resolved() {
        let m = parse(
            "/data",
            "none",
            "data",
            &["rbind", "ro", "nosuid", "rprivate"],
        )
        .unwrap();
        assert_eq!(
            m.kind,
            MountKind::Bind {
                source: "/bundles/fn/data".into()
            }
        );
        let want = MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
        assert_eq!(m.flags, want.bits());
        assert_eq!(
            m.propagation,
            (MsFlags::MS_PRIVATE | MsFlags::MS_REC).bits()
        );
        let absolute = parse("/etc/hosts", "bind", "/etc/hosts", &[]).unwrap();
        assert_eq!(
            absolute.kind,
            MountKind::Bind {
                source: "/etc/hosts".into()
            }
        );
    }

    #[test]
    fn a_tmpfs_passes_its_other_options_as_data_and_a_later_option_wins() {
        let m = parse(
            "/scratch",
            "tmpfs",
            "tmpfs",
            &["ro", "rw", "nodev", "size=8m", "mode=1777"],
        )
        .unwrap();
        assert_eq!(m.kind, MountKind::Tmpfs);
        assert_eq!(m.flags, MsFlags::MS_NODEV.bits());
        assert_eq!(m.data, "size=8m,mode=1777");
    }

    #[test]
    fn other_types_relative_or_escaping_destinations_and_bind_data_are_refused() {
        for (dest, typ, options) in [
            ("/mnt", "overlay", &[][..]),
            ("/mnt", "proc", &[][..]),
            ("mnt", "tmpfs", &[][..]),
            ("/mnt/../etc", "tmpfs", &[][..]),
            ("/", "tmpfs", &[][..]),
            ("/mnt", "none", &["bind", "size=1m"][..]),
        ] {
            let refused = parse(dest, typ, "/srv", options);
            assert!(
                matches!(refused, Err(BundleError::Unsupported(_))),
                "{dest} {typ} {options:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_mount_point_is_made_where_missing_and_never_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let dir = mount_point(root.path(), "/a/b", true).unwrap();
        assert!(dir.is_dir());
        let file = mount_point(root.path(), "/a/f", false).unwrap();
        assert!(file.is_file());
        std::os::unix::fs::symlink("/etc", root.path().join("a/out")).unwrap();
        let through = mount_point(root.path(), "/a/out/passwd", false);
        assert!(through.is_err(), "{through:?}");
    }
}
