//! "Did you mean" for misspelt field names, enum values and tokens.

/// The candidate nearest to `word`, if it is near enough to be a likely typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    let mut best: Option<(f64, &'a str)> = None;
    for c in candidates {
        let cl = c.to_ascii_lowercase();
        let score = if cl == w {
            2.0
        } else {
            let jw = strsim::jaro_winkler(&w, &cl);
            let dl = strsim::normalized_damerau_levenshtein(&w, &cl);
            // A prefix (`sshUser` for `sshUsername`) is a likely abbreviation.
            let prefix = if w.len() >= 3 && (cl.starts_with(&w) || w.starts_with(&cl)) {
                0.9
            } else {
                0.0
            };
            jw.max(dl + 0.15).max(prefix)
        };
        if score >= 0.85 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn typos() {
        let f = ["provisioners", "resources", "source", "name"];
        assert_eq!(closest("provisoners", f), Some("provisioners"));
        assert_eq!(closest("Resources", f), Some("resources"));
        assert_eq!(closest("zzz", f), None);
        assert_eq!(
            closest("sshUser", ["sshUsername", "sshPort", "shell"]),
            Some("sshUsername")
        );
    }
}
