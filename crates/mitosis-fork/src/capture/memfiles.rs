//! Memfds and files deleted while open: no other host has them, so their content travels in
//! the descriptor (bounded: a seed holding more is refused at prepare) and each child gets a
//! memfd in their place. A deleted FIFO is a pipe like any other.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use mitosis_descriptor::codec::{MAX_MEM_FILE, MAX_MEM_FILES};
use mitosis_descriptor::{KernelObject, MemFileOpen};
use mitosis_sys::task;

use super::fds::{Entry, Fds, fd_ref, field, same_files};

/// What a memfd or deleted file's descriptor turned out to be.
pub(super) enum Kind {
    /// A regular file, by (device, inode).
    File((u32, u32), u64),
    /// A FIFO: grouped with pipes by inode.
    Fifo(u64),
}

/// What `e` (a memfd or a deleted file) is, through a copy of the seed's descriptor.
pub(super) fn kind(pidfd: &OwnedFd, e: &Entry) -> Result<Kind, String> {
    let fd = task::steal_fd(pidfd, e.fd).map_err(|e| e.to_string())?;
    let md = std::fs::File::from(fd)
        .metadata()
        .map_err(|e| e.to_string())?;
    let ft = md.file_type();
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        Ok(Kind::Fifo(md.ino()))
    } else if ft.is_file() {
        let dev = (libc::major(md.dev()), libc::minor(md.dev()));
        Ok(Kind::File(dev, md.ino()))
    } else {
        Err("deleted, and neither a regular file nor a FIFO".into())
    }
}

/// Turns each group of descriptors of one file into a [`KernelObject::MemFile`]; records
/// which object each (device, inode) became so its shared mappings can be found.
pub(super) fn capture(
    pid: i32,
    pidfd: &OwnedFd,
    files: BTreeMap<((u32, u32), u64), Vec<Entry>>,
    out: &mut Fds,
) {
    let mut total = 0usize;
    for ((dev, ino), entries) in files {
        let name = name_of(&entries[0].target);
        let content = match read_whole(pidfd, entries[0].fd) {
            Ok((content, _)) if total + content.len() > MAX_MEM_FILES => {
                out.refused.push(format!(
                    "{name} (fd {}): memfds and deleted files hold more than the {MAX_MEM_FILES} bytes carried",
                    entries[0].fd
                ));
                continue;
            }
            Ok((content, seals)) => (content, seals),
            Err(why) => {
                out.refused
                    .push(format!("{name} (fd {}): {why}", entries[0].fd));
                continue;
            }
        };
        total += content.0.len();
        let opens = same_files(pid, entries)
            .into_iter()
            .map(|group| MemFileOpen {
                offset: field(&group[0].info, "pos")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
                fds: group.iter().map(fd_ref).collect(),
            })
            .collect();
        out.mem_files.push((out.objects.len(), dev, ino));
        out.objects.push(KernelObject::MemFile {
            name,
            content: content.0,
            seals: content.1,
            opens,
            mappings: Vec::new(),
        });
    }
}

/// A memfd's name, or a deleted file's path.
fn name_of(target: &str) -> String {
    let t = target.strip_suffix(" (deleted)").unwrap_or(target);
    t.strip_prefix("/memfd:").unwrap_or(t).to_string()
}

/// The whole content of the file at the seed's `fd`, and its seals (0 if it has none).
fn read_whole(pidfd: &OwnedFd, fd: i32) -> Result<(Vec<u8>, u32), String> {
    let file = std::fs::File::from(task::steal_fd(pidfd, fd).map_err(|e| e.to_string())?);
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size > MAX_MEM_FILE as u64 {
        return Err(format!(
            "it holds {size} bytes, more than the {MAX_MEM_FILE} carried"
        ));
    }
    let mut content = vec![0u8; size as usize];
    file.read_exact_at(&mut content, 0)
        .map_err(|e| e.to_string())?;
    // EINVAL for a file that is not a memfd: no seals.
    let seals = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap_or(0);
    Ok((content, seals.max(0) as u32))
}
