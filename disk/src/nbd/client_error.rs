//! Why one client connection ended early; logged, then the server takes the next client.

use std::io;

/// A client's protocol violation or a failed socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    OptionMagic(u64),
    #[error(
        "option {opt} carries {len} bytes, over the {} byte limit",
        super::wire::MAX_OPTION_LEN
    )]
    OptionTooBig { opt: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("request magic {0:#010x} is wrong")]
    RequestMagic(u32),
    #[error("write of {len} bytes exceeds the {max} byte maximum; its payload was not read")]
    WriteTooBig { len: u32, max: u32 },
}
