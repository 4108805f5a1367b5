//! What a child needs to become a copy of a prepared seed, and how that travels.
//!
//! A [`Descriptor`] holds the seed's registers, memory layout and which pages exist; it is
//! encoded in a small versioned, checksummed envelope ([`codec`]). A [`Handle`] is the one-line
//! string a user passes around to reach a prepared seed.

pub mod codec;
mod handle;
mod kernel;
mod model;
mod pageset;

pub use codec::{DecodeError, decode, encode};
pub use handle::{Handle, HandleError, KEY_LEN};
pub use kernel::*;
pub use model::*;
pub use pageset::PageSet;
