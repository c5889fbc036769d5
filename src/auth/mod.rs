//! Client authentication to redcloak itself (`[listen.auth]`).
//!
//! A client's AUTH and HELLO ... AUTH are answered here and never forwarded:
//! the upstream connection is always logged in with redcloak's own
//! credentials. Without `[listen.auth]` the answers are those of a Redis whose
//! default user has no password. Replies never echo what the client sent.

pub mod lockout;

use crate::secret::Secret;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// The passwords clients may log in with: any of them, so clients can move
/// to a new one while the old still works. A reload replaces them whole.
pub type Passwords = Arc<ArcSwap<Vec<Secret>>>;

/// What a client must present, if anything.
#[derive(Debug)]
pub struct ClientAuth {
    required: Option<Required>,
}

#[derive(Debug)]
struct Required {
    username: Option<String>,
    passwords: Passwords,
}

#[derive(Debug)]
pub struct Credentials {
    /// `None`: the password alone (Redis's `default` user) is enough.
    pub username: Option<String>,
    /// Any of these is accepted (one per line of `password_file`).
    pub passwords: Vec<Secret>,
}

/// The outcome of one AUTH attempt, with the reply Redis would give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted,
    WrongPass,
    /// `AUTH <password>` while no password is configured.
    NoPasswordConfigured,
}

impl AuthOutcome {
    /// The error reply for a refused attempt (Redis's own wording).
    pub fn error_text(self) -> Option<&'static str> {
        match self {
            AuthOutcome::Accepted => None,
            AuthOutcome::WrongPass => {
                Some("WRONGPASS invalid username-password pair or user is disabled.")
            }
            AuthOutcome::NoPasswordConfigured => Some(
                "ERR AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            ),
        }
    }
}

const DEFAULT_USER: &[u8] = b"default";

impl ClientAuth {
    pub fn new(required: Option<Credentials>) -> Self {
        ClientAuth {
            required: required.map(|c| Required {
                username: c.username,
                passwords: Arc::new(ArcSwap::from_pointee(c.passwords)),
            }),
        }
    }

    /// The accepted passwords, for a reload to replace (`None`: clients
    /// need none, which only a restart changes).
    pub fn passwords(&self) -> Option<Passwords> {
        self.required.as_ref().map(|r| r.passwords.clone())
    }

    /// Whether clients start unauthenticated.
    pub fn is_required(&self) -> bool {
        self.required.is_some()
    }

    /// Checks `AUTH [username] password`.
    pub fn check(&self, username: Option<&[u8]>, password: &[u8]) -> AuthOutcome {
        let Some(required) = &self.required else {
            return match username {
                None => AuthOutcome::NoPasswordConfigured,
                Some(DEFAULT_USER) => AuthOutcome::Accepted,
                Some(_) => AuthOutcome::WrongPass,
            };
        };
        let expected_user = required
            .username
            .as_deref()
            .map_or(DEFAULT_USER, str::as_bytes);
        let user_ok = username.unwrap_or(DEFAULT_USER) == expected_user;
        // Always compare every password, so neither a wrong username nor
        // which password matched shows in the time taken.
        let password_ok = required
            .passwords
            .load()
            .iter()
            .fold(false, |ok, accepted| accepted.matches(password) | ok);
        if user_ok && password_ok {
            AuthOutcome::Accepted
        } else {
            AuthOutcome::WrongPass
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(username: Option<&str>) -> ClientAuth {
        ClientAuth::new(Some(Credentials {
            username: username.map(str::to_owned),
            passwords: vec![Secret::new(b"s3cret-s3cret".to_vec())],
        }))
    }

    #[test]
    fn without_auth_answers_like_a_passwordless_redis() {
        let open = ClientAuth::new(None);
        assert_eq!(open.check(None, b"x"), AuthOutcome::NoPasswordConfigured);
        assert_eq!(open.check(Some(b"default"), b"x"), AuthOutcome::Accepted);
        assert_eq!(open.check(Some(b"app"), b"x"), AuthOutcome::WrongPass);
    }

    #[test]
    fn password_only_matches_the_default_user() {
        let auth = with(None);
        assert_eq!(auth.check(None, b"s3cret-s3cret"), AuthOutcome::Accepted);
        assert_eq!(
            auth.check(Some(b"default"), b"s3cret-s3cret"),
            AuthOutcome::Accepted
        );
        assert_eq!(auth.check(None, b"wrong"), AuthOutcome::WrongPass);
        assert_eq!(
            auth.check(Some(b"app"), b"s3cret-s3cret"),
            AuthOutcome::WrongPass
        );
    }

    #[test]
    fn a_configured_username_must_be_given() {
        let auth = with(Some("app"));
        assert_eq!(
            auth.check(Some(b"app"), b"s3cret-s3cret"),
            AuthOutcome::Accepted
        );
        assert_eq!(auth.check(None, b"s3cret-s3cret"), AuthOutcome::WrongPass);
        assert_eq!(auth.check(Some(b"app"), b"s3cret"), AuthOutcome::WrongPass);
    }

    #[test]
    fn any_listed_password_is_accepted_and_a_replaced_list_takes_effect() {
        let auth = ClientAuth::new(Some(Credentials {
            username: None,
            passwords: vec![
                Secret::new(b"old-password".to_vec()),
                Secret::new(b"new-password".to_vec()),
            ],
        }));
        assert_eq!(auth.check(None, b"old-password"), AuthOutcome::Accepted);
        assert_eq!(auth.check(None, b"new-password"), AuthOutcome::Accepted);
        let passwords = auth.passwords().expect("required");
        passwords.store(Arc::new(vec![Secret::new(b"new-password".to_vec())]));
        assert_eq!(auth.check(None, b"old-password"), AuthOutcome::WrongPass);
        assert_eq!(auth.check(None, b"new-password"), AuthOutcome::Accepted);
        assert!(ClientAuth::new(None).passwords().is_none());
    }
}
