//! Decides what the proxy does with each client request.
//!
//! `Policy::classify` is pure and deterministic: it reads a parsed
//! [`Request`] and the request-side [`RequestState`] (client login, MULTI)
//! and returns an [`Action`]: forward it, seal the values at the positions
//! it names and forward that ([`Action::Seal`]; `session::seal` encrypts,
//! never this module), forward a rewritten form (HELLO's AUTH stripped),
//! answer it here, or refuse it. Every per-command fact comes from
//! `table`. The [`ReplyPlan`] it returns travels through the session's FIFO
//! and tells the reply side how to treat the reply, including which values
//! to open and where they live.
//!
//! It must never forward AUTH, or HELLO's AUTH arguments, upstream; never
//! forward a value of an encrypted key without naming it for sealing; and
//! never forward a command the table does not know unless
//! `unknown_commands = "pass"`.

pub mod known;
pub mod local;
pub mod rules;
pub mod script;
pub mod table;
mod values;

pub use values::message_site;

use crate::auth::{AuthOutcome, ClientAuth};
use crate::crypto::CurrentKeyring;
use crate::crypto::envelope::{Binding, Kind, Scope};
use crate::resp::Request;
use bytes::Bytes;
use rules::{Mode, Rules};
use std::sync::Arc;
use table::{Class, Handling, PubSubKind, Row, Scripting, Subcommand};

/// Which name a value's envelope is bound to, as its key's rule says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteScope {
    Key,
    /// The rule's name.
    Rule(std::sync::Arc<str>),
    Unbound,
}

/// Where one stored value lives, as its envelope's associated data binds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueSite {
    pub kind: Kind,
    /// The key (or channel) name; a copy, so a pending plan does not pin the
    /// read buffer. Named in errors even when the scope does not bind it.
    pub key: Bytes,
    pub scope: SiteScope,
    /// The hash field, for hash values.
    pub field: Option<Bytes>,
    /// Sealed with the deterministic envelope (set and sorted-set members;
    /// list elements on `members = "deterministic"` rules). Opening takes
    /// either envelope.
    pub deterministic: bool,
}

impl ValueSite {
    pub fn binding(&self) -> Binding<'_> {
        Binding {
            kind: self.kind,
            scope: match &self.scope {
                SiteScope::Key => Scope::Key(&self.key),
                SiteScope::Rule(name) => Scope::Rule(name.as_bytes()),
                SiteScope::Unbound => Scope::Unbound,
            },
            field: self.field.as_deref(),
        }
    }
}

/// One argument to seal before the request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealAt {
    /// Its index in the request's arguments.
    pub index: usize,
    pub site: ValueSite,
}

/// A key a reply may name, and the site of its values (`None`: plaintext).
pub type KeySite = (Bytes, Option<ValueSite>);

/// Which values of a reply to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenPlan {
    /// One bulk value (GET, GETDEL, GETEX, GETSET, SET ... GET, HGET, LINDEX).
    One(ValueSite),
    /// One value or an array or set of values, all of one key (LPOP, LRANGE).
    Values(ValueSite),
    /// An array, one site per element; `None`: a plaintext key (MGET, HMGET).
    Each(Vec<Option<ValueSite>>),
    /// A hash's field/value pairs: flat array, RESP3 map, or array of pairs
    /// (HGETALL, HRANDFIELD ... WITHVALUES). `field` of the site is unset.
    HashPairs(ValueSite),
    /// HVALS, sent upstream as HGETALL: the opened values only, as an array.
    HashValues(ValueSite),
    /// HSCAN: `[cursor, [field, value, ...]]`.
    HashScan(ValueSite),
    /// BLPOP, BRPOP: `[key, value]`, the key one of these.
    KeyAndValue(Vec<KeySite>),
    /// LMPOP, BLMPOP: `[key, [value, ...]]`, the key one of these.
    KeyAndValues(Vec<KeySite>),
    /// Set or sorted-set members: one, an array or set of them, or with
    /// `scores` member/score pairs (flat in RESP2, nested in RESP3).
    Members { site: ValueSite, scores: bool },
    /// BZPOPMIN, BZPOPMAX: `[key, member, score]`.
    KeyMemberScore(Vec<KeySite>),
    /// ZMPOP, BZMPOP: `[key, [[member, score], ...]]`.
    KeyAndMembersWithScores(Vec<KeySite>),
    /// Stream entries `[[id, [field, value, ...]], ...]` (XRANGE, XCLAIM).
    StreamEntries(ValueSite),
    /// XREAD, XREADGROUP: `[[key, entries], ...]` or a RESP3 map of them.
    Streams(Vec<KeySite>),
    /// XAUTOCLAIM: `[cursor, entries, deleted ids]`.
    AutoClaim(ValueSite),
    /// XINFO STREAM: the entries among its fields.
    StreamInfo(ValueSite),
    /// GEORADIUS, GEOSEARCH: members, or arrays whose first element is one.
    GeoResults(ValueSite),
    /// SSCAN, ZSCAN (boxed: rare, and the largest plan).
    Scan(Box<ScanPlan>),
}

/// SSCAN's and ZSCAN's `[cursor, [member, (score,) ...]]`; with `pattern`,
/// only the members that match it once opened (MATCH was not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPlan {
    pub site: ValueSite,
    pub scores: bool,
    pub pattern: Option<Bytes>,
}

/// What the reply side does with the reply to one forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyPlan {
    /// Deliver the reply as Redis sent it.
    Passthrough,
    /// Open the sealed values in the reply.
    Open(OpenPlan),
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
    /// MULTI: a transaction is open once Redis answers `+OK`.
    Multi,
    /// Inside MULTI: `+QUEUED` delivered, the inner plan kept for EXEC. Any
    /// other reply means Redis did not queue it: the inner plan applies.
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
    /// Seal the arguments named, then send the request.
    Seal(Vec<SealAt>, ReplyPlan),
    /// Send these arguments instead.
    Rewrite(Vec<Bytes>, ReplyPlan),
    /// Send RESET, then log the upstream connection in again.
    Reset,
    /// Answer `+OK` here (a successful AUTH).
    AnswerOk,
    /// Answer with this reply here (state kept for a client on a lane).
    Answer(Bytes),
    /// Answer this error here; the connection stays usable.
    AnswerError(String),
    /// Refused by policy: answer the refusal's text; the connection stays usable.
    Refuse(Refusal),
    /// A client AUTH (or HELLO AUTH) with wrong credentials: answer this
    /// error. The session counts it against the peer.
    AuthFailed(&'static str),
    /// Answer `+OK` and close once every earlier reply is delivered.
    Quit,
    /// An HTTP request on the RESP port (`POST`, `Host:`): close without a
    /// reply, as Redis does against cross-protocol attacks.
    CrossProtocol,
}

