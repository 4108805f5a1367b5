//! Finding the cgroup mounts, v1 hierarchies and the v2 tree, in /proc/self/mountinfo.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::common::{CONTROLLERS, CgroupError, Version};
use super::v2;

pub(super) const MOUNTINFO: &str = "/proc/self/mountinfo";

/// A cgroup mount from mountinfo; for v2, `controllers` is filled from its cgroup.controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CgMount {
    pub(super) version: Version,
    pub(super) path: PathBuf,
    pub(super) controllers: Vec<&'static str>,
    pub(super) writable: bool,
}

/// This process's cgroup mounts.
pub(super) fn read() -> Result<Vec<CgMount>, CgroupError> {
    let text = fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Read {
        path: MOUNTINFO.into(),
        source,
    })?;
    Ok(mounts(&text))
}

/// The cgroup mounts in mountinfo `text`, v2 ones with the controllers their root offers.
pub(super) fn mounts(text: &str) -> Vec<CgMount> {
    let mut mounts = parse(text);
    for m in mounts.iter_mut().filter(|m| m.version == Version::V2) {
        m.controllers = fs::read_to_string(m.path.join("cgroup.controllers"))
            .map(|t| v2::parse_controllers(&t))
            .unwrap_or_default();
    }
    mounts
}

/// The cgroup mounts in mountinfo `text`, v2 ones without controllers.
pub(super) fn parse(text: &str) -> Vec<CgMount> {
    text.lines().filter_map(parse_line).collect()
}

