//! Decides what the proxy does with each client request.
//!
//! `Policy::classify` is pure: it reads a parsed [`Request`] and the
//! request-side [`RequestState`] (client login, MULTI) and returns an
//! [`Action`]: forward it with a [`ReplyPlan`], forward a rewritten form,
//! answer it here, or refuse it. It never touches a socket and never sees a
//! reply; the plan it returns travels through the session's FIFO and tells
//! the reply side how to treat the reply when it comes back.
//!
//! It must never forward AUTH, or HELLO's AUTH arguments, upstream: the
//! upstream connection belongs to redcloak's own login.

pub mod table;

use crate::auth::ClientAuth;
use crate::resp::Request;
use bytes::Bytes;
use table::{Handling, PubSubKind};

/// What the reply side does with the reply to one forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyPlan {
    /// Deliver the reply as Redis sent it.
    Passthrough,
    /// Deliver; on success the connection now speaks `protocol` (if given).
    Hello { protocol: Option<u8> },
    /// Expect one confirmation per channel (RESP3: pushes).
    Subscribe { kind: PubSubKind, channels: usize },
    /// Expect one confirmation per channel; `None`: all current ones.
    Unsubscribe {
        kind: PubSubKind,
        channels: Option<usize>,
    },
    /// Deliver `+RESET`, forget subscriptions, protocol and transaction.
    Reset,
    /// The proxy's own AUTH after RESET: swallow `+OK`, anything else is fatal.
    RestoreLogin,
    /// Inside MULTI: `+QUEUED` delivered, the inner plan kept for EXEC.
    Queued(Box<ReplyPlan>),
    /// Open EXEC's array element by element with the queued plans.
    Exec,
    /// DISCARD: forget the queued plans.
    Discard,
    /// Swallow the reply and answer this error instead (EXEC of a
    /// transaction the proxy refused a command of: DISCARD is sent instead).
    Replace(&'static str),
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the request upstream as parsed.
    Forward(ReplyPlan),
    /// Send these arguments instead.
    Rewrite(Vec<Bytes>, ReplyPlan),
    /// Send RESET, then log the upstream connection in again.
    Reset,
    /// Answer `+OK` here (a successful AUTH).
    AnswerOk,
    /// Answer this error here; the connection stays usable.
    AnswerError(String),
    /// Answer `+OK` and close once every earlier reply is delivered.
    Quit,
}

/// Request-side connection state that decisions depend on.
#[derive(Debug)]
pub struct RequestState {
    authenticated: bool,
    in_multi: bool,
    /// A command inside MULTI was refused: EXEC must fail like Redis's EXECABORT.
    multi_failed: bool,
}

const NOAUTH: &str = "NOAUTH Authentication required.";
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, \
otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
select the RESP protocol version at the same time";
const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

impl RequestState {
    fn end_transaction(&mut self) {
        self.in_multi = false;
        self.multi_failed = false;
    }
}

fn refuse(reason: &str) -> Action {
    Action::AnswerError(format!("ERR redcloak: {reason}"))
}

pub struct Policy {
    client_auth: ClientAuth,
}

impl Policy {
    pub fn new(client_auth: ClientAuth) -> Self {
        Policy { client_auth }
    }

    /// The state a new connection starts in.
    pub fn new_connection(&self) -> RequestState {
        RequestState {
            authenticated: !self.client_auth.is_required(),
            in_multi: false,
            multi_failed: false,
        }
    }

    pub fn classify(&self, request: &Request, state: &mut RequestState) -> Action {
        let handling = table::lookup(request.name()).map(|row| row.handling);
        let allowed_before_auth = matches!(
            handling,
            Some(Handling::Auth | Handling::Hello | Handling::Quit | Handling::Reset)
        );
        if !state.authenticated && !allowed_before_auth {
            return Action::AnswerError(NOAUTH.into());
        }
        let args = &request.args[1..];
        if state.in_multi {
            return self.in_transaction(handling, args, state);
        }
        match handling {
            None => Action::Forward(ReplyPlan::Passthrough),
            Some(Handling::Auth) => self.auth(args, state),
            Some(Handling::Hello) => self.hello(args, state),
            Some(Handling::Quit) => Action::Quit,
            Some(Handling::Reset) => self.reset(state),
            Some(Handling::Client) => client(args),
            Some(Handling::Multi) => {
                state.in_multi = true;
                Action::Forward(ReplyPlan::Passthrough)
            }
            // Outside MULTI, Redis answers these with its own error.
            Some(Handling::Exec) => Action::Forward(ReplyPlan::Exec),
            Some(Handling::Discard) => Action::Forward(ReplyPlan::Discard),
            Some(Handling::Subscribe(kind)) => Action::Forward(ReplyPlan::Subscribe {
                kind,
                channels: args.len().max(1),
            }),
            Some(Handling::Unsubscribe(kind)) => Action::Forward(ReplyPlan::Unsubscribe {
                kind,
                channels: (!args.is_empty()).then_some(args.len()),
            }),
            Some(Handling::Refuse(reason)) => refuse(reason),
        }
    }

