//! Proves, before a Lua script or function library reaches Redis, that every
//! key it can touch is one its caller declares. Pure: bytes in, a verdict out.
//!
//! A script (EVAL, SCRIPT LOAD) or library (FUNCTION LOAD) is parsed with a
//! real Lua 5.1 parser (full_moon) and accepted only when:
//!
//! * every `redis.call` / `redis.pcall` names its command as a string
//!   literal, the command has a row in the command table and may run in a
//!   script, and each of its key arguments is `KEYS[<number>]` (in a library:
//!   `<first parameter>[<number>]` of the callback given inline to
//!   `redis.register_function`, and nowhere else), or, in a script, a local
//!   declared at the top level as `local name = KEYS[<number>]` and never
//!   declared again (no other local, parameter or loop variable of that
//!   name anywhere), never assigned, and not used before that line;
//! * `redis` appears only as `redis.call(...)`, `redis.pcall(...)` or one of
//!   its harmless helpers and constants (never as a value, an index by
//!   string, or an assignment target);
//! * the keys table (`KEYS`, or a callback's first parameter) is only read
//!   as `T[...]` or `#T`: never assigned, aliased, passed on or redeclared;
//! * nothing reaches the environment by other routes (`_G`, `getfenv`,
//!   `loadstring`, `rawget`, `debug`, ... are refused wherever they appear).
//!
//! The declared keys themselves are checked against the rules by the
//! caller, per invocation. Everything this module cannot prove is refused
//! with a reason that says what to change.

use super::table::{self, Class, Keys};
use bytes::Bytes;
use full_moon::ast::{
    self, Call, Expression, FunctionArgs, FunctionBody, Index, Parameter, Prefix, Suffix, UnOp,
    Var, VarExpression,
};
use full_moon::tokenizer::{TokenReference, TokenType};
use full_moon::visitors::Visitor;
use std::collections::HashSet;

/// Largest script or library body analyzed; larger ones are refused.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;
/// Deepest nesting of brackets and blocks the parser is given (it recurses).
const MAX_NESTING: usize = 200;
/// The parser, the walk and the tree's drop recurse once per operator of a
/// chain (`1 .. 1 .. ...`), about 1.3 KiB of stack each: the analysis runs
/// on its own thread with room for the longest chain `MAX_SOURCE_BYTES`
/// allows. Only the pages it touches are committed.
const ANALYSIS_STACK: usize = 256 * 1024 * 1024;
/// One analysis at a time, so hostile scripts cannot stack up threads.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What is being analyzed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// EVAL / EVAL_RO / SCRIPT LOAD: keys come in the global `KEYS`.
    Script,
    /// FUNCTION LOAD: keys come in each callback's first parameter.
    Library,
}

/// A script or library redcloak has proved safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    /// The functions a library registers (empty for a script).
    pub functions: Vec<String>,
}

/// Why a script or library was refused: a sentence for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unproven(pub String);

/// Names that reach the environment, the `redis` table or code by other
/// routes than a literal `redis.call`.
const ESCAPES: &[&str] = &[
    "_ENV",
    "_G",
    "debug",
    "dofile",
    "getfenv",
    "getmetatable",
    "load",
    "loadfile",
    "loadstring",
    "module",
    "package",
    "rawget",
    "rawset",
    "require",
    "setfenv",
    "setmetatable",
];

/// `redis.<name>` members that neither run commands nor hand out `redis.call`.
const HARMLESS_MEMBERS: &[&str] = &[
    "LOG_DEBUG",
    "LOG_NOTICE",
    "LOG_VERBOSE",
    "LOG_WARNING",
    "REDIS_VERSION",
    "REDIS_VERSION_NUM",
    "REPL_ALL",
    "REPL_AOF",
    "REPL_NONE",
    "REPL_REPLICA",
    "REPL_SLAVE",
    "breakpoint",
    "debug",
    "error_reply",
    "log",
    "replicate_commands",
    "set_repl",
    "setresp",
    "sha1hex",
    "status_reply",
];

/// Analyzes a script or library body.
pub fn analyze(body: &[u8], source: Source) -> Result<Approved, Unproven> {
    if body.len() > MAX_SOURCE_BYTES {
        return Err(Unproven(format!(
            "it is larger than {} KiB",
            MAX_SOURCE_BYTES / 1024
        )));
    }
    let text = std::str::from_utf8(body).map_err(|_| Unproven("it is not UTF-8 text".into()))?;
    let code = without_shebang(text);
    if nesting(code) > MAX_NESTING {
        return Err(Unproven(format!(
            "it nests brackets or blocks deeper than {MAX_NESTING}"
        )));
    }
    let code = code.to_owned();
    let _turn = lock(&ONE_AT_A_TIME);
    std::thread::Builder::new()
        .name("redcloak-lua".into())
        .stack_size(ANALYSIS_STACK)
        .spawn(move || parse_and_walk(&code, source))
        .map_err(|_| Unproven("no thread could be started to analyze it".into()))?
        .join()
        .map_err(|_| Unproven("its analysis failed".into()))?
}

