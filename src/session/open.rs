//! Opens the sealed values in a reply, as its [`OpenPlan`] says. Pure.
//!
//! Every reply shape Redis uses for values is handled: a bulk string, nil,
//! RESP2 arrays, RESP3 maps and sets, arrays of pairs, and HSCAN's
//! `[cursor, [field, value, ...]]`. Elements that are not values (nil, an
//! error, a field name, a cursor) are copied as Redis sent them.
//!
//! A value that fails to open becomes an error reply in its place, naming the
//! key (and field) and the reason; never the ciphertext, never garbage. In an
//! array the other elements are still delivered.
//!
//! A reply whose shape contradicts its request (an integer or status where a
//! value must be, an array of the wrong length, a map that is not pairs) is
//! a [`Contradiction`]: the connection is out of step with Redis, or not
//! talking to Redis at all, and nothing of that reply is delivered.

use crate::crypto::keyring::Opened;
use crate::crypto::{Keyring, OpenError, envelope};
use crate::policy::rules::glob_match;
use crate::policy::table::Kind;
use crate::policy::{KeySite, OpenPlan, ValueSite, shown};
use crate::resp::{self, Limits};
use crate::telemetry::metrics::OpenFailure;
use bytes::BytesMut;

/// A value that failed to open: where it lives, the key id its header
/// named (if it had one), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub site: ValueSite,
    pub key_id: Option<u32>,
    pub reason: OpenFailure,
}

/// A reply whose shape its request rules out: what was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Contradiction(pub &'static str);

/// Writes `frame` to `out` with its values opened; values that fail to
/// open are added to `failures`. On a contradiction, `out` holds garbage
/// and must be discarded with the connection.
pub fn reply(
    plan: &OpenPlan,
    frame: &[u8],
    keyring: &Keyring,
    limits: &Limits,
    out: &mut BytesMut,
    failures: &mut Vec<Failure>,
) -> Result<(), Contradiction> {
    let mut opener = Opener {
        keyring,
        limits,
        failures,
        contradiction: None,
    };
    match plan {
        OpenPlan::One(site) => opener.value(site, frame, out),
        OpenPlan::Each(sites) => opener.each(sites, frame, out),
        OpenPlan::HashPairs(site) => opener.pairs(site, frame, out),
        OpenPlan::HashValues(site) => opener.values_only(site, frame, out),
        OpenPlan::HashScan(site) => opener.scan(site, frame, out),
        OpenPlan::Values(site) => opener.values(site, frame, out),
        OpenPlan::KeyAndValue(sites) => opener.keyed(sites, frame, out, Opener::value),
        OpenPlan::KeyAndValues(sites) => opener.keyed(sites, frame, out, Opener::values),
        OpenPlan::Members {
            site,
            scores: false,
        } => opener.values(site, frame, out),
        OpenPlan::Members { site, scores: true } => opener.with_scores(site, frame, out),
        OpenPlan::KeyMemberScore(sites) => opener.key_member_score(sites, frame, out),
        OpenPlan::KeyAndMembersWithScores(sites) => {
            opener.keyed(sites, frame, out, Opener::with_scores)
        }
        OpenPlan::Scan(scan) => {
            opener.member_scan(&scan.site, scan.scores, scan.pattern.as_deref(), frame, out)
        }
        OpenPlan::StreamEntries(site) => opener.entries(site, frame, out),
        OpenPlan::Streams(sites) => opener.streams(sites, frame, out),
        OpenPlan::AutoClaim(site) => opener.autoclaim(site, frame, out),
        OpenPlan::StreamInfo(site) => opener.stream_info(site, frame, out),
        OpenPlan::GeoResults(site) => opener.geo_results(site, frame, out),
    }
    opener.contradiction.map_or(Ok(()), Err)
}

/// A pub/sub message's payload under `site`, opened into `out`; or why it
/// did not open (a payload that is not a string is malformed). Nothing is
/// written to `out` on failure that the caller must deliver.
pub fn payload(
    site: &ValueSite,
    element: &[u8],
    keyring: &Keyring,
    limits: &Limits,
    out: &mut BytesMut,
) -> Result<(), Failure> {
    let mut failures = Vec::new();
    let mut opener = Opener {
        keyring,
        limits,
        failures: &mut failures,
        contradiction: None,
    };
    opener.value(site, element, out);
    let contradicted = opener.contradiction.is_some();
    match failures.pop() {
        Some(failure) => Err(failure),
        None if contradicted => Err(Failure {
            site: site.clone(),
            key_id: None,
            reason: OpenFailure::Malformed,
        }),
        None => Ok(()),
    }
}

struct Opener<'a> {
    keyring: &'a Keyring,
    limits: &'a Limits,
    failures: &'a mut Vec<Failure>,
    /// The first shape that contradicted the plan.
    contradiction: Option<Contradiction>,
}

/// An error reply (RESP2 `-`, RESP3 `!`): fine in place of anything.
fn is_error(element: &[u8]) -> bool {
    matches!(element.first(), Some(b'-' | b'!'))
}