    /// Inside MULTI only plain data commands are queued. A command refused
    /// here fails the EXEC, as one Redis itself rejects at queue time would.
    fn in_transaction(
        &self,
        handling: Option<Handling>,
        args: &[Bytes],
        state: &mut RequestState,
    ) -> Action {
        let refused = match handling {
            None => return Action::Forward(ReplyPlan::Queued(Box::new(ReplyPlan::Passthrough))),
            Some(Handling::Exec) => {
                let failed = state.multi_failed;
                state.end_transaction();
                return match failed {
                    true => Action::Rewrite(
                        vec![Bytes::from_static(b"DISCARD")],
                        ReplyPlan::Replace(EXECABORT),
                    ),
                    false => Action::Forward(ReplyPlan::Exec),
                };
            }
            Some(Handling::Discard) => {
                state.end_transaction();
                return Action::Forward(ReplyPlan::Discard);
            }
            // Redis answers a nested MULTI with an error and keeps the transaction.
            Some(Handling::Multi) => return Action::Forward(ReplyPlan::Passthrough),
            Some(Handling::Quit) => return Action::Quit,
            Some(Handling::Reset) => return self.reset(state),
            Some(Handling::Client) => match client(args) {
                Action::Forward(plan) => return Action::Forward(ReplyPlan::Queued(Box::new(plan))),
                refusal => refusal,
            },
            Some(Handling::Refuse(reason)) => refuse(reason),
            Some(
                Handling::Auth
                | Handling::Hello
                | Handling::Subscribe(_)
                | Handling::Unsubscribe(_),
            ) => refuse("this command changes the connection and is not allowed inside MULTI"),
        };
        state.multi_failed = true;
        refused
    }

    /// RESET leaves MULTI and, when clients must log in, logs this one out.
    fn reset(&self, state: &mut RequestState) -> Action {
        state.end_transaction();
        state.authenticated = !self.client_auth.is_required();
        Action::Reset
    }

    fn auth(&self, args: &[Bytes], state: &mut RequestState) -> Action {
        let outcome = match args {
            [password] => self.client_auth.check(None, password),
            [username, password] => self.client_auth.check(Some(username), password),
            _ => {
                return Action::AnswerError(
                    "ERR wrong number of arguments for 'auth' command".into(),
                );
            }
        };
        match outcome.error_text() {
            None => {
                state.authenticated = true;
                Action::AnswerOk
            }
            Some(text) => Action::AnswerError(text.into()),
        }
    }

    /// `HELLO [protover [AUTH username password] [SETNAME clientname]]`:
    /// AUTH is checked here and stripped; the rest is forwarded.
    fn hello(&self, args: &[Bytes], state: &mut RequestState) -> Action {
        let mut forwarded = vec![Bytes::from_static(b"HELLO")];
        let mut login = None;
        let mut protocol = None;
        if let Some((version, mut options)) = args.split_first() {
            protocol = std::str::from_utf8(version)
                .ok()
                .and_then(|v| v.parse::<u8>().ok());
            forwarded.push(version.clone());
            while let Some((option, rest)) = options.split_first() {
                match (option.to_ascii_lowercase().as_slice(), rest) {
                    (b"auth", [username, password, rest @ ..]) => {
                        login = Some((username, password));
                        options = rest;
                    }
                    (b"setname", [name, rest @ ..]) => {
                        forwarded.extend([option.clone(), name.clone()]);
                        options = rest;
                    }
                    _ => return Action::AnswerError("ERR Syntax error in HELLO option".into()),
                }
            }
        }
        match login {
            Some((username, password)) => {
                let outcome = self.client_auth.check(Some(username), password);
                if let Some(text) = outcome.error_text() {
                    return Action::AnswerError(text.into());
                }
                state.authenticated = true;
            }
            None if !state.authenticated => return Action::AnswerError(HELLO_NOAUTH.into()),
            None => {}
        }
        Action::Rewrite(forwarded, ReplyPlan::Hello { protocol })
    }
}