fn parse_and_walk(code: &str, source: Source) -> Result<Approved, Unproven> {
    let ast = full_moon::parse(code).map_err(|errors| {
        let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
        Unproven(format!("it does not parse as Lua 5.1 ({first})"))
    })?;
    let mut walk = Walk::new(source);
    walk.visit_ast(&ast);
    walk.verdict()
}

/// Redis strips a first line starting with `#!` (flags, library name).
fn without_shebang(text: &str) -> &str {
    match text.strip_prefix("#!") {
        Some(rest) => rest.find('\n').map_or("", |nl| &rest[nl..]),
        None => text,
    }
}

/// A conservative bound on how deep the parser will recurse: brackets and
/// block keywords, counted anywhere (strings and comments included, which
/// only over-counts), plus runs of unary operators.
fn nesting(code: &str) -> usize {
    let (mut depth, mut deepest, mut unary_run) = (0usize, 0usize, 0usize);
    let mut word = String::new();
    let flush_word = |word: &mut String, depth: &mut usize| {
        match word.as_str() {
            "function" | "do" | "then" | "repeat" => *depth += 1,
            "end" | "until" | "elseif" => *depth = depth.saturating_sub(1),
            _ => {}
        }
        word.clear();
    };
    for ch in code.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
            continue;
        }
        if word == "not" {
            unary_run += 1;
        } else if !word.is_empty() {
            unary_run = 0;
        }
        flush_word(&mut word, &mut depth);
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '-' | '#' => unary_run += 1,
            c if c.is_whitespace() => {}
            _ => unary_run = 0,
        }
        deepest = deepest.max(depth + unary_run);
    }
    flush_word(&mut word, &mut depth);
    deepest.max(depth)
}

/// One argument of a `redis.call`, as far as the analysis can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    /// A string or number literal.
    Literal(Vec<u8>),
    /// `<keys table>[<number>]`: a declared key.
    DeclaredKey,
    /// Anything else, one value.
    Unknown,
    /// A call or `...` in last place: any number of values.
    Spread,
}

/// A function body being walked: its first parameter, and whether it is a
/// callback given inline to `redis.register_function`.
struct Frame {
    first_parameter: Option<String>,
    callback: bool,
}

struct Walk {
    source: Source,
    /// Innermost function body last.
    frames: Vec<Frame>,
    /// Callback bodies (by address, stable while the AST is borrowed).
    callbacks: HashSet<usize>,
    /// Names whose every occurrence must be sanctioned: `redis`, `KEYS` and
    /// the callbacks' first parameters.
    guarded: HashSet<String>,
    /// Every identifier seen: name and byte offset.
    identifiers: Vec<(String, usize)>,
    /// Offsets of identifiers used in an allowed way.
    sanctioned: HashSet<usize>,
    /// Offsets of identifiers that are assignment targets (never allowed
    /// for guarded names, whatever else sanctioned them).
    assigned: HashSet<usize>,
    functions: Vec<String>,
    /// Top-level `local name = KEYS[n]` (scripts): the name stands for a
    /// declared key after its declaration, if it is never declared again
    /// or assigned (checked in the verdict). Name and declaration offset.
    aliases: std::collections::HashMap<String, usize>,
    /// How often each name is declared (locals, parameters, loop variables).
    declarations: std::collections::HashMap<String, usize>,
    /// Blocks open around the node being visited (the chunk's is 1).
    block_depth: usize,
    /// The first reason found, if any.
    refusal: Option<String>,
}

impl Walk {
    fn new(source: Source) -> Self {
        let guarded = ["redis", "KEYS"];
        Walk {
            source,
            frames: Vec::new(),
            callbacks: HashSet::new(),
            guarded: guarded.iter().map(|s| s.to_string()).collect(),
            identifiers: Vec::new(),
            sanctioned: HashSet::new(),
            assigned: HashSet::new(),
            functions: Vec::new(),
            aliases: Default::default(),
            declarations: Default::default(),
            block_depth: 0,
            refusal: None,
        }
    }

    fn declared(&mut self, name: &TokenReference) {
        *self
            .declarations
            .entry(name.token().to_string())
            .or_default() += 1;
    }

    fn refuse(&mut self, why: String) {
        self.refusal.get_or_insert(why);
    }

