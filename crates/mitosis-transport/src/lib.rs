//! How mitosis processes talk: length-prefixed postcard frames over TCP between daemons
//! (the page server) and over a unix socket between the CLI and its local daemon.

pub mod control;
pub mod packed;
pub mod peer;
pub mod tls;

pub use mitosis_frame as frame;
pub use mitosis_frame::FrameError;