/// A nil: RESP2's null bulk string or array, or RESP3's null.
fn is_nil(element: &[u8]) -> bool {
    matches!(element, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n")
}

impl Opener<'_> {
    fn contradicted(&mut self, what: &'static str, element: &[u8], out: &mut BytesMut) {
        self.contradiction.get_or_insert(Contradiction(what));
        out.extend_from_slice(element);
    }

    /// Where an aggregate was expected: an error or nil is copied, anything
    /// else contradicts.
    fn not_aggregate(&mut self, what: &'static str, frame: &[u8], out: &mut BytesMut) {
        if is_error(frame) || is_nil(frame) {
            out.extend_from_slice(frame);
        } else {
            self.contradicted(what, frame, out);
        }
    }

    /// One element that holds a value (or nil, or an error).
    fn value(&mut self, site: &ValueSite, element: &[u8], out: &mut BytesMut) {
        let Some(stored) = resp::bulk_body(element) else {
            if is_error(element) || is_nil(element) {
                out.extend_from_slice(element);
            } else {
                self.contradicted("a value that is not a string", element, out);
            }
            return;
        };
        match self.keyring.open(stored, site.binding()) {
            Ok(Opened::Plaintext(plaintext)) => resp::encode_bulk(out, &plaintext),
            Ok(Opened::Legacy(_)) => out.extend_from_slice(element),
            Err(err) => {
                resp::encode_error(out, &failure(site, &err));
                self.failures.push(Failure {
                    site: site.clone(),
                    key_id: envelope::key_id(stored).ok(),
                    reason: match err {
                        OpenError::AuthenticationFailed => OpenFailure::AuthFailed,
                        OpenError::UnknownKeyId(_) => OpenFailure::UnknownKeyId,
                        OpenError::Malformed => OpenFailure::Malformed,
                        OpenError::NotAnEnvelope => OpenFailure::NotEncrypted,
                        OpenError::Revoked(_) => OpenFailure::Revoked,
                    },
                });
            }
        }
    }

    /// One value, or an array or set of values, all of one site.
    fn values(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        if !matches!(frame.first(), Some(b'*' | b'~')) {
            return self.value(site, frame, out);
        }
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no array where values must be", frame, out);
        };
        out.extend_from_slice(header);
        for element in elements {
            self.value(site, element, out);
        }
    }

    /// Member/score pairs: flat (RESP2, and RESP3 ZPOPMIN without a count)
    /// or an array of `[member, score]` arrays (RESP3).
    fn with_scores(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no members with scores where they must be", frame, out);
        };
        out.extend_from_slice(header);
        if elements.first().is_some_and(|e| e.first() == Some(&b'*')) {
            for pair in elements {
                match resp::aggregate_elements(pair, self.limits) {
                    Some((pair_header, inner)) if inner.len() == 2 => {
                        out.extend_from_slice(pair_header);
                        self.value(site, inner[0], out);
                        out.extend_from_slice(inner[1]);
                    }
                    _ => {
                        self.contradicted("a member/score pair that is not two elements", pair, out)
                    }
                }
            }
            return;
        }
        if elements.len() % 2 != 0 {
            return self.contradicted("member/score pairs of odd length", frame, out);
        }
        for pair in elements.chunks_exact(2) {
            self.value(site, pair[0], out);
            out.extend_from_slice(pair[1]);
        }
    }

    /// `[key, member, score]` (BZPOPMIN), the key one the request named.
    fn key_member_score(&mut self, sites: &[KeySite], frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no [key, member, score] where it must be", frame, out);
        };
        let [key, member, score] = elements[..] else {
            return self.contradicted(
                "a [key, member, score] reply that is not three elements",
                frame,
                out,
            );
        };
        let Some(site) = named_site(sites, key) else {
            return self.contradicted("a reply naming a key the request did not", frame, out);
        };
        out.extend_from_slice(header);
        out.extend_from_slice(key);
        match site {
            Some(site) => self.value(site, member, out),
            None => out.extend_from_slice(member),
        }
        out.extend_from_slice(score);
    }

    /// SSCAN's or ZSCAN's `[cursor, items]`; with `pattern`, only the
    /// members (with their scores) that match it once opened. A member that
    /// fails to open stays, as an error, whatever the pattern.
    fn member_scan(
        &mut self,
        site: &ValueSite,
        scores: bool,
        pattern: Option<&[u8]>,
        frame: &[u8],
        out: &mut BytesMut,
    ) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no scan reply where one must be", frame, out);
        };
        let [cursor, items] = elements[..] else {
            return self.contradicted("a scan reply that is not [cursor, items]", frame, out);
        };
        let Some((items_header, items)) = resp::aggregate_elements(items, self.limits) else {
            return self.contradicted("scan items that are not an array", frame, out);
        };
        let step = if scores { 2 } else { 1 };
        if items.len() % step != 0 {
            return self.contradicted("member/score pairs of odd length", frame, out);
        }
        let mut kept = BytesMut::new();
        let mut count = 0;
        for entry in items.chunks_exact(step) {
            let mut opened = BytesMut::new();
            self.value(site, entry[0], &mut opened);
            let matches = match (pattern, resp::bulk_body(&opened)) {
                (Some(pattern), Some(member)) => glob_match(pattern, member),
                _ => true,
            };
            if matches {
                kept.extend_from_slice(&opened);
                for rest in &entry[1..] {
                    kept.extend_from_slice(rest);
                }
                count += step;
            }
        }
        out.extend_from_slice(header);
        out.extend_from_slice(cursor);
        resp::encode_header(out, items_header[0], count);
        out.extend_from_slice(&kept);
    }

    /// One stream entry `[id, [field, value, ...]]`; the fields are nil for
    /// an entry deleted while pending (XREADGROUP, XCLAIM).
    fn entry(&mut self, site: &ValueSite, element: &[u8], out: &mut BytesMut) {
        let Some((header, parts)) = resp::aggregate_elements(element, self.limits) else {
            return self.not_aggregate("no stream entry where one must be", element, out);
        };
        let [id, fields] = parts[..] else {
            return self.contradicted("a stream entry that is not [id, fields]", element, out);
        };
        out.extend_from_slice(header);
        out.extend_from_slice(id);
        // Field/value pairs, as a hash's are (nil passes as it came).
        self.pairs(site, fields, out);
    }

    /// An array of stream entries (or nil).
    fn entries(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((header, entries)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no stream entries where they must be", frame, out);
        };
        out.extend_from_slice(header);
        for entry in entries {
            self.entry(site, entry, out);
        }
    }

    /// XREAD's `[[key, entries], ...]` (RESP2) or `{key: entries}` (RESP3).
    fn streams(&mut self, sites: &[KeySite], frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no streams where they must be", frame, out);
        };
        if frame.first() != Some(&b'%') {
            out.extend_from_slice(header);
            for stream in elements {
                self.keyed(sites, stream, out, Opener::entries);
            }
            return;
        }
        out.extend_from_slice(header);
        for pair in elements.chunks_exact(2) {
            let [key, entries] = pair else { continue };
            let Some(site) = named_site(sites, key) else {
                return self.contradicted("a reply naming a key the request did not", frame, out);
            };
            out.extend_from_slice(key);
            match site {
                Some(site) => self.entries(site, entries, out),
                None => out.extend_from_slice(entries),
            }
        }
    }

    /// XAUTOCLAIM's `[cursor, entries, deleted ids]`.
    fn autoclaim(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((header, parts)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no XAUTOCLAIM reply where one must be", frame, out);
        };
        let [cursor, entries, deleted] = parts[..] else {
            return self.contradicted(
                "an XAUTOCLAIM reply that is not [cursor, entries, deleted]",
                frame,
                out,
            );
        };
        out.extend_from_slice(header);
        out.extend_from_slice(cursor);
        self.entries(site, entries, out);
        out.extend_from_slice(deleted);
    }

    /// XINFO STREAM's name/value pairs (array or map): `first-entry` and
    /// `last-entry` are entries, FULL's `entries` a list of them; the rest
    /// (lengths, ids, groups, pending lists) holds no values.
    fn stream_info(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no XINFO STREAM reply where one must be", frame, out);
        };
        if elements.len() % 2 != 0 {
            return self.contradicted("XINFO STREAM fields of odd length", frame, out);
        }
        out.extend_from_slice(header);
        for pair in elements.chunks_exact(2) {
            out.extend_from_slice(pair[0]);
            let name = resp::bulk_body(pair[0]).or_else(|| simple_body(pair[0]));
            match name {
                Some(b"first-entry" | b"last-entry") => self.entry(site, pair[1], out),
                Some(b"entries") => self.entries(site, pair[1], out),
                _ => out.extend_from_slice(pair[1]),
            }
        }
    }

    /// GEORADIUS's and GEOSEARCH's results: a member each, or (with WITHDIST,
    /// WITHHASH, WITHCOORD) an array of the member and those.
    fn geo_results(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((header, results)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no geo results where they must be", frame, out);
        };
        out.extend_from_slice(header);
        for result in results {
            match resp::aggregate_elements(result, self.limits) {
                Some((result_header, parts)) if !parts.is_empty() => {
                    out.extend_from_slice(result_header);
                    self.value(site, parts[0], out);
                    for part in &parts[1..] {
                        out.extend_from_slice(part);
                    }
                }
                Some(_) => self.contradicted("an empty geo result", result, out),
                None => self.value(site, result, out),
            }
        }
    }

    /// `[key, rest]` where the key is one the request named: `rest` is
    /// opened with that key's site (nil when nothing came, as on a timeout).
    fn keyed(
        &mut self,
        sites: &[KeySite],
        frame: &[u8],
        out: &mut BytesMut,
        open_rest: fn(&mut Self, &ValueSite, &[u8], &mut BytesMut),
    ) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no [key, values] where they must be", frame, out);
        };
        let [key, rest] = elements[..] else {
            return self.contradicted("a [key, values] reply that is not two elements", frame, out);
        };
        let Some(site) = named_site(sites, key) else {
            return self.contradicted("a reply naming a key the request did not", frame, out);
        };
        out.extend_from_slice(header);
        out.extend_from_slice(key);
        match site {
            Some(site) => open_rest(self, site, rest, out),
            None => out.extend_from_slice(rest),
        }
    }

    fn each(&mut self, sites: &[Option<ValueSite>], frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no array where values must be", frame, out);
        };
        if elements.len() != sites.len() || frame.first() != Some(&b'*') {
            return self.contradicted("an array of another length than the keys asked", frame, out);
        }
        out.extend_from_slice(header);
        for (i, element) in elements.into_iter().enumerate() {
            match sites.get(i) {
                Some(Some(site)) => self.value(site, element, out),
                _ => out.extend_from_slice(element),
            }
        }
    }

    /// Field/value pairs: a flat array or map, or an array of 2-element arrays.
    fn pairs(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((header, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no field/value pairs where they must be", frame, out);
        };
        out.extend_from_slice(header);
        if elements.first().is_some_and(|e| e.first() == Some(&b'*')) {
            for pair in elements {
                match resp::aggregate_elements(pair, self.limits) {
                    Some((_, inner)) if inner.len() == 2 => self.pairs(site, pair, out),
                    _ => {
                        self.contradicted("a field/value pair that is not two elements", pair, out)
                    }
                }
            }
            return;
        }
        if elements.len() % 2 != 0 {
            return self.contradicted("field/value pairs of odd length", frame, out);
        }
        for pair in elements.chunks(2) {
            if let [field, value] = pair {
                out.extend_from_slice(field);
                self.value(&with_field(site, field), value, out);
            }
        }
    }

    /// HGETALL's pairs, delivered as HVALS would: the values as an array.
    fn values_only(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        let Some((_, elements)) = resp::aggregate_elements(frame, self.limits) else {
            return self.not_aggregate("no field/value pairs where they must be", frame, out);
        };
        if elements.len() % 2 != 0 {
            return self.contradicted("field/value pairs of odd length", frame, out);
        }
        resp::encode_header(out, b'*', elements.len() / 2);
        for pair in elements.chunks_exact(2) {
            self.value(&with_field(site, pair[0]), pair[1], out);
        }
    }

    fn scan(&mut self, site: &ValueSite, frame: &[u8], out: &mut BytesMut) {
        match resp::aggregate_elements(frame, self.limits) {
            Some((header, elements)) if elements.len() == 2 => {
                out.extend_from_slice(header);
                out.extend_from_slice(elements[0]);
                self.pairs(site, elements[1], out);
            }
            Some(_) => self.contradicted("a scan reply that is not [cursor, items]", frame, out),
            None => self.not_aggregate("no scan reply where one must be", frame, out),
        }
    }
}

