//! JWT bearer tokens: where a request carries one, verifying its signature
//! against a JWK Set with `ring` (RS256, ES256, EdDSA; `none` and every
//! HMAC algorithm are refused before any key is looked at), then the
//! registered claims (`iss`, `aud`, `exp`, `nbf` with the clock skew) and
//! the route's claim rules. Pure: the key set comes from [`super::jwks`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ironmesh_api::gateway::{ClaimRule, JwtAlgorithm, JwtAuth};
use ring::signature;
use serde_json::Value;

/// Why a request is refused. [`JwtError::status`] says 401 or 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("no key {0:?} in the issuer's key set")]
    UnknownKey(String),
    #[error("signature does not verify")]
    Signature,
    #[error("issuer {0:?} is not the expected one")]
    Issuer(String),
    #[error("audience does not include an accepted one")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("the issuer's keys are not available")]
    KeysUnavailable,
    /// Authenticated, but a claim rule does not hold.
    #[error("claim {claim:?} does not satisfy the route's rule")]
    Forbidden { claim: String },
}

impl JwtError {
    /// 401 for every authentication failure, 403 for a rule not met.
    pub fn status(&self) -> u16 {
        match self {
            JwtError::Forbidden { .. } => 403,
            _ => 401,
        }
    }

    /// The RFC 6750 `error` code for `WWW-Authenticate`.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Missing => "",
            JwtError::Forbidden { .. } => "insufficient_scope",
            _ => "invalid_token",
        }
    }
}

/// One verification key of a JWK Set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub kid: Option<String>,
    pub alg: JwtAlgorithm,
    /// What ring verifies with: the RSA components, the uncompressed P-256
    /// point, or the Ed25519 public key.
    material: Material,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// A parsed JWK Set; keys of kinds we do not verify with are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Parses `{"keys": [...]}`. Keys whose `use` is not `sig`, or of a
    /// type or curve not supported, are left out; a set with no usable key
    /// is an error.
    pub fn parse(text: &[u8]) -> Result<KeySet, String> {
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let Some(keys) = v.get("keys").and_then(Value::as_array) else {
            return Err("no \"keys\" list".into());
        };
        let b64 = |k: &Value, f: &str| -> Option<Vec<u8>> {
            URL_SAFE_NO_PAD
                .decode(k.get(f)?.as_str()?.trim_end_matches('='))
                .ok()
        };
        let mut out = Vec::new();
        for k in keys {
            if k.get("use")
                .and_then(Value::as_str)
                .is_some_and(|u| u != "sig")
            {
                continue;
            }
            let kid = k.get("kid").and_then(Value::as_str).map(str::to_string);
            let key = match (
                k.get("kty").and_then(Value::as_str),
                k.get("crv").and_then(Value::as_str),
            ) {
                (Some("RSA"), _) => match (b64(k, "n"), b64(k, "e")) {
                    (Some(n), Some(e)) => Some((JwtAlgorithm::RS256, Material::Rsa { n, e })),
                    _ => None,
                },
                (Some("EC"), Some("P-256")) => match (b64(k, "x"), b64(k, "y")) {
                    (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                        let mut point = vec![4u8];
                        point.extend(x);
                        point.extend(y);
                        Some((JwtAlgorithm::ES256, Material::P256(point)))
                    }
                    _ => None,
                },
                (Some("OKP"), Some("Ed25519")) => match b64(k, "x") {
                    Some(x) if x.len() == 32 => Some((JwtAlgorithm::EdDSA, Material::Ed25519(x))),
                    _ => None,
                },
                _ => None,
            };
            let Some((alg, material)) = key else { continue };
            // A key that names its algorithm is used only for that one.
            if let Some(a) = k.get("alg").and_then(Value::as_str) {
                if a != alg.as_str() {
                    continue;
                }
            }
            out.push(Key { kid, alg, material });
        }
        if out.is_empty() {
            return Err("no usable RS256, ES256 or EdDSA key".into());
        }
        Ok(KeySet { keys: out })
    }

    /// Candidate keys for `alg` and `kid` (a token without `kid` may be
    /// checked against every key of its algorithm).
    fn candidates<'a>(
        &'a self,
        alg: JwtAlgorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
    }
}

