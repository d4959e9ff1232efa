//! JWT-SVIDs: short-lived signed bearer tokens for HTTP APIs without mTLS.
//!
//! A token is a JWT signed with ES256 by the node's token key (`<state dir>/ca/jwt.key`, 0600);
//! its `sub` is the holder's SPIFFE ID, `aud` the audience it was asked for, `exp` a few minutes
//! ahead (default 5). The public key is published as a JWKS (`<state dir>/jwks.json`) under a
//! key id that the token's header names. Signing and checking are jsonwebtoken's.

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
}

/// The node's token signing key.
pub struct TokenSigner {
    key: EncodingKey,
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
    /// Loads `<dir>/jwt.key`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, TokenError> {
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
        let digest = ring::digest::digest(&ring::digest::SHA256, raw);
        Ok(Self {
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
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

    /// Signs a token for `sub`, valid from `now` for `lifetime`.
    pub fn issue(
        &self,
        sub: &SpiffeId,
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
        if lifetime < Duration::from_secs(1) || lifetime > Duration::from_secs(3600) {
            return Err(TokenError::Lifetime(lifetime));
        }
        let claims = Claims {
            sub: sub.to_string(),
            aud: audience.to_vec(),
            exp: secs(now + lifetime),
            iat: secs(now),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key).map_err(TokenError::Sign)?;
        Ok((jwt, claims))
    }
}

/// Verifies a JWT-SVID against a key set for `audience`: ES256 signature by the key the header
/// names, audience, expiry (with `leeway`), and a SPIFFE ID as subject. Revocation is the
/// caller's to check on the returned subject.
pub fn verify(
    jwks: &JwkSet,
    token: &str,
    audience: &str,
    leeway: Duration,
) -> Result<Claims, TokenError> {
    let invalid = |e: jsonwebtoken::errors::Error| TokenError::Invalid(e.to_string());
    let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
    if header.alg != Algorithm::ES256 {
        return Err(TokenError::Invalid(format!(
            "algorithm {:?}; JWT-SVIDs here are ES256",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| TokenError::Invalid("no key id (kid) in the header".into()))?;
    let jwk = jwks.find(&kid).ok_or(TokenError::UnknownKey(kid))?;
    let key = DecodingKey::from_jwk(jwk).map_err(invalid)?;
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    v.leeway = leeway.as_secs();
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(invalid)?;
    SpiffeId::workload(&data.claims.sub).map_err(|e| TokenError::Subject(e.to_string()))?;
    Ok(data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aw-token-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn tokens_verify_only_for_their_audience_key_and_time() {
        let d = dir("verify");
        let signer = TokenSigner::load_or_create(&d).unwrap();
        // Loading again gives the same key.
        assert_eq!(TokenSigner::load_or_create(&d).unwrap().kid(), signer.kid());
        let jwks: JwkSet = serde_json::from_value(signer.jwks()).unwrap();
        let id = SpiffeId::workload("spiffe://example.org/agent/a/prod").unwrap();
        let now = SystemTime::now();
        let (t, c) = signer
            .issue(&id, &["billing-api".into()], Duration::from_secs(300), now)
            .unwrap();
        assert_eq!(c.sub, id.to_string());
        let got = verify(&jwks, &t, "billing-api", Duration::ZERO).unwrap();
        assert_eq!(got, c);
        assert!(verify(&jwks, &t, "other-api", Duration::ZERO).is_err());
        // Expired (issued in the past).
        let (old, _) = signer
            .issue(
                &id,
                &["billing-api".into()],
                Duration::from_secs(60),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let e = verify(&jwks, &old, "billing-api", Duration::from_secs(30)).unwrap_err();
        assert!(e.to_string().contains("Expired"), "{e}");
        // Signed by another key.
        let other = TokenSigner::load_or_create(&dir("other")).unwrap();
        let (foreign, _) = other
            .issue(&id, &["billing-api".into()], Duration::from_secs(60), now)
            .unwrap();
        assert!(matches!(
            verify(&jwks, &foreign, "billing-api", Duration::ZERO),
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
        assert!(verify(&jwks, &parts.join("."), "billing-api", Duration::ZERO).is_err());
        assert!(matches!(
            signer.issue(&id, &[], Duration::from_secs(60), now),
            Err(TokenError::NoAudience)
        ));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(dir("other"));
    }
}
