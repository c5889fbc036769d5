//! Commands on stored values (the table's `Class::Sealed` rows, and known
//! scripts): which arguments to seal, under which site, and which parts of
//! the reply to open. A plan only: nothing here encrypts (`session::seal`
//! does), and every grammar fact it reads comes from the command table or
//! is Redis's own option parsing, reproduced where Redis parses it.

use super::known;
use super::rules::{Bind, Decision, Members, Mode, Rules};
use super::table::{Kind, Opens, Row, Scores, Sealed, Values};
use super::{
    Action, KeySite, OpenPlan, Policy, ReplyPlan, ScanPlan, SealAt, SiteScope, ValueSite, refuse,
    shown,
};
use bytes::Bytes;

impl Policy {
    /// EVAL or EVALSHA of a known script. `None`: treat it as any proved
    /// script (a plaintext-only script on plaintext keys).
    pub(super) fn known_script(
        &self,
        name: &str,
        known: &known::KnownScript,
        args: &[Bytes],
    ) -> Option<Action> {
        let numkeys = args
            .get(2)
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())?;
        let keys = args.get(3..3 + numkeys)?;
        let (holds, arg_roles, reply) = match &known.usage {
            known::Use::PlaintextOnly(reason) => {
                let encrypted = keys
                    .iter()
                    .find(|k| self.rules.decide(k).mode != Mode::Plaintext)?;
                return Some(refuse(
                    "encrypted_key",
                    &format!(
                        "{name} of {} on '{}' is refused: {reason}",
                        known.name,
                        shown(encrypted)
                    ),
                ));
            }
            known::Use::Serve { keys, args, reply } => (keys, args, reply),
        };
        let argv_from = 3 + numkeys;
        let argv = args.len() - argv_from;
        if numkeys != holds.len() || argv != arg_roles.len() {
            return Some(refuse(
                "unproven_script",
                &format!(
                    "{name} of {} is refused: it takes {} keys and {} arguments, and was given {numkeys} and {argv}",
                    known.name,
                    holds.len(),
                    arg_roles.len()
                ),
            ));
        }
        let sites: Vec<Option<ValueSite>> = keys
            .iter()
            .zip(holds)
            .map(|(key, holds)| self.site(holds.kind(), key, None))
            .collect();
        // Values may pass between the keys of one script: they must share a binding.
        if let Some((first, other)) = self.unshared(keys) {
            return Some(refuse(
                "moves_value",
                &format!(
                    "{name} of {} would pass values between '{}' ({}) and '{}' ({}), whose bindings \
                     differ: give its keys one rule with bind = \"rule\"",
                    known.name,
                    shown(first),
                    self.rules.decide(first).describe(),
                    shown(other),
                    self.rules.decide(other).describe()
                ),
            ));
        }
        let site_of_role = |role: &known::Role| match role {
            known::Role::Plain => None,
            known::Role::ValuesOf(n) => sites.get(n - 1).cloned().flatten(),
        };
        let seal: Vec<SealAt> = arg_roles
            .iter()
            .enumerate()
            .filter_map(|(i, role)| {
                site_of_role(role).map(|site| SealAt {
                    index: argv_from + i,
                    site,
                })
            })
            .collect();
        let plan = match site_of_role(reply) {
            Some(site) => ReplyPlan::Open(OpenPlan::Members {
                site,
                scores: false,
            }),
            None => ReplyPlan::Passthrough,
        };
        Some(match seal.is_empty() {
            true => Action::Forward(plan),
            false => Action::Seal(seal, plan),
        })
    }

    /// LMOVE, RENAME, COPY and the like: values must still open under the
    /// key they move to. `None`: they do.
    pub(super) fn moves_values(&self, name: &str, row: &Row, args: &[Bytes]) -> Option<Action> {
        let mut positions = row.keys.positions(args);
        positions.extend(row.keys.store_candidates(args));
        let (from, to) = self.unshared(positions.iter().map(|&at| &args[at]))?;
        Some(refuse(
            "moves_value",
            &format!(
                "{name} would move values of '{}' ({}) to '{}' ({}), where they would no longer decrypt. \
                 Values are bound to their key name: give both keys one rule with bind = \"rule\", \
                 or plaintext rules",
                shown(from),
                self.rules.decide(from).describe(),
                shown(to),
                self.rules.decide(to).describe()
            ),
        ))
    }

    /// The first key and the first of the others whose values would not
    /// open under the first key's binding; `None`: they all share it (the
    /// same key always does).
    fn unshared<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k Bytes>,
    ) -> Option<(&'k Bytes, &'k Bytes)> {
        let mut keys = keys.into_iter();
        let first = keys.next()?;
        let source = self.rules.decide(first);
        keys.find(|key| *key != first && !source.shares_values_with(&self.rules.decide(key)))
            .map(|other| (first, other))
    }

    /// The site of values of `kind` under `key` (a channel, for messages),
    /// or `None` when its rule is plaintext.
    pub fn site(&self, kind: Kind, key: &Bytes, field: Option<&Bytes>) -> Option<ValueSite> {
        let decision = match kind {
            Kind::Message => return message_site(&self.rules, key),
            _ => self.rules.decide(key),
        };
        site_of(&decision, kind, key, field)
    }

    /// Commands of [`Class::Sealed`]: which arguments to seal, which parts
    /// of the reply to open.
    pub(super) fn sealed(
        &self,
        name: &dyn Fn() -> String,
        row: &Row,
        sealed: Sealed,
        args: &[Bytes],
    ) -> Action {
        // The first key (ZUNION's comes after its count); values of commands
        // over several keys share its binding (`moves_values`).
        let Some(key) = row.keys.first(args).and_then(|at| args.get(at)) else {
            return Action::Forward(ReplyPlan::Passthrough);
        };
        let kind = sealed.kind;
        let mut key_site = self.site(kind, key, None);
        if sealed.opens == Opens::HashValues
            && let (Some(site), 2) = (&key_site, args.len())
        {
            // Values are bound to their fields: fetch the pairs, return the values.
            return Action::Rewrite(
                vec![Bytes::from_static(b"HGETALL"), key.clone()],
                ReplyPlan::Open(OpenPlan::HashValues(site.clone())),
            );
        }
        if let Some(site) = &key_site
            && let Some(refusal) = self.needs(name, row, sealed, site, args)
        {
            return refusal;
        }
        if let (Opens::Scan(scores), Some(site)) = (sealed.opens, &key_site)
            && let Some(rewrite) = scan_matching(site, scores, args)
        {
            return rewrite;
        }
        let plan = self.opens(row, sealed, key, &mut key_site, args);
        let at = |index: usize, site: Option<ValueSite>| {
            site.filter(|_| index < args.len())
                .map(|site| SealAt { index, site })
        };
        let seal: Vec<SealAt> = match sealed.values {
            Values::None => Vec::new(),
            Values::At(i) => at(i.into(), key_site).into_iter().collect(),
            Values::From(first) => match &key_site {
                Some(site) => (first.into()..args.len())
                    .map(|index| SealAt {
                        index,
                        site: site.clone(),
                    })
                    .collect(),
                None => Vec::new(),
            },
            Values::KeyValuePairs => (1..args.len())
                .step_by(2)
                .filter_map(|k| at(k + 1, self.site(kind, &args[k], None)))
                .collect(),
            Values::FieldValuePairs => (2..args.len())
                .step_by(2)
                .filter_map(|f| at(f + 1, self.site(kind, key, Some(&args[f]))))
                .collect(),
            Values::StreamFields => (xadd_id_position(args) + 1..args.len())
                .step_by(2)
                .filter_map(|f| at(f + 1, self.site(kind, key, Some(&args[f]))))
                .collect(),
            Values::Span { first, count } => (usize::from(first)..usize::from(first + count))
                .filter_map(|index| at(index, key_site.clone()))
                .collect(),
            Values::GeoTriples => (geoadd_first_longitude(args) + 2..args.len())
                .step_by(3)
                .filter_map(|index| at(index, key_site.clone()))
                .collect(),
            Values::AfterWord(word) => args
                .iter()
                .enumerate()
                .skip(options_after_keys(row, args, 0))
                .find(|(_, a)| a.eq_ignore_ascii_case(word.as_bytes()))
                .and_then(|(option, _)| at(option + 1, key_site.clone()))
                .into_iter()
                .collect(),
            Values::ScoreMemberPairs => match &key_site {
                Some(site) => (zadd_first_score(args) + 1..args.len())
                    .step_by(2)
                    .map(|index| SealAt {
                        index,
                        site: site.clone(),
                    })
                    .collect(),
                None => Vec::new(),
            },
        };
        match seal.is_empty() {
            true => Action::Forward(plan),
            false => Action::Seal(seal, plan),
        }
    }

    /// The reply plan of a [`Class::Sealed`] command.
    fn opens(
        &self,
        row: &Row,
        sealed: Sealed,
        key: &Bytes,
        key_site: &mut Option<ValueSite>,
        args: &[Bytes],
    ) -> ReplyPlan {
        let kind = sealed.kind;
        // Nothing is sealed (GET): the plan takes the key's site; otherwise
        // sealing needs it after, and the plan takes a copy (SET ... GET).
        let takes = sealed.values == Values::None;
        let mut site = || match takes {
            true => key_site.take(),
            false => key_site.clone(),
        };
        let open = |site: Option<ValueSite>, plan: fn(ValueSite) -> OpenPlan| {
            site.map_or(ReplyPlan::Passthrough, |s| ReplyPlan::Open(plan(s)))
        };
        let option_from = |first: usize, word: &[u8]| {
            args.iter()
                .skip(first)
                .any(|a| a.eq_ignore_ascii_case(word))
        };
        let keyed = |plan: fn(Vec<KeySite>) -> OpenPlan| {
            let sites: Vec<KeySite> = row
                .keys
                .positions(args)
                .into_iter()
                .map(|i| (args[i].clone(), self.site(kind, &args[i], None)))
                .collect();
            match sites.iter().all(|(_, site)| site.is_none()) {
                true => ReplyPlan::Passthrough,
                false => ReplyPlan::Open(plan(sites)),
            }
        };
        match sealed.opens {
            Opens::Nothing => ReplyPlan::Passthrough,
            Opens::Value => open(site(), OpenPlan::One),
            Opens::ValueWithGet if option_from(3, b"get") => open(site(), OpenPlan::One),
            Opens::ValueWithGet => ReplyPlan::Passthrough,
            Opens::FieldValue => open(
                args.get(2)
                    .and_then(|field| self.site(kind, key, Some(field))),
                OpenPlan::One,
            ),
            Opens::Values => open(site(), OpenPlan::Values),
            Opens::PerKey => each(args[1..].iter().map(|k| self.site(kind, k, None)).collect()),
            Opens::PerField => each(
                args[2..]
                    .iter()
                    .map(|field| self.site(kind, key, Some(field)))
                    .collect(),
            ),
            Opens::HashPairs => open(site(), OpenPlan::HashPairs),
            Opens::HashPairsWithValues => match args.get(3) {
                Some(option) if option.eq_ignore_ascii_case(b"withvalues") => {
                    open(site(), OpenPlan::HashPairs)
                }
                _ => ReplyPlan::Passthrough,
            },
            // Rewritten to HGETALL before a plan is asked for (see `sealed`).
            Opens::HashValues => ReplyPlan::Passthrough,
            Opens::HashScan if hscan_no_values(args) => ReplyPlan::Passthrough,
            Opens::HashScan => open(site(), OpenPlan::HashScan),
            Opens::KeyAndValue => keyed(OpenPlan::KeyAndValue),
            Opens::KeyAndValues => keyed(OpenPlan::KeyAndValues),
            Opens::KeyMemberScore => keyed(OpenPlan::KeyMemberScore),
            Opens::KeyAndMembersWithScores => keyed(OpenPlan::KeyAndMembersWithScores),
            Opens::Members(scores) => match site() {
                Some(site) => ReplyPlan::Open(OpenPlan::Members {
                    site,
                    scores: with_scores(scores, row, args),
                }),
                None => ReplyPlan::Passthrough,
            },
            Opens::StreamEntries { options_from } => {
                let options = args.get(usize::from(options_from)..).unwrap_or_default();
                match options.iter().any(|a| a.eq_ignore_ascii_case(b"justid")) {
                    true => ReplyPlan::Passthrough,
                    false => open(site(), OpenPlan::StreamEntries),
                }
            }
            Opens::AutoClaim => {
                let options = args.get(5..).unwrap_or_default();
                match options.iter().any(|a| a.eq_ignore_ascii_case(b"justid")) {
                    true => ReplyPlan::Passthrough,
                    false => open(site(), OpenPlan::AutoClaim),
                }
            }
            Opens::Streams => keyed(OpenPlan::Streams),
            Opens::StreamInfo => match args.get(1) {
                Some(sub) if sub.eq_ignore_ascii_case(b"stream") => {
                    open(site(), OpenPlan::StreamInfo)
                }
                _ => ReplyPlan::Passthrough,
            },
            Opens::GeoResults => {
                // With STORE or STOREDIST (a second key), the reply is a count.
                match row.keys.positions(args).len() > 1 {
                    true => ReplyPlan::Passthrough,
                    false => open(site(), OpenPlan::GeoResults),
                }
            }
            Opens::Scan(scores) => match site() {
                Some(site) => ReplyPlan::Open(OpenPlan::Scan(Box::new(ScanPlan {
                    site,
                    scores: scores == Scores::Always,
                    pattern: None,
                }))),
                None => ReplyPlan::Passthrough,
            },
        }
    }

    /// What a [`Class::Sealed`] command needs of an encrypted key's rule
    /// that it may not have: `Some` refusal when it lacks it.
    fn needs(
        &self,
        name: &dyn Fn() -> String,
        row: &Row,
        sealed: Sealed,
        site: &ValueSite,
        args: &[Bytes],
    ) -> Option<Action> {
        let key = shown(&site.key);
        if sealed.equality && !site.deterministic {
            let name = name();
            return Some(refuse(
                "encrypted_key",
                &format!(
                    "{name} on '{key}' is refused: Redis would compare list elements, and the elements of \
                     '{key}' are sealed with a random nonce each, so none compare equal. Give its rule \
                     members = \"deterministic\" (equal elements then look equal to Redis), or a plaintext rule"
                ),
            ));
        }
        // ZRANGE and ZRANGESTORE take BYLEX: a range over members' bytes.
        if site.kind == Kind::SortedSetMember
            && args[options_after_keys(row, args, 0)..]
                .iter()
                .any(|a| a.eq_ignore_ascii_case(b"bylex"))
        {
            let name = name();
            return Some(refuse(
                "encrypted_key",
                &format!(
                    "{name} ... BYLEX on '{key}' is refused: it ranges over members by their bytes, and the \
                     members of '{key}' are encrypted, so the order Redis sees means nothing. \
                     Use BYSCORE or ranks, or give such keys a plaintext rule"
                ),
            ));
        }
        None
    }
}

