//! Parsing what /proc says about a process.

use std::fs;
use std::io;

use mitosis_descriptor::MmFields;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// The device (major, minor) of the mapped file.
    pub dev: (u32, u32),
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`...); empty for anonymous memory.
    pub name: String,
}

/// Parses the text of /proc/PID/maps.
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(parse_maps_line)
        .collect()
}

fn parse_maps_line(line: &str) -> Result<MapsEntry, String> {
    let bad = || format!("unparsable maps line {line:?}");
    let mut fields = line.splitn(6, ' ');
    let range = fields.next().ok_or_else(bad)?;
    let perms = fields.next().ok_or_else(bad)?.as_bytes();
    let offset = fields.next().ok_or_else(bad)?;
    let dev = fields.next().ok_or_else(bad)?;
    let inode = fields.next().ok_or_else(bad)?;
    let name = fields.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad());
    if perms.len() != 4 {
        return Err(bad());
    }
    let (major, minor) = dev.split_once(':').ok_or_else(bad)?;
    let dev_part = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
    Ok(MapsEntry {
        start: hex(start)?,
        end: hex(end)?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: hex(offset)?,
        dev: (dev_part(major)?, dev_part(minor)?),
        inode: inode.parse().map_err(|_| bad())?,
        name,
    })
}

/// The mm fields exposed in /proc/PID/stat (brk itself is not there; the caller asks the kernel).
pub fn parse_stat_mm(text: &str) -> Result<MmFields, String> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')').ok_or("stat has no command field")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is f[N - 3].
    let field = |n: usize| -> Result<u64, String> {
        f.get(n - 3)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("stat field {n} missing"))
    };
    Ok(MmFields {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk: 0,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    })
}

/// The auxiliary vector as u64 words, trailing AT_NULL pair included.
pub fn parse_auxv(raw: &[u8]) -> Vec<u64> {
    let mut words: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(end) = words.chunks_exact(2).position(|p| p[0] == 0) {
        words.truncate(end * 2 + 2);
    }
    words
}

/// The ids of the threads of `pid`.
pub fn task_ids(pid: i32) -> io::Result<std::collections::BTreeSet<i32>> {
    Ok(fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// The pid tracing the task at `dir` (`/proc/PID` or `/proc/PID/task/TID`), if any.
pub fn tracer_pid_at(dir: &str) -> io::Result<Option<i32>> {
    let status = fs::read_to_string(format!("{dir}/status"))?;
    let tracer = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((tracer != 0).then_some(tracer))
}

/// The size of `pid`'s address space in pages (`total_vm`, the first field of statm).
pub fn vm_pages(pid: i32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    parse_statm_size(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("statm {text:?}")))
}

fn parse_statm_size(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A mapping fork leaves out of the child (VM_DONTCOPY, smaps flag `dc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DontFork {
    pub start: u64,
    pub end: u64,
    pub name: String,
    /// Memory of a kernel object or device (`io`/`pf` flags, an anon_inode file), which no
    /// copy could stand for, rather than memory the process asked fork to skip.
    pub special: bool,
}

/// One mapping of an smaps text and its `VmFlags` (two-letter codes: `dc`, `lo`, `gd`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmapsVma {
    pub start: u64,
    pub end: u64,
    pub name: String,
    pub flags: Vec<String>,
}

impl SmapsVma {
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Every mapping of an smaps text with its flags.
pub fn parse_smaps(smaps: &str) -> Vec<SmapsVma> {
    let mut current: Option<SmapsVma> = None;
    let mut out = Vec::new();
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(mut m) = current.take() {
                m.flags = flags.split_whitespace().map(str::to_string).collect();
                out.push(m);
            }
        } else if let Some((span, rest)) = line.split_once(' ') {
            let range = span.split_once('-').and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((start, end)) = range {
                // perms, offset, dev, inode, then the name (which may hold spaces).
                let name = rest
                    .split_whitespace()
                    .skip(4)
                    .collect::<Vec<_>>()
                    .join(" ");
                current = Some(SmapsVma {
                    start,
                    end,
                    name,
                    flags: Vec::new(),
                });
            }
        }
    }
    out
}

/// The mappings of parsed smaps that fork does not copy.
pub fn dont_fork_of(smaps: &[SmapsVma]) -> Vec<DontFork> {
    smaps
        .iter()
        .filter(|m| m.has("dc"))
        .map(|m| DontFork {
            start: m.start,
            end: m.end,
            name: m.name.clone(),
            special: m.name.starts_with("anon_inode:") || m.has("io") || m.has("pf"),
        })
        .collect()
}

