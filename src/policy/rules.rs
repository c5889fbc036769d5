//! Which keys are encrypted: `[[encryption.rules]]`, first match wins, and a
//! key no rule matches is encrypted and bound to its key name. Patterns use
//! Redis glob syntax (`*`, `?`, `[abc]`, `[^a-z]`, `\` escapes), matched
//! without recursion so a client's key name cannot make matching slow.
//!
//! Pub/sub channels are decided by the same rules, after one built-in
//! rule: Redis's own channels are plaintext (keyspace and keyevent
//! notifications, `__redis__:invalidate`, `__sentinel__:*`): Redis publishes
//! them itself, and their payloads are key names, event names and server
//! addresses, never values.

/// Which name a sealed value is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// The key (or channel) name: the value opens under that name only.
    Key,
    /// The rule's name: the value may move between the rule's keys
    /// (LMOVE, SMOVE, the STORE forms, RENAME, COPY) and nowhere else.
    Rule,
    /// Nothing: the value opens under any key of any unbound rule
    /// (`bind_key = false`, as before `bind` existed).
    None,
}

/// What a rule does with the keys it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Encrypt { bind: Bind },
    Plaintext,
}

/// How list elements of a rule's keys are sealed. Set and sorted-set
/// members are always deterministic: Redis must find them by equality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Members {
    /// A random nonce per element: equal elements look different in Redis.
    #[default]
    Random,
    /// Equal elements under one binding have equal envelopes, so LREM, LPOS
    /// and LINSERT work; Redis sees which elements are equal.
    Deterministic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What `bind = "rule"` binds values to: `name`, or the pattern.
    /// Shared, so a plan names it without a copy.
    pub name: std::sync::Arc<str>,
    pub pattern: String,
    pub mode: Mode,
    pub members: Members,
}

/// The rule that decided a key's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub mode: Mode,
    /// `None`: no rule matched (encrypted, key-bound, by default).
    pub rule: Option<&'a Rule>,
}

impl Decision<'_> {
    /// How an error message names the rule.
    pub fn describe(&self) -> String {
        match self.rule {
            Some(rule) => format!("rule '{}'", rule.pattern),
            None => "no rule matches it, so it is encrypted".to_owned(),
        }
    }

    /// How list elements of this key are sealed.
    pub fn list_members(&self) -> Members {
        self.rule.map_or(Members::Random, |rule| rule.members)
    }

    /// Whether a value sealed under `self` still opens under `other`:
    /// both plaintext, both unbound, or both bound to the same rule.
    pub fn shares_values_with(&self, other: &Decision<'_>) -> bool {
        match (self.mode, other.mode) {
            (Mode::Plaintext, Mode::Plaintext) => true,
            (Mode::Encrypt { bind: Bind::None }, Mode::Encrypt { bind: Bind::None }) => true,
            (Mode::Encrypt { bind: Bind::Rule }, Mode::Encrypt { bind: Bind::Rule }) => {
                self.rule.map(|r| &r.name) == other.rule.map(|r| &r.name)
            }
            _ => false,
        }
    }
}

/// Redis's own channels: plaintext whatever the rules say. Keyspace and
/// keyevent notifications, client-side caching invalidations sent to a
/// REDIRECT client (their payload is an array of key names), and
/// Sentinel's hello messages.
const NOTIFICATION_CHANNELS: [&str; 4] = [
    "__keyspace@*__:*",
    "__keyevent@*__:*",
    "__redis__:*",
    "__sentinel__:*",
];

#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Self {
        Rules { rules }
    }

    /// True when no key can be encrypted: a plaintext `*` rule comes
    /// before any encrypting rule.
    pub fn all_plaintext(&self) -> bool {
        for rule in &self.rules {
            if rule.mode != Mode::Plaintext {
                return false;
            }
            if rule.pattern == "*" {
                return true;
            }
        }
        false
    }

    pub fn decide(&self, key: &[u8]) -> Decision<'_> {
        self.rules
            .iter()
            .find(|rule| glob_match(rule.pattern.as_bytes(), key))
            .map_or(
                Decision {
                    mode: Mode::Encrypt { bind: Bind::Key },
                    rule: None,
                },
                |rule| Decision {
                    mode: rule.mode,
                    rule: Some(rule),
                },
            )
    }

    /// A pub/sub channel's decision: the notification channels are
    /// plaintext, every other channel is decided as a key of that name.
    pub fn decide_channel(&self, channel: &[u8]) -> Decision<'_> {
        let notification = NOTIFICATION_CHANNELS
            .iter()
            .any(|pattern| glob_match(pattern.as_bytes(), channel));
        match notification {
            true => Decision {
                mode: Mode::Plaintext,
                rule: None,
            },
            false => self.decide(channel),
        }
    }
}

