//! Lease secrets: how pool-managerd recognises a lease it granted when a client re-asserts it.
//!
//! A lease's secret is HMAC-SHA-256 over its id, pool and slots, keyed with this host's lease key
//! and cut to 128 bits. A client learns a secret only in the `Acquired` reply to its own
//! `Acquire`, so showing it in a `Hello` proves the lease is the client's; the pool and the slots
//! are signed too, so a lease cannot come back on another pool or at another size. Whether a
//! proven lease may come back at all (not released, not expired) is the registry's rule
//! (`state.rs`).
//!
//! The key lives in the state directory (`lease-key`, mode 0600, written durably) and outlives
//! restarts, so the leases a client re-asserts after a pool-managerd crash can still be proven.
//! Whoever can read the key can forge secrets: only pool-managerd's user may. Without a usable
//! key file the daemon runs with a key of its own run ([`LeaseSigner::ephemeral`]): re-assertions
//! after a reconnect still work, re-assertions after a restart are refused.

use hmac::{Hmac, KeyInit, Mac};
use pool_ipc::registry::{LeaseId, LeaseSecret, PoolId};
use sha2::Sha256;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// HMAC-SHA-256 takes a key of its block size without hashing it first.
const KEY_BYTES: usize = 64;
/// The key file's name in the state directory.
pub const KEY_FILE: &str = "lease-key";
/// Separates these MACs from anything else this key could ever sign.
const DOMAIN: &[u8] = b"pool-managerd lease secret v1\0";

#[derive(Debug, thiserror::Error)]
#[error("lease key {path}: {source}")]
pub struct KeyFileError {
    path: PathBuf,
    source: std::io::Error,
}

/// Signs and checks lease secrets. Cheap to use from the registry's actor: no I/O after loading.
#[derive(Clone)]
pub struct LeaseSigner {
    key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for LeaseSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseSigner(..)")
    }
}

impl LeaseSigner {
    pub fn from_key(key: [u8; KEY_BYTES]) -> LeaseSigner {
        LeaseSigner { key }
    }

    /// A key of this run only (nothing written).
    pub fn ephemeral() -> LeaseSigner {
        LeaseSigner::from_key(rand::random())
    }

    /// Reads `state_dir/lease-key`, or creates it (0600, synced, renamed into place) when it is
    /// missing or not a key; a key readable by others is made private again.
    pub fn load_or_create(state_dir: &Path) -> Result<LeaseSigner, KeyFileError> {
        let path = state_dir.join(KEY_FILE);
        let failed = |source| KeyFileError {
            path: path.clone(),
            source,
        };
        match read_key(&path) {
            Ok(Some(key)) => {
                let mode = std::fs::metadata(&path)
                    .map_err(failed)?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the lease key was readable by others; making it private (rotate it if others may have read it)");
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                        .map_err(failed)?;
                }
                return Ok(LeaseSigner::from_key(key));
            }
            Ok(None) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(failed(error)),
        }
        let key: [u8; KEY_BYTES] = rand::random();
        write_key(&path, &key).map_err(failed)?;
        tracing::info!(path = %path.display(), "created a new lease key");
        Ok(LeaseSigner::from_key(key))
    }

    pub fn sign(&self, lease: LeaseId, pool: &PoolId, slots: u32) -> LeaseSecret {
        let tag = self.mac(lease, pool, slots).finalize().into_bytes();
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&tag[..16]);
        LeaseSecret(secret)
    }

    /// Whether `secret` is the one [`Self::sign`] gives; compared in constant time.
    pub fn verify(&self, lease: LeaseId, pool: &PoolId, slots: u32, secret: &LeaseSecret) -> bool {
        self.mac(lease, pool, slots)
            .verify_truncated_left(&secret.0)
            .is_ok()
    }

    fn mac(&self, lease: LeaseId, pool: &PoolId, slots: u32) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&self.key.into());
        mac.update(DOMAIN);
        mac.update(&lease.0.to_le_bytes());
        mac.update(&slots.to_le_bytes());
        // Length first, so no two (pool, …) pairs share a message.
        mac.update(&(pool.as_str().len() as u64).to_le_bytes());
        mac.update(pool.as_str().as_bytes());
        mac
    }
}

/// `Ok(None)`: the file is there but is not a key (wrong size), and will be replaced.
fn read_key(path: &Path) -> std::io::Result<Option<[u8; KEY_BYTES]>> {
    let mut bytes = Vec::with_capacity(KEY_BYTES + 1);
    std::fs::File::open(path)?
        .take(KEY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    match <[u8; KEY_BYTES]>::try_from(bytes.as_slice()) {
        Ok(key) => Ok(Some(key)),
        Err(_) => {
            tracing::warn!(path = %path.display(), bytes = bytes.len(), "the lease key file is not a key; replacing it (leases from before this start cannot be re-asserted)");
            Ok(None)
        }
    }
}

/// Written whole or not at all, private (see [`crate::durable`]).
fn write_key(path: &Path, key: &[u8; KEY_BYTES]) -> std::io::Result<()> {
    crate::durable::write_file(path, key, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_proves_exactly_the_lease_it_was_signed_for() {
        let signer = LeaseSigner::from_key([7; KEY_BYTES]);
        let pool = PoolId::from("p");
        let secret = signer.sign(LeaseId(5), &pool, 2);
        assert!(signer.verify(LeaseId(5), &pool, 2, &secret));
        assert!(!signer.verify(LeaseId(6), &pool, 2, &secret), "another id");
        assert!(
            !signer.verify(LeaseId(5), &pool, 3, &secret),
            "another size"
        );
        assert!(
            !signer.verify(LeaseId(5), &PoolId::from("q"), 2, &secret),
            "another pool"
        );
        assert!(!signer.verify(LeaseId(5), &pool, 2, &LeaseSecret::default()));
        let other = LeaseSigner::from_key([8; KEY_BYTES]);
        assert!(!other.verify(LeaseId(5), &pool, 2, &secret), "another key");
    }

    #[test]
    fn the_key_file_is_created_private_and_read_back_on_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = LeaseSigner::load_or_create(&state).unwrap();
        let path = state.join(KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = LeaseSigner::load_or_create(&state).unwrap();
        assert_eq!(first.key, again.key);

        std::fs::write(&path, b"short").unwrap();
        let replaced = LeaseSigner::load_or_create(&state).unwrap();
        assert_ne!(replaced.key, first.key);
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_BYTES);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        LeaseSigner::load_or_create(&state).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
