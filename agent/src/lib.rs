//! kiln-agent: the guest agent's wire protocol, its host-side client, and the agent itself.
//!
//! - [`frame`] and [`message`]: the versioned, framed protocol (see the crate README for
//!   the encoding and why).
//! - [`client::Client`]: the synchronous host-side API the builder uses.
//! - [`transport`]: Unix, TCP, AF_VSOCK, and the vsock device's `CONNECT` handshake.
//! - [`server`]: the guest side, run by the `kiln-agent` binary.
//! - [`cloud_init`]: the files and the user-data fragment that put the agent in a guest.

pub mod client;
pub mod cloud_init;
pub mod frame;
mod fuzz;
mod locate;
pub mod message;
pub mod server;
pub mod transport;

pub use client::{Client, ClientError, Output, OutputStream, PutOptions, TtyInput};
#[doc(hidden)]
pub use fuzz::fuzz_entry;
pub use locate::{is_static_elf, locate_binary};
pub use message::{
    Command, ExecRequest, ExitStatus, FileEnd, FileKind, FileMeta, FileStat, GuestInfo, HelloReply,
    Interpreter, LinkConfig, RemoteError, Tty, WindowSize, STATIC_LEASE,
};

/// The AF_VSOCK port the agent listens on by default.
pub const VSOCK_PORT: u32 = 1024;

/// The newest protocol version this build speaks (hello negotiates a common one).
/// 2: the hello reply carries the guest's boot id, and the agent knows `net-config`.
/// 3: exec may ask for a terminal (`ExecRequest::tty`), resized by `resize`.
/// 4: the agent knows `freeze` and `thaw`.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