/// A token split into its parts, header decoded, nothing verified yet.
#[derive(Debug)]
pub struct Token<'a> {
    pub alg: JwtAlgorithm,
    pub kid: Option<String>,
    signed: &'a str,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

/// Splits and decodes `raw`; refuses every `alg` outside `allowed` (so
/// `none` and `HS256` never get further).
pub fn decode<'a>(raw: &'a str, allowed: &[JwtAlgorithm]) -> Result<Token<'a>, JwtError> {
    let mut parts = raw.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let dec = |x: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(x)
            .map_err(|_| JwtError::Malformed(format!("{what} is not base64url")))
    };
    let header: Value = serde_json::from_slice(&dec(h, "header")?)
        .map_err(|_| JwtError::Malformed("header is not JSON".into()))?;
    let alg_s = header.get("alg").and_then(Value::as_str).unwrap_or("none");
    let alg = allowed
        .iter()
        .copied()
        .find(|a| a.as_str() == alg_s)
        .ok_or_else(|| JwtError::Algorithm(alg_s.to_string()))?;
    if header.get("crit").is_some() {
        return Err(JwtError::Malformed(
            "critical header parameters are not supported".into(),
        ));
    }
    let signature = dec(s, "signature")?;
    if signature.is_empty() {
        return Err(JwtError::Signature);
    }
    Ok(Token {
        alg,
        kid: header
            .get("kid")
            .and_then(Value::as_str)
            .map(str::to_string),
        signed: &raw[..h.len() + 1 + p.len()],
        payload: dec(p, "payload")?,
        signature,
    })
}

impl Token<'_> {
    /// Whether some key of `keys` verifies the signature. `Err(UnknownKey)`
    /// when no key could (the caller may refresh the set and ask again).
    pub fn verify(&self, keys: &KeySet) -> Result<(), JwtError> {
        let mut tried = false;
        for k in keys.candidates(self.alg, self.kid.as_deref()) {
            tried = true;
            let msg = self.signed.as_bytes();
            let ok = match &k.material {
                Material::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, &self.signature)
                    .is_ok(),
                Material::P256(point) => {
                    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(msg, &self.signature)
                        .is_ok()
                }
                Material::Ed25519(x) => signature::UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(msg, &self.signature)
                    .is_ok(),
            };
            if ok {
                return Ok(());
            }
        }
        if tried {
            Err(JwtError::Signature)
        } else {
            Err(JwtError::UnknownKey(self.kid.clone().unwrap_or_default()))
        }
    }

    /// The payload's claims, once the signature verified.
    pub fn claims(&self) -> Result<BTreeMap<String, Value>, JwtError> {
        serde_json::from_slice(&self.payload)
            .map_err(|_| JwtError::Malformed("payload is not a JSON object".into()))
    }
}

/// The route's JWT settings with durations parsed once.
#[derive(Debug, Clone)]
pub struct Policy {
    pub spec: JwtAuth,
    pub skew: Duration,
}

impl Policy {
    pub fn new(spec: JwtAuth) -> Policy {
        let skew =
            ironmesh_api::gateway::duration(&spec.clock_skew).unwrap_or(Duration::from_secs(60));
        Policy { spec, skew }
    }

    /// Checks the registered claims and then the rules, at time `now`.
    pub fn check_claims(
        &self,
        claims: &BTreeMap<String, Value>,
        now: SystemTime,
    ) -> Result<(), JwtError> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let skew = self.skew.as_secs();
        match claims.get("iss").and_then(Value::as_str) {
            Some(i) if i == self.spec.issuer => {}
            other => return Err(JwtError::Issuer(other.unwrap_or_default().to_string())),
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.spec.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.spec.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(JwtError::Audience);
        }
        // A bearer token without an expiry would be good forever.
        let Some(exp) = claims.get("exp").and_then(Value::as_f64) else {
            return Err(JwtError::Malformed("no exp claim".into()));
        };
        if now as f64 >= exp + skew as f64 {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64) {
            if ((now + skew) as f64) < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        for r in &self.spec.rules {
            if !rule_holds(r, claims.get(&r.claim)) {
                return Err(JwtError::Forbidden {
                    claim: r.claim.clone(),
                });
            }
        }
        Ok(())
    }
}

