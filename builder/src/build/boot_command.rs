//! Typing a VM's `bootCommand` into its keyboard: the parsed events turned into QEMU qcode
//! presses (Shift added for shifted characters, one key down then up), typed after
//! `bootWait` once QEMU runs the VM, with `bootKeyInterval` after each key. A screenshot
//! goes to the module's logs before the first key, after each `<wait>` and at the end (a
//! second after the last key, for the guest to draw it), so a user sees where the typing went
//! wrong.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::qemu::control::{Control, ControlError, KeyEvent};
use crate::manifest::boot::{char_key, BootEvent, Modifier, SpecialKey};

/// How long a fresh QEMU (the first, or one started for a reboot) may take to listen.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long a VM may stay paused or not started before its first key.
const RUNNING_WAIT: Duration = Duration::from_secs(60);
/// How long the guest gets to show the last keys before the last screenshot.
const SETTLE: Duration = Duration::from_secs(1);
/// How often a wait looks at the build's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Why a boot command could not be typed.
#[derive(Debug, thiserror::Error)]
pub enum BootCommandError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot type {0:?} on a US keyboard")]
    CannotType(char),
    #[error("`{{{{ .HTTPIP }}}}` needs a NIC on a subnet with a gateway, and this VM has none")]
    NoHttpAddress,
    #[error("creating the screenshot {}: {source}", path.display())]
    Screenshot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

/// Where `{{ .HTTPIP }}`:`{{ .HTTPPort }}` point: the httpDirectory server at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// What typing does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Key events sent together, then the key interval.
    Keys(Vec<KeyEvent>),
    /// A `<waitN>`, then a screenshot.
    Wait(Duration),
}

/// The qcode of a special key (`ret`, not `enter`, is QEMU's name).
pub fn special_qcode(k: SpecialKey) -> &'static str {
    const F: [&str; 12] = [
        "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "f11", "f12",
    ];
    match k {
        SpecialKey::Enter => "ret",
        SpecialKey::Tab => "tab",
        SpecialKey::Space => "spc",
        SpecialKey::Backspace => "backspace",
        SpecialKey::Delete => "delete",
        SpecialKey::Up => "up",
        SpecialKey::Down => "down",
        SpecialKey::Left => "left",
        SpecialKey::Right => "right",
        SpecialKey::Home => "home",
        SpecialKey::End => "end",
        SpecialKey::PageUp => "pgup",
        SpecialKey::PageDown => "pgdn",
        SpecialKey::Insert => "insert",
        SpecialKey::Escape => "esc",
        // The parser accepts F1 to F12 only; anything else would be a parser bug, typed as F12.
        SpecialKey::F(n) => F[(n.clamp(1, 12) - 1) as usize],
    }
}

pub fn modifier_qcode(m: Modifier) -> &'static str {
    match m {
        Modifier::LeftCtrl => "ctrl",
        Modifier::LeftAlt => "alt",
        Modifier::LeftShift => "shift",
        Modifier::LeftSuper => "meta_l",
        Modifier::RightCtrl => "ctrl_r",
        Modifier::RightAlt => "alt_r",
        Modifier::RightShift => "shift_r",
        Modifier::RightSuper => "meta_r",
    }
}

/// The qcode of a character's key and whether Shift is held for it.
pub fn char_qcode(c: char) -> Option<(&'static str, bool)> {
    const LETTERS: [&str; 26] = [
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r",
        "s", "t", "u", "v", "w", "x", "y", "z",
    ];
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    let (name, shift) = char_key(c)?;
    let qcode = match name {
        "SPACE" => "spc",
        "MINUS" => "minus",
        "EQUAL" => "equal",
        "LEFTBRACE" => "bracket_left",
        "RIGHTBRACE" => "bracket_right",
        "SEMICOLON" => "semicolon",
        "APOSTROPHE" => "apostrophe",
        "GRAVE" => "grave_accent",
        "BACKSLASH" => "backslash",
        "COMMA" => "comma",
        "DOT" => "dot",
        "SLASH" => "slash",
        _ => {
            let b = *name.as_bytes().first()?;
            match (name.len(), b) {
                (1, b'A'..=b'Z') => LETTERS[(b - b'A') as usize],
                (1, b'0'..=b'9') => DIGITS[(b - b'0') as usize],
                _ => return None,
            }
        }
    };
    Some((qcode, shift))
}

