//! Client authentication to redcloak itself (`[listen.auth]`).
//!
//! A client's AUTH and HELLO ... AUTH are answered here and never forwarded:
//! the upstream connection is always logged in with redcloak's own
//! credentials. Without `[listen.auth]` the answers are those of a Redis whose
//! default user has no password. Replies never echo what the client sent.

pub mod lockout;

use crate::secret::Secret;

/// What a client must present, if anything.
#[derive(Debug)]
pub struct ClientAuth {
    required: Option<Credentials>,
}

#[derive(Debug)]
pub struct Credentials {
    /// `None`: the password alone (Redis's `default` user) is enough.
    pub username: Option<String>,
    pub password: Secret,
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
        ClientAuth { required }
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
        // Always compare the password, so a wrong username costs the same time.
        let password_ok = required.password.matches(password);
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
            password: Secret::new(b"s3cret-s3cret".to_vec()),
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
}
