//! Bearer-token check for `/v1` (and `/metrics` when the config asks for it),
//! compared in constant time.
//!
//! Left out: roles and per-tenant tokens (the one token opens all of `/v1`), and
//! reading the token, which `main` does at start-up and on SIGHUP ([`Token::replace`]).
//! `/healthz` needs none.

use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The API token, which a SIGHUP may replace while requests are checked.
pub struct Token {
    held: RwLock<String>,
    /// How many times it was replaced: what the event streams opened with an
    /// earlier token watch, to end then.
    replaced: tokio::sync::watch::Sender<u64>,
}

impl Token {
    pub fn new(token: String) -> Self {
        Self {
            held: RwLock::new(token),
            replaced: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The token from now on. Requests already checked are not checked again,
    /// but the event streams they opened end ([`Token::replacements`]).
    pub fn replace(&self, token: String) {
        {
            // A poisoned lock still holds a whole string: a write replaces it.
            let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
            *held = token;
        }
        self.replaced.send_modify(|n| *n += 1);
    }

    /// Changes each time the token is replaced.
    pub fn replacements(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replaced.subscribe()
    }

    /// Whether `presented` is the token, compared in constant time.
    fn matches(&self, presented: &str) -> bool {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        bool::from(presented.as_bytes().ct_eq(held.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Rejects requests without `Authorization: Bearer <token>` with 401.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if holds_token(&request, &state.token) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::unauthorized())
    }
}

/// In front of every route and of the fallbacks: a path under `/v1` without
/// the token is answered 401 whether or not it names a route (a 404 or 405
/// would tell a stranger which paths exist); `/metrics` names tenants, peers'
/// public keys and addresses: with `api.metrics_need_token` it takes the same
/// token as `/v1`.
pub async fn guard(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = request.uri().path();
    let needs_token = path == "/v1"
        || path.starts_with("/v1/")
        || (state.metrics_need_token && path == "/metrics");
    if needs_token && !holds_token(&request, &state.token) {
        return Err(ApiError::unauthorized());
    }
    Ok(next.run(request).await)
}

fn holds_token(request: &Request, token: &Token) -> bool {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .unwrap_or("");
    token.matches(presented)
}

/// The credentials of a `Bearer` authorization (the scheme is
/// case-insensitive, RFC 9110 section 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim_start_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::{bearer, Token};

    #[test]
    fn a_replaced_token_is_the_only_one() {
        let token = Token::new("old".into());
        assert!(token.matches("old") && !token.matches("new"));
        token.replace("new".into());
        assert!(token.matches("new") && !token.matches("old") && !token.matches(""));
        assert_eq!(format!("{token:?}"), "Token(..)", "never printed");
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_nothing_else_passes() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "Bearer  abc"] {
            assert_eq!(bearer(value), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearerabc", "abc", ""] {
            assert_eq!(bearer(value), None, "{value}");
        }
    }
}