/// HSCAN key cursor [MATCH pattern] [COUNT count] [NOVALUES], read as
/// Redis reads it: MATCH and COUNT take the next argument whatever it is,
/// so `MATCH novalues` is a pattern. An option Redis would refuse makes it
/// answer an error, which holds no values.
fn hscan_no_values(args: &[Bytes]) -> bool {
    let mut i = 3;
    let mut no_values = false;
    while let Some(option) = args.get(i) {
        let takes_value =
            option.eq_ignore_ascii_case(b"match") || option.eq_ignore_ascii_case(b"count");
        if takes_value && i + 1 < args.len() {
            i += 2;
        } else if option.eq_ignore_ascii_case(b"novalues") {
            no_values = true;
            i += 1;
        } else {
            return false;
        }
    }
    no_values
}

/// The plan for an array of values; a passthrough when none is encrypted.
fn each(sites: Vec<Option<ValueSite>>) -> ReplyPlan {
    if sites.iter().all(Option::is_none) {
        ReplyPlan::Passthrough
    } else {
        ReplyPlan::Open(OpenPlan::Each(sites))
    }
}

/// Where the payload of a message on `channel` is sealed; `None` when the
/// channel's rule is plaintext.
pub fn message_site(rules: &Rules, channel: &[u8]) -> Option<ValueSite> {
    site_of(&rules.decide_channel(channel), Kind::Message, channel, None)
}