impl Action {
    /// The request goes to Redis (as parsed, rewritten, or as RESET).
    pub fn forwards(&self) -> bool {
        matches!(
            self,
            Action::Forward(_) | Action::Seal(..) | Action::Rewrite(..) | Action::Reset
        )
    }
}

/// Whether commands missing from the table are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownCommands {
    Refuse,
    Pass,
}

/// Request-side connection state that decisions depend on.
#[derive(Debug)]
pub struct RequestState {
    authenticated: bool,
    /// What redcloak answers itself for a client on a lane.
    pub local: local::LocalState,
    in_multi: bool,
    /// WATCH was sent and no EXEC, DISCARD, UNWATCH or RESET since.
    watching: bool,
    /// A command inside MULTI was refused: EXEC must fail like Redis's EXECABORT.
    multi_failed: bool,
}

impl RequestState {
    /// The client may use commands (it logged in, or needs not).
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// MULTI or WATCH state is open on the connection (or will be, once
    /// Redis answers what was sent).
    pub fn holds_transaction(&self) -> bool {
        self.in_multi || self.watching
    }

    fn end_transaction(&mut self) {
        self.in_multi = false;
        self.watching = false;
        self.multi_failed = false;
    }
}

const NOAUTH: &str = "NOAUTH Authentication required.";
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, \
otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
select the RESP protocol version at the same time";
const NOSCRIPT: &str = "NOSCRIPT No matching script. Please use EVAL.";
const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

/// A command the policy refused: which rule refused it (for the security
/// event) and the error reply that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: &'static str,
    pub text: String,
}

fn refuse(rule: &'static str, reason: &str) -> Action {
    Action::Refuse(Refusal {
        rule,
        text: format!("ERR redcloak: {reason}"),
    })
}

impl Policy {
    /// Whether a request changes, or waits on, its upstream connection, so
    /// that a client on a shared lane must first move to a connection of
    /// its own: transactions, WATCH, blocking commands (a timeout that
    /// parses; Redis refuses the others at once), subscriptions, CLIENT and
    /// SELECT (those `policy::local` does not answer), RESET, and the
    /// commands whose row says they leave state behind (or that have no
    /// row, when those are forwarded). HELLO is decided after `classify`
    /// (2 and 3 stay); this is decided before it, which may change the
    /// request state.
    pub fn needs_own_connection(&self, row: Option<&Row>, args: &[Bytes]) -> bool {
        let Some(row) = row else {
            return self.unknown_commands == UnknownCommands::Pass;
        };
        match row.class {
            // HELLO 2 or 3 is answered on the lane (after classify, which
            // checks its AUTH); another version goes to Redis from there.
            Class::Connection(Handling::Auth | Handling::Quit | Handling::Hello) => false,
            // Outside MULTI, Redis answers them with its own error.
            Class::Connection(Handling::Exec | Handling::Discard) => false,
            Class::Connection(_) => true,
            _ => {
                row.leaves != table::Leaves::Nothing
                    || table::blocks(Some(row), args) != table::Blocks::No
            }
        }
    }
}

/// Whether a request is a client login attempt (AUTH, or HELLO with AUTH):
/// the session refuses those from a locked-out peer before they are checked.
pub fn is_auth_attempt(request: &Request) -> bool {
    let name = request.name();
    name.eq_ignore_ascii_case(b"auth")
        || (name.eq_ignore_ascii_case(b"hello")
            && request
                .args
                .iter()
                .skip(2)
                .any(|a| a.eq_ignore_ascii_case(b"auth")))
}

