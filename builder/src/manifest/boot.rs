//! Boot commands: strings of literal text and `<token>`s, parsed into key events and waits.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SpecialKey {
    Enter,
    Tab,
    Space,
    Backspace,
    Delete,
    Up,
    Down,
    Left,
    Right,
    Home,
    End,
    PageUp,
    PageDown,
    Insert,
    Escape,
    F(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Modifier {
    LeftCtrl,
    LeftAlt,
    LeftShift,
    LeftSuper,
    RightCtrl,
    RightAlt,
    RightShift,
    RightSuper,
}

/// One step of typing at the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BootEvent {
    /// Literal printable ASCII; see [`char_key`] for the keys (with Shift) each needs.
    Text(String),
    Key(SpecialKey),
    /// Press (`true`) or release a modifier.
    Modifier {
        key: Modifier,
        down: bool,
    },
    #[serde(serialize_with = "super::plan::ser_duration")]
    Wait(Duration),
    /// `{{ .HTTPIP }}`: the address of the build's HTTP server, typed as text.
    HttpIp,
    /// `{{ .HTTPPort }}`.
    HttpPort,
}

/// A problem in one boot command string; `col` is the 0-based character offset of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootError {
    pub col: usize,
    pub len: usize,
    pub message: String,
    pub hint: Option<String>,
}

const SPECIAL: &[(&str, SpecialKey)] = &[
    ("enter", SpecialKey::Enter),
    ("return", SpecialKey::Enter),
    ("tab", SpecialKey::Tab),
    ("space", SpecialKey::Space),
    ("spacebar", SpecialKey::Space),
    ("bs", SpecialKey::Backspace),
    ("backspace", SpecialKey::Backspace),
    ("del", SpecialKey::Delete),
    ("delete", SpecialKey::Delete),
    ("up", SpecialKey::Up),
    ("down", SpecialKey::Down),
    ("left", SpecialKey::Left),
    ("right", SpecialKey::Right),
    ("home", SpecialKey::Home),
    ("end", SpecialKey::End),
    ("pageup", SpecialKey::PageUp),
    ("pagedown", SpecialKey::PageDown),
    ("insert", SpecialKey::Insert),
    ("esc", SpecialKey::Escape),
    ("escape", SpecialKey::Escape),
];

const MODIFIERS: &[(&str, Modifier)] = &[
    ("leftCtrl", Modifier::LeftCtrl),
    ("leftAlt", Modifier::LeftAlt),
    ("leftShift", Modifier::LeftShift),
    ("leftSuper", Modifier::LeftSuper),
    ("rightCtrl", Modifier::RightCtrl),
    ("rightAlt", Modifier::RightAlt),
    ("rightShift", Modifier::RightShift),
    ("rightSuper", Modifier::RightSuper),
];

fn token(tok: &str) -> Result<BootEvent, String> {
    let lower = tok.to_ascii_lowercase();
    if let Some((_, k)) = SPECIAL.iter().find(|(n, _)| *n == lower) {
        return Ok(BootEvent::Key(*k));
    }
    if let Some(n) = lower.strip_prefix('f').and_then(|n| n.parse::<u8>().ok()) {
        if (1..=12).contains(&n) && !lower[1..].starts_with('0') {
            return Ok(BootEvent::Key(SpecialKey::F(n)));
        }
    }
    if lower == "wait" {
        return Ok(BootEvent::Wait(Duration::from_secs(1)));
    }
    if let Some(n) = lower.strip_prefix("wait") {
        let n = n.strip_suffix('s').unwrap_or(n);
        if !n.is_empty() && n.len() <= 5 && n.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(secs) = n.parse::<u64>() {
                return Ok(BootEvent::Wait(Duration::from_secs(secs)));
            }
        }
        return Err(
            "a wait is `<wait>`, `<waitN>` or `<waitNs>` with N whole seconds (at most 99999)"
                .into(),
        );
    }
    for (name, m) in MODIFIERS {
        if let Some(rest) = tok.strip_prefix(name) {
            match rest {
                "On" => {
                    return Ok(BootEvent::Modifier {
                        key: *m,
                        down: true,
                    })
                }
                "Off" => {
                    return Ok(BootEvent::Modifier {
                        key: *m,
                        down: false,
                    })
                }
                _ => {}
            }
        }
    }
    // A near miss on a case-sensitive modifier says so.
    for (name, _) in MODIFIERS {
        for suffix in ["On", "Off"] {
            let full = format!("{name}{suffix}");
            if full.eq_ignore_ascii_case(tok) {
                return Err(format!(
                    "modifier tokens are case-sensitive: write `<{full}>`"
                ));
            }
        }
    }
    let mut names: Vec<String> = SPECIAL.iter().map(|(n, _)| n.to_string()).collect();
    names.extend(["pageUp", "pageDown", "wait"].map(String::from));
    names.extend(MODIFIERS.iter().map(|(n, _)| format!("{n}On")));
    match super::suggest::closest(tok, names.iter().map(String::as_str)) {
        Some(s) => Err(format!("did you mean `<{s}>`?")),
        None => Err("see the boot command keys in docs/manifest.md".into()),
    }
}

