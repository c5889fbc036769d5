//! Reads what the startup checks need from certificates: their expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, X509Certificate};

/// When a DER certificate stops being valid.
pub fn expiry(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Whole days from now until `expiry`; negative once expired.
pub fn days_left(expiry: SystemTime) -> Option<i64> {
    let now = SystemTime::now();
    match expiry.duration_since(now) {
        Ok(left) => Some((left.as_secs() / 86_400) as i64),
        Err(past) => Some(-((past.duration().as_secs() / 86_400) as i64) - 1),
    }
}
