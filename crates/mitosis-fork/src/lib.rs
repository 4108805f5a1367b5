//! The remote-fork primitive: capture a running process as a seed ([`prepare`]), and rebuild it
//! as a child on any host ([`restore`]) whose missing pages arrive through the [`fault`] path.

pub mod capture;
pub mod fault;
pub mod filecache;
mod flatten;
pub mod pending;
pub mod prepare;
pub mod procfs;
pub mod regs;
pub mod replica_pages;
pub mod restore;
pub mod source;

pub use filecache::FileCache;
pub use prepare::{PrepareError, Prepared, Twin, prepare};
pub use source::{PageSource, SourceError, TwinSource};

/// BLAKE3 of this process's vDSO text: children check they run on the same vDSO as the seed.
pub fn local_vdso_hash() -> std::io::Result<[u8; 32]> {
    let maps = procfs::parse_maps(&std::fs::read_to_string("/proc/self/maps")?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no vDSO"))?;
    // SAFETY: the [vdso] mapping of our own process is readable for its whole length and never unmapped while we run.
    let text = unsafe {
        std::slice::from_raw_parts(vdso.start as *const u8, (vdso.end - vdso.start) as usize)
    };
    Ok(*blake3::hash(text).as_bytes())
}
