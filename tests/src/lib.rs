//! Shared helpers for kiln's end-to-end tests: find the `kiln` binary the workspace built.
