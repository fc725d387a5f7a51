//! Token checks for a schema with `[auth]`: a JWT in the Hello, verified
//! with [`jsonwebtoken`] against an HS256 secret (from an environment
//! variable) or a JSON Web Key Set file (RS256, ES256, EdDSA).
//!
//! What is checked, each failure naming the check (code `AUTH`, or
//! `AUTH_EXPIRED` for `exp`):
//! - the token's size (at most [`TOKEN_BYTES_MAX`]) and shape;
//! - the algorithm, against an allowlist fixed by the key: HS256 with a
//!   secret, the JWK's own algorithm with a key set (never `none`; a key
//!   set never yields an HMAC key, so no RSA/HMAC confusion);
//! - the key id (`kid`) against the key set, when it has several keys;
//! - the signature; `exp` (required) and `nbf` with `leeway_s`; `iss` and
//!   `aud` when the schema sets them (then required); a string `sub`.

use std::sync::Arc;

use hearth_engine::rules::{Auth, Principal};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};

/// The largest token taken, in bytes.
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;

/// The code of a refused token.
pub const AUTH: &str = "AUTH";
/// The code of an expired token: the device asks its app for a new one and
/// reconnects; its pending writes stay.
pub const AUTH_EXPIRED: &str = "AUTH_EXPIRED";
/// The code of a token for another user than the device's.
pub const AUTH_USER_CHANGED: &str = "AUTH_USER_CHANGED";

enum Keys {
    Secret(DecodingKey),
    /// (kid, algorithm, key) per key of the set.
    Set(Vec<(Option<String>, Algorithm, DecodingKey)>),
}

pub struct Verifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: u64,
}

/// A verified token: who, and until when (seconds since the epoch).
pub struct Verified {
    pub principal: Arc<Principal>,
    pub exp_s: u64,
}

#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: AUTH,
        message: message.into(),
    }
}

