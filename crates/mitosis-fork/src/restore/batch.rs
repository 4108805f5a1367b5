//! Batches of system calls for the trampoline to run, with the data they point to.
//!
//! A batch is laid out as its records followed by its data. Arguments that point into the data
//! are resolved when the batch's address is known, so a batch is built once and placed later.

use super::trampoline::{ANY, Record};

pub(crate) const RECORD_LEN: u64 = std::mem::size_of::<Record>() as u64;

/// One argument: a plain value or the address of a data item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arg {
    Val(u64),
    Data(usize),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::Val(v)
    }
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Val(v as u64)
    }
}

impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::Val(v as i64 as u64)
    }
}

enum Item {
    Bytes(Vec<u8>),
    /// Words that may themselves point at other items (a msghdr's iovec).
    Words(Vec<Arg>),
}

#[derive(Default)]
pub(crate) struct Batch {
    records: Vec<(i64, [Arg; 6], u64, String)>,
    items: Vec<Item>,
}

impl Batch {
    /// Adds bytes to the data area (8-byte aligned); returns their address argument.
    pub fn bytes(&mut self, bytes: &[u8]) -> Arg {
        self.items.push(Item::Bytes(bytes.to_vec()));
        Arg::Data(self.items.len() - 1)
    }

    /// Adds a NUL-terminated copy of `s`.
    pub fn c_string(&mut self, s: &str) -> Arg {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.bytes(&b)
    }

    pub fn words(&mut self, words: Vec<Arg>) -> Arg {
        self.items.push(Item::Words(words));
        Arg::Data(self.items.len() - 1)
    }

    pub fn call(&mut self, nr: i64, args: &[Arg], label: impl Into<String>) {
        let mut all = [Arg::Val(0); 6];
        all[..args.len()].copy_from_slice(args);
        self.records.push((nr, all, ANY, label.into()));
    }

    /// A call that must return exactly `expect` (a check, such as reading an id back).
    pub fn call_expecting(&mut self, nr: i64, args: &[Arg], expect: u64, label: impl Into<String>) {
        self.call(nr, args, label);
        self.records.last_mut().expect("just pushed").2 = expect;
    }

    pub fn count(&self) -> u64 {
        self.records.len() as u64
    }

    pub fn labels(&self) -> Vec<String> {
        self.records.iter().map(|(.., l)| l.clone()).collect()
    }

    fn item_len(item: &Item) -> usize {
        match item {
            Item::Bytes(b) => b.len().next_multiple_of(8),
            Item::Words(w) => w.len() * 8,
        }
    }

    /// Bytes the batch takes, whatever its address.
    pub fn len(&self) -> u64 {
        self.count() * RECORD_LEN + self.items.iter().map(Self::item_len).sum::<usize>() as u64
    }

    /// Where each data item lands when the batch is placed at `at`.
    fn item_addresses(&self, at: u64) -> Vec<u64> {
        let mut addr = Vec::with_capacity(self.items.len());
        let mut next = at + self.count() * RECORD_LEN;
        for item in &self.items {
            addr.push(next);
            next += Self::item_len(item) as u64;
        }
        addr
    }

    /// The address `arg` stands for when the batch is placed at `at`.
    pub fn address_of(&self, at: u64, arg: Arg) -> u64 {
        match arg {
            Arg::Val(v) => v,
            Arg::Data(i) => self.item_addresses(at)[i],
        }
    }

    /// The batch's bytes when placed at `at`.
    pub fn encode(&self, at: u64) -> Vec<u8> {
        let addr = self.item_addresses(at);
        let resolve = |a: &Arg| match *a {
            Arg::Val(v) => v,
            Arg::Data(i) => addr[i],
        };
        let mut out = Vec::with_capacity(self.len() as usize);
        for (nr, args, expect, _) in &self.records {
            out.extend_from_slice(&nr.to_ne_bytes());
            for a in args {
                out.extend_from_slice(&resolve(a).to_ne_bytes());
            }
            out.extend_from_slice(&expect.to_ne_bytes());
        }
        for item in &self.items {
            match item {
                Item::Bytes(b) => {
                    out.extend_from_slice(b);
                    out.resize(out.len().next_multiple_of(8), 0);
                }
                Item::Words(w) => w
                    .iter()
                    .for_each(|a| out.extend_from_slice(&resolve(a).to_ne_bytes())),
            }
        }
        debug_assert_eq!(out.len() as u64, self.len());
        out
    }
}

/// A batch placed in a process: where it is and what its calls are called in errors.
#[derive(Debug, Clone, Default)]
pub struct Placed {
    pub at: u64,
    pub labels: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_pointers_resolve_after_the_records() {
        let mut b = Batch::default();
        let path = b.c_string("/dev/null");
        let iov = b.bytes(&[0; 16]);
        let msg = b.words(vec![Arg::Val(0), iov]);
        b.call(2, &[path, 0i32.into()], "open");
        b.call(47, &[3i32.into(), msg], "recvmsg");
        let bytes = b.encode(0x1000);
        let word = |i: usize| u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        let data = 0x1000 + 2 * RECORD_LEN;
        assert_eq!((word(0), word(1)), (2, data));
        // "/dev/null\0" takes 16 bytes, the iovec 16 more; the msghdr's second word is the iovec.
        assert_eq!(word(7), ANY);
        assert_eq!((word(8), word(9)), (47, 3));
        assert_eq!(word(10), data + 32);
        assert_eq!(word(16 + 4 + 1), data + 16);
        assert_eq!(bytes.len() as u64, b.len());
        assert_eq!(b.labels(), ["open", "recvmsg"]);
    }
}
