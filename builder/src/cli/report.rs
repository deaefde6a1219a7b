//! How the CLI prints an error: the message, then each cause the message does not already
//! tell.
//!
//! kiln's error types put their cause in their own message (`reading x: No such file`), so
//! that an error turned into text anywhere (an event, a log line, an HTTP answer) still says
//! why. A chain printed cause by cause would then say every cause twice; this prints a cause
//! only when the text so far does not already end with it.

/// `e` and its causes, each told once, joined with ": ".
pub fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct Tells {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the cache is broken")]
    struct Hides(#[source] std::io::Error);

    fn enoent() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn a_cause_in_the_message_is_not_repeated() {
        let e = anyhow::Error::new(Tells {
            path: "m.yaml",
            source: enoent(),
        })
        .context("building module `m` failed");
        let r = render(&e);
        assert_eq!(
            r,
            "building module `m` failed: reading m.yaml: entity not found"
        );
        assert_eq!(r.matches("not found").count(), 1);
    }

    #[test]
    fn a_cause_the_message_does_not_tell_is_printed() {
        let e = anyhow::Error::new(Hides(enoent())).context("building failed");
        assert_eq!(
            render(&e),
            "building failed: the cache is broken: entity not found"
        );
    }
}