fn press(qcode: &'static str, shift: bool) -> Action {
    let mut ev = Vec::with_capacity(4);
    if shift {
        ev.push(KeyEvent {
            qcode: "shift",
            down: true,
        });
    }
    ev.push(KeyEvent { qcode, down: true });
    ev.push(KeyEvent { qcode, down: false });
    if shift {
        ev.push(KeyEvent {
            qcode: "shift",
            down: false,
        });
    }
    Action::Keys(ev)
}

fn text(s: &str, out: &mut Vec<Action>) -> Result<(), BootCommandError> {
    for c in s.chars() {
        let (q, shift) = char_qcode(c).ok_or(BootCommandError::CannotType(c))?;
        out.push(press(q, shift));
    }
    Ok(())
}

/// The boot command as key presses and waits, with `{{ .HTTPIP }}` and `{{ .HTTPPort }}`
/// typed as `http`'s address.
pub fn actions(
    events: &[BootEvent],
    http: Option<HttpAddr>,
) -> Result<Vec<Action>, BootCommandError> {
    let mut out = Vec::new();
    for e in events {
        match e {
            BootEvent::Text(s) => text(s, &mut out)?,
            BootEvent::Key(k) => out.push(press(special_qcode(*k), false)),
            BootEvent::Modifier { key, down } => out.push(Action::Keys(vec![KeyEvent {
                qcode: modifier_qcode(*key),
                down: *down,
            }])),
            BootEvent::Wait(d) => out.push(Action::Wait(*d)),
            BootEvent::HttpIp => {
                let a = http.ok_or(BootCommandError::NoHttpAddress)?;
                text(&a.ip.to_string(), &mut out)?;
            }
            BootEvent::HttpPort => {
                let a = http.ok_or(BootCommandError::NoHttpAddress)?;
                text(&a.port.to_string(), &mut out)?;
            }
        }
    }
    Ok(out)
}

/// One VM's typing: where its control socket is, where its screenshots go, its pacing.
pub struct Typist<'a> {
    /// QEMU's control socket ([`crate::engine::qemu::control_socket`]).
    pub socket: PathBuf,
    /// Screenshots are `<logs>/<vm>-boot-NN.png`.
    pub logs: PathBuf,
    pub vm: String,
    pub key_interval: Duration,
    /// The build's cancel, or the wait being over: typing stops at once.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Told of each screenshot once it is written.
    pub screenshot: &'a (dyn Fn(&Path) + Sync),
}