/// The text of a simple string (`+text`), as RESP3 map keys may be.
fn simple_body(element: &[u8]) -> Option<&[u8]> {
    element.strip_prefix(b"+")?.strip_suffix(b"\r\n")
}

/// The site of the key a reply element names, if the request named it.
fn named_site<'a>(sites: &'a [KeySite], key: &[u8]) -> Option<&'a Option<ValueSite>> {
    let name = resp::bulk_body(key)?;
    sites
        .iter()
        .find(|(asked, _)| asked[..] == *name)
        .map(|(_, site)| site)
}

fn with_field(site: &ValueSite, field: &[u8]) -> ValueSite {
    let field = resp::bulk_body(field).unwrap_or(field);
    ValueSite {
        field: Some(bytes::Bytes::copy_from_slice(field)),
        ..site.clone()
    }
}

/// The error text for a value that did not open. Names, never values.
fn failure(site: &ValueSite, err: &OpenError) -> String {
    let key = shown(&site.key);
    let field = || site.field.as_deref().map(shown).unwrap_or_default();
    let what = match site.kind {
        Kind::String => format!("value of key '{key}'"),
        Kind::HashField => format!("value of field '{}' of key '{key}'", field()),
        Kind::ListElement => format!("element of list '{key}'"),
        Kind::StreamValue => format!("value of field '{}' of stream '{key}'", field()),
        Kind::Message => format!("message on channel '{key}'"),
        Kind::SetMember => format!("member of set '{key}'"),
        Kind::SortedSetMember => format!("member of sorted set '{key}'"),
        Kind::HyperLogLogElement => format!("element of HyperLogLog '{key}'"),
    };
    match err {
        OpenError::NotAnEnvelope => format!(
            "ERR redcloak: {what} is not encrypted (legacy plaintext); \
             encryption.legacy_plaintext = \"pass\" reads such values during a migration"
        ),
        err => format!("ERR redcloak: {what} failed to decrypt ({err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::LegacyPlaintext;
    use bytes::Bytes;
    use zeroize::Zeroizing;

    fn keyring() -> Keyring {
        Keyring::new(
            1,
            vec![(1, Zeroizing::new([7; 32]))],
            LegacyPlaintext::Reject,
        )
        .expect("ring")
    }

    fn site(key: &str, field: Option<&str>) -> ValueSite {
        ValueSite {
            kind: match field {
                Some(_) => Kind::HashField,
                None => Kind::String,
            },
            key: Bytes::copy_from_slice(key.as_bytes()),
            scope: crate::policy::SiteScope::Key,
            field: field.map(|f| Bytes::copy_from_slice(f.as_bytes())),
            deterministic: false,
        }
    }

    fn list(key: &str) -> ValueSite {
        ValueSite {
            kind: Kind::ListElement,
            ..site(key, None)
        }
    }

    fn bulk(bytes: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        resp::encode_bulk(&mut out, bytes);
        out.to_vec()
    }

    fn sealed(ring: &Keyring, value: &str, at: &ValueSite) -> Vec<u8> {
        bulk(&ring.seal(value.as_bytes(), at.binding()).expect("primary"))
    }

    fn run(plan: &OpenPlan, frame: &[u8], ring: &Keyring) -> String {
        run_counting(plan, frame, ring).0
    }

    fn run_counting(plan: &OpenPlan, frame: &[u8], ring: &Keyring) -> (String, Vec<Failure>) {
        let mut out = BytesMut::new();
        let mut failures = Vec::new();
        reply(
            plan,
            frame,
            ring,
            &Limits::default(),
            &mut out,
            &mut failures,
        )
        .expect("the reply fits its plan");
        (String::from_utf8_lossy(&out).into_owned(), failures)
    }

    #[test]
    fn opens_a_bulk_and_copies_nil_and_errors() {
        let ring = keyring();
        let k = site("k", None);
        assert_eq!(
            run(&OpenPlan::One(k.clone()), &sealed(&ring, "v", &k), &ring),
            "$1\r\nv\r\n"
        );
        assert_eq!(run(&OpenPlan::One(k.clone()), b"$-1\r\n", &ring), "$-1\r\n");
        assert_eq!(run(&OpenPlan::One(k.clone()), b"_\r\n", &ring), "_\r\n");
        assert_eq!(
            run(&OpenPlan::One(k.clone()), b"-WRONGTYPE x\r\n", &ring),
            "-WRONGTYPE x\r\n"
        );
        let moved = sealed(&ring, "v", &site("other", None));
        let text = run(&OpenPlan::One(k.clone()), &moved, &ring);
        assert!(
            text.starts_with(
                "-ERR redcloak: value of key 'k' failed to decrypt (authentication failed"
            ),
            "{text}"
        );
        let legacy = run(&OpenPlan::One(k), &bulk(b"plain"), &ring);
        assert!(
            legacy.starts_with("-ERR redcloak: value of key 'k' is not encrypted"),
            "{legacy}"
        );
        assert!(!legacy.contains("plain\r"), "{legacy}");
    }

    #[test]
    fn failures_are_reported_with_key_id_and_reason() {
        let ring = keyring();
        let (a, b) = (site("a", None), site("b", None));
        let mut frame = b"*5\r\n".to_vec();
        frame.extend(sealed(&ring, "va", &a));
        frame.extend(sealed(&ring, "vb", &a)); // sealed for `a`, read as `b`
        frame.extend(bulk(b"plain"));
        frame.extend(bulk(&[0xC7, 0x0A, 0x4B, 1, 0]));
        let mut unknown = ring.seal(b"v", a.binding()).expect("primary");
        unknown[7] = 9;
        frame.extend(bulk(&unknown));
        let plan = OpenPlan::Each(vec![
            Some(a.clone()),
            Some(b.clone()),
            Some(a.clone()),
            Some(a.clone()),
            Some(a.clone()),
        ]);
        let (_, failures) = run_counting(&plan, &frame, &ring);
        let seen: Vec<_> = failures
            .iter()
            .map(|f| (shown(&f.site.key), f.key_id, f.reason))
            .collect();
        assert_eq!(
            seen,
            [
                ("b".to_owned(), Some(1), OpenFailure::AuthFailed),
                ("a".to_owned(), None, OpenFailure::NotEncrypted),
                ("a".to_owned(), None, OpenFailure::Malformed),
                ("a".to_owned(), Some(9), OpenFailure::UnknownKeyId),
            ]
        );
    }

    #[test]
    fn each_element_opens_on_its_own_and_a_failure_stays_in_its_place() {
        let ring = keyring();
        let (a, b) = (site("a", None), site("b", None));
        let mut frame = b"*4\r\n".to_vec();
        frame.extend(sealed(&ring, "va", &a));
        frame.extend(sealed(&ring, "vb", &a)); // sealed for `a`, read as `b`
        frame.extend(b"$-1\r\n");
        frame.extend(bulk(b"plain"));
        let plan = OpenPlan::Each(vec![Some(a), Some(b), Some(site("c", None)), None]);
        let text = run(&plan, &frame, &ring);
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(&lines[..3], ["*4", "$2", "va"]);
        assert!(lines[3].starts_with("-ERR redcloak: value of key 'b' failed to decrypt"));
        assert_eq!(&lines[4..7], ["$-1", "$5", "plain"]);
    }

    #[test]
    fn hash_pairs_open_in_flat_arrays_resp3_maps_and_pair_arrays() {
        let ring = keyring();
        let h = ValueSite {
            kind: Kind::HashField,
            ..site("h", None)
        };
        let v1 = sealed(&ring, "one", &site("h", Some("f1")));
        let v2 = sealed(&ring, "two", &site("h", Some("f2")));
        let fields = [bulk(b"f1"), bulk(b"f2")];
        let flat = [
            b"*4\r\n".to_vec(),
            fields[0].clone(),
            v1.clone(),
            fields[1].clone(),
            v2.clone(),
        ]
        .concat();
        let expected_flat = "*4\r\n$2\r\nf1\r\n$3\r\none\r\n$2\r\nf2\r\n$3\r\ntwo\r\n";
        assert_eq!(
            run(&OpenPlan::HashPairs(h.clone()), &flat, &ring),
            expected_flat
        );
        let map = [
            b"%2\r\n".to_vec(),
            fields[0].clone(),
            v1.clone(),
            fields[1].clone(),
            v2.clone(),
        ]
        .concat();
        assert_eq!(
            run(&OpenPlan::HashPairs(h.clone()), &map, &ring),
            expected_flat.replacen("*4", "%2", 1)
        );
        let nested = [
            b"*2\r\n*2\r\n".to_vec(),
            fields[0].clone(),
            v1.clone(),
            b"*2\r\n".to_vec(),
            fields[1].clone(),
            v2.clone(),
        ]
        .concat();
        assert_eq!(
            run(&OpenPlan::HashPairs(h.clone()), &nested, &ring),
            "*2\r\n*2\r\n$2\r\nf1\r\n$3\r\none\r\n*2\r\n$2\r\nf2\r\n$3\r\ntwo\r\n"
        );
        assert_eq!(
            run(&OpenPlan::HashValues(h.clone()), &map, &ring),
            "*2\r\n$3\r\none\r\n$3\r\ntwo\r\n"
        );
        let scan = [b"*2\r\n$1\r\n0\r\n".to_vec(), flat].concat();
        assert_eq!(
            run(&OpenPlan::HashScan(h.clone()), &scan, &ring),
            format!("*2\r\n$1\r\n0\r\n{expected_flat}")
        );
        // Swapped fields: each value is an error in its place.
        let swapped = [
            b"*4\r\n".to_vec(),
            fields[0].clone(),
            v2,
            fields[1].clone(),
            v1,
        ]
        .concat();
        let text = run(&OpenPlan::HashPairs(h), &swapped, &ring);
        assert_eq!(
            text.matches("-ERR redcloak: value of field").count(),
            2,
            "{text}"
        );
    }

    #[test]
    fn list_replies_open_as_one_value_or_an_array_or_a_keyed_pair() {
        let ring = keyring();
        let (q, other) = (list("q"), list("other"));
        let one = sealed(&ring, "job", &q);
        assert_eq!(
            run(&OpenPlan::Values(q.clone()), &one, &ring),
            "$3\r\njob\r\n"
        );
        let array = [b"*2\r\n".to_vec(), one.clone(), sealed(&ring, "two", &q)].concat();
        assert_eq!(
            run(&OpenPlan::Values(q.clone()), &array, &ring),
            "*2\r\n$3\r\njob\r\n$3\r\ntwo\r\n"
        );
        assert_eq!(
            run(&OpenPlan::Values(q.clone()), b"*-1\r\n", &ring),
            "*-1\r\n"
        );
        // A list element never opens as a string of the same key.
        let text = run(&OpenPlan::One(site("q", None)), &one, &ring);
        assert!(
            text.starts_with("-ERR redcloak: value of key 'q' failed"),
            "{text}"
        );
        let keyed = vec![
            (Bytes::from_static(b"other"), Some(other.clone())),
            (Bytes::from_static(b"q"), Some(q.clone())),
            (Bytes::from_static(b"plain"), None),
        ];
        let pair = [b"*2\r\n$1\r\nq\r\n".to_vec(), one.clone()].concat();
        assert_eq!(
            run(&OpenPlan::KeyAndValue(keyed.clone()), &pair, &ring),
            "*2\r\n$1\r\nq\r\n$3\r\njob\r\n"
        );
        let from_plain = b"*2\r\n$5\r\nplain\r\n$1\r\nx\r\n";
        assert_eq!(
            run(&OpenPlan::KeyAndValue(keyed.clone()), from_plain, &ring),
            String::from_utf8_lossy(from_plain)
        );
        let mpop = [b"*2\r\n$1\r\nq\r\n".to_vec(), array.clone()].concat();
        assert_eq!(
            run(&OpenPlan::KeyAndValues(keyed.clone()), &mpop, &ring),
            "*2\r\n$1\r\nq\r\n*2\r\n$3\r\njob\r\n$3\r\ntwo\r\n"
        );
        assert_eq!(
            run(&OpenPlan::KeyAndValue(keyed.clone()), b"*-1\r\n", &ring),
            "*-1\r\n"
        );
        // Sealed for `q`, delivered as if popped from `other`: an error in its place.
        let swapped = [b"*2\r\n$5\r\nother\r\n".to_vec(), one].concat();
        let text = run(&OpenPlan::KeyAndValue(keyed.clone()), &swapped, &ring);
        assert!(
            text.contains("-ERR redcloak: element of list 'other' failed to decrypt"),
            "{text}"
        );
    }

    #[test]
    fn a_keyed_reply_naming_a_key_not_asked_for_contradicts_the_request() {
        let ring = keyring();
        let keyed = vec![(Bytes::from_static(b"q"), Some(list("q")))];
        let mut out = BytesMut::new();
        let frame = b"*2\r\n$5\r\nstray\r\n$1\r\nx\r\n";
        let plan = OpenPlan::KeyAndValue(keyed);
        assert!(
            reply(
                &plan,
                frame,
                &ring,
                &Limits::default(),
                &mut out,
                &mut Vec::new()
            )
            .is_err()
        );
        assert!(
            reply(
                &plan,
                b":1\r\n",
                &ring,
                &Limits::default(),
                &mut out,
                &mut Vec::new()
            )
            .is_err()
        );
    }

    fn zset(key: &str) -> ValueSite {
        ValueSite {
            kind: Kind::SortedSetMember,
            deterministic: true,
            ..site(key, None)
        }
    }

    fn member(ring: &Keyring, value: &str, at: &ValueSite) -> Vec<u8> {
        bulk(
            &ring
                .seal_member(value.as_bytes(), at.binding())
                .expect("primary"),
        )
    }

    #[test]
    fn members_with_scores_open_flat_and_nested_and_keep_the_scores() {
        let ring = keyring();
        let z = zset("z");
        let (a, b) = (member(&ring, "alice", &z), member(&ring, "bob", &z));
        let plan = OpenPlan::Members {
            site: z.clone(),
            scores: true,
        };
        let flat = [
            b"*4\r\n".to_vec(),
            a.clone(),
            b"$1\r\n1\r\n".to_vec(),
            b.clone(),
            b"$1\r\n2\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(
            run(&plan, &flat, &ring),
            "*4\r\n$5\r\nalice\r\n$1\r\n1\r\n$3\r\nbob\r\n$1\r\n2\r\n"
        );
        let nested = [
            b"*2\r\n*2\r\n".to_vec(),
            a.clone(),
            b",1\r\n*2\r\n".to_vec(),
            b.clone(),
            b",2\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(
            run(&plan, &nested, &ring),
            "*2\r\n*2\r\n$5\r\nalice\r\n,1\r\n*2\r\n$3\r\nbob\r\n,2\r\n"
        );
        assert_eq!(run(&plan, b"*0\r\n", &ring), "*0\r\n");
        let sites = vec![(Bytes::from_static(b"z"), Some(z.clone()))];
        let popped = [b"*3\r\n$1\r\nz\r\n".to_vec(), a.clone(), b",1\r\n".to_vec()].concat();
        assert_eq!(
            run(&OpenPlan::KeyMemberScore(sites.clone()), &popped, &ring),
            "*3\r\n$1\r\nz\r\n$5\r\nalice\r\n,1\r\n"
        );
        let mpop = [b"*2\r\n$1\r\nz\r\n".to_vec(), nested].concat();
        assert!(
            run(&OpenPlan::KeyAndMembersWithScores(sites), &mpop, &ring)
                .ends_with("$3\r\nbob\r\n,2\r\n")
        );
    }

    #[test]
    fn scans_match_opened_members_and_keep_failures_in_place() {
        let ring = keyring();
        let s = ValueSite {
            kind: Kind::SetMember,
            ..zset("s")
        };
        let items = [
            member(&ring, "user:1", &s),
            member(&ring, "admin:1", &s),
            member(&ring, "user:2", &zset("other")),
        ];
        let frame = [b"*2\r\n$2\r\n17\r\n*3\r\n".to_vec(), items.concat()].concat();
        let plan = |pattern: Option<&'static [u8]>| {
            OpenPlan::Scan(Box::new(crate::policy::ScanPlan {
                site: s.clone(),
                scores: false,
                pattern: pattern.map(Bytes::from_static),
            }))
        };
        let (text, failures) = run_counting(&plan(Some(b"user:*")), &frame, &ring);
        assert!(
            text.starts_with(
                "*2\r\n$2\r\n17\r\n*2\r\n$6\r\nuser:1\r\n-ERR redcloak: member of set 's' failed"
            ),
            "{text}"
        );
        assert_eq!(failures.len(), 1);
        let all = run(&plan(None), &frame, &ring);
        assert!(
            all.contains("*3\r\n$6\r\nuser:1\r\n$7\r\nadmin:1\r\n"),
            "{all}"
        );
        let z = zset("z");
        let pairs = [
            b"*2\r\n$1\r\n0\r\n*4\r\n".to_vec(),
            member(&ring, "a1", &z),
            b"$1\r\n1\r\n".to_vec(),
            member(&ring, "b1", &z),
            b"$1\r\n2\r\n".to_vec(),
        ]
        .concat();
        let scan = OpenPlan::Scan(Box::new(crate::policy::ScanPlan {
            site: z,
            scores: true,
            pattern: Some(Bytes::from_static(b"b*")),
        }));
        assert_eq!(
            run(&scan, &pairs, &ring),
            "*2\r\n$1\r\n0\r\n*2\r\n$2\r\nb1\r\n$1\r\n2\r\n"
        );
    }

    /// Replies of any shape, well framed: scalars, nil, errors, and nested
    /// arrays, maps, sets and pushes of them (some holding real envelopes).
    fn any_reply() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let ring = keyring();
        let sealed_value = ring.seal(b"v", site("k", None).binding()).expect("primary");
        let sealed_member = ring
            .seal_member(b"m", zset("k").binding())
            .expect("primary");
        let scalar = prop_oneof![
            Just(b"$-1\r\n".to_vec()),
            Just(b"*-1\r\n".to_vec()),
            Just(b"_\r\n".to_vec()),
            Just(b":7\r\n".to_vec()),
            Just(b",1.5\r\n".to_vec()),
            Just(b"+OK\r\n".to_vec()),
            Just(b"-ERR x\r\n".to_vec()),
            Just(bulk(b"k")),
            Just(bulk(b"f")),
            Just(bulk(&sealed_value)),
            Just(bulk(&sealed_member)),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| bulk(&b)),
        ];
        scalar.prop_recursive(4, 64, 6, |inner| {
            (
                prop_oneof![Just(b'*'), Just(b'%'), Just(b'~'), Just(b'>')],
                proptest::collection::vec(inner, 0..6),
            )
                .prop_map(|(marker, elements)| {
                    let count = match marker {
                        b'%' => elements.len() / 2,
                        _ => elements.len(),
                    };
                    let mut frame = format!("{}{count}\r\n", marker as char).into_bytes();
                    for element in &elements[..if marker == b'%' { count * 2 } else { count }] {
                        frame.extend_from_slice(element);
                    }
                    frame
                })
        })
    }

    fn every_plan() -> Vec<OpenPlan> {
        let (k, h, z) = (
            site("k", None),
            ValueSite {
                kind: Kind::HashField,
                ..site("k", None)
            },
            zset("k"),
        );
        let sites = vec![
            (Bytes::from_static(b"k"), Some(z.clone())),
            (Bytes::from_static(b"p"), None),
        ];
        vec![
            OpenPlan::One(k.clone()),
            OpenPlan::Values(k.clone()),
            OpenPlan::Each(vec![Some(k.clone()), None]),
            OpenPlan::HashPairs(h.clone()),
            OpenPlan::HashValues(h.clone()),
            OpenPlan::HashScan(h.clone()),
            OpenPlan::KeyAndValue(sites.clone()),
            OpenPlan::KeyAndValues(sites.clone()),
            OpenPlan::Members {
                site: z.clone(),
                scores: false,
            },
            OpenPlan::Members {
                site: z.clone(),
                scores: true,
            },
            OpenPlan::KeyMemberScore(sites.clone()),
            OpenPlan::KeyAndMembersWithScores(sites.clone()),
            OpenPlan::Scan(Box::new(crate::policy::ScanPlan {
                site: z.clone(),
                scores: true,
                pattern: Some(Bytes::from_static(b"m*")),
            })),
            OpenPlan::Scan(Box::new(crate::policy::ScanPlan {
                site: z.clone(),
                scores: false,
                pattern: None,
            })),
            OpenPlan::StreamEntries(h.clone()),
            OpenPlan::Streams(sites.clone()),
            OpenPlan::AutoClaim(h.clone()),
            OpenPlan::StreamInfo(h.clone()),
            OpenPlan::GeoResults(z),
        ]
    }

    proptest::proptest! {
        /// Whatever Redis sends, every plan either delivers something or
        /// reports a contradiction: never a panic.
        #[test]
        fn no_reply_shape_makes_any_plan_panic(frame in any_reply()) {
            let ring = keyring();
            for plan in every_plan() {
                let mut out = BytesMut::new();
                let _ = reply(&plan, &frame, &ring, &Limits::default(), &mut out, &mut Vec::new());
            }
        }
    }
}