    fn verdict(self) -> Result<Approved, Unproven> {
        if let Some(why) = self.refusal {
            return Err(Unproven(why));
        }
        for (name, at) in &self.identifiers {
            if ESCAPES.contains(&name.as_str()) {
                return Err(Unproven(format!(
                    "it uses '{name}', which can reach commands or keys around the checks"
                )));
            }
            let guarded = self.guarded.contains(name);
            if guarded && (!self.sanctioned.contains(at) || self.assigned.contains(at)) {
                return Err(Unproven(match name.as_str() {
                    "redis" => "it uses 'redis' other than as redis.call(...), redis.pcall(...) \
                                or a helper such as redis.log"
                        .to_owned(),
                    keys => format!(
                        "it uses '{keys}' other than as {keys}[n] or #{keys} (assigned, \
                         aliased, passed on or redeclared)"
                    ),
                }));
            }
        }
        for (alias, declared_at) in &self.aliases {
            let redeclared = self.declarations.get(alias).copied().unwrap_or(0) != 1;
            let reassigned = self
                .identifiers
                .iter()
                .any(|(name, at)| name == alias && self.assigned.contains(at));
            let used_before = self
                .identifiers
                .iter()
                .any(|(name, at)| name == alias && at < declared_at);
            if redeclared || reassigned || used_before {
                return Err(Unproven(format!(
                    "the local '{alias}' holds a key (KEYS[n]) and is also declared again, assigned                      or used before it; give keys to redis.call as KEYS[n] or as a local set once"
                )));
            }
        }
        if self.source == Source::Library && self.functions.is_empty() {
            return Err(Unproven(
                "it registers no function with redis.register_function".into(),
            ));
        }
        Ok(Approved {
            functions: self.functions,
        })
    }

    /// A chain `prefix suffix...` (a call or a variable).
    fn chain<'a>(&mut self, prefix: &Prefix, suffixes: impl Iterator<Item = &'a Suffix>) {
        let Prefix::Name(root) = prefix else { return };
        let name = root.token().to_string();
        let suffixes: Vec<&Suffix> = suffixes.collect();
        if name != "redis" {
            // A guarded keys table may be read by index.
            if let Some(Suffix::Index(Index::Brackets { .. })) = suffixes.first() {
                self.sanctioned.insert(offset(root));
            }
            return;
        }
        let (Some(Suffix::Index(Index::Dot { name: member, .. })), call) =
            (suffixes.first(), suffixes.get(1))
        else {
            return;
        };
        let member = member.token().to_string();
        let args = match call {
            Some(Suffix::Call(Call::AnonymousCall(args))) => Some(args.as_ref()),
            _ => None,
        };
        match (member.as_str(), args) {
            ("call" | "pcall", Some(args)) => self.redis_call(args),
            ("register_function", Some(args)) if self.source == Source::Library => {
                self.register(args)
            }
            (member, _) if HARMLESS_MEMBERS.contains(&member) => {}
            _ => return,
        }
        self.sanctioned.insert(offset(root));
    }

    /// `redis.register_function('name', function(keys, args) ... end)` or
    /// `redis.register_function{function_name = 'name', callback = function ... end, ...}`.
    fn register(&mut self, args: &FunctionArgs) {
        let (name, callback) = match args {
            FunctionArgs::Parentheses { arguments, .. } => {
                let mut items = arguments.iter();
                (
                    items.next().and_then(literal),
                    items.next().and_then(inline_body),
                )
            }
            FunctionArgs::TableConstructor(table) => {
                let mut name = None;
                let mut callback = None;
                for field in table.fields() {
                    if let ast::Field::NameKey { key, value, .. } = field {
                        match key.token().to_string().as_str() {
                            "function_name" => name = literal(value),
                            "callback" => callback = inline_body(value),
                            _ => {}
                        }
                    }
                }
                (name, callback)
            }
            _ => (None, None),
        };
        let (Some(name), Some(body)) = (name, callback) else {
            return self.refuse(
                "redis.register_function must name the function with a string literal and \
                 give its callback inline as function(keys, args) ... end"
                    .into(),
            );
        };
        self.functions
            .push(String::from_utf8_lossy(&name).into_owned());
        self.callbacks.insert(body as *const FunctionBody as usize);
        if let Some(Parameter::Name(keys)) = body.parameters().iter().next() {
            self.guarded.insert(keys.token().to_string());
            self.sanctioned.insert(offset(keys));
        }
    }

    /// The table a key argument must come from here, if any.
    fn keys_table(&self) -> Result<Option<String>, String> {
        match self.source {
            Source::Script => Ok(Some("KEYS".into())),
            Source::Library => match self.frames.last() {
                Some(Frame {
                    callback: true,
                    first_parameter,
                }) => Ok(first_parameter.clone()),
                _ => Err(
                    "redis.call is only allowed directly in the body of a callback given \
                          inline to redis.register_function"
                        .into(),
                ),
            },
        }
    }

    fn redis_call(&mut self, args: &FunctionArgs) {
        let keys_table = match self.keys_table() {
            Ok(table) => table,
            Err(why) => return self.refuse(why),
        };
        let args: Vec<Arg> = match args {
            FunctionArgs::Parentheses { arguments, .. } => {
                let count = arguments.len();
                arguments
                    .iter()
                    .enumerate()
                    .map(|(i, e)| classify(e, keys_table.as_deref(), &self.aliases, i + 1 == count))
                    .collect()
            }
            FunctionArgs::String(token) => {
                vec![literal_token(token).map_or(Arg::Unknown, Arg::Literal)]
            }
            _ => vec![Arg::Unknown],
        };
        if let Err(why) = check_command(&args) {
            self.refuse(why);
        }
    }
}

