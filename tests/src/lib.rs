//! Integration tests for mitosis live in tests/.