fn rule_holds(r: &ClaimRule, v: Option<&Value>) -> bool {
    let Some(v) = v else { return false };
    if let Some(want) = &r.equals {
        return v.as_str() == Some(want.as_str());
    }
    if let Some(want) = &r.contains {
        return match v {
            Value::Array(items) => items.iter().any(|i| i.as_str() == Some(want.as_str())),
            Value::String(s) => s.split_whitespace().any(|w| w == want),
            _ => false,
        };
    }
    false
}

/// Tokens whose signature verified, with their claims: a client sends the
/// same token on every request, and a signature check costs more than the
/// rest of the request. An entry is good for [`VERIFIED_TTL`] and only
/// with the key set it was verified against (a rotated-out key stops being
/// trusted at once); the claims (expiry, rules) are checked every time.
#[derive(Default)]
pub struct VerifiedCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, Verified>>,
}

struct Verified {
    keys: std::sync::Weak<KeySet>,
    at: std::time::Instant,
    claims: std::sync::Arc<BTreeMap<String, Value>>,
}

/// How long a verified signature is trusted without checking it again.
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Entries kept per route; past it the cache starts over.
const VERIFIED_MAX: usize = 10_000;

impl VerifiedCache {
    /// The claims of `token` if it verified against `keys` lately.
    pub fn get(
        &self,
        token: &str,
        keys: &std::sync::Arc<KeySet>,
    ) -> Option<std::sync::Arc<BTreeMap<String, Value>>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let v = entries.get(token)?;
        let same_keys = v
            .keys
            .upgrade()
            .is_some_and(|k| std::sync::Arc::ptr_eq(&k, keys));
        (same_keys && v.at.elapsed() < VERIFIED_TTL).then(|| v.claims.clone())
    }

    pub fn put(
        &self,
        token: &str,
        keys: &std::sync::Arc<KeySet>,
        claims: std::sync::Arc<BTreeMap<String, Value>>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= VERIFIED_MAX {
            entries.clear();
        }
        entries.insert(
            token.to_string(),
            Verified {
                keys: std::sync::Arc::downgrade(keys),
                at: std::time::Instant::now(),
                claims,
            },
        );
    }
}

