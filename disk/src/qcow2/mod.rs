//! qcow2: header parsing, imago-backed devices, kiln's own reader, the streaming writer and
//! the consistency check.

pub mod check;
pub mod header;
pub mod imago_dev;
pub mod meta;
pub mod reader;
pub mod writer;