/// Parse one boot command string.
pub fn parse(s: &str) -> Result<Vec<BootEvent>, BootError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out: Vec<BootEvent> = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    let flush = |text: &mut String, out: &mut Vec<BootEvent>| {
        if !text.is_empty() {
            out.push(BootEvent::Text(std::mem::take(text)));
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '<' {
            if let Some(rel) = chars[i + 1..].iter().position(|&c| c == '>' || c == '<') {
                if chars[i + 1 + rel] == '>' {
                    let tok: String = chars[i + 1..i + 1 + rel].iter().collect();
                    match token(&tok) {
                        Ok(ev) => {
                            flush(&mut text, &mut out);
                            out.push(ev);
                        }
                        Err(hint) => {
                            return Err(BootError {
                                col: i,
                                len: rel + 2,
                                message: format!("unknown boot command token `<{tok}>`"),
                                hint: Some(hint),
                            })
                        }
                    }
                    i += rel + 2;
                    continue;
                }
            }
            // A `<` with no closing `>` is typed literally.
        }
        if c == '{' {
            let rest: String = chars[i..chars.len().min(i + 40)].iter().collect();
            let mut matched = false;
            for (pat, ev) in [
                ("{{ .HTTPIP }}", BootEvent::HttpIp),
                ("{{ .HTTPPort }}", BootEvent::HttpPort),
                ("{{.HTTPIP}}", BootEvent::HttpIp),
                ("{{.HTTPPort}}", BootEvent::HttpPort),
            ] {
                if rest.starts_with(pat) {
                    flush(&mut text, &mut out);
                    out.push(ev);
                    i += pat.chars().count();
                    matched = true;
                    break;
                }
            }
            if matched {
                continue;
            }
        }
        if c == '\n' {
            flush(&mut text, &mut out);
            out.push(BootEvent::Key(SpecialKey::Enter));
        } else if c == '\t' {
            flush(&mut text, &mut out);
            out.push(BootEvent::Key(SpecialKey::Tab));
        } else if char_key(c).is_none() {
            return Err(BootError {
                col: i,
                len: 1,
                message: format!("cannot type {c:?} on a US keyboard"),
                hint: Some(
                    "boot commands type printable ASCII; use tokens such as `<enter>` for keys"
                        .into(),
                ),
            });
        } else {
            text.push(c);
        }
        i += 1;
    }
    flush(&mut text, &mut out);
    Ok(out)
}

/// The US-layout key name (Linux input names without `KEY_`) and whether Shift is needed.
pub fn char_key(c: char) -> Option<(&'static str, bool)> {
    const LOWER: &str = "abcdefghijklmnopqrstuvwxyz";
    const KEYS: [&str; 26] = [
        "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q", "R",
        "S", "T", "U", "V", "W", "X", "Y", "Z",
    ];
    if let Some(i) = LOWER.find(c.to_ascii_lowercase()) {
        if c.is_ascii_alphabetic() {
            return Some((KEYS[i], c.is_ascii_uppercase()));
        }
    }
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    if let Some(d) = c.to_digit(10) {
        return Some((DIGITS[d as usize], false));
    }
    let k = match c {
        ' ' => ("SPACE", false),
        '-' => ("MINUS", false),
        '_' => ("MINUS", true),
        '=' => ("EQUAL", false),
        '+' => ("EQUAL", true),
        '[' => ("LEFTBRACE", false),
        '{' => ("LEFTBRACE", true),
        ']' => ("RIGHTBRACE", false),
        '}' => ("RIGHTBRACE", true),
        ';' => ("SEMICOLON", false),
        ':' => ("SEMICOLON", true),
        '\'' => ("APOSTROPHE", false),
        '"' => ("APOSTROPHE", true),
        '`' => ("GRAVE", false),
        '~' => ("GRAVE", true),
        '\\' => ("BACKSLASH", false),
        '|' => ("BACKSLASH", true),
        ',' => ("COMMA", false),
        '<' => ("COMMA", true),
        '.' => ("DOT", false),
        '>' => ("DOT", true),
        '/' => ("SLASH", false),
        '?' => ("SLASH", true),
        '!' => ("1", true),
        '@' => ("2", true),
        '#' => ("3", true),
        '$' => ("4", true),
        '%' => ("5", true),
        '^' => ("6", true),
        '&' => ("7", true),
        '*' => ("8", true),
        '(' => ("9", true),
        ')' => ("0", true),
        _ => return None,
    };
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_text() {
        let ev = parse("<esc><wait5>linux ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks<ENTER><leftCtrlOn>c<leftCtrlOff><wait10s>").unwrap();
        assert_eq!(ev[0], BootEvent::Key(SpecialKey::Escape));
        assert_eq!(ev[1], BootEvent::Wait(Duration::from_secs(5)));
        assert_eq!(ev[2], BootEvent::Text("linux ks=http://".into()));
        assert_eq!(ev[3], BootEvent::HttpIp);
        assert_eq!(ev[5], BootEvent::HttpPort);
        assert_eq!(ev[7], BootEvent::Key(SpecialKey::Enter));
        assert_eq!(
            ev[8],
            BootEvent::Modifier {
                key: Modifier::LeftCtrl,
                down: true
            }
        );
        assert_eq!(ev[11], BootEvent::Wait(Duration::from_secs(10)));
    }

    #[test]
    fn unclosed_angle_is_literal() {
        assert_eq!(
            parse("a < b").unwrap(),
            vec![BootEvent::Text("a < b".into())]
        );
        assert_eq!(parse("<f12><F1>").unwrap().len(), 2);
    }

    #[test]
    fn unknown_tokens_have_columns() {
        let e = parse("abc <entr>").unwrap_err();
        assert_eq!((e.col, e.len), (4, 6));
        assert_eq!(e.hint.as_deref(), Some("did you mean `<enter>`?"));
        let e = parse("<leftctrlon>").unwrap_err();
        assert!(e.hint.unwrap().contains("case-sensitive"));
        assert!(parse("<f13>").is_err());
        assert!(parse("<waitx>").is_err());
        assert!(parse("é").is_err());
    }

    #[test]
    fn shift_is_automatic() {
        assert_eq!(char_key('A'), Some(("A", true)));
        assert_eq!(char_key('a'), Some(("A", false)));
        assert_eq!(char_key(':'), Some(("SEMICOLON", true)));
    }
}