impl Visitor for Walk {
    fn visit_function_call(&mut self, call: &ast::FunctionCall) {
        self.chain(call.prefix(), call.suffixes());
    }

    fn visit_var_expression(&mut self, var: &VarExpression) {
        self.chain(var.prefix(), var.suffixes());
    }

    fn visit_expression(&mut self, expression: &Expression) {
        // `#KEYS`: the number of declared keys.
        if let Expression::UnaryOperator {
            unop: UnOp::Hash(_),
            expression,
        } = expression
            && let Expression::Var(Var::Name(name)) = expression.as_ref()
            && name.token().to_string() != "redis"
        {
            self.sanctioned.insert(offset(name));
        }
    }

    fn visit_assignment(&mut self, assignment: &ast::Assignment) {
        for var in assignment.variables() {
            let root = match var {
                Var::Name(name) => Some(name),
                Var::Expression(expression) => match expression.prefix() {
                    Prefix::Name(name) => Some(name),
                    _ => None,
                },
                _ => None,
            };
            if let Some(root) = root {
                self.assigned.insert(offset(root));
            }
        }
    }

    fn visit_block(&mut self, _: &ast::Block) {
        self.block_depth += 1;
    }

    fn visit_block_end(&mut self, _: &ast::Block) {
        self.block_depth -= 1;
    }

    fn visit_local_assignment(&mut self, local: &ast::LocalAssignment) {
        let top_level =
            self.source == Source::Script && self.frames.is_empty() && self.block_depth == 1;
        let values: Vec<&Expression> = local.expressions().iter().collect();
        for (i, name) in local.names().iter().enumerate() {
            self.declared(name);
            let holds_key = matches!(
                values.get(i),
                Some(Expression::Var(Var::Expression(var))) if is_declared_key(var, Some("KEYS"))
            );
            if top_level && holds_key {
                self.aliases.insert(name.token().to_string(), offset(name));
            }
        }
    }

    fn visit_local_function(&mut self, function: &ast::LocalFunction) {
        self.declared(function.name());
    }

    /// `function name() end` assigns `name` (the visible local, if any).
    fn visit_function_declaration(&mut self, function: &ast::FunctionDeclaration) {
        if let Some(root) = function.name().names().iter().next() {
            self.declared(root);
        }
    }

    fn visit_generic_for(&mut self, generic_for: &ast::GenericFor) {
        for name in generic_for.names() {
            self.declared(name);
        }
    }

    fn visit_numeric_for(&mut self, numeric_for: &ast::NumericFor) {
        self.declared(numeric_for.index_variable());
    }

    fn visit_function_body(&mut self, body: &FunctionBody) {
        for parameter in body.parameters() {
            if let Parameter::Name(name) = parameter {
                self.declared(name);
            }
        }
        let first_parameter = match body.parameters().iter().next() {
            Some(Parameter::Name(name)) => Some(name.token().to_string()),
            _ => None,
        };
        self.frames.push(Frame {
            first_parameter,
            callback: self
                .callbacks
                .contains(&(body as *const FunctionBody as usize)),
        });
    }

    fn visit_function_body_end(&mut self, _: &FunctionBody) {
        self.frames.pop();
    }

    fn visit_identifier(&mut self, token: &full_moon::tokenizer::Token) {
        if let TokenType::Identifier { identifier } = token.token_type() {
            self.identifiers
                .push((identifier.to_string(), token.start_position().bytes()));
        }
    }
}

fn offset(token: &TokenReference) -> usize {
    token.token().start_position().bytes()
}

/// A string or number literal's bytes; `None` for anything else, and for
/// strings with escapes (what they stand for is not worked out here).
fn literal(expression: &Expression) -> Option<Vec<u8>> {
    match expression {
        Expression::String(token) | Expression::Number(token) => literal_token(token),
        _ => None,
    }
}

fn literal_token(token: &TokenReference) -> Option<Vec<u8>> {
    match token.token().token_type() {
        TokenType::StringLiteral { literal, .. } if !literal.contains('\\') => {
            Some(literal.as_bytes().to_vec())
        }
        TokenType::Number { text } => Some(text.as_bytes().to_vec()),
        _ => None,
    }
}

fn inline_body(expression: &Expression) -> Option<&FunctionBody> {
    match expression {
        Expression::Function(function) => Some(function.body()),
        _ => None,
    }
}

