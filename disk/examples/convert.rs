//! Convert one image with kiln's block layer and print the time (a profiling aid; the user
//! command is `kiln disk convert`).
//!
//! `cargo run --release -p kiln-disk --example convert -- SRC DST [raw|qcow2] [deflate|zstd] [threads]`

use std::time::Instant;

use kiln_disk::{convert, open, Compression, ConvertOptions, Format, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: convert SRC DST [raw|qcow2] [deflate|zstd|none] [threads]");
        std::process::exit(2);
    }
    let format = match args.get(3).map(String::as_str) {
        Some("raw") => Format::Raw,
        _ => Format::Qcow2,
    };
    let compress = match args.get(4).map(String::as_str) {
        Some("deflate") => Some(Compression::DEFLATE),
        Some("zstd") => Some(Compression::ZSTD),
        _ => None,
    };
    let threads = args.get(5).and_then(|t| t.parse().ok()).unwrap_or(0);
    let src = open(&args[1], OpenOptions::read_only())?;
    let t = Instant::now();
    let stats = convert(
        src.as_ref(),
        args[2].as_ref(),
        &ConvertOptions {
            format,
            compress,
            threads,
            sync: std::env::var_os("KILN_NO_SYNC").is_none(),
            ..Default::default()
        },
    )?;
    println!("{:.3} s {stats:?}", t.elapsed().as_secs_f64());
    Ok(())
}