/// `id parent maj:min root mountpoint options [optional...] - fstype source superoptions`
fn parse_line(line: &str) -> Option<CgMount> {
    let mut it = line.split(' ');
    let mountpoint = it.nth(4)?;
    let options = it.next()?;
    while it.next()? != "-" {}
    let fstype = it.next()?;
    let _source = it.next()?;
    let super_options = it.next().unwrap_or("");
    let version = match fstype {
        "cgroup" => Version::V1,
        "cgroup2" => Version::V2,
        _ => return None,
    };
    let ro = |opts: &str| opts.split(',').any(|o| o == "ro");
    let controllers = match version {
        // v1 names its controllers among the superblock options ("rw,cpu,cpuacct").
        Version::V1 => CONTROLLERS
            .into_iter()
            .filter(|c| super_options.split(',').any(|o| o == *c))
            .collect(),
        Version::V2 => Vec::new(),
    };
    Some(CgMount {
        version,
        path: PathBuf::from(OsStr::from_bytes(&unescape(mountpoint))),
        controllers,
        writable: !ro(options) && !ro(super_options),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Mounts that could provide `controller`, best first: writable v1 mounts carrying it, then
/// writable v2 mounts listing it.
pub(super) fn candidates<'a>(mounts: &'a [CgMount], controller: &str) -> Vec<(Version, &'a Path)> {
    let usable = |version| {
        mounts
            .iter()
            .filter(move |m| m.version == version && m.writable)
            .filter(|m| m.controllers.contains(&controller))
            .map(|m| (m.version, m.path.as_path()))
    };
    usable(Version::V1).chain(usable(Version::V2)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::test_util::TmpDir;

    /// The first candidate for each controller, as "controller version path".
    fn chosen(mounts: &[CgMount]) -> Vec<String> {
        CONTROLLERS
            .iter()
            .filter_map(|c| {
                let (v, p) = candidates(mounts, c).into_iter().next()?;
                Some(format!("{c} {v} {}", p.display()))
            })
            .collect()
    }

    /// CentOS 7 / RHEL 7: v1 only, cpu comounted with cpuacct.
    const V1_ONLY: &str = "\
18 60 0:17 / /sys rw,nosuid,nodev,noexec,relatime shared:6 - sysfs sysfs rw
24 18 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:7 - tmpfs tmpfs ro,mode=755
25 24 0:21 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
28 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
29 24 0:25 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
33 24 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
60 1 253:0 / / rw,relatime shared:1 - xfs /dev/mapper/centos-root rw,attr2,inode64,noquota
";

    #[test]
    fn parses_v1_only() {
        let found = parse(V1_ONLY);
        assert_eq!(found.len(), 4);
        assert!(found.iter().all(|m| m.version == Version::V1 && m.writable));
        assert!(found[0].controllers.is_empty()); // name=systemd
        assert_eq!(
            found[1],
            CgMount {
                version: Version::V1,
                path: "/sys/fs/cgroup/cpu,cpuacct".into(),
                controllers: vec!["cpu"],
                writable: true,
            }
        );
        assert_eq!(
            chosen(&found),
            vec![
                "memory v1 /sys/fs/cgroup/memory",
                "cpu v1 /sys/fs/cgroup/cpu,cpuacct",
                "pids v1 /sys/fs/cgroup/pids",
            ]
        );
        // Nothing to read for v1: the same without the filesystem.
        assert_eq!(mounts(V1_ONLY), parse(V1_ONLY));
    }

    #[test]
    fn parses_v2_only() {
        let root = TmpDir::with_files("mountinfo-v2", &[]);
        std::fs::write(
            root.0.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        // Ubuntu 22.04: the unified tree alone, here mounted on the temporary directory.
        let text = format!(
            "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / {} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
",
            root.0.display()
        );
        let found = mounts(&text);
        assert_eq!(
            found,
            vec![CgMount {
                version: Version::V2,
                path: root.0.clone(),
                controllers: vec!["memory", "cpu", "pids"],
                writable: true,
            }]
        );
        let at = root.0.display();
        assert_eq!(
            chosen(&found),
            vec![
                format!("memory v2 {at}"),
                format!("cpu v2 {at}"),
                format!("pids v2 {at}")
            ]
        );
        // Without its cgroup.controllers (e.g. unreadable) a v2 mount serves nothing.
        assert_eq!(
            mounts(&text.replace(&at.to_string(), "/nonexistent"))[0]
                .controllers
                .len(),
            0
        );
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_hybrid() {
        let mut mounts = parse(HYBRID);
        assert_eq!(mounts.len(), 6);
        assert_eq!(
            mounts[0],
            CgMount {
                version: Version::V1,
                path: "/sys/fs/cgroup/cpu".into(),
                controllers: vec!["cpu"],
                writable: true,
            }
        );
        assert!(mounts[1].controllers.is_empty()); // cpuacct alone is not cpu
        assert!(mounts[4].controllers.is_empty()); // name=systemd
        assert_eq!(mounts[5].version, Version::V2);
        mounts[5].controllers = v2::parse_controllers("hugetlb\n");
        assert_eq!(
            chosen(&mounts),
            vec![
                "memory v1 /sys/fs/cgroup/memory",
                "cpu v1 /sys/fs/cgroup/cpu",
                "pids v1 /sys/fs/cgroup/pids",
            ]
        );
        // Even a v2 tree that has them all comes second to v1.
        mounts[5].controllers = v2::parse_controllers("memory cpu pids");
        assert_eq!(
            candidates(&mounts, "pids"),
            vec![
                (Version::V1, Path::new("/sys/fs/cgroup/pids")),
                (Version::V2, Path::new("/sys/fs/cgroup/unified"))
            ]
        );
    }

    #[test]
    fn parses_v2_comounted_readonly_and_escaped() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
50 24 0:40 / /cg/cpu,cpuacct rw,relatime shared:20 - cgroup cgroup rw,cpu,cpuacct
51 24 0:41 / /cg/pids ro,relatime - cgroup cgroup rw,pids
52 24 0:42 / /cg/my\\040mem rw,relatime - cgroup cgroup rw,memory
53 24 0:43 / /cg/both rw,relatime master:3 - cgroup cgroup ro,memory,pids
60 24 0:50 / /proc rw - proc proc rw
";
        let mut mounts = parse(text);
        assert_eq!(mounts.len(), 5);
        mounts[0].controllers =
            v2::parse_controllers("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(mounts[1].path, Path::new("/cg/cpu,cpuacct"));
        assert_eq!(mounts[1].controllers, vec!["cpu"]);
        assert!(!mounts[2].writable);
        assert_eq!(mounts[3].path, Path::new("/cg/my mem"));
        // Read-only in the superblock options is read-only too.
        assert_eq!(mounts[4].controllers, vec!["memory", "pids"]);
        assert!(!mounts[4].writable);
        assert_eq!(
            candidates(&mounts, "cpu"),
            vec![
                (Version::V1, Path::new("/cg/cpu,cpuacct")),
                (Version::V2, Path::new("/sys/fs/cgroup"))
            ]
        );
        // The read-only v1 pids mounts are skipped for v2.
        assert_eq!(
            candidates(&mounts, "pids"),
            vec![(Version::V2, Path::new("/sys/fs/cgroup"))]
        );
        assert_eq!(
            candidates(&mounts, "memory")[0],
            (Version::V1, Path::new("/cg/my mem"))
        );
        mounts.retain(|m| m.version == Version::V2);
        assert_eq!(
            chosen(&mounts),
            vec![
                "memory v2 /sys/fs/cgroup",
                "cpu v2 /sys/fs/cgroup",
                "pids v2 /sys/fs/cgroup",
            ]
        );
    }

    #[test]
    fn skips_malformed_lines() {
        let text = "\
garbage
1 2 3:4 / /x rw - cgroup
1 2 3:4 / /y rw no-separator cgroup cgroup rw,memory
1 2 3:4 / /z rw - cgroup cgroup
";
        // A line cut before its source is dropped; one without superblock options is kept.
        let mounts = parse(text);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].path, Path::new("/z"));
        assert!(mounts[0].controllers.is_empty());
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape(r"/a\040b\134c\011"), b"/a b\\c\t");
        assert_eq!(unescape(r"/trailing\04"), b"/trailing\\04");
    }
}