fn classify(
    expression: &Expression,
    keys_table: Option<&str>,
    aliases: &std::collections::HashMap<String, usize>,
    last: bool,
) -> Arg {
    // A top-level local bound once to KEYS[n], used after its declaration.
    if let Expression::Var(Var::Name(name)) = expression
        && aliases
            .get(&name.token().to_string())
            .is_some_and(|declared_at| offset(name) > *declared_at)
    {
        return Arg::DeclaredKey;
    }
    if let Some(bytes) = literal(expression) {
        return Arg::Literal(bytes);
    }
    match expression {
        Expression::FunctionCall(_) if last => Arg::Spread,
        Expression::Symbol(token) if last && token.token().to_string() == "..." => Arg::Spread,
        Expression::Var(Var::Expression(var)) if is_declared_key(var, keys_table) => {
            Arg::DeclaredKey
        }
        _ => Arg::Unknown,
    }
}

/// `T[<number>]` where `T` is the keys table.
fn is_declared_key(var: &VarExpression, keys_table: Option<&str>) -> bool {
    let (Prefix::Name(root), Some(keys_table)) = (var.prefix(), keys_table) else {
        return false;
    };
    let suffixes: Vec<&Suffix> = var.suffixes().collect();
    root.token().to_string() == keys_table
        && matches!(
            suffixes.as_slice(),
            [Suffix::Index(Index::Brackets { expression, .. })]
                if matches!(expression.as_ref(), Expression::Number(_))
        )
}

/// One `redis.call`: a command the table knows, allowed in scripts, whose
/// key arguments are all declared keys.
fn check_command(args: &[Arg]) -> Result<(), String> {
    let Some(Arg::Literal(name)) = args.first() else {
        return Err("redis.call must name its command as a string literal".into());
    };
    let shown = super::shown(name);
    let Some(row) = table::lookup(name) else {
        return Err(format!("it calls '{shown}', which redcloak does not know"));
    };
    match row.class {
        Class::Forward
        | Class::Sealed(_)
        | Class::ServerReadsValue
        | Class::OrdersValues
        | Class::Sort => {}
        _ => {
            return Err(format!(
                "it calls '{shown}', which is not allowed in scripts"
            ));
        }
    }
    let stand_ins = stand_ins(args, row.keys)?;
    if row.class == Class::Sort && super::sort_reads_other_keys(&stand_ins) {
        return Err(format!(
            "it calls '{shown}' with BY or GET, which reads keys it does not declare"
        ));
    }
    for position in row.keys.positions(&stand_ins) {
        if args.get(position) != Some(&Arg::DeclaredKey) {
            return Err(format!(
                "argument {position} of its '{shown}' call is a key, and must be KEYS[n] (a declared key)"
            ));
        }
    }
    Ok(())
}

/// Arguments as the key layout reads them, once it is proved that the
/// unknown ones cannot move the key positions.
fn stand_ins(args: &[Arg], keys: Keys) -> Result<Vec<Bytes>, String> {
    let spread_at = args.iter().position(|a| *a == Arg::Spread);
    let bytes_of = |arg: &Arg| match arg {
        Arg::Literal(bytes) => Bytes::copy_from_slice(bytes),
        // Bytes no keyword or number can equal.
        _ => Bytes::from_static(b"\0"),
    };
    let stand_ins: Vec<Bytes> = args.iter().map(bytes_of).collect();
    let decided_by = match keys {
        Keys::None => 0,
        Keys::Range { last, .. } if last >= 0 => last as usize + 1,
        Keys::Range { .. } => args.len(),
        Keys::NumKeys { at, .. } => {
            let at = at as usize;
            let count = match args.get(at) {
                Some(Arg::Literal(n)) => std::str::from_utf8(n)
                    .ok()
                    .and_then(|n| n.parse::<usize>().ok()),
                None => Some(0),
                _ => None,
            };
            let Some(count) = count else {
                return Err("its key count must be a number literal".into());
            };
            at + 1 + count
        }
        // Keywords decide where keys are: every other argument must be a literal.
        Keys::Streams | Keys::SortStore | Keys::GeoStore { .. } => {
            let positions = keys.positions(&stand_ins);
            let unknown = args
                .iter()
                .enumerate()
                .skip(1)
                .any(|(i, a)| !matches!(a, Arg::Literal(_)) && !positions.contains(&i));
            if unknown || spread_at.is_some() {
                return Err("its options must be literals, so the key positions are known".into());
            }
            args.len()
        }
    };
    if spread_at.is_some_and(|at| at < decided_by) {
        return Err(
            "a call or ... among its first arguments hides how many there are, and so which are keys"
                .into(),
        );
    }
    Ok(stand_ins)
}

/// Most scripts and functions remembered; past it the oldest half is
/// forgotten (an EVALSHA then gets NOSCRIPT and the client sends EVAL).
const BOOK_CAPACITY: usize = 10_000;

