//! The startup check report: one named line per check (ok / warn / FAIL,
//! with the fix), as text for people or JSON for pipelines. Pure.
//!
//! JSON format (one object):
//! `{"profile": "production", "upstream": "host:port", "passed": bool,
//!   "checks": [{"name": "tls", "status": "ok"|"warn"|"fail",
//!               "detail": "...", "fix": "..." | null}, ...]}`
//! `passed` is false when any check has status "fail". Names are stable.

use crate::config::Profile;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub profile: Profile,
    pub upstream: String,
    pub passed: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(profile: Profile, upstream: String, checks: Vec<Check>) -> Self {
        let passed = checks.iter().all(|c| c.status != Status::Fail);
        Report {
            profile,
            upstream,
            passed,
            checks,
        }
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "redcloak check: profile {:?}, upstream {}\n",
            self.profile, self.upstream
        )
        .to_lowercase();
        for check in &self.checks {
            let status = match check.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            out.push_str(&format!(
                "  {status:<5} {:<20} {}\n",
                check.name, check.detail
            ));
            if let Some(fix) = &check.fix {
                out.push_str(&format!("  {:<5} {:<20} fix: {fix}\n", "", ""));
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warned = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        out.push_str(&format!(
            "result: {verdict} ({failed} failed, {warned} warnings)\n"
        ));
        out
    }
}

/// A check that passed.
pub fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Ok,
        detail: detail.into(),
        fix: None,
    }
}

/// A check that failed (or warned), with its fix.
pub fn problem(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_failure_fails_the_report_and_both_formats_show_every_line() {
        let report = Report::new(
            Profile::Production,
            "redis:6379".into(),
            vec![
                ok("tls", "TLS 1.3"),
                problem("password", Status::Fail, "too short", "use 32+ characters"),
            ],
        );
        assert!(!report.passed);
        let text = report.text();
        assert!(
            text.contains("ok    tls")
                && text.contains("FAIL  password")
                && text.contains("fix: use 32+"),
            "{text}"
        );
        assert!(
            text.ends_with("result: FAIL (1 failed, 0 warnings)\n"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.json()).expect("json");
        assert_eq!(json["passed"], false);
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["profile"], "production");
    }
}
