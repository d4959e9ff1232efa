//! JWT-SVIDs: short-lived signed bearer tokens for HTTP APIs without mTLS.
//!
//! A token is a JWT signed with ES256 by the node's token key (`<state dir>/ca/jwt.key`, 0600);
//! its `sub` is the holder's SPIFFE ID, `aud` the audience it was asked for, `exp` a few minutes
//! ahead (default 5) and never past the holder's certificate. The public key is published as a
//! JWKS (`<state dir>/jwks.json`) under a key id that the token's header names. Signing and
//! checking are jsonwebtoken's.
//!
//! A token is tied to the certificate it was issued for: its `svid_serial` claim names that
//! certificate, so that revoking the certificate (or its SPIFFE ID) ends the token too. The key
//! speaks for the node's trust domain only: no token is issued or accepted for another.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};

use super::{
    spiffe::SpiffeId,
    svid::{check_key_file, write_private},
};

/// The longest token lifetime (config `identity.token_lifetime` is at most this).
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// The most clock difference tolerated when judging a token's times (config
/// `identity.clock_skew` is at most this).
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Key(#[from] super::svid::CaError),
    #[error("token key {path}: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("signing the token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("give at least one audience (the API the token is for)")]
    NoAudience,
    #[error("audience {0:?} is empty or has control characters")]
    BadAudience(String),
    #[error("token lifetime {0:?} is outside 1 s to 1 h")]
    Lifetime(Duration),
    #[error(
        "the certificate expires within a second; renew it before asking for a token, which \
         never outlives its certificate"
    )]
    CertificateExpiring,
    #[error(
        "{0} is not in this node's trust domain {1}; tokens of this node speak for its own \
         trust domain only"
    )]
    ForeignTrustDomain(String, String),
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token names key {0:?}, which is not in the key set")]
    UnknownKey(String),
    #[error("the token's subject is not a SPIFFE ID: {0}")]
    Subject(String),
}

/// The claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: Vec<String>,
    /// Seconds since the Unix epoch.
    pub exp: u64,
    pub iat: u64,
    /// Serial (upper-case hex) of the X509-SVID the token was issued for.
    pub svid_serial: String,
}

/// The certificate a token is issued for: its holder, serial and end.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub id: &'a SpiffeId,
    pub serial: &'a str,
    pub not_after: SystemTime,
}