/// What redcloak has analyzed, shared by every connection: script verdicts
/// by SHA-1 (for EVALSHA), and the functions of proved libraries (for FCALL).
#[derive(Debug, Default)]
pub struct Book {
    scripts: std::sync::Mutex<Remembered<[u8; 20], Result<(), Unproven>>>,
    functions: std::sync::Mutex<Remembered<String, ()>>,
}

/// A bounded map that forgets its oldest entries.
#[derive(Debug)]
struct Remembered<K, V> {
    map: std::collections::HashMap<K, V>,
    order: std::collections::VecDeque<K>,
}

impl<K, V> Default for Remembered<K, V> {
    fn default() -> Self {
        Remembered {
            map: Default::default(),
            order: Default::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Remembered<K, V> {
    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > BOOK_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

impl Book {
    /// The verdict on a script body, analyzed once per distinct body.
    pub fn script(&self, body: &[u8]) -> Result<(), Unproven> {
        let digest = sha1(body);
        if let Some(verdict) = lock(&self.scripts).map.get(&digest) {
            return verdict.clone();
        }
        let verdict = analyze(body, Source::Script).map(|_| ());
        lock(&self.scripts).insert(digest, verdict.clone());
        verdict
    }

    /// The verdict on a script by its SHA-1 (40 hex digits, any case);
    /// `None`: never seen.
    pub fn script_by_sha(&self, sha: &[u8]) -> Option<Result<(), Unproven>> {
        let digest = parse_sha1(sha)?;
        lock(&self.scripts).map.get(&digest).cloned()
    }

    /// Analyzes a library; its functions may be called once it is proved.
    pub fn library(&self, code: &[u8]) -> Result<(), Unproven> {
        let approved = analyze(code, Source::Library)?;
        let mut functions = lock(&self.functions);
        for name in approved.functions {
            functions.insert(name, ());
        }
        Ok(())
    }

    /// Whether `name` was registered by a library redcloak proved.
    pub fn knows_function(&self, name: &[u8]) -> bool {
        std::str::from_utf8(name).is_ok_and(|name| lock(&self.functions).map.contains_key(name))
    }
}

/// The verdict on a script body, not remembered (for configured entries).
pub fn prove_script(body: &[u8]) -> Result<(), Unproven> {
    analyze(body, Source::Script).map(|_| ())
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The SHA-1 Redis names a script by.
pub fn sha1(body: &[u8]) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(body).into()
}

/// A SHA-1 written as 40 hex digits (any case).
pub fn parse_sha1(hex: &[u8]) -> Option<[u8; 20]> {
    if hex.len() != 40 {
        return None;
    }
    let mut digest = [0u8; 20];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(code: &str) -> Result<Approved, Unproven> {
        analyze(code.as_bytes(), Source::Script)
    }

    fn library(code: &str) -> Result<Approved, Unproven> {
        analyze(code.as_bytes(), Source::Library)
    }

    #[track_caller]
    fn refused(result: Result<Approved, Unproven>, why: &str) {
        match result {
            Err(Unproven(text)) => assert!(text.contains(why), "{text:?} does not say {why:?}"),
            Ok(_) => panic!("accepted; expected a refusal saying {why:?}"),
        }
    }

    #[test]
    fn accepts_calls_whose_keys_are_declared() {
        for code in [
            "return redis.call('GET', KEYS[1])",
            "redis.call('SET', KEYS[1], ARGV[1]); return redis.pcall('HSET', KEYS[2], 'f', ARGV[2])",
            "local n = #KEYS; return redis.call('DEL', KEYS[1], KEYS[2])",
            "return redis.call('HSET', KEYS[1], unpack(ARGV))",
            "return redis.call('ZUNIONSTORE', KEYS[1], 2, KEYS[2], KEYS[3], 'WEIGHTS', ARGV[1], 2)",
            "local function f(x) return redis.call('EXPIRE', KEYS[1], x) end return f(10)",
            "redis.log(redis.LOG_WARNING, 'hi') return redis.status_reply('OK')",
            "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])",
            "return redis.call('PING')",
            "return redis.call 'PING'",
            "for i = 1, #KEYS do redis.call('TYPE', KEYS[1]) end",
            "return redis.call('XREAD', 'COUNT', 1, 'STREAMS', KEYS[1], '0')",
            "return redis.call('SORT', KEYS[1], 'LIMIT', '0', '10')",
            "return cjson.encode({a = KEYS[1]})",
        ] {
            assert_eq!(script(code), Ok(Approved { functions: vec![] }), "{code}");
        }
    }

    #[test]
    fn a_top_level_local_set_once_to_a_declared_key_is_that_key() {
        let sidekiq = "local key, now = KEYS[1], ARGV[1]\n\
            local jobs = redis.call(\"zrangebyscore\", key, \"-inf\", now, \"limit\", 0, 1)\n\
            if jobs[1] then\n  redis.call(\"zrem\", key, jobs[1])\n  return jobs[1]\nend\n";
        for code in [
            sidekiq,
            "local k = KEYS[1] return redis.call('GET', k)",
            "local k = KEYS[2] local v = redis.call('GET', k) return {k, v}",
            "local k = KEYS[1] local function f() return redis.call('GET', k) end return f()",
        ] {
            assert!(script(code).is_ok(), "{code}: {:?}", script(code));
        }
        for (code, why) in [
            (
                "local k = KEYS[1] k = 'other' return redis.call('GET', k)",
                "declared again, assigned",
            ),
            (
                "local k = KEYS[1] do local k = 'x' return redis.call('GET', k) end",
                "declared again",
            ),
            (
                "local k = KEYS[1] local function f(k) return redis.call('GET', k) end return f('x')",
                "declared again",
            ),
            (
                "local k = KEYS[1] for k = 1, 2 do redis.call('GET', k) end",
                "declared again",
            ),
            (
                "local k = KEYS[1] for _, k in ipairs(ARGV) do redis.call('GET', k) end",
                "declared again",
            ),
            (
                "local k local k = KEYS[1] return redis.call('GET', k)",
                "declared again",
            ),
            (
                "local k = KEYS[1] function k() end return redis.call('GET', k)",
                "declared again",
            ),
            (
                "redis.call('GET', k) local k = KEYS[1]",
                "argument 1 of its 'GET' call is a key",
            ),
            (
                "if true then local k = KEYS[1] return redis.call('GET', k) end",
                "argument 1",
            ),
            (
                "local k = ARGV[1] return redis.call('GET', k)",
                "argument 1",
            ),
            (
                "local k = KEYS[1] return redis.call('GET', k .. ':x')",
                "argument 1",
            ),
            (
                "local k = KEYS return redis.call('GET', k[1])",
                "argument 1",
            ),
        ] {
            refused(script(code), why);
        }
        // In a library the keys come from the callback's parameter only.
        refused(
            library(
                "local k = KEYS[1] redis.register_function('f', function(keys, args) \
                 return redis.call('GET', k) end)",
            ),
            "",
        );
    }

    #[test]
    fn refuses_undeclared_keys() {
        refused(
            script("return redis.call('SET','secret:1',ARGV[1])"),
            "argument 1 of its 'SET' call is a key",
        );
        refused(script("return redis.call('GET', ARGV[1])"), "argument 1");
        refused(script("return redis.call('GET', KEYS[i])"), "argument 1");
        refused(
            script("return redis.call('MGET', KEYS[1], 'x')"),
            "argument 2",
        );
        refused(script("return redis.call('GET', 1)"), "argument 1");
        refused(
            script("return redis.call('HSET', 'secret:h', 'f', ARGV[1])"),
            "argument 1",
        );
        refused(
            script("return redis.call('DEL', KEYS[1], unpack(ARGV))"),
            "hides how many",
        );
        refused(
            script("return redis.call('EVAL', 'x', 0)"),
            "not allowed in scripts",
        );
        refused(
            script("return redis.call(ARGV[1], KEYS[1])"),
            "string literal",
        );
        refused(
            script("return redis.call('NOPE', KEYS[1])"),
            "does not know",
        );
        refused(
            script("return redis.call('SORT', KEYS[1], 'BY', 'w_*')"),
            "BY or GET",
        );
        refused(
            script("return redis.call('SORT', KEYS[1], ARGV[1], ARGV[2])"),
            "literals",
        );
        refused(
            script("return redis.call('ZUNIONSTORE', KEYS[1], ARGV[1], KEYS[2])"),
            "number literal",
        );
        refused(
            script("return redis.call('MIGRATE', 'h', 1, '', 0, 5000, 'KEYS', KEYS[1])"),
            "",
        );
    }

    #[test]
    fn refuses_other_routes_to_redis_and_keys() {
        for (code, why) in [
            (
                "local c = redis.call return c('SET', 'secret:1', 'x')",
                "'redis'",
            ),
            ("return redis['call']('SET', 'secret:1', 'x')", "'redis'"),
            (
                "return pcall(redis.call, 'SET', 'secret:1', 'x')",
                "'redis'",
            ),
            ("return redis:call('SET', KEYS[1], 'x')", "'redis'"),
            ("local redis = {} return 1", "'redis'"),
            ("redis.call = nil", "'redis'"),
            (
                "KEYS[1] = 'secret:1' return redis.call('GET', KEYS[1])",
                "'KEYS'",
            ),
            ("local t = KEYS t[1] = 'secret:1' return 1", "'KEYS'"),
            ("table.insert(KEYS, 'secret:1') return 1", "'KEYS'"),
            (
                "KEYS = {'secret:1'} return redis.call('GET', KEYS[1])",
                "'KEYS'",
            ),
            (
                "local KEYS = {'secret:1'} return redis.call('GET', KEYS[1])",
                "'KEYS'",
            ),
            ("return _G.redis.call('SET', 'secret:1', 'x')", "'_G'"),
            (
                "return getfenv().redis.call('SET', 'secret:1', 'x')",
                "'getfenv'",
            ),
            ("return loadstring('return 1')()", "'loadstring'"),
            ("return rawget(_G, 'redis')", "'rawget'"),
            ("return redis.call('GET', KEYS[1]", "does not parse"),
        ] {
            refused(script(code), why);
        }
    }

    #[test]
    fn refuses_what_the_parser_could_choke_on() {
        refused(script(&"(".repeat(10_000)), "nests");
        refused(script(&"- ".repeat(10_000)), "nests");
        refused(script(&"x".repeat(MAX_SOURCE_BYTES + 1)), "larger");
        refused(analyze(b"return '\xff'", Source::Script), "UTF-8");
    }

    #[test]
    fn the_deepest_accepted_nesting_parses_on_a_small_stack() {
        let depth = MAX_NESTING - 1;
        let longest_chain = MAX_SOURCE_BYTES / 2 - 10;
        let cases = [
            format!("return {}1{}", "(".repeat(depth), ")".repeat(depth)),
            format!("return {}1{}", "{".repeat(depth), "}".repeat(depth)),
            format!(
                "{}{}",
                "if x then ".repeat(depth / 2),
                "end ".repeat(depth / 2)
            ),
            format!("return {}1", "- ".repeat(depth)),
            format!("return {}1", "not ".repeat(depth)),
            format!("return {}x", "x..".repeat(longest_chain / 2)),
            format!("return {}1", "2^".repeat(longest_chain / 2)),
            format!("return {}1", "1+".repeat(longest_chain)),
            format!(
                "local f = {}1{}",
                "function() return ".repeat(depth / 2),
                " end".repeat(depth / 2)
            ),
        ];
        // A tokio worker thread's stack.
        let analyzed = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || cases.iter().map(|c| script(c).is_ok()).collect::<Vec<_>>())
            .expect("thread")
            .join()
            .expect("no stack overflow");
        assert!(analyzed.iter().all(|ok| *ok), "{analyzed:?}");
    }

    #[test]
    fn the_book_finds_scripts_by_sha1_and_functions_by_name() {
        let book = Book::default();
        let body = b"return redis.call('GET', KEYS[1])";
        // echo -n "return redis.call('GET', KEYS[1])" | sha1sum
        let sha = b"d3c21d0c2b9ca22f82737626a27bcaf5d288f99f";
        assert_eq!(book.script_by_sha(sha), None);
        assert_eq!(book.script(body), Ok(()));
        assert_eq!(book.script_by_sha(sha), Some(Ok(())));
        assert_eq!(book.script_by_sha(&sha.to_ascii_uppercase()), Some(Ok(())));
        assert!(book.script(b"return redis.call('GET', 'x')").is_err());
        assert!(!book.knows_function(b"f"));
        let lib = b"#!lua name=l\nredis.register_function('f', function(keys, args) return 1 end)";
        assert_eq!(book.library(lib), Ok(()));
        assert!(book.knows_function(b"f"));
    }

    #[test]
    fn libraries_take_keys_from_their_callbacks_first_parameter() {
        let lib = "#!lua name=mylib\n\
            redis.register_function('get1', function(keys, args) return redis.call('GET', keys[1]) end)\n\
            redis.register_function{function_name = 'set1', callback = function(k, a) \
              return redis.call('SET', k[1], a[1]) end, flags = {}}";
        assert_eq!(
            library(lib),
            Ok(Approved {
                functions: vec!["get1".into(), "set1".into()]
            })
        );
        refused(
            library(
                "#!lua name=l\nredis.register_function('f', function(keys, args) return redis.call('SET', 'secret:1', args[1]) end)",
            ),
            "argument 1",
        );
        refused(
            library(
                "#!lua name=l\nlocal function f(keys, args) return redis.call('GET', keys[1]) end\nredis.register_function('f', f)",
            ),
            "inline",
        );
        refused(
            library(
                "#!lua name=l\nredis.register_function('f', function(keys, args) local keys = {'secret:1'} return redis.call('GET', keys[1]) end)",
            ),
            "'keys'",
        );
        refused(
            library(
                "#!lua name=l\nredis.register_function('f', function(keys, args) local g = function() return redis.call('GET', keys[1]) end return g() end)",
            ),
            "directly in the body",
        );
        refused(library("#!lua name=l\nreturn 1"), "registers no function");
        refused(
            script("redis.register_function('f', function(keys) return 1 end)"),
            "'redis'",
        );
    }
}
