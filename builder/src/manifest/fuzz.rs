//! The fuzz target's body, shared with a unit test so CI exercises it on stable.

use std::path::Path;

use super::{fmt, load_bytes, yaml, Limits};

/// Parse, validate and (when valid) format and re-validate arbitrary bytes. Panics only on a
/// broken invariant: a formatted valid manifest must validate to the same plan.
#[doc(hidden)]
pub fn fuzz_entry(data: &[u8]) {
    let path = Path::new("/nonexistent/fuzz.yaml");
    let loaded = load_bytes(data, path, Limits::default());
    if let Some(plan) = loaded.plan {
        let Ok(text) = std::str::from_utf8(data) else {
            panic!("a plan from non-UTF-8 input");
        };
        let Ok(tree) = yaml::parse(text, Limits::default().yaml) else {
            panic!("a plan from unparsable input");
        };
        let formatted = fmt::format(&tree, text);
        let again = load_bytes(formatted.as_bytes(), path, Limits::default());
        assert_eq!(
            again.plan.as_ref(),
            Some(&plan),
            "fmt changed the plan:\n{formatted}"
        );
    }
}

#[cfg(test)]
mod tests {
    /// Pseudo-random mutations of a valid manifest: bytes flipped, lines dropped and
    /// duplicated, structure characters inserted.
    #[test]
    fn fuzz_entry_survives_mutations() {
        let seed = include_str!("../../../examples/hello.yaml");
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..400 {
            let mut data = seed.as_bytes().to_vec();
            for _ in 0..(next() % 6 + 1) {
                if data.is_empty() {
                    break;
                }
                let pos = (next() as usize) % data.len().max(1);
                match next() % 5 {
                    0 => data[pos] = (next() & 0xff) as u8,
                    1 => {
                        data.remove(pos);
                    }
                    2 => {
                        let set = b"[{:-&*!|>'\"\n ";
                        data.insert(pos, set[(next() as usize) % set.len()])
                    }
                    3 => {
                        let chunk: Vec<u8> = data[pos..data.len().min(pos + 40)].to_vec();
                        data.splice(pos..pos, chunk);
                    }
                    _ => data.truncate(pos),
                }
            }
            super::fuzz_entry(&data);
        }
    }

    /// Token soup made of schema field names, values and YAML punctuation: reaches the
    /// semantic checks far more often than random bytes do.
    #[test]
    fn fuzz_entry_survives_schema_soup() {
        let mut words: Vec<&str> = super::super::schema::ALL
            .iter()
            .flat_map(|o| o.fields.iter().map(|f| f.name))
            .collect();
        words.extend([
            ": ",
            "\n",
            "\n  ",
            "\n    ",
            "- ",
            "{",
            "}",
            "[",
            "]",
            ", ",
            "true",
            "1",
            "10.0.0.0/24",
            "10.0.0.5",
            "4Gi",
            "30m",
            "<enter>",
            "&a ",
            "*a",
            "\"x\"",
            "shell",
            "file",
            "debian",
            "bookworm",
            "52:54:00:00:00:01",
            "https://e.example.org/x",
            "default",
            "<<: ",
        ]);
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..400 {
            let n = (next() % 80) as usize;
            let mut text = String::from("vms:\n  - name: a\n    ");
            for _ in 0..n {
                text.push_str(words[(next() as usize) % words.len()]);
            }
            super::fuzz_entry(text.as_bytes());
        }
    }
}