/// `CLIENT REPLY OFF|SKIP` would leave replies out of step with requests.
fn client(args: &[Bytes]) -> Action {
    match args {
        [sub, mode, ..]
            if sub.eq_ignore_ascii_case(b"reply")
                && (mode.eq_ignore_ascii_case(b"off") || mode.eq_ignore_ascii_case(b"skip")) =>
        {
            refuse(
                "CLIENT REPLY OFF/SKIP is not supported: every request gets a reply through redcloak",
            )
        }
        _ => Action::Forward(ReplyPlan::Passthrough),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credentials;
    use crate::secret::Secret;

    fn request(args: &[&str]) -> Request {
        Request {
            args: args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect(),
        }
    }

    fn with_password() -> Policy {
        Policy::new(ClientAuth::new(Some(Credentials {
            username: None,
            password: Secret::new(b"pw-pw-pw-pw".to_vec()),
        })))
    }

    #[test]
    fn unauthenticated_clients_get_noauth_until_they_log_in() {
        let policy = with_password();
        let mut state = policy.new_connection();
        assert_eq!(
            policy.classify(&request(&["GET", "k"]), &mut state),
            Action::AnswerError(NOAUTH.into())
        );
        assert!(matches!(
            policy.classify(&request(&["AUTH", "nope"]), &mut state),
            Action::AnswerError(_)
        ));
        assert_eq!(
            policy.classify(&request(&["AUTH", "pw-pw-pw-pw"]), &mut state),
            Action::AnswerOk
        );
        assert_eq!(
            policy.classify(&request(&["GET", "k"]), &mut state),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn hello_auth_is_checked_here_and_stripped() {
        let policy = with_password();
        let mut state = policy.new_connection();
        let hello = request(&[
            "hello",
            "3",
            "AUTH",
            "default",
            "pw-pw-pw-pw",
            "SETNAME",
            "app",
        ]);
        match policy.classify(&hello, &mut state) {
            Action::Rewrite(args, ReplyPlan::Hello { protocol: Some(3) }) => {
                assert_eq!(
                    args,
                    ["HELLO", "3", "SETNAME", "app"].map(|a| Bytes::from_static(a.as_bytes()))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut fresh = policy.new_connection();
        assert!(matches!(
            policy.classify(&request(&["HELLO", "3"]), &mut fresh),
            Action::AnswerError(text) if text.starts_with("NOAUTH")
        ));
        assert!(matches!(
            policy.classify(&request(&["HELLO", "3", "AUTH", "default"]), &mut fresh),
            Action::AnswerError(_)
        ));
    }

    #[test]
    fn refusals_inside_multi_fail_the_exec() {
        let policy = Policy::new(ClientAuth::new(None));
        let mut state = policy.new_connection();
        assert_eq!(
            policy.classify(&request(&["MULTI"]), &mut state),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            policy.classify(&request(&["SET", "a", "1"]), &mut state),
            Action::Forward(ReplyPlan::Queued(Box::new(ReplyPlan::Passthrough)))
        );
        assert!(matches!(
            policy.classify(&request(&["SUBSCRIBE", "c"]), &mut state),
            Action::AnswerError(_)
        ));
        assert_eq!(
            policy.classify(&request(&["EXEC"]), &mut state),
            Action::Rewrite(
                vec![Bytes::from_static(b"DISCARD")],
                ReplyPlan::Replace(EXECABORT)
            )
        );
        assert_eq!(
            policy.classify(&request(&["MULTI"]), &mut state),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            policy.classify(&request(&["EXEC"]), &mut state),
            Action::Forward(ReplyPlan::Exec)
        );
    }

    #[test]
    fn client_reply_off_and_skip_are_refused() {
        let policy = Policy::new(ClientAuth::new(None));
        let mut state = policy.new_connection();
        for mode in ["OFF", "skip"] {
            assert!(matches!(
                policy.classify(&request(&["CLIENT", "REPLY", mode]), &mut state),
                Action::AnswerError(_)
            ));
        }
        assert_eq!(
            policy.classify(&request(&["client", "reply", "on"]), &mut state),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn reset_logs_the_client_out_when_auth_is_required() {
        let policy = with_password();
        let mut state = policy.new_connection();
        policy.classify(&request(&["AUTH", "pw-pw-pw-pw"]), &mut state);
        assert_eq!(
            policy.classify(&request(&["RESET"]), &mut state),
            Action::Reset
        );
        assert!(matches!(
            policy.classify(&request(&["PING"]), &mut state),
            Action::AnswerError(_)
        ));
    }
}