/// The site of values under a decided key; `None` when it is plaintext.
fn site_of(
    decision: &Decision<'_>,
    kind: Kind,
    key: &[u8],
    field: Option<&Bytes>,
) -> Option<ValueSite> {
    let scope = match decision.mode {
        Mode::Plaintext => return None,
        Mode::Encrypt { bind: Bind::Key } => SiteScope::Key,
        Mode::Encrypt { bind: Bind::None } => SiteScope::Unbound,
        Mode::Encrypt { bind: Bind::Rule } => {
            let name = decision
                .rule
                .map_or_else(|| "".into(), |rule| rule.name.clone());
            SiteScope::Rule(name)
        }
    };
    let deterministic = match kind {
        Kind::SetMember | Kind::SortedSetMember => true,
        Kind::ListElement => decision.list_members() == Members::Deterministic,
        Kind::String
        | Kind::HashField
        | Kind::StreamValue
        | Kind::Message
        | Kind::HyperLogLogElement => false,
    };
    Some(ValueSite {
        kind,
        key: Bytes::copy_from_slice(key),
        scope,
        field: field.map(|f| Bytes::copy_from_slice(f)),
        deterministic,
    })
}

/// Where a command's options start: after its last key and `fixed` more
/// arguments.
fn options_after_keys(row: &Row, args: &[Bytes], fixed: u8) -> usize {
    let after_keys = row.keys.positions(args).last().map_or(2, |last| last + 1);
    (after_keys + usize::from(fixed)).min(args.len())
}

