//! Reads what the startup checks need from certificates: their expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, X509Certificate};

/// When a DER certificate stops being valid.
pub fn expiry(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(seconds))
}

/// When the first (leaf) certificate in the PEM file at `path` stops being
/// valid. `Err`: the file holds no readable certificate (why, without its
/// content); `Ok(None)`: its validity cannot be read.
pub fn file_expiry(path: &std::path::Path) -> Result<Option<SystemTime>, String> {
    let chain = super::load::certificates(path, "certificate").map_err(|e| e.to_string())?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{} holds no certificate", path.display()))?;
    Ok(expiry(leaf))
}

/// Whole days from now until `expiry`; negative once expired.
pub fn days_left(expiry: SystemTime) -> Option<i64> {
    let now = SystemTime::now();
    match expiry.duration_since(now) {
        Ok(left) => Some((left.as_secs() / 86_400) as i64),
        Err(past) => Some(-((past.duration().as_secs() / 86_400) as i64) - 1),
    }
}
