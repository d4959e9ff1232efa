//! The secrets of the policy language: the paths `secret:` rules name, and how long the
//! lease of a fetch may last. The store that keeps the values is `crate::secrets`.

use std::time::Duration;

/// Longest secret path, in bytes.
pub const MAX_PATH: usize = 256;

/// Why `text` is not a secret's path, if it is not: segments of letters, digits, `.`, `_` and
/// `-`, joined by `/`, at most [`MAX_PATH`] bytes.
pub fn check_path(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("is empty".into());
    }
    if text.len() > MAX_PATH {
        return Err(format!("is over {MAX_PATH} bytes"));
    }
    for segment in text.split('/') {
        if segment.is_empty() {
            return Err("has an empty segment (a leading, trailing or doubled `/`)".into());
        }
        if segment == "." || segment == ".." {
            return Err("has a `.` or `..` segment".into());
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "has {c:?}; segments hold letters, digits, `.`, `_` and `-`"
            ));
        }
    }
    Ok(())
}

/// A rule's lease when it names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The shortest and longest lease a rule may name.
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The paths of a `secret:` rule: segments as in a secret's path, where a segment `*` stands
/// for any one segment, and a last segment `*` for any path below (one segment or more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPattern(Vec<String>);

impl SecretPattern {
    /// Parses the text after `secret:`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        // Each `*` segment is checked as a segment that is a plain name.
        let plain: Vec<&str> = text
            .split('/')
            .map(|s| if s == "*" { "x" } else { s })
            .collect();
        if let Err(why) = check_path(&plain.join("/")) {
            return Err(format!(
                "secret:{text} {why}; write secret:PATH, where a segment `*` stands for any one segment and a last `*` for any path below (such as secret:agent/data-pipeline-agent/*)"
            ));
        }
        Ok(Self(text.split('/').map(str::to_owned).collect()))
    }

    /// Whether `path` is one of the paths this pattern names.
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let n = self.0.len();
        if parts.len() < n || (parts.len() > n && self.0.last().is_none_or(|l| l != "*")) {
            return false;
        }
        self.0.iter().zip(&parts).all(|(p, s)| p == "*" || p == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_segments_and_whole_subtrees() {
        let p = |t: &str| SecretPattern::parse(t).unwrap();
        let exact = p("agent/a/db");
        assert!(exact.matches("agent/a/db"));
        assert!(!exact.matches("agent/a/db/x"));
        assert!(!exact.matches("agent/a"));
        let below = p("agent/data-pipeline-agent/*");
        assert!(below.matches("agent/data-pipeline-agent/db-password"));
        assert!(below.matches("agent/data-pipeline-agent/x/y"));
        assert!(!below.matches("agent/data-pipeline-agent"));
        assert!(!below.matches("agent/data-pipeline-agentx/key"));
        assert!(!below.matches("agent/other/key"));
        let one = p("team/*/api-key");
        assert!(one.matches("team/a/api-key"));
        assert!(!one.matches("team/a/b/api-key"));
        assert!(!one.matches("team/a/other"));
        assert!(p("*").matches("anything/at/all"));
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        for (t, why) in [
            ("", "is empty"),
            ("a/*x", "has '*'"),
            ("a//b", "empty segment"),
            ("a/../b", "`..`"),
            ("a/**", "has '*'"),
        ] {
            let e = SecretPattern::parse(t).unwrap_err();
            assert!(
                e.contains(why) && e.contains("write secret:PATH"),
                "{t:?}: {e}"
            );
        }
    }
}
