//! SPIFFE IDs: the full grammar of the SPIFFE-ID specification, checked strictly (no
//! normalisation: a URI that only becomes valid after normalising is refused), and
//! agentwall's naming convention for agents on top of it.
//!
//! Convention: `spiffe://<trust-domain>/agent/<name>/<env>[/<version>]`, for example
//! `spiffe://example.org/agent/data-pipeline-agent/prod` or `.../prod/v3`. Policies name the
//! part after the trust domain (`agent/data-pipeline-agent/prod`).

use std::{fmt, str::FromStr};

/// Longest SPIFFE ID accepted, in bytes (SPIFFE-ID specification, section 2.3).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID. Each variant says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("the SPIFFE ID is empty")]
    Empty,
    #[error("the SPIFFE ID is {0} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("a SPIFFE ID starts with \"spiffe://\"")]
    Scheme,
    #[error("the scheme must be written in lower case: \"spiffe://\"")]
    SchemeCase,
    #[error("the trust domain is missing (spiffe://<trust-domain>/...)")]
    MissingTrustDomain,
    #[error("the trust domain must be lower case; found {0:?}")]
    UppercaseTrustDomain(char),
    #[error("the trust domain may hold only a-z, 0-9, '.', '-' and '_'; found {0:?}")]
    TrustDomainChar(char),
    #[error("the trust domain is {0} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong(usize),
    #[error("a SPIFFE ID has no port")]
    Port,
    #[error("a SPIFFE ID has no user info (\"user@\")")]
    UserInfo,
    #[error("a SPIFFE ID has no query (\"?...\")")]
    Query,
    #[error("a SPIFFE ID has no fragment (\"#...\")")]
    Fragment,
    #[error("percent-encoded characters are not allowed in a SPIFFE ID")]
    PercentEncoded,
    #[error("the path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("the path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("the path ends with a slash")]
    TrailingSlash,
    #[error("path segments may hold only a-z, A-Z, 0-9, '.', '-' and '_'; found {0:?}")]
    PathChar(char),
    #[error("a workload's SPIFFE ID needs a path; {0} names a whole trust domain")]
    NoPath(String),
    #[error(
        "{0} does not follow agentwall's convention spiffe://<trust-domain>/agent/<name>/<env>[/<version>]"
    )]
    NotAgent(String),
}

/// A syntactically valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Requires a path: the ID of a workload, not of a trust domain.
    pub fn workload(s: &str) -> Result<Self, IdError> {
        let id: Self = s.parse()?;
        if id.path.is_empty() {
            return Err(IdError::NoPath(id.to_string()));
        }
        Ok(id)
    }

    /// Checks a bare trust domain name (config, bundles).
    pub fn trust_domain_only(td: &str) -> Result<(), IdError> {
        check_trust_domain(td)
    }

    /// The agent this ID names, by agentwall's convention.
    pub fn agent(&self) -> Result<AgentName<'_>, IdError> {
        let mut segs = self.path.strip_prefix('/').unwrap_or_default().split('/');
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("agent"), Some(name), Some(env), version, None) => {
                Ok(AgentName { name, env, version })
            }
            _ => Err(IdError::NotAgent(self.to_string())),
        }
    }
}

/// The parts of an agent's SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentName<'a> {
    pub name: &'a str,
    pub env: &'a str,
    pub version: Option<&'a str>,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.contains('@') {
        return Err(IdError::UserInfo);
    }
    if td.contains(':') {
        return Err(IdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong(td.len()));
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(IdError::UppercaseTrustDomain(c)),
            '%' => return Err(IdError::PercentEncoded),
            _ => return Err(IdError::TrustDomainChar(c)),
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(IdError::TrailingSlash);
    }
    for seg in path[1..].split('/') {
        match seg {
            "" => return Err(IdError::EmptySegment),
            "." | ".." => return Err(IdError::DotSegment),
            _ => {}
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(if c == '%' {
                IdError::PercentEncoded
            } else {
                IdError::PathChar(c)
            });
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = match s.get(..SCHEME.len()) {
            Some(p) if p == SCHEME => &s[SCHEME.len()..],
            Some(p) if p.eq_ignore_ascii_case(SCHEME) => return Err(IdError::SchemeCase),
            _ => return Err(IdError::Scheme),
        };
        // Query and fragment end the path in URI syntax; refuse them before anything else.
        if rest.contains('#') {
            return Err(IdError::Fragment);
        }
        if rest.contains('?') {
            return Err(IdError::Query);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/agent/reader/prod",
            "spiffe://example.org/agent/reader/prod/v3",
            "spiffe://a-b_c.d9/Path.With-Mixed_Case/0",
            "spiffe://x/a",
        ] {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s, "round trip");
        }
    }

    #[test]
    fn invalid_ids_name_their_fault() {
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
        let table: Vec<(&str, IdError)> = vec![
            ("", IdError::Empty),
            ("http://example.org/a", IdError::Scheme),
            ("spiffe:/example.org/a", IdError::Scheme),
            ("example.org/a", IdError::Scheme),
            ("SPIFFE://example.org/a", IdError::SchemeCase),
            ("Spiffe://example.org/a", IdError::SchemeCase),
            ("spiffe:///a", IdError::MissingTrustDomain),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe://Example.org/a", IdError::UppercaseTrustDomain('E')),
            ("spiffe://exa$mple.org/a", IdError::TrustDomainChar('$')),
            ("spiffe://example.org:8443/a", IdError::Port),
            ("spiffe://user@example.org/a", IdError::UserInfo),
            ("spiffe://user:pw@example.org/a", IdError::UserInfo),
            ("spiffe://example.org/a?x=1", IdError::Query),
            ("spiffe://example.org/a#frag", IdError::Fragment),
            ("spiffe://example.org/a%20b", IdError::PercentEncoded),
            ("spiffe://ex%41mple.org/a", IdError::PercentEncoded),
            ("spiffe://example.org//a", IdError::EmptySegment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org/a/./b", IdError::DotSegment),
            ("spiffe://example.org/a/..", IdError::DotSegment),
            ("spiffe://example.org/a/", IdError::TrailingSlash),
            ("spiffe://example.org/", IdError::TrailingSlash),
            ("spiffe://example.org/a b", IdError::PathChar(' ')),
            ("spiffe://example.org/é", IdError::PathChar('é')),
            (&long_td, IdError::TrustDomainTooLong(256)),
            (&long_id, IdError::TooLong(long_id.len())),
        ];
        for (s, want) in table {
            assert_eq!(s.parse::<SpiffeId>(), Err(want), "{s:?}");
        }
    }

    #[test]
    fn workload_ids_need_a_path() {
        assert!(matches!(
            SpiffeId::workload("spiffe://example.org"),
            Err(IdError::NoPath(_))
        ));
        assert!(SpiffeId::workload("spiffe://example.org/agent/a/prod").is_ok());
    }

    #[test]
    fn agent_convention() {
        let id: SpiffeId = "spiffe://example.org/agent/reader/prod/v3".parse().unwrap();
        assert_eq!(
            id.agent().unwrap(),
            AgentName {
                name: "reader",
                env: "prod",
                version: Some("v3")
            }
        );
        let id: SpiffeId = "spiffe://example.org/agent/reader/prod".parse().unwrap();
        assert_eq!(id.agent().unwrap().version, None);
        for s in [
            "spiffe://example.org/svc/reader/prod",
            "spiffe://example.org/agent/reader",
            "spiffe://example.org/agent/a/b/c/d",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert!(matches!(id.agent(), Err(IdError::NotAgent(_))), "{s}");
        }
    }
}