/// Whether a reply of members carries scores, as the request asked.
fn with_scores(scores: Scores, row: &Row, args: &[Bytes]) -> bool {
    match scores {
        Scores::Never => false,
        Scores::Always => true,
        Scores::WithOption(fixed) => args[options_after_keys(row, args, fixed)..]
            .iter()
            .any(|a| a.eq_ignore_ascii_case(b"withscores")),
    }
}

/// XADD's id, after its options, read as Redis's
/// `streamParseAddOrTrimArgsOrReply` reads them: NOMKSTREAM; MAXLEN or MINID,
/// an optional `=` or `~`, and the threshold; LIMIT and its count. The first
/// other argument is the id; field, value pairs follow it.
pub(super) fn xadd_id_position(args: &[Bytes]) -> usize {
    let mut i = 2;
    while let Some(option) = args.get(i) {
        let is = |word: &[u8]| option.eq_ignore_ascii_case(word);
        if is(b"nomkstream") {
            i += 1;
        } else if is(b"maxlen") || is(b"minid") {
            let exactness = args
                .get(i + 1)
                .is_some_and(|a| a[..] == *b"=" || a[..] == *b"~");
            i += if exactness { 3 } else { 2 };
        } else if is(b"limit") {
            i += 2;
        } else {
            break;
        }
    }
    i
}