/// A claim as a header value: strings as they are, other JSON as text.
pub fn claim_header_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod test_keys {
    //! Keys made in the test, and tokens signed with them.
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    pub enum Signer {
        Ed(signature::Ed25519KeyPair),
        Ec(signature::EcdsaKeyPair),
        Rsa(signature::RsaKeyPair),
    }

    impl Signer {
        pub fn ed25519() -> Signer {
            let doc = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Signer::Ed(signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap())
        }

        pub fn p256() -> Signer {
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let rng = SystemRandom::new();
            let doc = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            Signer::Ec(signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap())
        }

        /// ring cannot make RSA keys; openssl (scripts/install-deps.sh) does.
        pub fn rsa() -> Signer {
            let dir = tempfile::tempdir().unwrap();
            let (pem, der) = (dir.path().join("k.pem"), dir.path().join("k.der"));
            let run = |args: &[&std::ffi::OsStr]| {
                let out = std::process::Command::new("openssl")
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
            };
            run(&[
                "genpkey".as_ref(),
                "-algorithm".as_ref(),
                "RSA".as_ref(),
                "-pkeyopt".as_ref(),
                "rsa_keygen_bits:2048".as_ref(),
                "-out".as_ref(),
                pem.as_os_str(),
            ]);
            // ring reads RSAPrivateKey (PKCS#1) DER.
            run(&[
                "rsa".as_ref(),
                "-in".as_ref(),
                pem.as_os_str(),
                "-outform".as_ref(),
                "DER".as_ref(),
                "-traditional".as_ref(),
                "-out".as_ref(),
                der.as_os_str(),
            ]);
            let der = std::fs::read(&der).unwrap();
            Signer::Rsa(signature::RsaKeyPair::from_der(&der).unwrap())
        }

        pub fn alg(&self) -> &'static str {
            match self {
                Signer::Ed(_) => "EdDSA",
                Signer::Ec(_) => "ES256",
                Signer::Rsa(_) => "RS256",
            }
        }

        /// This key as a JWK with `kid`.
        pub fn jwk(&self, kid: &str) -> Value {
            let b = |x: &[u8]| URL_SAFE_NO_PAD.encode(x);
            match self {
                Signer::Ed(k) => {
                    serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b(k.public_key().as_ref())})
                }
                Signer::Ec(k) => {
                    let p = k.public_key().as_ref();
                    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b(&p[1..33]), "y": b(&p[33..65])})
                }
                Signer::Rsa(k) => {
                    let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                    serde_json::json!({"kty": "RSA", "kid": kid, "n": b(&c.n), "e": b(&c.e), "alg": "RS256", "use": "sig"})
                }
            }
        }

        pub fn sign(&self, kid: &str, claims: &Value) -> String {
            let header = serde_json::json!({"alg": self.alg(), "typ": "JWT", "kid": kid});
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let rng = SystemRandom::new();
            let sig = match self {
                Signer::Ed(k) => k.sign(signed.as_bytes()).as_ref().to_vec(),
                Signer::Ec(k) => k.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec(),
                Signer::Rsa(k) => {
                    let mut out = vec![0; k.public().modulus_len()];
                    k.sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        signed.as_bytes(),
                        &mut out,
                    )
                    .unwrap();
                    out
                }
            };
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
    }

    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::{now, Signer};
    use super::*;
    use serde_json::json;

    fn policy(rules: Value) -> Policy {
        Policy::new(
            serde_json::from_value(json!({"issuer": "https://issuer.test", "audiences": ["orders"],
                "jwks": {"inline": "{}"}, "algorithms": ["RS256", "ES256", "EdDSA"], "clockSkew": "30s",
                "rules": rules}))
            .unwrap(),
        )
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({"iss": "https://issuer.test", "aud": "orders", "sub": "alice", "exp": now() + 300, "scope": "orders:read orders:write"});
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    /// Decode, verify, check: what the proxy does with a token.
    fn check(p: &Policy, keys: &KeySet, raw: &str) -> Result<(), JwtError> {
        let t = decode(raw, &p.spec.algorithms)?;
        t.verify(keys)?;
        p.check_claims(&t.claims()?, SystemTime::now())
    }

    fn set(signers: &[(&Signer, &str)]) -> KeySet {
        let keys: Vec<Value> = signers.iter().map(|(s, kid)| s.jwk(kid)).collect();
        KeySet::parse(json!({"keys": keys}).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn every_supported_algorithm_verifies_and_a_foreign_key_does_not() {
        let p = policy(json!([]));
        for s in [Signer::ed25519(), Signer::p256(), Signer::rsa()] {
            let keys = set(&[(&s, "k1")]);
            assert_eq!(
                check(&p, &keys, &s.sign("k1", &claims(json!({})))),
                Ok(()),
                "{}",
                s.alg()
            );
            // Same kid, another key of the same kind: wrong signature.
            let other = match s {
                Signer::Ed(_) => Signer::ed25519(),
                Signer::Ec(_) => Signer::p256(),
                Signer::Rsa(_) => Signer::rsa(),
            };
            assert_eq!(
                check(&p, &keys, &other.sign("k1", &claims(json!({})))),
                Err(JwtError::Signature),
                "{}",
                s.alg()
            );
        }
    }

    #[test]
    fn claims_are_checked_after_the_signature() {
        let s = Signer::ed25519();
        let keys = set(&[(&s, "k1")]);
        let p = policy(json!([]));
        let t = |extra: Value| check(&p, &keys, &s.sign("k1", &claims(extra)));
        assert_eq!(t(json!({"exp": now() - 120})), Err(JwtError::Expired));
        // Within the clock skew an expired token still passes.
        assert_eq!(t(json!({"exp": now() - 10})), Ok(()));
        assert_eq!(t(json!({"nbf": now() + 600})), Err(JwtError::NotYetValid));
        assert_eq!(t(json!({"aud": "billing"})), Err(JwtError::Audience));
        assert_eq!(t(json!({"aud": ["billing", "orders"]})), Ok(()));
        assert_eq!(
            t(json!({"iss": "https://evil.test"})),
            Err(JwtError::Issuer("https://evil.test".into()))
        );
        let no_exp = {
            let mut c = claims(json!({}));
            c.as_object_mut().unwrap().remove("exp");
            c
        };
        assert!(matches!(
            check(&p, &keys, &s.sign("k1", &no_exp)),
            Err(JwtError::Malformed(_))
        ));
        assert_eq!(JwtError::Expired.status(), 401);
    }

    #[test]
    fn alg_none_and_hmac_are_refused_whatever_the_keys() {
        let s = Signer::ed25519();
        let keys = set(&[(&s, "k1")]);
        let p = policy(json!([]));
        let body = URL_SAFE_NO_PAD.encode(claims(json!({})).to_string());
        for alg in ["none", "HS256", "NONE"] {
            let h = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": "k1"}).to_string());
            for sig in ["", "c2ln"] {
                let raw = format!("{h}.{body}.{sig}");
                assert_eq!(
                    check(&p, &keys, &raw),
                    Err(JwtError::Algorithm(alg.into())),
                    "{alg}"
                );
            }
        }
        // An allowed list without EdDSA refuses an EdDSA token too.
        let mut only_rs = policy(json!([]));
        only_rs.spec.algorithms = vec![JwtAlgorithm::RS256];
        assert_eq!(
            check(&only_rs, &keys, &s.sign("k1", &claims(json!({})))),
            Err(JwtError::Algorithm("EdDSA".into()))
        );
        assert!(matches!(
            check(&p, &keys, "abc"),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn an_unknown_kid_asks_for_a_refresh() {
        let s = Signer::p256();
        let keys = set(&[(&s, "old")]);
        let raw = s.sign("new", &claims(json!({})));
        let t = decode(&raw, &[JwtAlgorithm::ES256]).unwrap();
        assert_eq!(t.verify(&keys), Err(JwtError::UnknownKey("new".into())));
        let rotated = set(&[(&s, "old"), (&s, "new")]);
        assert_eq!(t.verify(&rotated), Ok(()));
    }

    #[test]
    fn rules_on_claims_give_403() {
        let s = Signer::ed25519();
        let keys = set(&[(&s, "k1")]);
        let p = policy(
            json!([{"claim": "scope", "contains": "orders:read"}, {"claim": "groups", "contains": "analytics"}]),
        );
        let t = |extra: Value| check(&p, &keys, &s.sign("k1", &claims(extra)));
        assert_eq!(t(json!({"groups": ["analytics", "ops"]})), Ok(()));
        let missing_scope = t(json!({"scope": "orders:write", "groups": ["analytics"]}));
        assert_eq!(
            missing_scope,
            Err(JwtError::Forbidden {
                claim: "scope".into()
            })
        );
        assert_eq!(missing_scope.unwrap_err().status(), 403);
        assert_eq!(
            t(json!({})),
            Err(JwtError::Forbidden {
                claim: "groups".into()
            })
        );
        // "orders:read" must be a whole word of scope, not a substring.
        assert!(t(json!({"scope": "orders:readonly", "groups": ["analytics"]})).is_err());
        let eq = policy(json!([{"claim": "tenant", "equals": "acme"}]));
        assert_eq!(
            check(
                &eq,
                &keys,
                &s.sign("k1", &claims(json!({"tenant": "acme"})))
            ),
            Ok(())
        );
        assert!(check(
            &eq,
            &keys,
            &s.sign("k1", &claims(json!({"tenant": "other"})))
        )
        .is_err());
    }

    #[test]
    fn verified_tokens_are_trusted_only_with_the_key_set_they_verified_against() {
        use std::sync::Arc;
        let cache = VerifiedCache::default();
        let keys = Arc::new(KeySet::default());
        cache.put("t", &keys, Arc::new(BTreeMap::new()));
        assert!(cache.get("t", &keys).is_some());
        assert!(cache.get("u", &keys).is_none());
        // A new set (a rotation, a key withdrawn): verify again.
        let rotated = Arc::new(KeySet::default());
        assert!(cache.get("t", &rotated).is_none());
        drop(keys);
        assert!(cache.get("t", &rotated).is_none());
    }

    #[test]
    fn key_sets_skip_what_they_cannot_use() {
        assert!(KeySet::parse(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
        assert!(KeySet::parse(b"[]").is_err());
        let s = Signer::ed25519();
        let mut enc = s.jwk("e");
        enc["use"] = json!("enc");
        let text = json!({"keys": [enc, s.jwk("s"), {"kty": "oct", "k": "eA"}]}).to_string();
        let set = KeySet::parse(text.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("s"));
    }
}
