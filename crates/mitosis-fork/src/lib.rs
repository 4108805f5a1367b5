//! mitosis-fork