/// Redis glob matching (`stringmatchlen` semantics, case-sensitive).
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: pattern after it, text position.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match_class(pattern, p, text[t]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(p + 2),
            Some(&c) => (c == text[t]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((after_star, star_t))) => {
                p = after_star;
                t = star_t + 1;
                star = Some((after_star, star_t + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Matches `[...]` at `pattern[start]` against `c`; returns where the
/// pattern continues when it matches.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<usize> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (low, high) = (
                pattern[i].min(pattern[i + 2]),
                pattern[i].max(pattern[i + 2]),
            );
            matched |= (low..=high).contains(&c);
            i += 3;
        } else {
            matched |= pattern[i] == c;
            i += 1;
        }
    }
    // An unclosed class ends at the end of the pattern, as in Redis.
    let next = (i + 1).min(pattern.len());
    (matched != negate).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_redis_glob() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("sessions:*", "sessions:42", true),
            ("sessions:*", "session:42", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("*a*b", "xaxxb", true),
            ("*a*b", "xaxx", false),
            ("a*", "a", true),
            ("ratelimit:*:min", "ratelimit:ip:1.2.3.4:min", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *expected,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn matching_stays_fast_on_hostile_keys() {
        let key = vec![b'a'; 100_000];
        assert!(!glob_match(b"*a*a*a*a*a*a*a*a*b", &key));
    }

    fn rule(pattern: &str, mode: Mode) -> Rule {
        Rule {
            name: pattern.into(),
            pattern: pattern.into(),
            mode,
            members: Members::Random,
        }
    }

    #[test]
    fn first_match_wins_and_unmatched_keys_are_encrypted() {
        let rules = Rules::new(vec![
            rule("ratelimit:*", Mode::Plaintext),
            rule("*", Mode::Encrypt { bind: Bind::None }),
        ]);
        assert_eq!(rules.decide(b"ratelimit:x").mode, Mode::Plaintext);
        assert_eq!(
            rules.decide(b"other").mode,
            Mode::Encrypt { bind: Bind::None }
        );
        let empty = Rules::default();
        let none = empty.decide(b"k");
        assert_eq!(
            none,
            Decision {
                mode: Mode::Encrypt { bind: Bind::Key },
                rule: None
            }
        );
    }

    #[test]
    fn notification_channels_are_plaintext_and_other_channels_follow_the_rules() {
        let rules = Rules::default();
        for channel in [
            "__keyspace@0__:user:1",
            "__keyevent@12__:expired",
            "__redis__:invalidate",
            "__sentinel__:hello",
        ] {
            assert_eq!(
                rules.decide_channel(channel.as_bytes()).mode,
                Mode::Plaintext
            );
        }
        assert_eq!(
            rules.decide_channel(b"orders").mode,
            Mode::Encrypt { bind: Bind::Key }
        );
        assert_eq!(
            rules.decide_channel(b"__keyspace_x").mode,
            Mode::Encrypt { bind: Bind::Key }
        );
    }

    #[test]
    fn values_move_only_between_keys_that_share_a_binding() {
        let rules = Rules::new(vec![
            rule("plain:*", Mode::Plaintext),
            rule("q:*", Mode::Encrypt { bind: Bind::Rule }),
            rule("jobs:*", Mode::Encrypt { bind: Bind::Rule }),
            rule("free:*", Mode::Encrypt { bind: Bind::None }),
        ]);
        let shares = |a: &str, b: &str| {
            rules
                .decide(a.as_bytes())
                .shares_values_with(&rules.decide(b.as_bytes()))
        };
        assert!(shares("plain:a", "plain:b"));
        assert!(shares("q:a", "q:b"));
        assert!(shares("free:a", "free:b"));
        assert!(!shares("q:a", "jobs:a"));
        assert!(!shares("q:a", "plain:a"));
        assert!(!shares("k1", "k2"));
        assert!(!shares("free:a", "q:a"));
    }
}