/// The node's token signing key.
pub struct TokenSigner {
    key: EncodingKey,
    trust_domain: String,
    kid: String,
    x: String,
    y: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl TokenSigner {
    /// Loads `<dir>/jwt.key`, creating it on first use; it signs for `trust_domain`.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, TokenError> {
        let path = dir.join("jwt.key");
        let bad = |message: String| TokenError::BadKey {
            path: path.clone(),
            message,
        };
        let pair = if path.exists() {
            check_key_file(&path)?;
            let pem = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| bad(e.to_string()))?
        } else {
            let pair = rcgen::KeyPair::generate().map_err(|e| bad(e.to_string()))?;
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            write_private(&path, pair.serialize_pem().as_bytes(), 0o600)?;
            pair
        };
        if pair.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad("not an ECDSA P-256 key".into()));
        }
        // Uncompressed point: 0x04 || X || Y.
        let raw = pair.public_key_raw();
        if raw.len() != 65 || raw[0] != 4 {
            return Err(bad("unexpected public key encoding".into()));
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw);
        Ok(Self {
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
            trust_domain: trust_domain.to_string(),
            kid: b64.encode(&digest.as_ref()[..16]),
            x: b64.encode(&raw[1..33]),
            y: b64.encode(&raw[33..65]),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key set that verifies this signer's tokens.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": self.x,
                "y": self.y,
                "kid": self.kid,
                "alg": "ES256",
                "use": "sig",
            }]
        })
    }

    /// Writes the JWKS where verifiers read it.
    pub fn write_jwks(&self, path: &Path) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec_pretty(&self.jwks()).map_err(|e| TokenError::BadKey {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        write_private(path, &bytes, 0o644)?;
        Ok(())
    }

    /// Signs a token for the holder of a certificate, valid from `now` for `lifetime` or
    /// until the certificate ends, whichever comes first.
    pub fn issue(
        &self,
        holder: Holder<'_>,
        audience: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<(String, Claims), TokenError> {
        if audience.is_empty() {
            return Err(TokenError::NoAudience);
        }
        if let Some(a) = audience
            .iter()
            .find(|a| a.is_empty() || a.chars().any(char::is_control))
        {
            return Err(TokenError::BadAudience(a.clone()));
        }
        if lifetime < Duration::from_secs(1) || lifetime > MAX_LIFETIME {
            return Err(TokenError::Lifetime(lifetime));
        }
        if holder.id.trust_domain() != self.trust_domain {
            return Err(TokenError::ForeignTrustDomain(
                holder.id.to_string(),
                self.trust_domain.clone(),
            ));
        }
        let exp = secs(now + lifetime).min(secs(holder.not_after));
        if exp <= secs(now) {
            return Err(TokenError::CertificateExpiring);
        }
        let claims = Claims {
            sub: holder.id.to_string(),
            aud: audience.to_vec(),
            exp,
            iat: secs(now),
            svid_serial: holder.serial.to_ascii_uppercase(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key).map_err(TokenError::Sign)?;
        Ok((jwt, claims))
    }
}

/// Verifies a JWT-SVID against a key set for `audience` at `now`: ES256 signature by the key
/// the header names, no critical header parameters, audience, not before and expiry (with
/// `leeway`, at most [`MAX_LEEWAY`]), an issue time that is not in the future and a lifetime no
/// token of this node has, a SPIFFE ID of `trust_domain` as subject, and the certificate it was
/// issued for. Revocation is the caller's to check on the returned subject and serial.
pub fn verify(
    jwks: &JwkSet,
    trust_domain: &str,
    token: &str,
    audience: &str,
    leeway: Duration,
    now: SystemTime,
) -> Result<Claims, TokenError> {
    let invalid = |e: jsonwebtoken::errors::Error| TokenError::Invalid(e.to_string());
    let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
    if header.alg != Algorithm::ES256 {
        return Err(TokenError::Invalid(format!(
            "algorithm {:?}; JWT-SVIDs here are ES256",
            header.alg
        )));
    }
    if let Some(crit) = &header.crit {
        // RFC 7515 §4.1.11: a critical extension this verifier does not know makes the token
        // invalid, and this one knows none.
        return Err(TokenError::Invalid(format!(
            "critical header parameters {crit:?} are not understood here"
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| TokenError::Invalid("no key id (kid) in the header".into()))?;
    let jwk = jwks.find(&kid).ok_or(TokenError::UnknownKey(kid))?;
    let key = DecodingKey::from_jwk(jwk).map_err(invalid)?;
    let leeway = leeway.min(MAX_LEEWAY).as_secs();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    v.validate_nbf = true;
    v.leeway = leeway;
    let claims = jsonwebtoken::decode::<Claims>(token, &key, &v)
        .map_err(invalid)?
        .claims;
    // jsonwebtoken judges exp against its own clock; these against the caller's.
    let now = secs(now);
    if claims.exp.saturating_add(leeway) < now {
        return Err(TokenError::Invalid("ExpiredSignature".into()));
    }
    if claims.iat > now.saturating_add(leeway) {
        return Err(TokenError::Invalid(
            "it was issued in the future (iat); check the clocks".into(),
        ));
    }
    if claims.exp.saturating_sub(claims.iat) > MAX_LIFETIME.as_secs() {
        return Err(TokenError::Invalid(format!(
            "it is valid for longer than {} (exp - iat); no token of this node is",
            humantime::format_duration(MAX_LIFETIME)
        )));
    }
    let sub = SpiffeId::workload(&claims.sub).map_err(|e| TokenError::Subject(e.to_string()))?;
    if sub.trust_domain() != trust_domain {
        return Err(TokenError::ForeignTrustDomain(
            claims.sub,
            trust_domain.to_string(),
        ));
    }
    let serial = &claims.svid_serial;
    if serial.is_empty() || serial.len() > 40 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Invalid(
            "svid_serial is not a certificate serial".into(),
        ));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aw-token-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const TD: &str = "example.org";

    fn holder(id: &SpiffeId, not_after: SystemTime) -> Holder<'_> {
        Holder {
            id,
            serial: "0a1b",
            not_after,
        }
    }

    /// Signs `claims` with `signer`'s key as they are, with `header` changes.
    fn forge(
        signer: &TokenSigner,
        claims: &serde_json::Value,
        edit: impl Fn(&mut Header),
    ) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(signer.kid.clone());
        edit(&mut header);
        jsonwebtoken::encode(&header, claims, &signer.key).unwrap()
    }

    #[test]
    fn tokens_verify_only_for_their_audience_key_and_time() {
        let d = dir("verify");
        let signer = TokenSigner::load_or_create(&d, TD).unwrap();
        // Loading again gives the same key.
        assert_eq!(
            TokenSigner::load_or_create(&d, TD).unwrap().kid(),
            signer.kid()
        );
        let jwks: JwkSet = serde_json::from_value(signer.jwks()).unwrap();
        let id = SpiffeId::workload("spiffe://example.org/agent/a/prod").unwrap();
        let now = SystemTime::now();
        let day = now + Duration::from_secs(86_400);
        let check = |t: &str, aud: &str, leeway: u64| {
            verify(&jwks, TD, t, aud, Duration::from_secs(leeway), now)
        };
        let (t, c) = signer
            .issue(
                holder(&id, day),
                &["billing-api".into()],
                Duration::from_secs(300),
                now,
            )
            .unwrap();
        assert_eq!(c.sub, id.to_string());
        assert_eq!(c.svid_serial, "0A1B");
        let got = check(&t, "billing-api", 0).unwrap();
        assert_eq!(got, c);
        assert!(check(&t, "other-api", 0).is_err());
        // Expired (issued in the past).
        let (old, _) = signer
            .issue(
                holder(&id, day),
                &["billing-api".into()],
                Duration::from_secs(60),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let e = check(&old, "billing-api", 30).unwrap_err();
        assert!(e.to_string().contains("Expired"), "{e}");
        // Signed by another key.
        let other = TokenSigner::load_or_create(&dir("other"), TD).unwrap();
        let (foreign, _) = other
            .issue(
                holder(&id, day),
                &["billing-api".into()],
                Duration::from_secs(60),
                now,
            )
            .unwrap();
        assert!(matches!(
            check(&foreign, "billing-api", 0),
            Err(TokenError::UnknownKey(_))
        ));
        // A tampered payload.
        let mut parts: Vec<&str> = t.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = b64.encode(
            serde_json::to_vec(&Claims {
                sub: "spiffe://example.org/agent/admin/prod".into(),
                ..c
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert!(check(&parts.join("."), "billing-api", 0).is_err());
        assert!(matches!(
            signer.issue(holder(&id, day), &[], Duration::from_secs(60), now),
            Err(TokenError::NoAudience)
        ));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(dir("other"));
    }

    /// A 1-minute certificate got a token valid 4 minutes past its end.
    #[test]
    fn a_token_never_outlives_its_certificate() {
        let d = dir("outlive");
        let signer = TokenSigner::load_or_create(&d, TD).unwrap();
        let id = SpiffeId::workload("spiffe://example.org/agent/a/prod").unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let end = now + Duration::from_secs(60);
        let (_, c) = signer
            .issue(
                holder(&id, end),
                &["api".into()],
                Duration::from_secs(300),
                now,
            )
            .unwrap();
        assert_eq!(c.exp, secs(end));
        // Nothing is left of the certificate: no token.
        assert!(matches!(
            signer.issue(
                holder(&id, now + Duration::from_millis(500)),
                &["api".into()],
                Duration::from_secs(300),
                now
            ),
            Err(TokenError::CertificateExpiring)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The node signed tokens for SVIDs of federated trust domains, and accepted a subject of
    /// any trust domain.
    #[test]
    fn tokens_are_issued_and_accepted_for_the_nodes_trust_domain_only() {
        let d = dir("domain");
        let signer = TokenSigner::load_or_create(&d, TD).unwrap();
        let jwks: JwkSet = serde_json::from_value(signer.jwks()).unwrap();
        let now = SystemTime::now();
        let day = now + Duration::from_secs(86_400);
        let evil = SpiffeId::workload("spiffe://evil.example/agent/a/prod").unwrap();
        assert!(matches!(
            signer.issue(
                holder(&evil, day),
                &["api".into()],
                Duration::from_secs(60),
                now
            ),
            Err(TokenError::ForeignTrustDomain(..))
        ));
        let claims = serde_json::json!({
            "sub": "spiffe://evil.example/agent/a/prod", "aud": ["api"],
            "exp": secs(now) + 60, "iat": secs(now), "svid_serial": "01",
        });
        let t = forge(&signer, &claims, |_| {});
        let e = verify(&jwks, TD, &t, "api", Duration::ZERO, now).unwrap_err();
        assert!(matches!(e, TokenError::ForeignTrustDomain(..)), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Tokens signed by the node's key but shaped as it never shapes them are refused.
    #[test]
    fn crit_future_iat_long_lifetime_nbf_and_missing_serial_are_refused() {
        let d = dir("shape");
        let signer = TokenSigner::load_or_create(&d, TD).unwrap();
        let jwks: JwkSet = serde_json::from_value(signer.jwks()).unwrap();
        let now = SystemTime::now();
        let n = secs(now);
        let check = |t: &str| verify(&jwks, TD, t, "api", Duration::from_secs(30), now);
        let good = serde_json::json!({
            "sub": "spiffe://example.org/agent/a/prod", "aud": ["api"],
            "exp": n + 60, "iat": n, "svid_serial": "01",
        });
        assert!(check(&forge(&signer, &good, |_| {})).is_ok());
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good.clone();
            c[k] = v;
            forge(&signer, &c, |_| {})
        };
        let refused = |t: String, what: &str| {
            let e = check(&t).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        refused(
            forge(&signer, &good, |h| h.crit = Some(vec!["exp".into()])),
            "critical",
        );
        refused(with("iat", (n + 3600).into()), "future");
        refused(with("exp", (n + 86_400).into()), "longer than");
        refused(with("nbf", (n + 600).into()), "ImmatureSignature");
        refused(with("svid_serial", "not hex".into()), "svid_serial");
        let mut no_serial = good.clone();
        no_serial.as_object_mut().unwrap().remove("svid_serial");
        refused(forge(&signer, &no_serial, |_| {}), "svid_serial");
        // The leeway is bounded, whatever the caller asks.
        let stale = with("exp", (n - 600).into());
        assert!(verify(&jwks, TD, &stale, "api", Duration::from_secs(86_400), now).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