impl Verifier {
    /// From the schema's `[auth]`: reads the secret's environment variable
    /// or the key set's file. The error says what is missing or wrong.
    pub fn new(auth: &Auth) -> Result<Verifier, String> {
        let keys = if let Some(var) = &auth.hs256_secret_env {
            let secret = std::env::var(var).map_err(|_| {
                format!("[auth] hs256_secret_env: the environment variable {var} is not set")
            })?;
            if secret.len() < 32 {
                return Err(format!(
                    "[auth] hs256_secret_env: the secret in {var} is {} bytes; HS256 needs at least 32",
                    secret.len()
                ));
            }
            Keys::Secret(
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| format!("[auth] the HS256 secret: {e}"))?,
            )
        } else if let Some(path) = &auth.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("[auth] jwks_file {path}: {e}"))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("[auth] jwks_file {path} is not a JSON Web Key Set: {e}"))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                let alg = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                    AlgorithmParameters::OctetKey(_) => {
                        return Err(format!(
                            "[auth] jwks_file {path}: symmetric (oct) keys are not taken from a key set; use hs256_secret_env"
                        ))
                    }
                    _ => {
                        return Err(format!(
                            "[auth] jwks_file {path}: a key of a kind this server does not take (RSA, EC P-256 and Ed25519 are taken)"
                        ))
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("[auth] jwks_file {path}: a key: {e}"))?;
                keys.push((jwk.common.key_id.clone(), alg, key));
            }
            if keys.is_empty() {
                return Err(format!("[auth] jwks_file {path} holds no keys"));
            }
            Keys::Set(keys)
        } else {
            return Err("[auth] needs hs256_secret_env or jwks_file".into());
        };
        Ok(Verifier {
            keys,
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            leeway_s: auth.leeway_s,
        })
    }

    /// Checks a Hello's token.
    pub fn verify(&self, token: Option<&str>) -> Result<Verified, Failure> {
        let token = token.ok_or_else(|| {
            fail("this server requires a token (the schema has [auth]); none was sent")
        })?;
        if token.len() > TOKEN_BYTES_MAX {
            return Err(fail(format!(
                "the token is {} bytes; at most {TOKEN_BYTES_MAX} are taken",
                token.len()
            )));
        }
        // A compact JWS is exactly three dot-separated parts (RFC 7515,
        // section 7.1); say so before anything reads one of them.
        if token.split('.').count() != 3 {
            return Err(fail(
                "the token is not a JWT: a JWT has three base64url parts separated by dots",
            ));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match header_alg(token) {
            // A header that parses as JSON but names an algorithm the
            // library does not know (`none`, say).
            Some(alg) => fail(format!(
                "alg: {alg:?} is not an algorithm this server takes"
            )),
            None => fail(format!("the token is not a JWT: {}", describe(e.kind()))),
        })?;
        let (alg, key) = match &self.keys {
            Keys::Secret(key) => (Algorithm::HS256, key),
            Keys::Set(keys) => {
                let found = match &header.kid {
                    Some(kid) => keys.iter().find(|(k, _, _)| k.as_deref() == Some(kid)),
                    None if keys.len() == 1 => keys.first(),
                    None => {
                        return Err(fail(
                            "kid: the token names no key id, and the key set has several keys",
                        ))
                    }
                };
                let (_, alg, key) = found.ok_or_else(|| {
                    fail(format!(
                        "kid: unknown key id {:?}",
                        header.kid.as_deref().unwrap_or("")
                    ))
                })?;
                (*alg, key)
            }
        };
        if header.alg != alg {
            return Err(fail(format!(
                "alg: the token is signed with {:?}; this server takes only {alg:?} for that key",
                header.alg
            )));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway_s;
        validation.validate_nbf = true;
        validation.validate_aud = self.audience.is_some();
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &self.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            key,
            &validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => Failure {
                code: AUTH_EXPIRED,
                message: "exp: the token expired".into(),
            },
            // The library says "missing" for a claim of the wrong type too.
            ErrorKind::MissingRequiredClaim(c) if payload_has(token, c) => {
                fail(format!("{c}: the claim has the wrong type"))
            }
            kind => fail(describe(kind)),
        })?;
        let claims = data.claims;
        let exp_s = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .ok_or_else(|| fail("exp: not a number of seconds"))?;
        let principal = Principal::from_claims(&claims)
            .ok_or_else(|| fail("sub: the token's sub is not a string"))?;
        if principal.sub.is_empty() || principal.sub.len() > 256 {
            return Err(fail("sub: empty, or longer than 256 bytes"));
        }
        Ok(Verified {
            principal: Arc::new(principal),
            exp_s,
        })
    }

    /// Seconds past `exp` a token is still taken.
    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }
}

/// Whether a token's payload has the claim `name` (of any type).
fn payload_has(token: &str, name: &str) -> bool {
    use base64::Engine as _;
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get(name).is_some())
}

/// The `alg` a token's header names, read without the library (which
/// refuses unknown algorithms before saying which).
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(json.get("alg")?.as_str()?.to_string())
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidToken => "not a JWT (three base64url parts)".into(),
        ErrorKind::InvalidSignature => "signature: it does not verify".into(),
        ErrorKind::ExpiredSignature => "exp: the token expired".into(),
        ErrorKind::ImmatureSignature => "nbf: the token is not valid yet".into(),
        ErrorKind::InvalidIssuer => "iss: not the issuer this server takes".into(),
        ErrorKind::InvalidAudience => "aud: not the audience this server takes".into(),
        ErrorKind::InvalidAlgorithm => "alg: not an algorithm this server takes".into(),
        ErrorKind::MissingAlgorithm => "alg: missing".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("{c}: the token has no {c} claim"),
        ErrorKind::InvalidClaimFormat(c) => format!("{c}: the claim has the wrong type"),
        ErrorKind::Base64(_) => "not a JWT: bad base64url".into(),
        ErrorKind::Json(_) => "not a JWT: bad JSON".into(),
        ErrorKind::Utf8(_) => "not a JWT: bad UTF-8".into(),
        other => format!("the token is refused: {other:?}"),
    }
}
