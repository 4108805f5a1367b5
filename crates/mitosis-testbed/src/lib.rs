//! mitosis-testbed
