//! A PKCS#11 token (an HSM; SoftHSM2 in the tests) as a KMS: a DEK is
//! wrapped with AES-256-GCM under the token's secret key `key_label`, the
//! associated data bound in, as `nonce (12 bytes) | ciphertext | tag`. The
//! key never leaves the token. Each request opens a session on the token
//! labelled `token_label`, logs in with the PIN read again from `pin_file`,
//! and closes it. Calls block, so they run on the blocking pool.
//!
//! A PKCS#11 module is initialized once per process (a second
//! `C_Initialize` fails), so modules are kept in one table for the
//! process's life.

use super::KmsError;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

const NONCE_BYTES: usize = 12;

/// Where the token and its key are, as `[encryption.kms.NAME]` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    pub token_label: String,
    pub pin_file: PathBuf,
    pub key_label: String,
}

pub struct Token {
    context: Arc<Pkcs11>,
    settings: Arc<Pkcs11Settings>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Token({}, key {})",
            self.settings.token_label, self.settings.key_label
        )
    }
}

/// The module at `path`, initialized once for the process.
fn module(path: &std::path::Path) -> Result<Arc<Pkcs11>, String> {
    static MODULES: Mutex<BTreeMap<PathBuf, Arc<Pkcs11>>> = Mutex::new(BTreeMap::new());
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(context) = modules.get(path) {
        return Ok(context.clone());
    }
    let context = Pkcs11::new(path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(format!("cannot initialize {}: {e}", path.display())),
    }
    let context = Arc::new(context);
    modules.insert(path.to_owned(), context.clone());
    Ok(context)
}

/// A PKCS#11 error, classified: the token refusing (a wrong or locked PIN,
/// a key that is gone or may not be used, a blob that does not
/// authenticate) is a denial; anything else (no token, a device error) is
/// passing.
fn classify(error: Error, during: &str) -> KmsError {
    let why = format!("{during}: {error}");
    match error {
        Error::Pkcs11(
            RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::PinLocked
            | RvError::UserPinNotInitialized
            | RvError::KeyHandleInvalid
            | RvError::KeyTypeInconsistent
            | RvError::KeyFunctionNotPermitted
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange,
            _,
        ) => KmsError::Denied(why),
        _ => KmsError::Unreachable(why),
    }
}

impl Token {
    pub fn new(settings: Pkcs11Settings) -> Result<Token, String> {
        Ok(Token {
            context: module(&settings.module)?,
            settings: Arc::new(settings),
        })
    }

    /// A logged-in session on the token and its key.
    fn open(
        context: &Pkcs11,
        settings: &Pkcs11Settings,
    ) -> Result<(Session, ObjectHandle), KmsError> {
        let slots = context
            .get_slots_with_token()
            .map_err(|e| classify(e, "listing slots"))?;
        let slot = slots
            .into_iter()
            .find(|slot| {
                context
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == settings.token_label)
            })
            .ok_or_else(|| {
                KmsError::Unreachable(format!("no token labelled '{}'", settings.token_label))
            })?;
        let session = context
            .open_ro_session(slot)
            .map_err(|e| classify(e, "opening a session"))?;
        let pin = std::fs::read_to_string(&settings.pin_file).map_err(|e| {
            KmsError::Unreachable(format!(
                "cannot read the PIN file {}: {e}",
                settings.pin_file.display()
            ))
        })?;
        let pin = cryptoki::types::AuthPin::from(pin.trim().to_owned());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(classify(e, "logging in")),
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(settings.key_label.as_bytes().to_vec()),
        ];
        let key = session
            .find_objects(&template)
            .map_err(|e| classify(e, "finding the key"))?
            .into_iter()
            .next()
            .ok_or_else(|| {
                KmsError::Denied(format!(
                    "no secret key labelled '{}' on the token",
                    settings.key_label
                ))
            })?;
        Ok((session, key))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Pkcs11, &Pkcs11Settings) -> Result<T, KmsError> + Send + 'static,
    ) -> Result<T, KmsError> {
        let (context, settings) = (self.context.clone(), self.settings.clone());
        tokio::task::spawn_blocking(move || work(&context, &settings))
            .await
            .map_err(|e| KmsError::Unreachable(format!("the PKCS#11 call did not finish: {e}")))?
    }

    pub async fn wrap(&self, dek: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        let dek = Zeroizing::new(*dek);
        let aad = aad.to_vec();
        self.blocking(move |context, settings| {
            let (session, key) = Token::open(context, settings)?;
            let mut nonce = [0u8; NONCE_BYTES];
            crate::crypto::envelope::fill_random(&mut nonce);
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, &aad, 128.into())
                .map_err(|e| KmsError::Invalid(e.to_string()))?;
            let sealed = session
                .encrypt(&Mechanism::AesGcm(params), key, &dek[..])
                .map_err(|e| classify(e, "wrapping"))?;
            Ok([&nonce[..], &sealed].concat())
        })
        .await
    }

    pub async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        if wrapped.len() <= NONCE_BYTES {
            return Err(KmsError::Invalid("the wrapped key is too short".into()));
        }
        let (wrapped, aad) = (wrapped.to_vec(), aad.to_vec());
        self.blocking(move |context, settings| {
            let (session, key) = Token::open(context, settings)?;
            let (nonce, sealed) = wrapped.split_at(NONCE_BYTES);
            let mut iv = [0u8; NONCE_BYTES];
            iv.copy_from_slice(nonce);
            let params = GcmParams::new(&mut iv, &aad, 128.into())
                .map_err(|e| KmsError::Invalid(e.to_string()))?;
            session
                .decrypt(&Mechanism::AesGcm(params), key, sealed)
                .map(Zeroizing::new)
                .map_err(|e| classify(e, "unwrapping"))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn the_token_refusing_is_told_from_the_token_missing() {
        let denied = |rv| {
            matches!(
                classify(Error::Pkcs11(rv, Function::Login), "x"),
                KmsError::Denied(_)
            )
        };
        for rv in [
            RvError::PinIncorrect,
            RvError::PinLocked,
            RvError::KeyHandleInvalid,
            RvError::EncryptedDataInvalid,
        ] {
            assert!(denied(rv), "{rv:?}");
        }
        for rv in [
            RvError::DeviceError,
            RvError::TokenNotPresent,
            RvError::GeneralError,
        ] {
            assert!(!denied(rv), "{rv:?}");
        }
    }
}