/// `VmLck` of /proc/PID/status in kB: memory the process has locked.
pub fn locked_kib(pid: i32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

/// `pos` and `flags` of an open file description, from /proc/PID/fdinfo/FD.
pub fn parse_fdinfo(text: &str) -> Option<(u64, i32)> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = i32::from_str_radix(v.trim(), 8).ok();
        }
    }
    Some((pos?, flags?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dont_fork_mappings_and_special_ones() {
        let smaps = "\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 \n\
Size:                 16 kB\n\
VmFlags: rd wr mr mw me dc ac sd \n\
7f0000004000-7f0000005000 rw-p 00000000 00:00 0                          [heap]\n\
VmFlags: rd wr mr mw me ac sd \n\
7fa1e401d000-7fa1e401f000 rw-s 00000000 00:10 1038                       anon_inode:[perf_event]\n\
VmFlags: rd wr sh mr mw ms pf io dc de dd \n\
7fb000000000-7fb000001000 rw-s 00000000 00:05 77                         /dev/some dev\n\
VmFlags: rd wr sh mr mw ms io dc \n";
        let found = dont_fork_of(&parse_smaps(smaps));
        let brief: Vec<(u64, &str, bool)> = found
            .iter()
            .map(|m| (m.start, m.name.as_str(), m.special))
            .collect();
        assert_eq!(
            brief,
            [
                (0x7f00_0000_0000, "", false),
                (0x7fa1_e401_d000, "anon_inode:[perf_event]", true),
                (0x7fb0_0000_0000, "/dev/some dev", true),
            ]
        );
        assert_eq!(found[0].end, 0x7f00_0000_4000);
    }

    #[test]
    fn smaps_flags_of_each_mapping() {
        let smaps = "\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 \n\
Locked:               16 kB\n\
VmFlags: rd wr mr mw me lo ac gd \n\
7f0000004000-7f0000006000 r--s 00000000 fe:00 12                         /srv/a file\n\
VmFlags: rd sh mr mw me ms \n";
        let vmas = parse_smaps(smaps);
        assert_eq!(vmas.len(), 2);
        assert!(vmas[0].has("lo") && vmas[0].has("gd") && !vmas[0].has("lf"));
        assert_eq!(vmas[1].name, "/srv/a file");
        assert!(vmas[1].has("mw") && !vmas[1].has("wr"));
        assert!(dont_fork_of(&vmas).is_empty());
    }

    #[test]
    fn statm_size() {
        assert_eq!(
            parse_statm_size("26843 7573 3412 1 0 4870 0\n"),
            Some(26843)
        );
        assert_eq!(parse_statm_size(""), None);
        assert_eq!(parse_statm_size("x 1"), None);
    }

    #[test]
    fn maps_lines() {
        let text = "55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 1234 /usr/bin/cat\n\
                    7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]\n\
                    7f0000000000-7f0000001000 rw-s 00001000 00:05 99 /dev/zero (deleted)\n\
                    7f0000002000-7f0000003000 ---p 00000000 00:00 0 \n";
        let maps = parse_maps(text).unwrap();
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].name, "/usr/bin/cat");
        assert_eq!(
            (maps[0].start, maps[0].end, maps[0].inode),
            (0x55d0c0a00000, 0x55d0c0a02000, 1234)
        );
        assert_eq!(maps[0].dev, (0xfe, 0));
        assert_eq!(maps[2].dev, (0, 5));
        assert!(maps[0].read && !maps[0].write && !maps[0].shared);
        assert_eq!(maps[1].name, "[stack]");
        assert!(maps[2].shared && maps[2].offset == 0x1000);
        assert_eq!(maps[2].name, "/dev/zero (deleted)");
        assert!(!maps[3].read && maps[3].name.is_empty());
        assert!(parse_maps("garbage\n").is_err());
    }

    #[test]
    fn stat_with_spaces_in_comm() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "S".into();
        let text = format!("123 (a b) c) {}", fields.join(" "));
        let mm = parse_stat_mm(&text).unwrap();
        assert_eq!((mm.start_code, mm.end_code, mm.start_stack), (26, 27, 28));
        assert_eq!((mm.start_brk, mm.env_end), (47, 51));
    }

    #[test]
    fn auxv_is_cut_after_null() {
        let words: Vec<u8> = [6u64, 4096, 0, 0, 9, 9]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        assert_eq!(parse_auxv(&words), vec![6, 4096, 0, 0]);
    }

    #[test]
    fn fdinfo() {
        assert_eq!(
            parse_fdinfo("pos:\t42\nflags:\t0100002\nmnt_id:\t1\n"),
            Some((42, 0o100002))
        );
        assert_eq!(parse_fdinfo("nothing"), None);
    }
}