/// A key, field or command name, fit for an error message (never a value).
pub fn shown(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(&name[..name.len().min(128)]);
    if name.len() > 128 {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

pub struct Policy {
    client_auth: ClientAuth,
    rules: Arc<Rules>,
    keyring: Arc<CurrentKeyring>,
    unknown_commands: UnknownCommands,
    /// Scripts and libraries proved so far, by every connection.
    scripts: script::Book,
    /// Scripts whose effect on values is known, by SHA-1.
    known: known::Registry,
}

impl Policy {
    pub fn new(
        client_auth: ClientAuth,
        rules: Rules,
        keyring: Arc<CurrentKeyring>,
        unknown_commands: UnknownCommands,
    ) -> Self {
        Policy {
            client_auth,
            rules: Arc::new(rules),
            keyring,
            unknown_commands,
            scripts: script::Book::default(),
            known: known::Registry::builtin(),
        }
    }

    /// The known scripts (`known::Registry::builtin` plus `[[scripts]]`).
    pub fn with_known_scripts(self, known: known::Registry) -> Self {
        Policy { known, ..self }
    }

    /// The passwords clients log in with, for a reload to replace.
    pub fn client_passwords(&self) -> Option<crate::auth::Passwords> {
        self.client_auth.passwords()
    }

    /// The keyring in use (a reload may replace it: load it per request).
    pub fn keyring(&self) -> &Arc<CurrentKeyring> {
        &self.keyring
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// The state a new connection starts in.
    pub fn new_connection(&self) -> RequestState {
        RequestState {
            authenticated: !self.client_auth.is_required(),
            local: local::LocalState::new(),
            in_multi: false,
            watching: false,
            multi_failed: false,
        }
    }

    pub fn classify(&self, request: &Request, state: &mut RequestState) -> Action {
        self.classify_as(table::lookup(request.name()), request, state)
    }

    /// [`Policy::classify`] with the command's row already looked up.
    pub fn classify_as(
        &self,
        row: Option<&'static Row>,
        request: &Request,
        state: &mut RequestState,
    ) -> Action {
        if is_http(request.name()) {
            return Action::CrossProtocol;
        }
        let connection = match row.map(|r| r.class) {
            Some(Class::Connection(handling)) => Some(handling),
            _ => None,
        };
        let allowed_before_auth = matches!(
            connection,
            Some(Handling::Auth | Handling::Hello | Handling::Quit | Handling::Reset)
        );
        if !state.authenticated && !allowed_before_auth {
            return Action::AnswerError(NOAUTH.into());
        }
        let args = &request.args[1..];
        match (connection, state.in_multi) {
            (Some(handling), false) => self.connection(handling, args, state),
            (Some(handling), true) => self.connection_in_transaction(handling, args, state),
            (None, false) => {
                let action = self.data(row, request);
                if action.forwards() {
                    match row.map(|row| row.name) {
                        Some("watch") => state.watching = true,
                        Some("unwatch") => state.watching = false,
                        _ => {}
                    }
                }
                action
            }
            (None, true) => match self.data(row, request) {
                Action::Forward(plan) => Action::Forward(ReplyPlan::Queued(Box::new(plan))),
                Action::Seal(values, plan) => {
                    Action::Seal(values, ReplyPlan::Queued(Box::new(plan)))
                }
                Action::Rewrite(args, plan) => {
                    Action::Rewrite(args, ReplyPlan::Queued(Box::new(plan)))
                }
                refusal => {
                    state.multi_failed = true;
                    refusal
                }
            },
        }
    }

    fn connection(&self, handling: Handling, args: &[Bytes], state: &mut RequestState) -> Action {
        match handling {
            Handling::Auth => self.auth(args, state),
            Handling::Hello => self.hello(args, state),
            Handling::Quit => Action::Quit,
            Handling::Reset => self.reset(state),
            Handling::Client => client(args),
            // Redis refuses MULTI with arguments (arity): no transaction opens.
            Handling::Multi if !args.is_empty() => Action::Forward(ReplyPlan::Passthrough),
            Handling::Multi => {
                state.in_multi = true;
                Action::Forward(ReplyPlan::Multi)
            }
            // Outside MULTI, Redis answers these with its own error.
            Handling::Exec => Action::Forward(ReplyPlan::Exec),
            Handling::Discard => Action::Forward(ReplyPlan::Discard),
            Handling::Subscribe(kind) => Action::Forward(ReplyPlan::Subscribe {
                kind,
                channels: args.len().max(1),
            }),
            Handling::Unsubscribe(kind) => Action::Forward(ReplyPlan::Unsubscribe {
                kind,
                channels: (!args.is_empty()).then_some(args.len()),
            }),
        }
    }

    /// Inside MULTI. A command refused here fails the EXEC, as one Redis
    /// itself rejects at queue time would.
    fn connection_in_transaction(
        &self,
        handling: Handling,
        args: &[Bytes],
        state: &mut RequestState,
    ) -> Action {
        let refused = match handling {
            Handling::Exec => {
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
            Handling::Discard => {
                state.end_transaction();
                return Action::Forward(ReplyPlan::Discard);
            }
            // Redis answers a nested MULTI with an error and keeps the transaction.
            Handling::Multi => return Action::Forward(ReplyPlan::Passthrough),
            Handling::Quit => return Action::Quit,
            Handling::Reset => return self.reset(state),
            Handling::Client => match client(args) {
                Action::Forward(plan) => return Action::Forward(ReplyPlan::Queued(Box::new(plan))),
                refusal => refusal,
            },
            Handling::Auth
            | Handling::Hello
            | Handling::Subscribe(_)
            | Handling::Unsubscribe(_) => refuse(
                "in_transaction",
                "this command changes the connection and is not allowed inside MULTI",
            ),
        };
        state.multi_failed = true;
        refused
    }

    /// Commands on stored data, by their class.
    fn data(&self, row: Option<&Row>, request: &Request) -> Action {
        let args = &request.args;
        let Some(row) = row else {
            return match self.unknown_commands {
                UnknownCommands::Pass => Action::Forward(ReplyPlan::Passthrough),
                UnknownCommands::Refuse => refuse(
                    "unknown_command",
                    &format!(
                        "unknown command '{}' refused: redcloak forwards only commands it knows, so no value \
                     reaches Redis unencrypted (encryption.unknown_commands = \"pass\" forwards them)",
                        shown(request.name())
                    ),
                ),
            };
        };
        // The upper-case name only goes into refusals: not built on the hot path.
        let name = || row.name.to_ascii_uppercase();
        if row.moves_values
            && let Some(refusal) = self.moves_values(&name(), row, args)
        {
            return refusal;
        }
        match row.class {
            Class::Connection(_) | Class::Forward => Action::Forward(ReplyPlan::Passthrough),
            Class::Refuse(reason) => refuse("not_proxied", reason),
            Class::Sealed(sealed) => {
                let action = self.sealed(&name, row, sealed, args);
                // The primary key was revoked by its KMS: nothing is sealed,
                // never under another key, never stored in plaintext.
                match (&action, self.keyring.can_seal()) {
                    (Action::Seal(..), Err(revoked)) => {
                        refuse("primary_key_revoked", &revoked.to_string())
                    }
                    _ => action,
                }
            }
            Class::ServerReadsValue | Class::OrdersValues => self.only_plaintext(row, args),
            Class::Scripting(scripting) => self.scripting(scripting, row, args),
            Class::Sort => {
                let name = name();
                if sort_reads_other_keys(args) {
                    return refuse(
                        "sort_by_get",
                        &format!(
                            "{name} with BY or GET makes Redis read other keys' values, which may be encrypted; \
                         sort in the application instead"
                        ),
                    );
                }
                self.only_plaintext(row, args)
            }
        }
    }

    /// EVAL, EVALSHA, FCALL and the SCRIPT and FUNCTION subcommands: code
    /// runs only once `script` proved it touches only declared keys, and
    /// then only when every declared key is plaintext (Redis reads values).
    fn scripting(&self, scripting: Scripting, row: &Row, args: &[Bytes]) -> Action {
        let Some(target) = args.get(1) else {
            return Action::Forward(ReplyPlan::Passthrough);
        };
        let name = row.name.to_ascii_uppercase();
        let digest = match scripting {
            Scripting::Eval => Some(script::sha1(target)),
            Scripting::EvalSha => script::parse_sha1(target),
            _ => None,
        };
        if let Some(known) = digest.and_then(|digest| self.known.get(&digest))
            && let Some(action) = self.known_script(&name, known, args)
        {
            return action;
        }
        let proved = match scripting {
            Scripting::Eval => self.scripts.script(target),
            Scripting::EvalSha => match self.scripts.script_by_sha(target) {
                Some(verdict) => verdict,
                None => return Action::AnswerError(NOSCRIPT.into()),
            },
            Scripting::FCall if self.scripts.knows_function(target) => Ok(()),
            Scripting::FCall => {
                return refuse(
                    "unproven_script",
                    &format!(
                        "FCALL of '{}' refused: its library was not loaded through redcloak, so it is not \
                         proved to touch only the keys it declares. Load it through redcloak \
                         (FUNCTION LOAD REPLACE)",
                        shown(target)
                    ),
                );
            }
            Scripting::Script => return self.admin("SCRIPT", table::SCRIPT_SUBCOMMANDS, args),
            Scripting::Function => {
                return self.admin("FUNCTION", table::FUNCTION_SUBCOMMANDS, args);
            }
        };
        if let Err(unproven) = proved {
            return refuse_unproven(&name, &unproven);
        }
        self.only_plaintext(row, args)
    }

    /// SCRIPT and FUNCTION subcommands, by their entry in the table.
    fn admin(&self, command: &str, subcommands: &[(&str, Subcommand)], args: &[Bytes]) -> Action {
        let sub = &args[1];
        let shown_sub = shown(sub).to_ascii_uppercase();
        match table::subcommand(subcommands, sub) {
            Some(Subcommand::Forward) => Action::Forward(ReplyPlan::Passthrough),
            Some(Subcommand::Refuse(reason)) => refuse("not_proxied", reason),
            Some(Subcommand::OnlyAllPlaintext) if self.rules.all_plaintext() => {
                Action::Forward(ReplyPlan::Passthrough)
            }
            Some(Subcommand::OnlyAllPlaintext) => refuse(
                "unproven_script",
                &format!(
                    "{command} {shown_sub} is refused while any key is encrypted: it would run or restore \
                     code redcloak has not proved"
                ),
            ),
            Some(Subcommand::Load) => {
                // The body is the last argument (FUNCTION LOAD [REPLACE] code).
                let Some(body) = args.get(2..).and_then(<[Bytes]>::last) else {
                    return Action::Forward(ReplyPlan::Passthrough);
                };
                let proved = match command {
                    "FUNCTION" => self.scripts.library(body),
                    _ => self.scripts.script(body),
                };
                match proved {
                    Ok(()) => Action::Forward(ReplyPlan::Passthrough),
                    Err(unproven) => refuse_unproven(&format!("{command} LOAD"), &unproven),
                }
            }
            None => refuse(
                "unknown_command",
                &format!("unknown subcommand '{command} {shown_sub}' refused"),
            ),
        }
    }

    /// Forwards when every key of the command is plaintext; otherwise the
    /// row's refusal names the first encrypted key and its rule.
    fn only_plaintext(&self, row: &Row, args: &[Bytes]) -> Action {
        let mut positions = row.keys.positions(args);
        positions.extend(row.keys.store_candidates(args));
        for position in positions {
            let decision = self.rules.decide(&args[position]);
            if decision.mode != Mode::Plaintext {
                let key = shown(&args[position]);
                let text = table::plaintext_only(row, &key, &decision.describe());
                return refuse("encrypted_key", &text);
            }
        }
        Action::Forward(ReplyPlan::Passthrough)
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
            Some(text) => self.auth_failed(outcome, text),
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
                    return self.auth_failed(outcome, text);
                }
                state.authenticated = true;
            }
            None if !state.authenticated => return Action::AnswerError(HELLO_NOAUTH.into()),
            None => {}
        }
        Action::Rewrite(forwarded, ReplyPlan::Hello { protocol })
    }

    /// A refused login counts against the peer when there is a password to guess.
    fn auth_failed(&self, outcome: AuthOutcome, text: &'static str) -> Action {
        match outcome {
            AuthOutcome::WrongPass if self.client_auth.is_required() => Action::AuthFailed(text),
            _ => Action::AnswerError(text.into()),
        }
    }

    /// RESET leaves MULTI and, when clients must log in, logs this one out.
    fn reset(&self, state: &mut RequestState) -> Action {
        state.end_transaction();
        state.authenticated = !self.client_auth.is_required();
        Action::Reset
    }
}

/// The words Redis closes a connection on: the start of an HTTP request.
fn is_http(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"post") || name.eq_ignore_ascii_case(b"host:")
}

