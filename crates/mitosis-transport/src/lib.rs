//! mitosis-transport
