//! What a terminal showed, as a test collects it from a pty or an agent session, and waiting
//! for text to appear on it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Waits until the bytes a terminal printed, from byte `from` on, contain `what`; returns
/// where that ends, to wait for the next answer after it. Panics (the test fails) after
/// `within`, showing what the terminal printed.
pub fn wait_for(screen: &Mutex<Vec<u8>>, from: usize, what: &str, within: Duration) -> usize {
    let start = Instant::now();
    loop {
        {
            let s = screen.lock().unwrap_or_else(|e| e.into_inner());
            let text = String::from_utf8_lossy(&s[from.min(s.len())..]).into_owned();
            if let Some(i) = text.find(what) {
                return from + i + what.len();
            }
            assert!(
                start.elapsed() < within,
                "{what:?} did not appear within {within:?}; the terminal shows {text:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