/// SORT's BY (other than NOSORT) and GET (other than `#`) read other keys.
pub fn sort_reads_other_keys(args: &[Bytes]) -> bool {
    args.windows(2).skip(2).any(|pair| {
        (pair[0].eq_ignore_ascii_case(b"by") && !pair[1].eq_ignore_ascii_case(b"nosort"))
            || (pair[0].eq_ignore_ascii_case(b"get") && pair[1].as_ref() != b"#")
    })
}

fn refuse_unproven(what: &str, unproven: &script::Unproven) -> Action {
    refuse(
        "unproven_script",
        &format!(
            "{what} refused: redcloak cannot prove which keys this script touches: {}. Scripts must name \
             each command as a literal (redis.call('GET', KEYS[1])) and take every key from KEYS",
            unproven.0
        ),
    )
}

/// `CLIENT REPLY OFF|SKIP` would leave replies out of step with requests.
fn client(args: &[Bytes]) -> Action {
    match args {
        [sub, mode, ..]
            if sub.eq_ignore_ascii_case(b"reply")
                && (mode.eq_ignore_ascii_case(b"off") || mode.eq_ignore_ascii_case(b"skip")) =>
        {
            refuse(
                "client_reply",
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
    use crate::crypto::{Keyring, LegacyPlaintext};
    use crate::secret::Secret;
    use rules::{Bind, Rule};
    use values::xadd_id_position;
    use zeroize::Zeroizing;

    fn request(args: &[&str]) -> Request {
        Request {
            args: args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect(),
        }
    }

    fn policy_with(auth: Option<Credentials>, unknown: UnknownCommands) -> Policy {
        let ring = Keyring::new(
            1,
            vec![(1, Zeroizing::new([3; 32]))],
            LegacyPlaintext::Reject,
        )
        .expect("ring");
        let rules = Rules::new(vec![
            Rule {
                name: "plain:*".into(),
                pattern: "plain:*".into(),
                mode: Mode::Plaintext,
                members: rules::Members::Random,
            },
            Rule {
                name: "free:*".into(),
                pattern: "free:*".into(),
                mode: Mode::Encrypt { bind: Bind::None },
                members: rules::Members::Random,
            },
            Rule {
                name: "queues".into(),
                pattern: "q:*".into(),
                mode: Mode::Encrypt { bind: Bind::Rule },
                members: rules::Members::Random,
            },
        ]);
        Policy::new(
            ClientAuth::new(auth),
            rules,
            CurrentKeyring::new(ring),
            unknown,
        )
    }

    fn policy() -> Policy {
        policy_with(None, UnknownCommands::Refuse)
    }

    fn with_password() -> Policy {
        let auth = Credentials {
            username: None,
            passwords: vec![Secret::new(b"pw-pw-pw-pw".to_vec())],
        };
        policy_with(Some(auth), UnknownCommands::Refuse)
    }

    fn classify(policy: &Policy, args: &[&str]) -> Action {
        policy.classify(&request(args), &mut policy.new_connection())
    }

    fn site(key: &str, field: Option<&str>) -> ValueSite {
        ValueSite {
            kind: match field {
                Some(_) => Kind::HashField,
                None => Kind::String,
            },
            key: Bytes::copy_from_slice(key.as_bytes()),
            scope: SiteScope::Key,
            field: field.map(|f| Bytes::copy_from_slice(f.as_bytes())),
            deterministic: false,
        }
    }

    fn hash(key: &str) -> ValueSite {
        ValueSite {
            kind: Kind::HashField,
            ..site(key, None)
        }
    }

    #[test]
    fn unauthenticated_clients_get_noauth_until_they_log_in() {
        let policy = with_password();
        let mut state = policy.new_connection();
        assert_eq!(
            policy.classify(&request(&["GET", "plain:k"]), &mut state),
            Action::AnswerError(NOAUTH.into())
        );
        assert!(matches!(
            policy.classify(&request(&["AUTH", "nope"]), &mut state),
            Action::AuthFailed(text) if text.starts_with("WRONGPASS")
        ));
        assert_eq!(
            policy.classify(&request(&["AUTH", "pw-pw-pw-pw"]), &mut state),
            Action::AnswerOk
        );
        // Without a password to guess, a refused AUTH is not a failed login.
        let open = policy_with(None, UnknownCommands::Refuse);
        assert!(matches!(
            open.classify(&request(&["AUTH", "x"]), &mut open.new_connection()),
            Action::AnswerError(_)
        ));
        assert_eq!(
            policy.classify(&request(&["GET", "plain:k"]), &mut state),
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
        assert!(matches!(
            policy.classify(
                &request(&["HELLO", "3", "AUTH", "default", "wrong"]),
                &mut fresh
            ),
            Action::AuthFailed(_)
        ));
    }

    #[test]
    fn login_attempts_are_recognised_before_they_are_checked() {
        for (args, expected) in [
            (&["AUTH", "pw"][..], true),
            (&["auth", "user", "pw"], true),
            (&["HELLO", "3", "AUTH", "u", "p"], true),
            (&["hello", "3", "setname", "x", "auth", "u", "p"], true),
            (&["HELLO", "3"], false),
            (&["HELLO", "auth"], false),
            (&["GET", "auth"], false),
        ] {
            assert_eq!(is_auth_attempt(&request(args)), expected, "{args:?}");
        }
    }

    /// The arguments a request goes upstream with: sealed as the plan says.
    fn sent(policy: &Policy, action: &Action, args: &[&str]) -> Vec<Bytes> {
        match action {
            Action::Seal(values, _) => {
                crate::session::seal::arguments(&policy.keyring.load(), &request(args).args, values)
                    .expect("primary")
            }
            other => panic!("not sealed: {other:?}"),
        }
    }

    fn opens(policy: &Policy, stored: &[u8], site: &ValueSite) -> Vec<u8> {
        match policy.keyring.load().open(stored, site.binding()) {
            Ok(crate::crypto::keyring::Opened::Plaintext(plaintext)) => plaintext,
            other => panic!("does not open: {other:?}"),
        }
    }

    #[test]
    fn set_seals_the_value_bound_to_its_key() {
        let policy = policy();
        let command = ["SET", "k", "secret", "EX", "10"];
        let action = classify(&policy, &command);
        let Action::Seal(values, ReplyPlan::Passthrough) = &action else {
            panic!("SET seals: {action:?}");
        };
        assert_eq!(
            values,
            &[SealAt {
                index: 2,
                site: site("k", None)
            }]
        );
        let args = sent(&policy, &action, &command);
        assert_eq!(args[1].as_ref(), b"k");
        assert_ne!(args[2].as_ref(), b"secret");
        assert_eq!(
            &args[3..],
            [Bytes::from_static(b"EX"), Bytes::from_static(b"10")]
        );
        assert_eq!(opens(&policy, &args[2], &site("k", None)), b"secret");
        // SET ... GET returns the old value, which gets opened.
        assert!(matches!(
            classify(&policy, &["SET", "k", "v", "GET"]),
            Action::Seal(_, ReplyPlan::Open(OpenPlan::One(s))) if s == site("k", None)
        ));
    }

    #[test]
    fn classify_decides_without_encrypting_so_its_plans_repeat() {
        let policy = policy();
        for command in [
            &["SET", "k", "v"][..],
            &["RPUSH", "q", "a", "b"],
            &["HSET", "h", "f", "v"],
            &["PUBLISH", "news", "hello"],
        ] {
            assert_eq!(
                classify(&policy, command),
                classify(&policy, command),
                "{command:?}"
            );
        }
    }

    #[test]
    fn plaintext_keys_are_forwarded_untouched() {
        let policy = policy();
        assert_eq!(
            classify(&policy, &["SET", "plain:k", "v"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["PUBLISH", "__keyevent@0__:expired", "k"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["GET", "plain:k"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["INCR", "plain:n"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["RPUSH", "plain:l", "x"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn reads_get_plans_that_name_each_value_site() {
        let policy = policy();
        assert_eq!(
            classify(&policy, &["MGET", "a", "plain:b"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::Each(vec![
                Some(site("a", None)),
                None
            ])))
        );
        assert_eq!(
            classify(&policy, &["HMGET", "h", "f1", "f2"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::Each(vec![
                Some(site("h", Some("f1"))),
                Some(site("h", Some("f2")))
            ])))
        );
        assert_eq!(
            classify(&policy, &["HVALS", "h"]),
            Action::Rewrite(
                request(&["HGETALL", "h"]).args,
                ReplyPlan::Open(OpenPlan::HashValues(hash("h")))
            )
        );
        assert_eq!(
            classify(&policy, &["HRANDFIELD", "h", "2"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["HRANDFIELD", "h", "2", "WITHVALUES"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::HashPairs(hash("h"))))
        );
        let unbound = ValueSite {
            scope: SiteScope::Unbound,
            ..site("free:x", None)
        };
        assert_eq!(
            classify(&policy, &["GET", "free:x"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::One(unbound)))
        );
    }

    #[test]
    fn hash_and_multi_key_writes_seal_every_value() {
        let policy = policy();
        let command = ["HSET", "h", "f1", "v1", "f2", "v2"];
        let args = sent(&policy, &classify(&policy, &command), &command);
        for (field, value, at) in [("f1", "v1", 3), ("f2", "v2", 5)] {
            assert_eq!(
                opens(&policy, &args[at], &site("h", Some(field))),
                value.as_bytes()
            );
        }
        let command = ["MSET", "a", "1", "plain:b", "2", "c"];
        let args = sent(&policy, &classify(&policy, &command), &command);
        assert_ne!(args[2].as_ref(), b"1");
        assert_eq!(args[4].as_ref(), b"2");
        assert_eq!(args[5].as_ref(), b"c");
    }

    #[test]
    fn list_elements_are_sealed_as_list_elements_and_pops_name_their_keys() {
        let policy = policy();
        let element = |key: &str| ValueSite {
            kind: Kind::ListElement,
            ..site(key, None)
        };
        let command = ["RPUSH", "q", "a", "b"];
        let args = sent(&policy, &classify(&policy, &command), &command);
        assert_eq!(opens(&policy, &args[2], &element("q")), b"a");
        assert_eq!(opens(&policy, &args[3], &element("q")), b"b");
        assert!(
            policy
                .keyring
                .load()
                .open(&args[2], site("q", None).binding())
                .is_err()
        );
        assert_eq!(
            classify(&policy, &["LPOP", "q", "2"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::Values(element("q"))))
        );
        assert_eq!(
            classify(&policy, &["BLPOP", "q", "plain:l", "0"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::KeyAndValue(vec![
                (Bytes::from_static(b"q"), Some(element("q"))),
                (Bytes::from_static(b"plain:l"), None),
            ])))
        );
        assert_eq!(
            classify(&policy, &["LMPOP", "1", "q", "LEFT", "COUNT", "2"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::KeyAndValues(vec![(
                Bytes::from_static(b"q"),
                Some(element("q"))
            )])))
        );
        assert_eq!(
            classify(&policy, &["LLEN", "q"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        // Messages are bound to their channel.
        let command = ["PUBLISH", "news", "hello"];
        let args = sent(&policy, &classify(&policy, &command), &command);
        let message = ValueSite {
            kind: Kind::Message,
            ..site("news", None)
        };
        assert_eq!(opens(&policy, &args[2], &message), b"hello");
    }

    fn member(kind: Kind, key: &str) -> ValueSite {
        ValueSite {
            kind,
            deterministic: true,
            ..site(key, None)
        }
    }

    #[test]
    fn set_and_sorted_set_members_are_sealed_deterministically_and_scores_stay_plain() {
        let policy = policy();
        let command = ["ZADD", "z", "NX", "ch", "1.5", "alice", "2", "bob"];
        let action = classify(&policy, &command);
        let args = sent(&policy, &action, &command);
        assert_eq!(&args[..5], &request(&command).args[..5]);
        assert_eq!(args[6].as_ref(), b"2");
        let zset = member(Kind::SortedSetMember, "z");
        assert_eq!(opens(&policy, &args[5], &zset), b"alice");
        assert_eq!(opens(&policy, &args[7], &zset), b"bob");
        // Deterministic: the member sent with ZSCORE is the stored one.
        let again = sent(
            &policy,
            &classify(&policy, &["ZSCORE", "z", "alice"]),
            &["ZSCORE", "z", "alice"],
        );
        assert_eq!(again[2], args[5]);
        let set = ["SADD", "s", "m1", "m2"];
        let sealed = sent(&policy, &classify(&policy, &set), &set);
        let ismember = ["SISMEMBER", "s", "m2"];
        assert_eq!(
            sent(&policy, &classify(&policy, &ismember), &ismember)[2],
            sealed[3]
        );
        assert_eq!(
            classify(&policy, &["SMEMBERS", "s"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::Members {
                site: member(Kind::SetMember, "s"),
                scores: false
            }))
        );
    }

    #[test]
    fn withscores_is_an_option_only_after_the_keys_and_fixed_arguments() {
        let policy = policy();
        let scores_of = |command: &[&str]| match classify(&policy, command) {
            Action::Forward(ReplyPlan::Open(OpenPlan::Members { scores, .. })) => scores,
            other => panic!("{command:?}: {other:?}"),
        };
        assert!(scores_of(&["ZRANGE", "z", "0", "-1", "WITHSCORES"]));
        assert!(!scores_of(&["ZRANGE", "z", "0", "-1"]));
        assert!(scores_of(&[
            "ZREVRANGEBYSCORE",
            "z",
            "+inf",
            "-inf",
            "withscores",
            "LIMIT",
            "0",
            "2"
        ]));
        assert!(scores_of(&["ZRANDMEMBER", "z", "2", "WITHSCORES"]));
        assert!(scores_of(&["ZPOPMIN", "z"]));
        // A key named withscores is a key, not the option.
        assert!(!scores_of(&["ZUNION", "2", "withscores", "withscores"]));
        assert!(scores_of(&[
            "ZUNION",
            "2",
            "withscores",
            "withscores",
            "WITHSCORES"
        ]));
    }

    #[test]
    fn scans_with_match_on_encrypted_members_are_matched_after_opening() {
        let policy = policy();
        assert_eq!(
            classify(
                &policy,
                &["SSCAN", "s", "0", "MATCH", "user:*", "COUNT", "10"]
            ),
            Action::Rewrite(
                request(&["SSCAN", "s", "0", "COUNT", "10"]).args,
                ReplyPlan::Open(OpenPlan::Scan(Box::new(ScanPlan {
                    site: member(Kind::SetMember, "s"),
                    scores: false,
                    pattern: Some(Bytes::from_static(b"user:*")),
                })))
            )
        );
        assert_eq!(
            classify(&policy, &["ZSCAN", "z", "0"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::Scan(Box::new(ScanPlan {
                site: member(Kind::SortedSetMember, "z"),
                scores: true,
                pattern: None,
            }))))
        );
        assert_eq!(
            classify(&policy, &["SSCAN", "plain:s", "0", "MATCH", "a*"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn xadd_options_are_read_as_redis_reads_them() {
        let id_of = |command: &str| {
            let args = request(&command.split(' ').collect::<Vec<_>>()).args;
            String::from_utf8_lossy(&args[xadd_id_position(&args)]).into_owned()
        };
        assert_eq!(id_of("XADD s * f v"), "*");
        assert_eq!(
            id_of("XADD s NOMKSTREAM MAXLEN ~ 10 LIMIT 5 1-1 f v"),
            "1-1"
        );
        assert_eq!(id_of("XADD s MAXLEN 10 * f v"), "*");
        assert_eq!(id_of("XADD s minid = 0-1 * f v"), "*");
        // A field named like an option is a field: options end at the id.
        assert_eq!(id_of("XADD s * maxlen v"), "*");
        let policy = policy();
        let command = [
            "XADD", "s", "MAXLEN", "~", "5", "*", "user", "u1", "maxlen", "9",
        ];
        let args = sent(&policy, &classify(&policy, &command), &command);
        assert_eq!(&args[..7], &request(&command).args[..7]);
        assert_eq!(args[8].as_ref(), b"maxlen");
        let field = |name: &str| ValueSite {
            kind: Kind::StreamValue,
            field: Some(Bytes::copy_from_slice(name.as_bytes())),
            ..site("s", None)
        };
        assert_eq!(opens(&policy, &args[7], &field("user")), b"u1");
        assert_eq!(opens(&policy, &args[9], &field("maxlen")), b"9");
    }

    #[test]
    fn scripts_of_frameworks_that_build_payloads_in_lua_are_refused_with_the_rule_to_add() {
        let policy = policy();
        let body = "return redis.call('HGETALL', KEYS[1])";
        for (key, says) in [
            (
                "bull:emails:42",
                "BullMQ builds and parses its job payloads inside Lua",
            ),
            ("queues:default", "pattern = \"queues:*\""),
        ] {
            match classify(&policy, &["EVAL", body, "1", key]) {
                Action::Refuse(r) => assert!(r.text.contains(says), "{}", r.text),
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_key_redis_may_store_into_must_share_the_binding() {
        let policy = policy();
        // Redis's key specs name the first STORE; its parser writes to the last.
        assert!(matches!(
            classify(&policy, &["GEORADIUS", "q:a", "0", "0", "1", "km", "STORE", "q:b", "STORE", "plain:x"]),
            Action::Refuse(r) if r.rule == "moves_value"
        ));
        assert!(matches!(
            classify(&policy, &["SORT", "plain:l", "STORE", "plain:a", "STORE", "secret"]),
            Action::Refuse(r) if r.rule == "encrypted_key"
        ));
        // A member named `store` is a member: the reply is opened.
        assert!(matches!(
            classify(&policy, &["GEORADIUSBYMEMBER", "g", "store", "10", "km"]),
            Action::Seal(_, ReplyPlan::Open(OpenPlan::GeoResults(_)))
        ));
        assert!(matches!(
            classify(
                &policy,
                &["GEORADIUS", "q:a", "0", "0", "1", "km", "STORE", "q:b"]
            ),
            Action::Forward(ReplyPlan::Passthrough)
        ));
    }

    #[test]
    fn list_comparisons_need_deterministic_elements() {
        let random = policy();
        assert!(matches!(
            classify(&random, &["LREM", "q", "0", "job"]),
            Action::Refuse(r) if r.text.contains("members = \"deterministic\"")
        ));
        let ring = Keyring::new(
            1,
            vec![(1, Zeroizing::new([3; 32]))],
            LegacyPlaintext::Reject,
        )
        .expect("ring");
        let rules = Rules::new(vec![Rule {
            name: "q".into(),
            pattern: "q".into(),
            mode: Mode::Encrypt { bind: Bind::Key },
            members: rules::Members::Deterministic,
        }]);
        let policy = Policy::new(
            ClientAuth::new(None),
            rules,
            CurrentKeyring::new(ring),
            UnknownCommands::Refuse,
        );
        let push = ["RPUSH", "q", "job"];
        let pushed = sent(&policy, &classify(&policy, &push), &push);
        let remove = ["LREM", "q", "0", "job"];
        assert_eq!(
            sent(&policy, &classify(&policy, &remove), &remove)[3],
            pushed[2]
        );
        let insert = ["LINSERT", "q", "BEFORE", "job", "first"];
        let inserted = sent(&policy, &classify(&policy, &insert), &insert);
        assert_eq!(inserted[3], pushed[2]);
        assert_eq!(inserted[2].as_ref(), b"BEFORE");
    }

    #[test]
    fn values_move_within_one_rule_binding_only() {
        let policy = policy();
        let rule_bound = |key: &str| ValueSite {
            kind: Kind::ListElement,
            scope: SiteScope::Rule("queues".into()),
            ..site(key, None)
        };
        assert_eq!(
            classify(&policy, &["LMOVE", "q:a", "q:b", "LEFT", "RIGHT"]),
            Action::Forward(ReplyPlan::Open(OpenPlan::One(rule_bound("q:a"))))
        );
        // Within one key-bound key: a rotation.
        assert!(matches!(
            classify(&policy, &["RPOPLPUSH", "k", "k"]),
            Action::Forward(ReplyPlan::Open(_))
        ));
        for command in [
            &["LMOVE", "q:a", "other", "LEFT", "RIGHT"][..],
            &["BLMOVE", "k1", "k2", "LEFT", "RIGHT", "0"],
            &["RPOPLPUSH", "q:a", "plain:l"],
            &["RENAME", "q:a", "free:b"],
        ] {
            assert!(
                matches!(classify(&policy, command), Action::Refuse(r) if r.rule == "moves_value"),
                "{command:?}"
            );
        }
        assert_eq!(
            classify(&policy, &["COPY", "q:a", "q:b"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn commands_that_need_the_value_or_move_it_are_refused_on_encrypted_keys() {
        let policy = policy();
        for (command, rule) in [
            (&["APPEND", "k", "x"][..], "encrypted_key"),
            (&["INCR", "k"], "encrypted_key"),
            (&["GETRANGE", "k", "0", "1"], "encrypted_key"),
            (&["HINCRBY", "h", "f", "1"], "encrypted_key"),
            (&["EVAL", "return 1", "1", "k"], "encrypted_key"),
            (&["DUMP", "k"], "encrypted_key"),
            (&["LREM", "list", "0", "x"], "encrypted_key"),
            (&["ZRANGEBYLEX", "zset", "-", "+"], "encrypted_key"),
            (&["ZRANGE", "zset", "[a", "[b", "BYLEX"], "encrypted_key"),
            (&["PFDEBUG", "GETREG", "hll"], "encrypted_key"),
            (&["RENAME", "k", "k2"], "moves_value"),
            (&["COPY", "plain:a", "k"], "moves_value"),
            (&["SORT", "plain:l", "BY", "w_*"], "sort_by_get"),
            (&["MONITOR"], "not_proxied"),
            (&["NOTACOMMAND", "k"], "unknown_command"),
        ] {
            let action = classify(&policy, command);
            assert!(
                matches!(&action, Action::Refuse(r) if r.rule == rule && r.text.starts_with("ERR redcloak: ")),
                "{command:?}: {action:?}"
            );
        }
        assert_eq!(
            classify(&policy, &["RENAME", "free:a", "free:b"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["EVAL", "return 1", "0"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert_eq!(
            classify(&policy, &["SORT", "plain:l", "BY", "nosort"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
        for key_only in [
            &["DEL", "k"][..],
            &["OBJECT", "FREQ", "k"],
            &["OBJECT", "ENCODING", "k"],
            &["SCARD", "k"],
            &["ZCARD", "k"],
            &["XLEN", "k"],
            &["LTRIM", "k", "0", "1"],
        ] {
            assert_eq!(
                classify(&policy, key_only),
                Action::Forward(ReplyPlan::Passthrough),
                "{key_only:?}"
            );
        }
        let open = policy_with(None, UnknownCommands::Pass);
        assert_eq!(
            classify(&open, &["NOTACOMMAND", "k"]),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn the_refusal_names_the_key_and_the_rule() {
        let Action::Refuse(Refusal { text, .. }) = classify(&policy(), &["INCR", "counter"]) else {
            panic!()
        };
        assert!(
            text.contains("INCR needs Redis to read the value of 'counter'"),
            "{text}"
        );
        assert!(
            text.contains("no rule matches it, so it is encrypted") && text.contains("plaintext"),
            "{text}"
        );
    }

    #[test]
    fn multi_with_arguments_opens_no_transaction_as_redis_refuses_it() {
        let policy = policy();
        let mut state = policy.new_connection();
        assert_eq!(
            policy.classify(&request(&["MULTI", "x"]), &mut state),
            Action::Forward(ReplyPlan::Passthrough)
        );
        assert!(matches!(
            policy.classify(&request(&["GET", "k"]), &mut state),
            Action::Forward(ReplyPlan::Open(_))
        ));
    }

    #[test]
    fn hscan_options_are_read_as_redis_reads_them() {
        let policy = policy();
        let mut state = policy.new_connection();
        let plan = |args: &[&str], state: &mut RequestState| policy.classify(&request(args), state);
        for opens in [
            &["HSCAN", "h", "0"][..],
            &["HSCAN", "h", "0", "MATCH", "novalues"],
            &["HSCAN", "h", "0", "COUNT", "10", "MATCH", "NOVALUES"],
        ] {
            assert!(
                matches!(
                    plan(opens, &mut state),
                    Action::Forward(ReplyPlan::Open(OpenPlan::HashScan(_)))
                ),
                "{opens:?}"
            );
        }
        assert_eq!(
            plan(&["HSCAN", "h", "0", "NOVALUES"], &mut state),
            Action::Forward(ReplyPlan::Passthrough)
        );
    }

    #[test]
    fn refusals_inside_multi_fail_the_exec_and_value_plans_are_queued() {
        let policy = policy();
        let mut state = policy.new_connection();
        assert_eq!(
            policy.classify(&request(&["MULTI"]), &mut state),
            Action::Forward(ReplyPlan::Multi)
        );
        assert_eq!(
            policy.classify(&request(&["GET", "a"]), &mut state),
            Action::Forward(ReplyPlan::Queued(Box::new(ReplyPlan::Open(OpenPlan::One(
                site("a", None)
            )))))
        );
        assert!(matches!(
            policy.classify(&request(&["SUBSCRIBE", "c"]), &mut state),
            Action::Refuse(Refusal {
                rule: "in_transaction",
                ..
            })
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
            Action::Forward(ReplyPlan::Multi)
        );
        assert!(matches!(
            policy.classify(&request(&["INCR", "n"]), &mut state),
            Action::Refuse(_)
        ));
        assert!(matches!(
            policy.classify(&request(&["EXEC"]), &mut state),
            Action::Rewrite(_, ReplyPlan::Replace(_))
        ));
    }

    #[test]
    fn client_reply_off_and_skip_are_refused() {
        let policy = policy();
        for mode in ["OFF", "skip"] {
            assert!(matches!(
                classify(&policy, &["CLIENT", "REPLY", mode]),
                Action::Refuse(Refusal {
                    rule: "client_reply",
                    ..
                })
            ));
        }
        assert_eq!(
            classify(&policy, &["client", "reply", "on"]),
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Every command in the table, with any arguments from words its
        /// grammar reacts to, is classified without a panic, and a plan that
        /// seals names only arguments that exist.
        #[test]
        fn every_command_with_any_arguments_is_classified_without_a_panic(
            row in 0..table::COMMANDS.len(),
            words in proptest::collection::vec(0..WORDS.len(), 0..9),
        ) {
            let policy = policy();
            let mut args = vec![table::COMMANDS[row].name];
            args.extend(words.iter().map(|&w| WORDS[w]));
            let mut state = policy.new_connection();
            if let Action::Seal(values, _) = policy.classify(&request(&args), &mut state) {
                proptest::prop_assert!(values.iter().all(|v| v.index > 0 && v.index < args.len()));
            }
        }
    }

    const WORDS: &[&str] = &[
        "k",
        "q:a",
        "q:b",
        "plain:x",
        "free:y",
        "0",
        "1",
        "2",
        "3",
        "-1",
        "+inf",
        "store",
        "STOREDIST",
        "withscores",
        "WITHVALUES",
        "BYLEX",
        "BYSCORE",
        "REV",
        "LIMIT",
        "MATCH",
        "COUNT",
        "NX",
        "GT",
        "CH",
        "INCR",
        "MAXLEN",
        "~",
        "=",
        "*",
        "frommember",
        "STREAMS",
        "GROUP",
        "BLOCK",
        "JUSTID",
        "GET",
        "BY",
        "LEFT",
        "NOVALUES",
        "STREAM",
        "FULL",
    ];
}