/// GEOADD's first longitude, after its options (NX, XX, CH), as Redis's
/// `geoaddCommand` reads them.
fn geoadd_first_longitude(args: &[Bytes]) -> usize {
    after_leading_options(args, &[b"nx", b"xx", b"ch"])
}

/// ZADD's first score, after its options, read as Redis's `zaddGenericCommand`
/// reads them: every leading NX, XX, GT, LT, CH or INCR is an option.
fn zadd_first_score(args: &[Bytes]) -> usize {
    after_leading_options(args, &[b"nx", b"xx", b"gt", b"lt", b"ch", b"incr"])
}

/// The first argument after the key that is none of `options` (any case).
fn after_leading_options(args: &[Bytes], options: &[&[u8]]) -> usize {
    let leading = args
        .iter()
        .skip(2)
        .take_while(|a| options.iter().any(|o| a.eq_ignore_ascii_case(o)))
        .count();
    2 + leading
}

/// SSCAN or ZSCAN with MATCH on an encrypted key: Redis would match the
/// pattern against envelopes, so the request goes without it and redcloak
/// matches the opened members. `None`: no MATCH.
fn scan_matching(site: &ValueSite, scores: Scores, args: &[Bytes]) -> Option<Action> {
    let mut forwarded = args[..args.len().min(3)].to_vec();
    let mut pattern = None;
    let mut i = 3;
    while let Some(option) = args.get(i) {
        let value = args.get(i + 1);
        match value {
            Some(value) if option.eq_ignore_ascii_case(b"match") => pattern = Some(value.clone()),
            Some(value) => forwarded.extend([option.clone(), value.clone()]),
            // An option without its value: Redis answers a syntax error.
            None => return None,
        }
        i += 2;
    }
    let pattern = pattern?;
    Some(Action::Rewrite(
        forwarded,
        ReplyPlan::Open(OpenPlan::Scan(Box::new(ScanPlan {
            site: site.clone(),
            scores: scores == Scores::Always,
            pattern: Some(pattern),
        }))),
    ))
}
