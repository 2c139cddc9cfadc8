//! The daemon's one policy for poisoned locks.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering from poisoning: a panic in one management operation (caught and
/// answered as an internal error) must not make every later one panic too. The state
/// behind these locks is left consistent by the operations' own ordering (checks first,
/// then one durable change), which is what poisoning would otherwise guard.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