impl Typist<'_> {
    /// Waits until `boot_wait` after `started` (the VM's launch).
    pub fn boot_wait(&self, started: Instant, boot_wait: Duration) -> Result<(), BootCommandError> {
        self.sleep(boot_wait.saturating_sub(started.elapsed()))
    }

    /// Types `actions` once QEMU runs the VM.
    pub fn type_actions(&self, actions: &[Action]) -> Result<(), BootCommandError> {
        let mut session = Session {
            socket: &self.socket,
            control: None,
            cancelled: self.cancelled,
        };
        let mut shots = 0usize;
        self.screenshot(&mut session, &mut shots)?;
        for a in actions {
            match a {
                Action::Keys(k) => {
                    session.call(|c| c.send_keys(k))?;
                    self.sleep(self.key_interval)?;
                }
                Action::Wait(d) => {
                    self.sleep(*d)?;
                    self.screenshot(&mut session, &mut shots)?;
                }
            }
        }
        // A guest under TCG draws the last keys late (GRUB's editor a second behind on a busy
        // host): the last screenshot waits for it, or it shows the line cut short.
        self.sleep(SETTLE.max(self.key_interval * 4))?;
        self.screenshot(&mut session, &mut shots)
    }

    fn screenshot(&self, s: &mut Session, n: &mut usize) -> Result<(), BootCommandError> {
        let name = self.logs.join(format!("{}-boot-{:02}.png", self.vm, *n));
        *n += 1;
        // QEMU resolves a relative path from its own working folder.
        let path = std::path::absolute(&name).unwrap_or(name);
        // Made 0600 first (QEMU truncates it and keeps the mode): a screen may show what was
        // typed, a password among it.
        crate::log_file::create(&path).map_err(|source| BootCommandError::Screenshot {
            path: path.clone(),
            source,
        })?;
        match s.call(|c| c.screendump(&path)) {
            Ok(()) => (self.screenshot)(&path),
            // A screen QEMU cannot dump (no display surface yet) is no reason to stop typing.
            Err(BootCommandError::Control(e @ ControlError::Refused { .. })) => {
                tracing::warn!("VM {}: no screenshot: {e}", self.vm)
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Sleeps `d`, looking at the cancel flag every [`CANCEL_POLL`].
    fn sleep(&self, d: Duration) -> Result<(), BootCommandError> {
        let end = Instant::now() + d;
        loop {
            if (self.cancelled)() {
                return Err(BootCommandError::Cancelled);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(CANCEL_POLL));
        }
    }
}

/// A control connection made on first use and made again once after QEMU closed it: a guest
/// reboot starts a fresh QEMU on the same socket.
struct Session<'a> {
    socket: &'a Path,
    control: Option<Control>,
    cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl Session<'_> {
    /// Connects in short tries, so a cancel is seen while QEMU is not listening yet.
    fn connect(&self) -> Result<Control, BootCommandError> {
        let start = Instant::now();
        loop {
            match Control::connect(self.socket, CANCEL_POLL) {
                Err(ControlError::Connect { .. })
                    if start.elapsed() < CONNECT_WAIT && !(self.cancelled)() => {}
                Err(ControlError::Connect { .. }) if (self.cancelled)() => {
                    return Err(BootCommandError::Cancelled)
                }
                r => return Ok(r?),
            }
        }
    }

    fn call<T>(
        &mut self,
        mut f: impl FnMut(&mut Control) -> Result<T, ControlError>,
    ) -> Result<T, BootCommandError> {
        let mut reconnected = false;
        loop {
            let c = match &mut self.control {
                Some(c) => c,
                None => {
                    let mut c = self.connect()?;
                    c.wait_running(RUNNING_WAIT, self.cancelled)?;
                    self.control.insert(c)
                }
            };
            match f(c) {
                Err(ControlError::Closed | ControlError::Io(_)) if !reconnected => {
                    self.control = None;
                    reconnected = true;
                }
                r => return Ok(r?),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::boot::parse;

    /// The qcodes QEMU 7.2's schema was seen to accept, of those kiln types.
    const QCODES: &[&str] = &[
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
        "g",
        "h",
        "i",
        "j",
        "k",
        "l",
        "m",
        "n",
        "o",
        "p",
        "q",
        "r",
        "s",
        "t",
        "u",
        "v",
        "w",
        "x",
        "y",
        "z",
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "ret",
        "tab",
        "spc",
        "backspace",
        "delete",
        "up",
        "down",
        "left",
        "right",
        "home",
        "end",
        "pgup",
        "pgdn",
        "insert",
        "esc",
        "f1",
        "f2",
        "f3",
        "f4",
        "f5",
        "f6",
        "f7",
        "f8",
        "f9",
        "f10",
        "f11",
        "f12",
        "ctrl",
        "ctrl_r",
        "alt",
        "alt_r",
        "shift",
        "shift_r",
        "meta_l",
        "meta_r",
        "minus",
        "equal",
        "bracket_left",
        "bracket_right",
        "semicolon",
        "apostrophe",
        "grave_accent",
        "backslash",
        "comma",
        "dot",
        "slash",
    ];

    #[test]
    fn every_special_key_and_modifier_has_a_known_qcode() {
        let mut keys = vec![
            SpecialKey::Enter,
            SpecialKey::Tab,
            SpecialKey::Space,
            SpecialKey::Backspace,
            SpecialKey::Delete,
            SpecialKey::Up,
            SpecialKey::Down,
            SpecialKey::Left,
            SpecialKey::Right,
            SpecialKey::Home,
            SpecialKey::End,
            SpecialKey::PageUp,
            SpecialKey::PageDown,
            SpecialKey::Insert,
            SpecialKey::Escape,
        ];
        keys.extend((1..=12).map(SpecialKey::F));
        let mut seen = std::collections::BTreeSet::new();
        for k in keys {
            let q = special_qcode(k);
            assert!(QCODES.contains(&q), "{k:?} -> {q}");
            assert!(seen.insert(q), "{q} twice");
        }
        assert_eq!(special_qcode(SpecialKey::Enter), "ret");
        assert_eq!(special_qcode(SpecialKey::F(12)), "f12");
        for m in [
            Modifier::LeftCtrl,
            Modifier::LeftAlt,
            Modifier::LeftShift,
            Modifier::LeftSuper,
            Modifier::RightCtrl,
            Modifier::RightAlt,
            Modifier::RightShift,
            Modifier::RightSuper,
        ] {
            let q = modifier_qcode(m);
            assert!(QCODES.contains(&q), "{m:?} -> {q}");
            assert!(seen.insert(q), "{q} twice");
        }
    }

    #[test]
    fn every_printable_ascii_character_has_a_known_qcode_and_shift_where_needed() {
        const SHIFTED: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ~!@#$%^&*()_+{}|:\"<>?";
        for b in 0x20u8..0x7f {
            let c = b as char;
            let (q, shift) = char_qcode(c).unwrap_or_else(|| panic!("{c:?} has no qcode"));
            assert!(QCODES.contains(&q), "{c:?} -> {q}");
            assert_eq!(shift, SHIFTED.contains(c), "{c:?}");
        }
        assert_eq!(char_qcode(':'), Some(("semicolon", true)));
        assert_eq!(char_qcode('x'), Some(("x", false)));
        assert_eq!(char_qcode(' '), Some(("spc", false)));
        assert_eq!(char_qcode('é'), None);
    }

    fn typed(actions: &[Action]) -> String {
        let mut s = String::new();
        for a in actions {
            match a {
                Action::Keys(k) => {
                    let keys: Vec<String> = k
                        .iter()
                        .map(|e| format!("{}{}", if e.down { "+" } else { "-" }, e.qcode))
                        .collect();
                    s.push_str(&keys.join(" "));
                    s.push('|');
                }
                Action::Wait(d) => s.push_str(&format!("wait{}|", d.as_secs())),
            }
        }
        s
    }

    #[test]
    fn http_ip_and_port_are_typed_as_the_gateway_address() {
        let ev = parse("{{ .HTTPIP }}:{{ .HTTPPort }}").unwrap();
        let http = HttpAddr {
            ip: Ipv4Addr::new(10, 0, 2, 1),
            port: 8080,
        };
        let got = typed(&actions(&ev, Some(http)).unwrap());
        let want = typed(&actions(&parse("10.0.2.1:8080").unwrap(), None).unwrap());
        assert_eq!(got, want);
        assert!(got.starts_with("+1 -1|+0 -0|+dot -dot|"), "{got}");
        assert!(
            got.contains("|+shift +semicolon -semicolon -shift|"),
            "{got}"
        );
        assert!(matches!(
            actions(&ev, None),
            Err(BootCommandError::NoHttpAddress)
        ));
    }

    #[test]
    fn keys_go_down_then_up_and_modifiers_stay_held() {
        let ev = parse("A<enter><leftCtrlOn>x<leftCtrlOff><wait3>").unwrap();
        assert_eq!(
            typed(&actions(&ev, None).unwrap()),
            "+shift +a -a -shift|+ret -ret|+ctrl|+x -x|-ctrl|wait3|"
        );
    }

    #[test]
    fn a_wait_ends_early_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let t = Typist {
            socket: dir.path().join("absent.sock"),
            logs: dir.path().into(),
            vm: "v".into(),
            key_interval: Duration::ZERO,
            cancelled: &|| true,
            screenshot: &|_| {},
        };
        let start = Instant::now();
        let r = t.boot_wait(start, Duration::from_secs(30));
        assert!(matches!(r, Err(BootCommandError::Cancelled)), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
