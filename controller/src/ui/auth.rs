//! Sign-in for the web UI: one-time codes, sessions and CSRF tokens.
//!
//! `imctl ui` calls `OperatorService.CreateUiLogin` with the operator's
//! certificate; [`Auth::issue_code`] answers with a random code bound to
//! that operator and role, good once for [`CODE_TTL`]. `GET /login?code=`
//! exchanges it ([`Auth::exchange`]) for a session: a random id in an
//! `HttpOnly; Secure; SameSite=Strict` cookie, valid for [`SESSION_TTL`],
//! with its own CSRF token that every POST must carry (form field `csrf`
//! or header `x-csrf-token`).
//!
//! Codes and sessions live in this controller's memory: a restart signs
//! everyone out, and with several controllers a code works only on the
//! one that issued it. Only SHA-256 digests of codes and session ids are
//! kept, so a memory dump does not hand out live credentials.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::authz::{Caller, Role};

/// How long a sign-in code is good for.
pub const CODE_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "im_session";
/// Most outstanding codes and sessions kept (oldest go first past it).
const MAX_ENTRIES: usize = 10_000;

/// A signed-in operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub operator: String,
    pub role: Role,
    /// Every POST of this session must carry it.
    pub csrf: String,
    expires: Instant,
}

impl Session {
    /// The operator as [`crate::authz`] checks it.
    pub fn caller(&self) -> Caller {
        Caller {
            name: self.operator.clone(),
            role: self.role,
        }
    }

    /// True when `token` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, token: &str) -> bool {
        !token.is_empty() && bool::from(token.as_bytes().ct_eq(self.csrf.as_bytes()))
    }

    /// Edit and admin operators see buttons; view operators none.
    pub fn may_edit(&self) -> bool {
        self.role >= Role::Edit
    }

    pub fn is_admin(&self) -> bool {
        self.role >= Role::Admin
    }
}

#[derive(Default)]
struct State {
    /// SHA-256 of the code → who it signs in, until when.
    codes: HashMap<[u8; 32], (Caller, Instant)>,
    /// SHA-256 of the session id → the session.
    sessions: HashMap<[u8; 32], Session>,
}

/// Codes and sessions of one UI. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    state: Arc<Mutex<State>>,
    base_url: String,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Auth {
    /// `base_url`: `https://host:port` of the UI, for the sign-in URL.
    pub fn new(base_url: String) -> Auth {
        Auth {
            state: Arc::default(),
            base_url,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new one-time code for `caller`, and when it expires (Unix seconds).
    pub fn issue_code(&self, caller: &Caller) -> (String, i64) {
        let code = random_token();
        let now = Instant::now();
        let mut g = self.lock();
        g.codes.retain(|_, (_, exp)| *exp > now);
        if g.codes.len() >= MAX_ENTRIES {
            if let Some(k) = g.codes.iter().min_by_key(|(_, (_, e))| *e).map(|(k, _)| *k) {
                g.codes.remove(&k);
            }
        }
        g.codes
            .insert(digest(&code), (caller.clone(), now + CODE_TTL));
        let expires = crate::tokens::now_unix() + CODE_TTL.as_secs() as i64;
        (code, expires)
    }

    /// The sign-in URL of `code`.
    pub fn login_url(&self, code: &str) -> String {
        format!("{}/login?code={code}", self.base_url)
    }

    /// Trades `code` (once) for a new session: its id and the session.
    pub fn exchange(&self, code: &str) -> Option<(String, Session)> {
        let now = Instant::now();
        let mut g = self.lock();
        let (caller, exp) = g.codes.remove(&digest(code))?;
        if exp <= now {
            return None;
        }
        g.sessions.retain(|_, s| s.expires > now);
        if g.sessions.len() >= MAX_ENTRIES {
            if let Some(k) = g
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)
            {
                g.sessions.remove(&k);
            }
        }
        let id = random_token();
        let session = Session {
            operator: caller.name,
            role: caller.role,
            csrf: random_token(),
            expires: now + SESSION_TTL,
        };
        g.sessions.insert(digest(&id), session.clone());
        Some((id, session))
    }

    /// The live session of cookie value `id`.
    pub fn session(&self, id: &str) -> Option<Session> {
        let g = self.lock();
        g.sessions
            .get(&digest(id))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    /// Signs the session `id` out.
    pub fn end(&self, id: &str) {
        self.lock().sessions.remove(&digest(id));
    }

    /// The `Set-Cookie` value for a new session.
    pub fn cookie(id: &str) -> String {
        format!(
            "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
            SESSION_TTL.as_secs()
        )
    }

    /// The `Set-Cookie` value that removes the session cookie.
    pub fn clear_cookie() -> String {
        format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
    }
}

/// The session id in a `Cookie` header, if any.
pub fn session_id(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn admin() -> Caller {
        Caller {
            name: "alice".into(),
            role: Role::Admin,
        }
    }

    #[test]
    fn a_code_signs_in_once() {
        let auth = Auth::new("https://127.0.0.1:7444".into());
        let (code, _) = auth.issue_code(&admin());
        assert!(auth
            .login_url(&code)
            .ends_with(&format!("/login?code={code}")));
        let (id, s) = auth.exchange(&code).expect("first use");
        assert_eq!(s.operator, "alice");
        assert_eq!(s.role, Role::Admin);
        assert!(auth.exchange(&code).is_none(), "second use refused");
        assert_eq!(auth.session(&id).as_ref(), Some(&s));
        assert!(auth.exchange("nope").is_none());
        auth.end(&id);
        assert!(auth.session(&id).is_none());
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let auth = Auth::new(String::new());
        let (c1, _) = auth.issue_code(&admin());
        let (c2, _) = auth.issue_code(&admin());
        let (_, s1) = auth.exchange(&c1).unwrap();
        let (_, s2) = auth.exchange(&c2).unwrap();
        assert!(s1.csrf_ok(&s1.csrf));
        assert!(!s1.csrf_ok(&s2.csrf));
        assert!(!s1.csrf_ok(""));
    }

    #[test]
    fn expired_codes_are_refused() {
        let auth = Auth::new(String::new());
        let (code, _) = auth.issue_code(&admin());
        {
            let mut g = auth.lock();
            for (_, (_, exp)) in g.codes.iter_mut() {
                *exp = Instant::now() - Duration::from_secs(1);
            }
        }
        assert!(auth.exchange(&code).is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(session_id("a=b; im_session=xyz; c=d"), Some("xyz"));
        assert_eq!(session_id("a=b"), None);
        assert_eq!(session_id("im_session="), None);
        let c = Auth::cookie("xyz");
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Max-Age=28800"] {
            assert!(c.contains(attr), "{c}");
        }
    }
}
